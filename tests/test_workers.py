"""viewer.ai.workers: real engine analyses off the GUI thread; progress, cancel, supersede, errors."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("pytestqt")

from engine.errors import AnalysisCancelled  # noqa: E402
from viewer.ai.workers import AnalysisRunner, ModelInfoLoader, _default_analyze  # noqa: E402


@pytest.fixture(scope="module")
def demo_series(demo_dir):
    """The demo's series by role: chest CR, tibia CR, chest CT phantom."""
    from engine.service import open_path

    idx = open_path(demo_dir)
    series = idx.all_series()
    cr = [s for s in series if s.kind == "xray"]
    chest = next(s for s in cr if "tibia" not in s.series_description.lower())
    tibia = next(s for s in cr if "tibia" in s.series_description.lower())
    ct = next(s for s in series if s.kind == "ct")
    return {"xray": chest, "tibia": tibia, "ct": ct}


class Recorder:
    """The real engine call, recording how each run ended and in which thread it ran."""

    def __init__(self, fn=_default_analyze):
        self.fn = fn
        self.outcomes: list[tuple[str, str]] = []
        self.threads: list[int] = []

    def __call__(self, series, progress, cancel):
        self.threads.append(threading.get_ident())
        try:
            res = self.fn(series, progress, cancel)
        except AnalysisCancelled:
            self.outcomes.append((series.series_uid, "cancelled"))
            raise
        self.outcomes.append((series.series_uid, "done"))
        return res


def test_runner_returns_real_result_off_gui_thread(qtbot, demo_series):
    rec = Recorder()
    runner = AnalysisRunner(rec)
    progress: list[tuple[float, str]] = []
    busy: list[bool] = []
    runner.progress.connect(lambda f, m: progress.append((f, m)))
    runner.busy_changed.connect(busy.append)
    s = demo_series["xray"]
    with qtbot.waitSignal(runner.result, timeout=180_000) as blocker:
        runner.submit(s)
    res = blocker.args[0]
    assert res.series_uid == s.series_uid and res.kind == "xray"
    assert res.models and res.models[0].name == "xray-densenet121"
    assert rec.threads and threading.get_ident() not in rec.threads   # never on the GUI thread
    assert progress and 0.0 <= progress[0][0] <= 1.0
    assert busy == [True, False] and not runner.is_busy()
    runner.shutdown()


def test_cancel_stops_the_engine(qtbot, demo_series):
    """Cancel at the first progress report of a CT analysis: the engine raises AnalysisCancelled."""
    rec = Recorder()
    runner = AnalysisRunner(rec)
    results: list = []
    runner.result.connect(results.append)
    runner.progress.connect(lambda *_: runner.cancel())
    s = demo_series["ct"]
    with qtbot.waitSignal(runner.cancelled, timeout=60_000) as blocker:
        runner.submit(s)
    assert blocker.args == [s.series_uid]
    assert runner.wait(120_000)
    qtbot.wait(50)
    assert rec.outcomes == [(s.series_uid, "cancelled")], rec.outcomes
    assert results == [] and not runner.is_busy()


def test_cancel_flag_reaches_engine(qtbot, demo_series):
    """The GUI's cancel is the flag the engine polls: set before the engine starts, no model runs."""
    entered, gate = threading.Event(), threading.Event()
    rec = Recorder()

    def held(series, progress, cancel):
        entered.set()
        gate.wait(30)
        return rec(series, progress, cancel)

    runner = AnalysisRunner(held)
    results: list = []
    runner.result.connect(results.append)
    runner.submit(demo_series["xray"])
    assert entered.wait(30)
    runner.cancel()
    gate.set()
    assert runner.wait(60_000)
    qtbot.wait(50)
    assert rec.outcomes == [(demo_series["xray"].series_uid, "cancelled")]
    assert results == []


def test_newer_request_supersedes_older(qtbot, demo_series):
    rec = Recorder()
    runner = AnalysisRunner(rec)
    results: list = []
    runner.result.connect(results.append)
    a, b = demo_series["ct"], demo_series["tibia"]
    runner.submit(a)
    qtbot.wait(20)
    with qtbot.waitSignal(runner.result, timeout=180_000):
        runner.submit(b)
    assert runner.wait(120_000)
    qtbot.wait(50)
    assert [r.series_uid for r in results] == [b.series_uid]
    # The older run either stopped at a cancel poll or finished and was dropped as stale.
    first = [o for o in rec.outcomes if o[0] == a.series_uid]
    assert first and (first[0][1] == "cancelled" or runner.stale_results == 1)
    assert results[0].validity.passed is False     # the tibia fails the chest gate


def test_exception_becomes_error_message(qtbot):
    from engine.ai.models.registry import load_model

    def broken(series, progress, cancel):
        return load_model("no-such-model")        # a real ModelError from the registry

    runner = AnalysisRunner(broken)
    with qtbot.waitSignal(runner.error, timeout=30_000) as blocker:
        runner.submit(object())
    msg = blocker.args[0]
    assert "ModelError" in msg and "no-such-model" in msg and "Run" in msg
    assert not runner.is_busy()


def test_model_info_loader_reads_cards(qtbot):
    loader = ModelInfoLoader()
    with qtbot.waitSignal(loader.loaded, timeout=120_000) as blocker:
        loader.start()
    infos, err = blocker.args
    assert err is None
    assert {m.name for m in infos} >= {"xray-densenet121", "ct-inception"}
