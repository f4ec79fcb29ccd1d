"""GUI: search a real Orthanc through the query/retrieve dialog, retrieve into the browser (offscreen)."""
from __future__ import annotations

import dataclasses

import pydicom
import pytest

from engine import paths
from engine.interop.netconfig import NetworkSettings, Peer, load_settings, save_settings
from tests.orthanc_server import SECRET_ID, OrthancServer, ensure_orthanc, free_port, make_sources

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, sources):
    """Orthanc holding the CR and CT studies; our SCP will listen on ``scp_port``."""
    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    scp_port = free_port()
    server = OrthancServer(exe, tmp_path_factory.mktemp("orthanc"),
                           modalities={"chestview": ("CHESTVIEW", "127.0.0.1", scp_port)})
    try:
        server.start()
        for p in sources["cr"] + sources["ct"]:
            server.upload(p)
        yield server, scp_port
    finally:
        server.stop()


@pytest.fixture
def main_window(qtbot, tmp_path, monkeypatch, orthanc):
    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))
    server, scp_port = orthanc
    save_settings(NetworkSettings(
        ae_title="CHESTVIEW", port=scp_port, bind_address="127.0.0.1", timeout_s=20,
        peers=[Peer("Test PACS", "ORTHANC", "127.0.0.1", server.dicom_port)]))
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    store = SettingsStore(tmp_path / "viewer.ini")
    store.set_value("ai/auto_run", False)          # this test is about PACS, not AI: keep CPU free
    mw = MainWindow(store)
    qtbot.addWidget(mw)
    mw.show()
    yield mw
    from viewer.pacs.pacs_dialog import stop_storage_scp

    stop_storage_scp(mw)
    mw.runner.wait_done(10000)


def test_search_and_retrieve_into_browser(qtbot, main_window, sources, artifacts_dir):
    from viewer.pacs.pacs_dialog import MODALITIES, open_query_retrieve

    mw = main_window
    ct = pydicom.dcmread(sources["ct"][0], stop_before_pixels=True)
    cr = pydicom.dcmread(sources["cr"][0], stop_before_pixels=True)
    dlg = open_query_retrieve(mw)
    assert dlg.peer_combo.count() == 1 and dlg.search_btn.isEnabled()

    # everything, then name + modality, then a date range that excludes both studies
    with qtbot.waitSignal(dlg.search_done, timeout=30000) as sig:
        dlg.search_btn.click()
    assert sig.args == [2] and dlg.study_table.rowCount() == 2
    dlg.name_edit.setText("quixote")
    dlg.modality_combo.setCurrentIndex(MODALITIES.index("CT"))
    with qtbot.waitSignal(dlg.search_done, timeout=30000) as sig:
        dlg.search_btn.click()
    assert sig.args == [1]
    row = [dlg.study_table.item(0, c).text() for c in range(dlg.study_table.columnCount())]
    assert row[0] == "Quixote, Dulcinea" and row[1] == SECRET_ID and row[3] == "2024-03-15"
    assert row[4] == "CT" and row[8] == "3"
    qtbot.waitUntil(lambda: dlg.series_table.rowCount() == 1, timeout=30000)
    assert dlg.series_table.item(0, 1).text() == "CT"

    # C-MOVE to our storage SCP (started by the dialog), then the study shows in the browser
    with qtbot.waitSignal(dlg.retrieve_done, timeout=60000) as sig:
        dlg.retrieve_btn.click()
    res = sig.args[0]
    assert (res.completed, res.failed, res.cancelled) == (3, 0, False)
    assert dlg.progress.value() == 100 and "Retrieved 3 image(s)" in dlg.status.text()
    assert mw.pacs_scp.running and len(mw.pacs_scp.stored) == 3
    files = sorted((paths.store_dir() / ct.StudyInstanceUID / ct.SeriesInstanceUID).glob("*.dcm"))
    assert len(files) == 3
    qtbot.waitUntil(lambda: ct.SeriesInstanceUID in mw.browser.series_uids(), timeout=30000)
    qtbot.waitUntil(lambda: mw.current_series is not None
                    and mw.current_series.series_uid == ct.SeriesInstanceUID, timeout=30000)
    dlg.grab().save(str(artifacts_dir / "pacs_query_retrieve.png"))

    # the same dialog with a C-GET peer: the CR study arrives over the query association
    s = load_settings()
    s.peers = [dataclasses.replace(s.peers[0], retrieve="C-GET")]
    save_settings(s)
    dlg.reload_settings()
    dlg.name_edit.setText("")
    dlg.modality_combo.setCurrentIndex(MODALITIES.index("CR"))
    with qtbot.waitSignal(dlg.search_done, timeout=30000) as sig:
        dlg.search_btn.click()
    assert sig.args == [1]
    with qtbot.waitSignal(dlg.retrieve_done, timeout=60000) as sig:
        dlg.retrieve_btn.click()
    assert sig.args[0].completed == 1 and len(sig.args[0].stored) == 1
    qtbot.waitUntil(lambda: cr.SeriesInstanceUID in mw.browser.series_uids(), timeout=30000)
    qtbot.waitUntil(lambda: mw.current_series.series_uid == cr.SeriesInstanceUID, timeout=30000)
    mw.grab().save(str(artifacts_dir / "pacs_browser_after_retrieve.png"))

    dlg.from_check.setChecked(True)
    dlg.to_check.setChecked(True)
    from PySide6.QtCore import QDate

    dlg.from_date.setDate(QDate(2030, 1, 1))
    dlg.to_date.setDate(QDate(2030, 12, 31))
    dlg.modality_combo.setCurrentIndex(0)
    with qtbot.waitSignal(dlg.search_done, timeout=30000) as sig:
        dlg.search_btn.click()
    assert sig.args == [0] and "No matching studies" in dlg.status.text()


def test_network_settings_dialog_validates_saves_and_echoes(qtbot, main_window, artifacts_dir):
    from viewer.pacs.pacs_dialog import open_network_settings

    dlg = open_network_settings(main_window)
    assert dlg.peer_table.rowCount() == 1 and dlg.peer_table.item(0, 1).text() == "ORTHANC"
    dlg.peer_table.selectRow(0)
    dlg.echo_selected()
    qtbot.waitUntil(lambda: "answered C-ECHO" in dlg.status.text(), timeout=30000)
    dlg.ae_edit.setText("WAY_TOO_LONG_AE_TITLE")
    assert dlg.ae_edit.text() == "WAY_TOO_LONG_AE_"           # the field itself caps at 16 (PS3.5 AE)
    dlg.ae_edit.setText("BAD\\TITLE")
    assert dlg.save() is False and "backslash" in dlg.status.text()
    assert load_settings().ae_title == "CHESTVIEW"             # nothing saved
    dlg.ae_edit.setText("CHESTVIEW2")
    dlg.allow_edit.setPlainText("CT_SCANNER1\nMODALITY2")
    dlg.grab().save(str(artifacts_dir / "pacs_network_settings.png"))
    assert dlg.save() is True
    s = load_settings()
    assert s.ae_title == "CHESTVIEW2" and s.allowed_calling_aets == ["CT_SCANNER1", "MODALITY2"]
    assert s.effective_allow_list() == ["CT_SCANNER1", "MODALITY2", "ORTHANC"]


def test_storage_scp_autostart_follows_settings(qtbot, main_window, sources):
    from engine.interop import network as net
    from viewer.pacs.pacs_dialog import autostart_storage_scp, stop_storage_scp

    assert autostart_storage_scp(main_window) is None                # start_scp is off
    s = load_settings()
    s.start_scp = True
    save_settings(s)
    scp = autostart_storage_scp(main_window)
    assert scp is not None and scp.running and main_window.pacs_scp is scp
    me = Peer("self", s.ae_title, "127.0.0.1", scp.port)
    assert net.echo(NetworkSettings(ae_title="ORTHANC"), me) > 0     # a configured peer may call
    with pytest.raises(net.NetworkError, match="rejected"):
        net.echo(NetworkSettings(ae_title="STRANGER"), me)           # anyone else may not
    # an allowed sender pushes a series: it is filed and appears in the browser by itself
    assert net.send(NetworkSettings(ae_title="ORTHANC"), me, sources["ct"]).ok
    ct = pydicom.dcmread(sources["ct"][0], stop_before_pixels=True)
    qtbot.waitUntil(lambda: ct.SeriesInstanceUID in main_window.browser.series_uids(), timeout=30000)
    assert len(list((paths.store_dir() / ct.StudyInstanceUID).rglob("*.dcm"))) == 3
    stop_storage_scp(main_window)
    s.peers, s.allow_peers = [], True
    save_settings(s)
    assert autostart_storage_scp(main_window) is None                 # empty allow-list: refused
    assert "allow-list" in main_window.last_message
