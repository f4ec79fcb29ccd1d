"""Background AI analysis: one worker thread, progress, cancel and supersede (DESIGN.md 3).

Why a QThreadPool with one thread: the engine caches its models at module level, and two
analyses at once would double memory and fight for the same cores; a newer request therefore
cancels the older one (the engine polls the cancel flag) and runs as soon as it has stopped.
Late results of superseded requests are dropped by request id, so the panel never shows a
result that belongs to a series the user has already left.

The analysis function is imported *inside* the worker (``engine.service.analyze_series``); the
engine runs the models in its AI process (engine.ai.host), so the viewer never imports torch and the
worker thread only waits on a pipe.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, Qt, Signal

from engine.errors import AnalysisCancelled
from viewer.qt_workers import owned_pool

AnalyzeFn = Callable[[Any, Callable[[float, str], None], Callable[[], bool]], Any]


WORKER_NICE = int(os.environ.get("CHESTVIEW_WORKER_NICE", "5"))


def lower_thread_priority(nice: int | None = None) -> None:
    """Let the GUI thread win the CPU over model work (2 cores: torch would take both).

    Linux: ``setpriority`` on the native thread id changes only this thread, and torch's
    intra-op threads created from it inherit the value. Elsewhere: Qt's thread priority.
    Best effort, never fails.
    """
    nice = WORKER_NICE if nice is None else nice
    if nice <= 0:
        return
    try:
        if hasattr(os, "setpriority") and sys.platform.startswith("linux"):
            tid = threading.get_native_id()
            cur = os.getpriority(os.PRIO_PROCESS, tid)
            if cur < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        else:
            from PySide6.QtCore import QThread

            QThread.currentThread().setPriority(QThread.Priority.LowPriority)
    except Exception:  # noqa: BLE001 - priority is an optimisation only
        pass


def install_gui_wait_hook() -> None:
    """While the GUI thread waits for the engine's sandboxed decoder (the displayed image, its
    header), keep serving timers and paint events, so the window repaints and answers within one
    hook period even when a hostile file runs into the decoder's time limit. User input waits
    (ExcludeUserInputEvents): a click cannot start a second display while the first is pending.
    Call once, from the GUI thread."""
    from PySide6.QtCore import QCoreApplication, QEventLoop

    from engine.service import set_wait_hook

    flags = QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents

    def hook() -> None:
        QCoreApplication.processEvents(flags, 15)

    set_wait_hook(hook)


def warm_up_decoder() -> None:
    """Start the sandboxed decode processes (worker thread, at startup): the first image then
    does not wait for them."""
    from engine.service import warm_up

    warm_up()


def _default_analyze(series: Any, progress: Callable[[float, str], None],
                     cancel: Callable[[], bool], volume: Any = None) -> Any:
    """engine.service.analyze_series (or analyze_volume when the viewer already loaded the CT),
    imported lazily; the models run in the engine's AI process (engine.ai.host)."""
    if volume is not None:
        from engine.service import analyze_volume

        return analyze_volume(series, volume, progress=progress, cancel=cancel)
    from engine.service import analyze_series

    return analyze_series(series, progress=progress, cancel=cancel)


@dataclass
class AnalysisRequest:
    """One queued analysis; ``cancel_event`` is the flag the engine polls via ``cancel()``."""

    request_id: int
    series: Any
    volume: Any = None            # a CT Volume the viewer already loaded (not read twice)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    @property
    def series_uid(self) -> str:
        return str(getattr(self.series, "series_uid", ""))

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class _Bridge(QObject):
    """Lives in the GUI thread; the worker emits through it (queued across threads by Qt)."""

    progress = Signal(int, float, str)
    finished = Signal(int, object)
    failed = Signal(int, str)
    cancelled = Signal(int)
    started = Signal(int)


class _AnalysisJob(QRunnable):
    """Runs one request; every outcome becomes exactly one signal, never an exception."""

    def __init__(self, request: AnalysisRequest, analyze: AnalyzeFn, bridge: _Bridge,
                 progress_interval_s: float = 0.05):
        super().__init__()
        self.setAutoDelete(True)
        self.request = request
        self.analyze = analyze
        self.bridge = bridge
        self.progress_interval_s = progress_interval_s
        self._last_progress = 0.0

    def _emit(self, name: str, *args: Any) -> None:
        try:
            getattr(self.bridge, name).emit(*args)
        except RuntimeError:  # the runner was deleted while we ran (window closed): nothing to tell
            pass

    def _progress(self, fraction: float, message: str) -> None:
        # Throttled: a chatty engine must not flood the GUI thread's event queue.
        now = time.monotonic()
        if now - self._last_progress >= self.progress_interval_s or fraction >= 1.0:
            self._last_progress = now
            self._emit("progress", self.request.request_id, float(fraction), str(message))

    def run(self) -> None:  # noqa: D102 - QRunnable entry point, worker thread
        lower_thread_priority()
        rid = self.request.request_id
        if self.request.cancelled():
            self._emit("cancelled", rid)
            return
        self._emit("started", rid)
        try:
            extra = {"volume": self.request.volume} if self.request.volume is not None else {}
            result = self.analyze(self.request.series, self._progress, self.request.cancelled, **extra)
        except AnalysisCancelled:
            self._emit("cancelled", rid)
            return
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes a panel message
            logging.getLogger(__name__).debug("analysis failed", exc_info=True)
            msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._emit("failed", rid, f"Analysis failed: {msg}. Run it again with the Run button; if it "
                       "keeps failing, check the model files with 'python main.py selftest'.")
            return
        if self.request.cancelled():
            self._emit("cancelled", rid)
            return
        self._emit("finished", rid, result)


class AnalysisRunner(QObject):
    """Queue of at most one live analysis; signals carry only results of the *current* request.

    Signals (GUI thread): ``started(str series_uid)``, ``progress(float, str)``,
    ``result(object StudyResult)``, ``error(str)``, ``cancelled(str series_uid)``, ``busy_changed(bool)``.
    """

    started = Signal(str)
    progress = Signal(float, str)
    result = Signal(object)
    error = Signal(str)
    cancelled = Signal(str)
    busy_changed = Signal(bool)

    def __init__(self, analyze: AnalyzeFn | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.analyze_fn: AnalyzeFn = analyze or _default_analyze   # replaceable (benchmarks, tests)
        self._pool = owned_pool(self, 1)
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)
        self._bridge.finished.connect(self._on_finished)
        self._bridge.failed.connect(self._on_failed)
        self._bridge.cancelled.connect(self._on_cancelled)
        self._bridge.started.connect(self._on_started)
        self._next_id = 0
        self._current: AnalysisRequest | None = None
        self._live: dict[int, AnalysisRequest] = {}   # submitted and not yet reported back
        self.stale_results = 0                          # late results of superseded requests dropped
        self.last_series_uid: str | None = None         # series of the last error (for its receiver)

    # -- public API -------------------------------------------------------------------------
    @property
    def current(self) -> AnalysisRequest | None:
        return self._current

    def is_busy(self) -> bool:
        return self._current is not None

    def submit(self, series: Any, volume: Any = None) -> int:
        """Queue ``series`` (with its loaded CT ``volume`` if any); an older request is cancelled
        and its late result ignored."""
        self._cancel_all_live()
        self._next_id += 1
        req = AnalysisRequest(self._next_id, series, volume)
        was_busy = self._current is not None
        self._current = req
        self._live[req.request_id] = req
        self._pool.start(_AnalysisJob(req, self.analyze_fn, self._bridge))
        if not was_busy:
            self.busy_changed.emit(True)
        return req.request_id

    def cancel(self) -> None:
        """Cancel the current request (the engine stops at its next cancel poll)."""
        req = self._current
        self._cancel_all_live()
        if req is not None:
            self._current = None
            self.cancelled.emit(req.series_uid)
            self.busy_changed.emit(False)

    def wait(self, msecs: int = 30000) -> bool:
        """Block until the worker thread is idle (tests, shutdown)."""
        return self._pool.waitForDone(msecs)

    def shutdown(self, msecs: int = 10000) -> None:
        """Cancel everything and wait for the worker (call before the window is destroyed)."""
        self._cancel_all_live()
        self._current = None
        self._pool.clear()
        self._pool.waitForDone(msecs)

    # -- internals --------------------------------------------------------------------------
    def _cancel_all_live(self) -> None:
        for req in self._live.values():
            req.cancel_event.set()

    def _is_current(self, rid: int) -> bool:
        return self._current is not None and self._current.request_id == rid

    def _done(self, rid: int) -> AnalysisRequest | None:
        self._live.pop(rid, None)
        if self._is_current(rid):
            req, self._current = self._current, None
            self.busy_changed.emit(False)
            return req
        return None

    def _on_started(self, rid: int) -> None:
        if self._is_current(rid):
            self.started.emit(self._current.series_uid)

    def _on_progress(self, rid: int, fraction: float, message: str) -> None:
        if self._is_current(rid):
            self.progress.emit(fraction, message)

    def _on_finished(self, rid: int, result: Any) -> None:
        if self._done(rid) is None:
            self.stale_results += 1
            return
        self.result.emit(result)

    def _on_failed(self, rid: int, message: str) -> None:
        req = self._done(rid)
        if req is not None:
            self.last_series_uid = req.series_uid
            self.error.emit(message)

    def _on_cancelled(self, rid: int) -> None:
        req = self._done(rid)
        if req is not None:
            self.cancelled.emit(req.series_uid)


class _InfoBridge(QObject):
    done = Signal(object, object)      # (value, error message or None)


class _CallJob(QRunnable):
    def __init__(self, fn: Callable[[], Any], bridge: _InfoBridge):
        super().__init__()
        self.fn, self.bridge = fn, bridge

    def run(self) -> None:  # noqa: D102 - worker thread
        lower_thread_priority()
        try:
            value, err = self.fn(), None
        except Exception as exc:  # noqa: BLE001 - reported as text
            value, err = None, f"{type(exc).__name__}: {exc}"
        try:
            self.bridge.done.emit(value, err)
        except RuntimeError:
            pass


def _model_infos() -> Any:
    from engine.service import model_infos

    return model_infos()


class ModelInfoLoader(QObject):
    """Reads the model cards off the GUI thread: the registry runs in the engine's AI process
    (engine.ai.host), which may still be starting, so the answer can take seconds.

    Signal ``loaded(list[ModelInfo] | None, str | None)``.
    """

    loaded = Signal(object, object)

    def __init__(self, fn: Callable[[], Any] | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self._fn = fn or _model_infos
        self._pool = owned_pool(self, 1)
        self._bridge = _InfoBridge()
        self._bridge.done.connect(self.loaded)

    def start(self) -> None:
        self._pool.start(_CallJob(self._fn, self._bridge))

    def wait(self, msecs: int = 30000) -> bool:
        return self._pool.waitForDone(msecs)


class StallMeter(QObject):
    """Measures GUI event-loop stalls: a 5 ms precise QTimer records the gap between its ticks.

    A gap much longer than the interval means the GUI thread could not run (blocked, or the GIL
    held by a worker inside a long C call). ``mark(text)`` labels the current phase (e.g. the
    engine's progress message) so the worst gap can be attributed; with ``capture_stacks`` the
    other threads' innermost frames are sampled right after a long gap (the call that just
    returned and released the GIL is usually on that line). Diagnostic only: no assertions.
    """

    def __init__(self, interval_ms: int = 5, long_gap_ms: float = 50.0, capture_stacks: bool = False,
                 parent: QObject | None = None):
        super().__init__(parent)
        from PySide6.QtCore import QElapsedTimer, QTimer

        self.interval_ms = interval_ms
        self.long_gap_ms = long_gap_ms
        self.capture_stacks = capture_stacks
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)
        self._clock = QElapsedTimer()
        self._last_ns = 0
        self.gaps_ms: list[float] = []
        self.labels: list[str] = []
        self.long_gaps: list[tuple[float, str, str]] = []   # (gap ms, phase label, sampled stacks)
        self.phase = ""

    def start(self) -> None:
        self.gaps_ms, self.labels, self.long_gaps = [], [], []
        self._clock.start()
        self._last_ns = self._clock.nsecsElapsed()
        self._timer.start()

    def stop(self) -> dict[str, Any]:
        self._timer.stop()
        return self.summary()

    def mark(self, text: str) -> None:
        self.phase = text

    def _tick(self) -> None:
        now = self._clock.nsecsElapsed()
        gap = (now - self._last_ns) / 1e6
        self._last_ns = now
        self.gaps_ms.append(gap)
        self.labels.append(self.phase)
        if gap >= self.long_gap_ms:
            self.long_gaps.append((gap, self.phase, self._stacks() if self.capture_stacks else ""))

    @staticmethod
    def _stacks() -> str:
        import sys
        import traceback as tb

        me = threading.get_ident()
        out = []
        for tid, frame in sys._current_frames().items():
            if tid == me:
                continue
            frames = [f for f in tb.extract_stack(frame) if "/engine/" in f.filename or "torch" in f.filename]
            if frames:
                out.append(" <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:"
                                       f"{f.lineno} {f.name}" for f in reversed(frames[-4:])))
        return " | ".join(out)

    def summary(self) -> dict[str, Any]:
        g = sorted(self.gaps_ms)
        if not g:
            return {"ticks": 0, "max_ms": 0.0, "p99_ms": 0.0, "over_50ms": 0, "worst_phase": ""}
        worst = max(range(len(self.gaps_ms)), key=self.gaps_ms.__getitem__)
        return {"ticks": len(g), "max_ms": g[-1], "p99_ms": g[min(len(g) - 1, int(0.99 * len(g)))],
                "median_ms": g[len(g) // 2], "over_50ms": sum(1 for x in g if x > 50.0),
                "worst_phase": self.labels[worst]}
