"""A small generic QThreadPool runner: run a callable off the GUI thread, get result/error/progress
back as queued signals on the GUI thread (used for indexing, thumbnails and volume loading).

The AI analysis has its own runner (viewer/ai/workers.py); this one stays generic.
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
        self.pool = owned_pool(self, max_threads)
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


# Every worker pool of the viewer, unparented: (weak reference to its owner, pool). A pool is released
# only once its owner is gone and no task of it runs, so no QThreadPool destructor ever waits.
_OWNED_POOLS: list[tuple[Any, QThreadPool]] = []


def _owner_alive(ref: Any) -> bool:
    import shiboken6

    obj = ref()
    return obj is not None and shiboken6.isValid(obj)


def _release_idle_orphans() -> None:
    keep = []
    for ref, pool in _OWNED_POOLS:
        if _owner_alive(ref):
            keep.append((ref, pool))
            continue
        pool.clear()                                   # an orphan starts nothing new
        if pool.activeThreadCount() > 0:
            keep.append((ref, pool))
    _OWNED_POOLS[:] = keep


def owned_pool(owner: QObject, max_threads: int | None = None) -> QThreadPool:
    """A QThreadPool for ``owner``'s background work that is never deleted together with ``owner``.

    Qt's ``QThreadPool::~QThreadPool`` waits for running tasks in the deleting thread. A pool parented
    to a widget is deleted with it, from the GUI thread holding the GIL (a deferred delete runs inside
    any event processing, e.g. ``QTest.qWaitForWindowExposed``); a task that still needs the GIL, even
    just to enter its Python ``run``, then never finishes and the GUI thread hangs forever. This pool
    has no parent: it is kept here and released only after ``owner`` is gone and the pool is idle."""
    import weakref

    _release_idle_orphans()
    pool = QThreadPool()
    if max_threads:
        pool.setMaxThreadCount(max_threads)
    _OWNED_POOLS.append((weakref.ref(owner), pool))
    return pool


def _owned_by(owner: QObject, ref: Any) -> bool:
    import shiboken6

    obj = ref()
    while obj is not None and shiboken6.isValid(obj):
        if obj is owner:
            return True
        obj = obj.parent()
    return False


def drain_pools(owner: QObject, msecs: int = 10000) -> bool:
    """Before ``owner`` closes: cancel its runners' work, drop queued tasks of every pool owned by
    ``owner`` or its descendants and give running ones ``msecs`` in all (``waitForDone`` releases the
    GIL). Returns whether all finished; the rest finish on their own (their pools outlive ``owner``)."""
    from PySide6.QtCore import QElapsedTimer

    for r in owner.findChildren(TaskRunner):
        r.cancel_all()
    pools = [pool for ref, pool in _OWNED_POOLS if _owned_by(owner, ref)]
    for pool in pools:
        pool.clear()
    clock = QElapsedTimer()
    clock.start()
    finished = [pool.waitForDone(max(1, msecs - int(clock.elapsed()))) for pool in pools]   # each one waited on
    return all(finished)


def wait_for_all_pools(msecs: int = 30000) -> bool:
    """At exit: give the last running tasks time to finish (the GIL released while waiting)."""
    ok = all([pool.waitForDone(msecs) for _, pool in _OWNED_POOLS])      # each one waited on
    _release_idle_orphans()
    return ok
