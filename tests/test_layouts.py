"""Viewport layouts, drag and drop from the study browser, linked scroll/zoom/W-L and the default
chest hanging in the main window (pytest-qt, offscreen)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from tests.priors_data import main_window, write_cr_studies, write_ct_studies


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Two patients: three CR studies (RG1 copies) and two small phantom CTs 30 mm apart in z."""
    root = tmp_path_factory.mktemp("priors")
    cr, ct = root / "cr", root / "ct"
    write_cr_studies(cr, "LAY-CR", ["20240105", "20240620", "20240312"])
    write_ct_studies(ct, "LAY-CT", ["20230101", "20240101"], n_slices=16, z_shift_mm=30.0)
    return {"cr": cr, "ct": ct}


@pytest.fixture()
def win(qapp, tmp_path, monkeypatch):
    yield from main_window(qapp, tmp_path, monkeypatch, auto_run=False, size=(1400, 900))


def _open(win, folder: Path, qtbot) -> None:
    win.open_path(folder, wait=True)
    win.wait_idle()
    qtbot.waitUntil(lambda: not win.viewports.loading(), timeout=30000)
    win.wait_idle()


def _drop(target, uid: str) -> bool:
    md = QMimeData()
    from viewer.view.layouts import SERIES_MIME

    md.setData(SERIES_MIME, uid.encode())
    pos = QPointF(target.width() / 2, target.height() / 2)
    enter = QDragEnterEvent(pos.toPoint(), Qt.DropAction.CopyAction, md, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(target, enter)       # Qt delivers a drop only after an accepted enter
    if not enter.isAccepted():
        return False
    ev = QDropEvent(pos, Qt.DropAction.CopyAction, md, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(target, ev)
    return ev.isAccepted()


def test_layout_actions_toolbar_menu_and_shortcuts(win):
    g = win.viewports
    assert g.layout_name() == "1x1" and len(g.visible_viewports()) == 1
    acts = win.hanging.layout_actions
    assert [acts[n].shortcut().toString() for n in ("1x1", "1x2", "2x1", "2x2")] == ["Alt+1", "Alt+2", "Alt+3", "Alt+4"]
    for name, n in (("2x2", 4), ("2x1", 2), ("1x2", 2), ("1x1", 1)):
        acts[name].trigger()
        assert g.layout_name() == name and len(g.visible_viewports()) == n
        assert all(vp.isVisible() for vp in g.visible_viewports())
        assert not any(vp.isVisible() for vp in g.viewports[n:])
    assert acts["2x2"] in win.toolbar.actions() and win.hanging.act_sync in win.toolbar.actions()
    view_menu = next(a.menu() for a in win.menuBar().actions() if a.text().replace("&", "") == "View")
    layout_menu = next(a.menu() for a in view_menu.actions() if a.menu() and "Layout" in a.text())
    assert acts["2x2"] in layout_menu.actions()
    rows = dict((v, k) for k, v in win.shortcut_rows())
    assert rows["Layout 2×2"] == "Alt+4"


def test_ct_prior_hung_beside_and_scroll_linked_by_position_not_index(win, qtbot, studies):
    _open(win, studies["ct"], qtbot)
    g = win.viewports
    assert g.layout_name() == "1x2"
    cur, prior = g.viewports[0], g.viewports[1]
    st_cur = win.index.study_of(cur.series)
    st_prior = win.index.study_of(prior.series)
    assert st_cur.study_date == "20240101" and st_prior.study_date == "20230101"
    assert cur.caption.text().startswith("CURRENT") and prior.caption.text().startswith("PRIOR")
    # lung window on both (the hanging's CT window), linked though the frames of reference differ
    assert cur.view.window() == (-600.0, 1500.0) and prior.view.window() == (-600.0, 1500.0)
    assert cur.frame_of_reference and cur.frame_of_reference != prior.frame_of_reference
    assert g.linked(0, 1)
    for step in (1, 3, -2, 5):
        cur.view.step_slices(step)
        p0, p1 = cur.current_position(), prior.current_position()
        assert abs(p0 - p1) <= 7.5, (p0, p1)              # within half a 15 mm slice
    # 30 mm table shift: the same anatomy is two slices apart, so index sync would be wrong
    assert cur.view.current_slice() != prior.view.current_slice()
    # link off: the prior stays
    win.hanging.act_sync.trigger()
    assert not g.sync_enabled
    before = prior.view.current_slice()
    cur.view.step_slices(2)
    assert prior.view.current_slice() == before
    win.hanging.act_sync.trigger()
    assert g.sync_enabled


def test_shift_scroll_moves_one_viewport_and_keeps_the_new_offset(win, qtbot, studies, monkeypatch):
    _open(win, studies["ct"], qtbot)
    g = win.viewports
    cur, prior = g.viewports[0], g.viewports[1]
    monkeypatch.setattr(QApplication, "keyboardModifiers", staticmethod(lambda: Qt.KeyboardModifier.ShiftModifier))
    before = cur.view.current_slice()
    prior.view.set_slice(prior.view.current_slice() + 2)
    assert cur.view.current_slice() == before
    monkeypatch.undo()
    d = prior.current_position() - cur.current_position()
    cur.view.step_slices(1)
    assert abs((prior.current_position() - cur.current_position()) - d) < 1e-6


def test_cr_prior_hung_beside_current_and_active_viewport_gets_the_actions(win, qtbot, studies):
    _open(win, studies["cr"], qtbot)
    g = win.viewports
    assert g.layout_name() == "1x2"
    cur, prior = g.viewports
    assert win.index.study_of(cur.series).study_date == "20240620"
    assert win.index.study_of(prior.series).study_date == "20240312"      # the most recent prior
    assert not g.linked(0, 1)                                              # radiographs: no position link
    assert prior.view.rendered_image() is not None
    # click the prior: it becomes active (highlighted) and Invert acts on it only
    vp = prior.view.graphics.viewport()
    QTest.mouseClick(vp, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(50, 50))
    assert g.active_index() == 1 and prior.active and not cur.active
    assert "#e0a030" in prior.styleSheet()
    win.act_invert.trigger()
    assert prior.view.inverted and not cur.view.inverted
    win.act_rot_r.trigger()
    assert prior.view.rotation == 90 and cur.view.rotation == 0
    QTest.mouseClick(cur.view.graphics.viewport(), Qt.MouseButton.LeftButton,
                     Qt.KeyboardModifier.NoModifier, QPoint(50, 50))
    assert g.active_index() == 0
    win.act_invert.trigger()
    assert cur.view.inverted


def test_drag_series_from_browser_onto_viewport_and_same_frame_sync(win, qtbot, studies):
    from viewer.browse.study_browser import UID_ROLE
    from viewer.view.layouts import SERIES_MIME

    _open(win, studies["ct"], qtbot)
    g = win.viewports
    g.set_layout("2x2")
    uid = g.viewports[0].series.series_uid
    # the browser drags series rows (and only those) with the series UID
    tree = win.browser.tree
    item = tree.findItems("", Qt.MatchFlag.MatchContains | Qt.MatchFlag.MatchRecursive)
    series_items = [it for it in item if it.data(0, UID_ROLE) == uid]
    assert series_items and series_items[0].flags() & Qt.ItemFlag.ItemIsDragEnabled
    assert not (tree.topLevelItem(0).flags() & Qt.ItemFlag.ItemIsDragEnabled)
    md = tree.mimeData(series_items)
    assert bytes(md.data(SERIES_MIME).data()).decode() == uid
    # drop the current series on viewport 3: same frame of reference -> scroll, zoom, W/L follow
    target = g.viewports[3].view.graphics.viewport()
    assert _drop(target, uid)
    qtbot.waitUntil(lambda: g.viewports[3].series is not None and not g.loading(), timeout=30000)
    win.wait_idle()
    qtbot.waitUntil(lambda: g.viewports[0].frame_of_reference != "", timeout=10000)
    v0, v3 = g.viewports[0].view, g.viewports[3].view
    assert g.active_index() == 3 and g.linked(0, 3)
    v0.set_slice(4)
    assert v3.current_slice() == 4                     # same geometry: same position = same index
    v0.set_window(40.0, 400.0)
    assert v3.window() == (40.0, 400.0)
    z0 = v0.zoom()
    v0.zoom_by(2.0)
    assert v3.zoom() == pytest.approx(v0.zoom(), rel=0.02) and v0.zoom() > 1.5 * z0
    # presets go to the active viewport (and from there to its link partners)
    win.apply_preset(3)
    assert v3.window() == (400.0, 1800.0) and v0.window() == (400.0, 1800.0)


def test_other_patient_never_stays_beside_and_no_prior_means_1x1(win, qtbot, studies):
    _open(win, studies["ct"], qtbot)
    g = win.viewports
    assert g.layout_name() == "1x2" and g.viewports[1].series is not None
    _open(win, studies["cr"], qtbot)
    assert all(vp.series is None or vp.series.patient_id == "LAY-CR" for vp in g.viewports)
    # a single study with no prior: one viewport
    only = studies["cr"] / "LAY-CR_20240105"
    win.select_series(g.viewports[0].series.series_uid)
    win.hanging.hang(__import__("engine.service", fromlist=["open_path"]).open_path(only))
    assert g.layout_name() == "1x1"


def test_prior_from_the_local_store(win, qtbot, studies, tmp_path):
    """The prior is not in the opened folder but in the local store (studies retrieved from PACS)."""
    import shutil

    from engine.paths import store_dir

    store = store_dir()
    shutil.copytree(studies["cr"] / "LAY-CR_20240312", store / "LAY-CR_20240312")
    _open(win, studies["cr"] / "LAY-CR_20240620", qtbot)
    qtbot.waitUntil(lambda: win.viewports.layout_name() == "1x2", timeout=30000)
    qtbot.waitUntil(lambda: not win.viewports.loading(), timeout=30000)
    prior = win.viewports.viewports[1]
    assert win.index.study_of(prior.series).study_date == "20240312"
    assert np.asarray(prior.view.rendered_image()).std() > 0
