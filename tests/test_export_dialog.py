"""'Export AI results…' in the viewer (pytest-qt, offscreen): the real MainWindow on the demo CR,
the real DICOM export engine, files read back with pydicom, optionally a C-STORE to a real Orthanc.

Covers: the panel button and the File menu action are disabled without a result for the displayed
series and for a failed result; SR + Secondary Capture written to a folder through the dialog
(SOP classes, same StudyInstanceUID, research-use text, untrained findings and heatmaps left out
and said so); refusal of the input folder with the engine's message; a real analysis with the
shipped X-ray model exported as SR; C-STORE to Orthanc through the dialog; no torch at import.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402

from engine.results import (RESEARCH_USE, Finding, Heatmap, ModelInfo, Severity,  # noqa: E402
                            StudyResult, Validity)
from tests.test_export import PROBABILITY, sr_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"      # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"          # Secondary Capture
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"         # Parametric Map
XR, XV = "xray-densenet121", "1.3.0"
UNTRAINED, UV = "xray-experimental", "0.0.1"
ANALYSIS_TIMEOUT_MS = 300_000
pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    """MainWindow with auto-run off, its own settings and CHESTVIEW_HOME (network.json lives there)."""
    monkeypatch.setenv("CHESTVIEW_HOME", str(tmp_path / "home"))
    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore

    w = MainWindow(settings=SettingsStore(tmp_path / "viewer.ini"))
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    assert w.ai is not None
    yield w
    w.ai.shutdown()


def open_chest(w, demo_dir: Path, auto_run: bool = False):
    w.ai.panel.auto_run.setChecked(auto_run)
    w.open_path(str(demo_dir))
    w.wait_idle(60_000)
    chest = next(s for s in w.index.all_series()
                 if s.kind == "xray" and "uncompressed" in s.series_description.lower())
    assert w.select_series(chest.series_uid)
    return chest


def _blob(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)).astype(np.float32)


def constructed_result(series, error: str | None = None) -> StudyResult:
    """A trained X-ray result plus findings/heatmap of an untrained model (which must not be exported)."""
    f = [Finding("Pneumonia", 0.8312, 0.52, True, XR, XV), Finding("Effusion", 0.1204, 0.41, False, XR, XV),
         Finding("Nodule", 0.9, 0.5, False, UNTRAINED, UV)]
    return StudyResult(
        study_uid=series.study_uid, series_uid=series.series_uid, modality="CR", kind="xray",
        validity=Validity(True, [], ood_score=0.2, ood_threshold=0.6), findings=f,
        severity=Severity(4.31, 2.87, 1.02, XR, XV),
        heatmaps=[Heatmap("Pneumonia", _blob((224, 224), 90, 70, 25), XR, XV),
                  Heatmap("Nodule", _blob((224, 224), 150, 150, 20), UNTRAINED, UV)],
        models=[ModelInfo(XR, XV, True, "ab" * 32, label=f"ChestView X-ray DenseNet-121 {XV}"),
                ModelInfo(UNTRAINED, UV, False, "cd" * 32)],
        error=error)


def sr_items(ds: pydicom.Dataset) -> list[tuple[str, str, object]]:
    """(value type, concept name, value) for every SR content item."""
    out: list[tuple[str, str, object]] = []

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            val: object = None
            if it.ValueType == "TEXT":
                val = str(it.TextValue)
            elif it.ValueType == "NUM":
                val = float(it.MeasuredValueSequence[0].NumericValue)
            out.append((it.ValueType, str(name), val))
            walk(it.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out


def _probabilities(sr: pydicom.Dataset) -> dict[str, float]:
    """Finding meaning -> DCM 122157 Probability of each TID 1501 group."""
    return {g["finding"][2]: g["num"][0][1] for g in sr_groups(sr).values()
            if g["finding"] and g["num"] and g["num"][0][0] == PROBABILITY}


def run_dialog_export(qtbot, dlg) -> tuple[bool, str]:
    with qtbot.waitSignal(dlg.export_finished, timeout=120_000) as sig:
        qtbot.mouseClick(dlg.export_btn, Qt.MouseButton.LeftButton)
    return tuple(sig.args)


# ------------------------------------------------------------------------------------ tests
def test_export_sr_and_sc_through_dialog_refuses_input_folder(qtbot, window, demo_dir, tmp_path, artifacts_dir):
    w, ai = window, window.ai
    chest = open_chest(w, demo_dir)
    src_path = Path(chest.instances[0].path)
    src = pydicom.dcmread(src_path, stop_before_pixels=True)
    input_before = sorted(p.name for p in src_path.parent.iterdir())

    # no result for the displayed series: button and menu action disabled, the action explains why
    assert not ai.panel.export_button.isEnabled() and not w.act_export_ai.isEnabled()
    assert "run the AI first" in w.act_export_ai.toolTip()
    assert ai.open_export_dialog() is None and "Nothing to export" in w.last_message
    # a failed analysis: still disabled, with the reason
    ai.show_result(constructed_result(chest, error="model file missing"))
    assert not ai.panel.export_button.isEnabled() and not w.act_export_ai.isEnabled()
    assert "analysis failed" in w.act_export_ai.toolTip()

    ai.show_result(constructed_result(chest))
    assert ai.panel.export_button.isEnabled() and w.act_export_ai.isEnabled()
    w.act_export_ai.trigger()                                     # File ▸ Export AI results…
    dlg = ai.export_dialog
    assert dlg is not None and dlg.isVisible()
    assert RESEARCH_USE in dlg.windowTitle()
    note = dlg.untrained_label.text()
    assert "Findings of untrained models are not exported" in note and f"{UNTRAINED} {UV}" in note
    assert dlg.pm_check.isEnabled() and "1 heatmap(s) from trained models" in dlg.heatmap_note.text()
    # a radiograph's heatmap cannot be a Parametric Map (no Frame of Reference): the box says what it writes
    assert "Secondary Capture" in dlg.pm_check.text() and "Parametric Map (float" not in dlg.pm_check.text()

    # the input folder (and a folder inside it) is refused with the engine's message; nothing written
    dlg.set_folder(src_path.parent)
    assert not dlg.export_btn.isEnabled() and "input folder" in dlg.hint.text()
    assert dlg.start_export() is False and "input folder" in dlg.status.text()
    dlg.set_folder(src_path.parent / "results")
    assert not dlg.export_btn.isEnabled() and "input folder" in dlg.hint.text()
    assert sorted(p.name for p in src_path.parent.iterdir()) == input_before

    # SR + Secondary Capture to a fresh folder, off the GUI thread
    out = tmp_path / "exported"
    dlg.set_folder(out)
    dlg.sr_check.setChecked(True)
    dlg.pm_check.setChecked(False)
    dlg.sc_check.setChecked(True)
    assert dlg.export_btn.isEnabled() and dlg.hint.text() == ""
    ok, message = run_dialog_export(qtbot, dlg)
    assert ok, message
    assert "Exported 2 DICOM object(s)" in message and str(out) in message and message in dlg.status.text()
    assert sorted(p.name for p in src_path.parent.iterdir()) == input_before   # input folder untouched
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2                                       # untrained model's heatmap left out
    read = {str(ds.SOPClassUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    assert set(read) == {SR_CLASS, SC_CLASS}
    for ds in read.values():
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert "RESEARCH USE ONLY" in ds.SeriesDescription
    items = sr_items(read[SR_CLASS])
    texts = [v for vt, _, v in items if vt == "TEXT"]
    probs = _probabilities(read[SR_CLASS])
    assert RESEARCH_USE in texts
    assert probs["Pneumonia"] == pytest.approx(0.8312) and probs["Pleural effusion"] == pytest.approx(0.1204)
    assert "Nodule" not in probs                                 # untrained model: no finding exported
    assert any(f"{UNTRAINED} {UV} is untrained" in t for t in texts)
    sc = read[SC_CLASS]
    assert RESEARCH_USE in sc.ImageComments and sc.BurnedInAnnotation == "YES"
    assert "Pneumonia" in sc.ImageComments and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert w.settings.value("ai/export_dir") == str(out)         # remembered for next time

    dlg.resize(700, dlg.sizeHint().height())
    qtbot.wait(50)
    dlg.grab().save(str(artifacts_dir / "export_dialog.png"))

    # another series displayed: no result for it -> disabled, and the open dialog says so
    tibia = next(s for s in w.index.all_series() if "tibia" in s.series_description.lower())
    w.select_series(tibia.series_uid)
    assert not ai.panel.export_button.isEnabled() and not w.act_export_ai.isEnabled()
    assert dlg.target is None and not dlg.export_btn.isEnabled() and "Nothing to export" in dlg.series_label.text()


def test_real_analysis_exported_as_sr(qtbot, window, demo_dir, tmp_path):
    """The shipped X-ray model (trained or not) through the real worker, then exported from the panel."""
    w, ai = window, window.ai
    chest = open_chest(w, demo_dir, auto_run=False)
    ai.run_current()
    assert not ai.panel.export_button.isEnabled()                # running: nothing to export yet
    qtbot.waitUntil(lambda: ai.current_result is not None and not ai.is_busy(), timeout=ANALYSIS_TIMEOUT_MS)
    res = ai.current_result
    assert res.error is None and res.series_uid == chest.series_uid
    assert ai.panel.export_button.isEnabled()
    qtbot.mouseClick(ai.panel.export_button, Qt.MouseButton.LeftButton)
    dlg = ai.export_dialog
    assert dlg.isVisible() and dlg.target.result is res and dlg.target.source_paths == [chest.instances[0].path]
    trained = {(m.name, m.version) for m in res.models if m.trained}
    dlg.set_folder(tmp_path / "real")
    dlg.sc_check.setChecked(False)
    ok, message = run_dialog_export(qtbot, dlg)
    assert ok, message
    read = [pydicom.dcmread(p) for p in sorted((tmp_path / "real").glob("*.dcm"))]
    sr = next(d for d in read if d.SOPClassUID == SR_CLASS)
    assert sr.StudyInstanceUID == chest.study_uid
    items = sr_items(sr)
    nums = [n for g in sr_groups(sr).values() for n in g["num"]]   # measurements, not library descriptors
    texts = [v for vt, _, v in items if vt == "TEXT"]
    assert RESEARCH_USE in texts
    if trained:
        assert nums, "a trained model's findings are in the report"
    else:
        # the engine returns no findings for an untrained model; the report holds none and names
        # the model version; the dialog says plainly that untrained findings are not exported
        assert not nums and not [f for f in res.findings if (f.model_name, f.model_version) not in trained]
        m = res.models[0]
        assert m.version in texts and f"{m.name} {m.version} is untrained" in dlg.untrained_label.text()
        assert "Findings of untrained models are not exported" in dlg.untrained_label.text()
        assert not dlg.pm_check.isEnabled() and [d for d in read if d.SOPClassUID == PM_CLASS] == []


def test_ct_export_uses_volume_order(qtbot, window, demo_dir, tmp_path):
    """CT: source_paths are the viewer's Volume.instance_paths, so the heatmap lands on its slice."""
    from engine.results import CTSliceScore

    w, ai = window, window.ai
    ai.panel.auto_run.setChecked(False)
    w.open_path(str(demo_dir))
    w.wait_idle(60_000)
    ct = next(s for s in w.index.all_series() if s.kind == "ct")
    w.select_series(ct.series_uid)
    qtbot.waitUntil(lambda: w.current_volume is not None, timeout=120_000)
    vol = w.current_volume
    k = len(vol.instance_paths) // 3
    m = ModelInfo("ct-inception", "1.0.0", True, "ef" * 32)
    ai.show_result(StudyResult(
        study_uid=ct.study_uid, series_uid=ct.series_uid, modality="CT", kind="ct", validity=Validity(True, []),
        findings=[Finding("COVID-19", 0.71, 0.5, True, m.name, m.version)],
        heatmaps=[Heatmap("COVID-19", _blob((128, 128), 60, 40, 12), m.name, m.version, slice_index=k)],
        models=[m], ct_study_probability=0.71,
        ct_slice_scores=[CTSliceScore(k, float(vol.positions[k]), 0.71), CTSliceScore(0, float(vol.positions[0]), 0.1)],
        lung_volume_ml=4100.0))
    dlg = ai.open_export_dialog()
    assert dlg.target.source_paths == list(vol.instance_paths) and "CT slice" in dlg.heatmap_note.text()
    dlg.set_folder(tmp_path / "ct")
    dlg.sc_check.setChecked(False)                                # SR + Parametric Map (the defaults)
    ok, message = run_dialog_export(qtbot, dlg)
    assert ok and "1 SR report, 1 Parametric Map" in message, message
    read = {str(d.SOPClassUID): d for d in (pydicom.dcmread(p) for p in (tmp_path / "ct").glob("*.dcm"))}
    pm, sr = read[PM_CLASS], read[SR_CLASS]
    assert pm.StudyInstanceUID == sr.StudyInstanceUID == ct.study_uid
    refs = [str(s.ReferencedSOPInstanceUID) for d in pm.SharedFunctionalGroupsSequence[0].get(
        "DerivationImageSequence", []) for s in d.SourceImageSequence]
    refs += [str(s.ReferencedSOPInstanceUID) for f in pm.PerFrameFunctionalGroupsSequence
             for d in f.get("DerivationImageSequence", []) for s in d.SourceImageSequence]
    assert refs == [vol.sop_instance_uids[k]]
    assert sr_groups(sr)["AI CT study score"]["num"][0][1] == pytest.approx(0.71)
    # without the viewer's volume (still loading) the worker reads the series in engine order
    w.current_volume = None
    target = ai.export_target()
    assert target.source_paths is None and list(target.resolve_sources()) == list(vol.instance_paths)


def test_send_to_orthanc_through_dialog(qtbot, window, demo_dir, tmp_path):
    from engine.interop.netconfig import NetworkSettings, Peer, save_settings
    from tests.orthanc_server import OrthancServer, ensure_orthanc

    exe = ensure_orthanc()
    if exe is None:
        pytest.skip("Debian 'orthanc' is not installed and cannot be installed here (needs root + apt)")
    server = OrthancServer(exe, tmp_path / "orthanc")
    try:
        server.start()
        save_settings(NetworkSettings(ae_title="CHESTVIEW", timeout_s=20,
                                      peers=[Peer("Test PACS", "ORTHANC", "127.0.0.1", server.dicom_port)]))
        w, ai = window, window.ai
        chest = open_chest(w, demo_dir)
        ai.show_result(constructed_result(chest))
        dlg = ai.open_export_dialog()
        assert dlg.pacs_radio.isEnabled() and "Test PACS" in dlg.peer_combo.currentText()
        dlg.pacs_radio.setChecked(True)
        dlg.pm_check.setChecked(False)
        dlg.sc_check.setChecked(True)
        ok, message = run_dialog_export(qtbot, dlg)
        assert ok, message
        assert "Sent 2 DICOM object(s) to Test PACS" in message
        sent = dlg.last_outcome.sent
        assert len(sent) == 2
        classes = set()
        for uid in sent:
            ids = server.find_instances(SOPInstanceUID=uid)
            assert len(ids) == 1
            ds = pydicom.dcmread(io.BytesIO(server.instance_file(ids[0])))
            assert ds.StudyInstanceUID == chest.study_uid
            classes.add(str(ds.SOPClassUID))
        assert classes == {SR_CLASS, SC_CLASS}
    finally:
        server.stop()
