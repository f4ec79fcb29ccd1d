"""Hostile files in the viewer: each hostile file goes through the window's open path; the window
survives, keeps answering (a QTimer ping is served at least once a second throughout) and
shows a per-image reason; a genuine study opened afterwards displays."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import QElapsedTimer, QTimer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_files as hf  # noqa: E402


class Ping:
    """Longest gap between ticks of a 50 ms timer: how long the GUI thread could not answer."""

    def __init__(self) -> None:
        self.clock = QElapsedTimer()
        self.timer = QTimer()
        self.timer.setInterval(50)
        self.timer.timeout.connect(self._tick)
        self.last = 0
        self.worst_ms = 0

    def _tick(self) -> None:
        now = self.clock.elapsed()
        self.worst_ms = max(self.worst_ms, now - self.last)
        self.last = now

    def __enter__(self) -> "Ping":
        self.clock.start()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tick()
        self.timer.stop()


@pytest.fixture(scope="module")
def win(qapp, tmp_path_factory):
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    s = SettingsStore(tmp_path_factory.mktemp("settings") / "viewer.ini")
    s.set_value("ai/auto_run", False)
    w = MainWindow(s)
    w.resize(1000, 700)
    w.show()
    w.wait_idle(60000)
    yield w
    w.close()
    w.deleteLater()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile_viewer")
    for name, (build, _) in hf.BUILDERS.items():
        sub = d / name.replace(".dcm", "")
        sub.mkdir()
        build(sub / name)
    hf.genuine_cr(d / "genuine.dcm")
    return d


@pytest.mark.parametrize("name", sorted(hf.BUILDERS))
def test_window_survives_and_answers(win, corpus: Path, qtbot, name: str) -> None:
    folder = corpus / name.replace(".dcm", "")
    win.last_message = ""
    failed: list[str] = []
    win.image_view.load_failed.connect(failed.append)
    with Ping() as ping:
        win.open_path(folder)
        win.wait_idle(60000)
        qtbot.wait(200)
        if win.image_view.n_slices() > 1:       # the multi-frame file: its second frame is hostile
            win.image_view.step_slices(1)
            qtbot.wait(200)
    win.image_view.load_failed.disconnect(failed.append)
    assert win.isVisible()
    assert ping.worst_ms < 1000, f"GUI did not answer for {ping.worst_ms} ms"
    frag = hf.BUILDERS[name][1]
    shown = win.last_message + " ".join(p.reason for p in win.index.problems) + " ".join(failed)
    assert frag in shown, shown
    # a genuine image right after still displays
    win.open_path(corpus / "genuine.dcm", wait=True)
    win.wait_idle(60000)
    data = win.image_view.current_data()
    assert data is not None and data.values.shape == (100, 100)


def test_thumbnail_of_a_hostile_series_fails_with_a_reason(win, corpus: Path, qtbot) -> None:
    from engine.dicom.index import index_path

    se = index_path(corpus / "j2k_siz_bomb").all_series()[0]
    failed: list[str] = []
    win.thumbs.cache.pop(se.series_uid, None)
    win.thumbs.failed.connect(lambda uid, reason: failed.append(reason) if uid == se.series_uid else None)
    win.thumbs.request([se])
    qtbot.waitUntil(lambda: bool(failed), timeout=30000)
    assert "60000x60000" in failed[0]


def test_tag_browser_shows_readable_elements_and_marks_unreadable(qapp, tmp_path: Path) -> None:
    """The rows are built in the decoder child (engine.service.header_tree), as the viewer reads them."""
    from pydicom.data import get_testdata_file

    from engine.service import header_tree
    from viewer.browse.tag_browser import TagBrowser

    tb = TagBrowser()
    tb.set_tree(header_tree(get_testdata_file("badVR.dcm")), "badVR.dcm")
    assert len(tb.visible_rows()) > 5
    tb.set_tree(header_tree(hf.bad_element(tmp_path / "bad.dcm")), "bad.dcm")
    rows = tb.visible_rows()
    assert tb.unreadable == 1 and any(r[0] == "(0008,0016)" for r in rows)   # the rest still shown
    assert any(r[1] == "(unreadable element)" for r in rows)
    assert "unreadable" in tb.title.text()
    deep = hf.deep_nesting(tmp_path / "deep.dcm", depth=60)
    tb.set_tree(header_tree(deep), "deep")
    assert any("nested deeper" in r[2] for r in tb.visible_rows())
