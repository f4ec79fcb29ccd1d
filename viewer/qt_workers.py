"""A small generic QThreadPool runner: run a callable off the GUI thread, get result/error/progress
back as queued signals on the GUI thread (used for indexing, thumbnails and volume loading).

The AI analysis has its own runner (viewer/workers.py); this one stays generic.
"""
from __future__ import annotations

import threading
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot


class WorkerSignals(QObject):
    result = Signal(object)
    error = Signal(object)          # the exception instance (traceback text on .__cv_traceback__)
    progress = Signal(float, str)
    finished = Signal()


class FunctionWorker(QRunnable):
    """Runs ``fn(*args, **kwargs)`` in the pool. With ``with_progress``/``with_cancel`` the callable
    also gets ``progress=(fraction, text) -> None`` / ``cancel=() -> bool`` keyword arguments."""

    def __init__(self, fn: Callable[..., Any], *args, with_progress: bool = False,
                 with_cancel: bool = False, **kwargs):
        super().__init__()
        self.setAutoDelete(False)      # the runner owns the Python object until `finished`
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.signals = WorkerSignals()
        self._cancel = threading.Event()
        if with_progress:
            self.kwargs["progress"] = self._progress
        if with_cancel:
            self.kwargs["cancel"] = self._cancel.is_set

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _progress(self, fraction: float, text: str = "") -> None:
        try:
            self.signals.progress.emit(float(fraction), str(text))
        except RuntimeError:       # signals object already gone (window closed)
            pass

    @Slot()
    def run(self) -> None:
        try:
            out = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as a signal
            exc.__cv_traceback__ = traceback.format_exc()  # type: ignore[attr-defined]
            self._emit(self.signals.error, exc)
        else:
            self._emit(self.signals.result, out)
        self._emit(self.signals.finished)

    @staticmethod
    def _emit(sig, *args) -> None:
        try:
            sig.emit(*args)
        except RuntimeError:
            pass


class TaskRunner(QObject):
    """Submit callables; keeps each worker alive until its `finished` signal reached the GUI thread."""

    def __init__(self, parent: QObject | None = None, max_threads: int | None = None):
        super().__init__(parent)
        self.pool = QThreadPool(self)
        if max_threads:
            self.pool.setMaxThreadCount(max_threads)
        self._live: set[FunctionWorker] = set()

    def submit(self, fn: Callable[..., Any], *args, on_result: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None,
               on_progress: Callable[[float, str], None] | None = None,
               with_cancel: bool = False, priority: int = 0, **kwargs) -> FunctionWorker:
        w = FunctionWorker(fn, *args, with_progress=on_progress is not None, with_cancel=with_cancel, **kwargs)
        if on_result is not None:
            w.signals.result.connect(on_result)
        if on_error is not None:
            w.signals.error.connect(on_error)
        if on_progress is not None:
            w.signals.progress.connect(on_progress)
        w.signals.finished.connect(lambda w=w: self._live.discard(w))
        self._live.add(w)
        self.pool.start(w, priority)
        return w

    def active(self) -> int:
        return len(self._live)

    def cancel_all(self) -> None:
        for w in list(self._live):
            w.cancel()

    def wait_done(self, msecs: int = 30000) -> bool:
        """Block until the pool is idle (tests, shutdown). Queued signals still need the event loop."""
        return self.pool.waitForDone(msecs)


# Pools whose tasks were still running when their owner closed: kept alive here (unparented) so
# that no C++ QThreadPool destructor runs with the GIL held while a task still needs it.
_PARKED_POOLS: list[QThreadPool] = []


def drain_pools(owner: QObject, msecs: int = 10000) -> int:
    """Stop every QThreadPool under ``owner`` before it is destroyed; returns how many were parked.

    Qt's ``QThreadPool::~QThreadPool`` waits for running tasks in the deleting thread. Deleted from
    Python that thread holds the GIL, so a task that still needs the GIL (a decode waiting for its
    child process, a Python callback) never finishes: the deletion hangs forever. Queued tasks are
    dropped, running ones get ``msecs`` in all (``waitForDone`` releases the GIL); any still running
    then is detached from ``owner`` and parked until it is idle, so closing never blocks."""
    from PySide6.QtCore import QElapsedTimer

    _PARKED_POOLS[:] = [p for p in _PARKED_POOLS if p.activeThreadCount() > 0]
    pools = owner.findChildren(QThreadPool)
    for r in owner.findChildren(TaskRunner):
        r.cancel_all()
    for p in pools:
        p.clear()
    clock = QElapsedTimer()
    clock.start()
    parked = 0
    for p in pools:
        if not p.waitForDone(max(1, msecs - int(clock.elapsed()))):
            p.setParent(None)
            _PARKED_POOLS.append(p)
            parked += 1
    return parked


def wait_parked_pools(msecs: int = 30000) -> bool:
    """At exit: give parked pools' last tasks time to finish (the GIL released while waiting)."""
    ok = all(p.waitForDone(msecs) for p in _PARKED_POOLS)
    if ok:
        _PARKED_POOLS.clear()
    return ok
