"""GUI worklist (pytest-qt, offscreen): the real batch review in a worker thread, the triage table
sorted by score / severity / validity, cancel, and double-click opening the series in the viewer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from engine.dicom.records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord  # noqa: E402
from engine.review.report import build_row  # noqa: E402
from engine.results import Finding, ModelInfo, Severity, StudyResult, Validity  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_batch import _xray_folder  # noqa: E402

M = ModelInfo("xray-densenet121", "1.0.0", True, "00" * 32)


def _row(uid: str, score: float | None, extent: float | None, valid: bool) -> dict:
    se = SeriesRecord(uid, "1.9", "P1", "CR", 1, f"series {uid}", "CHEST", "PA",
                      instances=[InstanceRecord(f"/x/{uid}.dcm", uid + ".1", 1)])
    st, pt = StudyRecord("1.9", "P1", "20200101"), PatientRecord("P1", "Test^Patient")
    findings = [] if score is None else [Finding("Lung Opacity", score, 0.5, valid and score >= 0.5, M.name, M.version)]
    sev = None if extent is None else Severity(extent, extent / 2, 0.0, M.name, M.version)
    res = StudyResult("1.9", uid, "CR", "xray", Validity(valid, [] if valid else ["not chest"]), findings=findings,
                      severity=sev, models=[M])
    return build_row(pt, st, se, res)


def _order(dlg) -> list[str]:
    return [dlg.series_uid_at(i) for i in range(dlg.table.rowCount())]


def test_table_sorts_by_score_severity_and_validity(qtbot):
    from viewer.browse.worklist import COL_SCORE, COL_SEVERITY, COL_VALIDITY, WorklistDialog

    dlg = WorklistDialog(None)
    qtbot.addWidget(dlg)
    dlg._add_study({"rows": [_row("1.1", 0.20, 6.5, True), _row("1.2", 0.90, 1.0, True),
                             _row("1.3", None, None, False), _row("1.4", 0.55, 3.0, False)]})
    assert dlg.table.rowCount() == 4
    assert _order(dlg) == ["1.2", "1.4", "1.1", "1.3"]          # default: score, highest first
    dlg.table.sortItems(COL_SEVERITY, Qt.SortOrder.DescendingOrder)
    assert _order(dlg) == ["1.1", "1.4", "1.2", "1.3"]
    dlg.table.sortItems(COL_VALIDITY, Qt.SortOrder.AscendingOrder)
    assert set(_order(dlg)[:2]) == {"1.3", "1.4"}               # failed gate first when ascending
    dlg.table.sortItems(COL_SCORE, Qt.SortOrder.AscendingOrder)
    assert _order(dlg) == ["1.3", "1.1", "1.4", "1.2"]
    # a study that is reported again (resume) updates its rows instead of duplicating them
    dlg._add_study({"rows": [_row("1.3", 0.99, 7.0, True)]})
    assert dlg.table.rowCount() == 4
    dlg.table.sortItems(COL_SCORE, Qt.SortOrder.DescendingOrder)
    assert _order(dlg)[0] == "1.3"


def test_worklist_reviews_a_folder_and_double_click_opens_the_series(qtbot, demo_dir, tmp_path, monkeypatch,
                                                                     artifacts_dir):
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))
    inp = _xray_folder(demo_dir, tmp_path / "in", 1)
    win = MainWindow(SettingsStore(tmp_path / "viewer.ini"))
    qtbot.addWidget(win)
    try:
        _review_and_open(qtbot, win, inp, monkeypatch, tmp_path, artifacts_dir)
    finally:  # no background thread (index, thumbnails, AI auto-run) may outlive the window
        ai = getattr(win, "ai", None)
        if ai is not None and hasattr(ai, "shutdown"):
            ai.shutdown()
        win.close()
        win.runner.wait_done(30_000)


def _review_and_open(qtbot, win, inp, monkeypatch, tmp_path, artifacts_dir) -> None:
    from viewer.browse.worklist import COL_VALIDITY, WorklistDialog, open_worklist

    dlg = open_worklist(win)
    assert isinstance(dlg, WorklistDialog) and open_worklist(win) is dlg     # one dialog per window
    assert dlg.start(inp, workers=1)
    qtbot.waitUntil(lambda: dlg.summary is not None, timeout=600_000)
    assert not dlg.summary.cancelled and dlg.summary.studies_done == 2
    assert dlg.table.rowCount() == 2 and dlg.progress.value() == 2
    assert dlg.summary.report_html.is_file() and Path(dlg.summary.out).is_relative_to(tmp_path / "home")
    dlg.table.sortItems(COL_VALIDITY, Qt.SortOrder.AscendingOrder)
    tibia_uid = dlg.series_uid_at(0)
    assert dlg.table.item(0, 4).text() == "invalid" and dlg.table.item(1, 4).text() == "ok"
    assert dlg.grab().save(str(artifacts_dir / "worklist.png"))          # for humans

    calls: list[tuple] = []
    real_open, real_select = win.open_path, win.select_series
    monkeypatch.setattr(win, "open_path", lambda *a, **k: (calls.append(("open", a[0])), real_open(*a, **k))[1])
    monkeypatch.setattr(win, "select_series", lambda uid: (calls.append(("select", uid)), real_select(uid))[1])
    rect = dlg.table.visualItemRect(dlg.table.item(0, 1))
    qtbot.mouseClick(dlg.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())   # Qt 6 needs
    qtbot.mouseDClick(dlg.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())  # press + dbl
    def _shown() -> bool:
        assert calls, "double-click did not reach the main window"
        return win.current_series is not None and win.current_series.series_uid == tibia_uid

    qtbot.waitUntil(_shown, timeout=60_000)
    assert calls[0] == ("open", str(inp)) and ("select", tibia_uid) in calls

    # a second review of the same folder resumes from its journal: nothing is recomputed
    assert dlg.start(inp, workers=1)
    qtbot.waitUntil(lambda: dlg.summary is not None, timeout=600_000)
    assert (dlg.summary.studies_done, dlg.summary.studies_skipped) == (0, 2) and dlg.table.rowCount() == 2
    dlg.close()


def test_cancel_stops_the_review(qtbot, demo_dir, tmp_path):
    from viewer.browse.worklist import WorklistDialog

    inp = _xray_folder(demo_dir, tmp_path / "in", 2)
    dlg = WorklistDialog(None)
    qtbot.addWidget(dlg)
    assert dlg.start(inp, out=tmp_path / "out", workers=1)
    assert not dlg.start(inp, out=tmp_path / "out")          # one review at a time
    dlg.cancel()
    qtbot.waitUntil(lambda: dlg.summary is not None, timeout=600_000)
    assert dlg.summary.cancelled and dlg.summary.studies_done < 3
    assert dlg.start_btn.isEnabled() and not dlg.cancel_btn.isEnabled()
    assert "Cancelled" in dlg.status.text()
