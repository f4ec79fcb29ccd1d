"""viewer.qt_workers: deleting a widget never waits for its background tasks.

A QThreadPool parented to a widget is deleted with it; ``QThreadPool::~QThreadPool`` then waits for
running tasks in the GUI thread, which holds the GIL, while the task needs the GIL to return from
its Python ``run``: the GUI hangs forever (seen as a frozen test run in the full suite, where a
deferred delete of an earlier test's view ran inside ``QTest.qWaitForWindowExposed``).
"""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("pytestqt")

import shiboken6  # noqa: E402
from PySide6.QtCore import QObject, QRunnable  # noqa: E402

from viewer.qt_workers import TaskRunner, _OWNED_POOLS, drain_pools, owned_pool  # noqa: E402


class _Sleeper(QRunnable):
    def __init__(self, started: threading.Event, seconds: float):
        super().__init__()
        self.started, self.seconds, self.done = started, seconds, threading.Event()

    def run(self) -> None:
        self.started.set()
        time.sleep(self.seconds)          # releases the GIL; returning needs it again
        self.done.set()


@pytest.mark.timeout(60)
def test_deleting_the_owner_while_a_task_runs_returns_at_once(qapp):
    owner = QObject()
    pool = owned_pool(owner, 1)
    started = threading.Event()
    task = _Sleeper(started, 0.5)
    task.setAutoDelete(False)
    pool.start(task)
    assert started.wait(10)
    t0 = time.monotonic()
    shiboken6.delete(owner)               # C++ delete from this thread, GIL held
    assert time.monotonic() - t0 < 0.4    # did not wait for the task (it sleeps 0.5 s)
    assert pool.waitForDone(10000) and task.done.is_set()
    owned_pool(QObject(), 1)              # creating a pool releases idle orphans
    assert all(p is not pool for _, p in _OWNED_POOLS)


@pytest.mark.timeout(60)
def test_drain_waits_for_the_pools_of_the_owner_and_its_children(qapp):
    window = QObject()
    runner = TaskRunner(QObject(window))  # a grandchild's pool counts
    other = TaskRunner()
    hits: list[str] = []
    runner.submit(lambda: (time.sleep(0.2), hits.append("child")))
    other.submit(lambda: (time.sleep(1.5), hits.append("other")))
    assert drain_pools(window, 5000)
    assert hits == ["child"]              # the unrelated runner was not waited for
    assert other.wait_done(10000)
