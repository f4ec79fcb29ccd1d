"""CT HU quantification (engine.ai.ct_quant): phantom ground truth, robustness (thick slices, padded
field of view, prone, missing slices), the real lung-cancer series, the CT gate, SEG/SR export,
and the opacity map on the axial stack and the coronal/sagittal MPR panes."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.demo import phantom as ph
from engine.ai.ct_quant import (LABEL_CONSOLIDATION, LABEL_GGO, QuantificationRefused, quantify_ct,
                             severity_points)

REPO = Path(__file__).resolve().parents[1]
GEOM = ph.PhantomGeometry()            # the demo CT: 120 x 512 x 512, 0.7 mm, 2.5 mm slices
SPACING = (GEOM.slice_mm, GEOM.pixel_mm, GEOM.pixel_mm)
VOLUME_TOL = 0.10                      # lesion volumes within 10% of the truth (method card)
LUNG_TOL = 0.03                        # each lung within 3%


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    return ph.phantom_volume(GEOM)


@pytest.fixture(scope="module")
def quant(vol):
    return quantify_ct(vol, SPACING, is_phantom=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def _by(q, lung: str, zone: str):
    return next(z for z in list(q.lungs) + list(q.zones) if z.lung == lung and z.zone == zone)


def test_phantom_lesion_and_lung_volumes_match_truth(quant):
    t = ph.phantom_truth(GEOM)
    assert _rel(quant.ggo_ml, t.ggo_ml) < VOLUME_TOL
    assert _rel(quant.consolidation_ml, t.consolidation_ml) < VOLUME_TOL
    assert _rel(_by(quant, "right", "whole").volume_ml, t.right_lung_ml) < LUNG_TOL
    assert _rel(_by(quant, "left", "whole").volume_ml, t.left_lung_ml) < LUNG_TOL
    # trachea and main bronchi removed (truth: airway outside the lungs), not more than twice that
    assert 0.5 * t.airway_ml < quant.airway_removed_ml < 2.0 * t.airway_ml
    assert quant.labels is not None and quant.labels.dtype == np.uint8
    assert set(np.unique(quant.labels)) == {0, LABEL_GGO, LABEL_CONSOLIDATION}
    assert quant.is_phantom and any("phantom" in w for w in quant.warnings)


def test_phantom_zone_assignment_and_score(quant):
    truth = ph.zone_truth(GEOM)
    for (side, zone), tz in truth.items():
        z = _by(quant, side, zone)
        assert abs(z.ggo_ml - tz["ggo_ml"]) < 0.1 * ph.phantom_truth(GEOM).ggo_ml + 0.5, (side, zone)
        assert abs(z.consolidation_ml - tz["consolidation_ml"]) < 0.1 * ph.phantom_truth(GEOM).consolidation_ml + 0.5
        assert _rel(z.volume_ml, tz["lung_ml"]) < 0.06, (side, zone)
    # GGO is in the right lung only (middle + lower zones), consolidation in the left lower zone only
    assert _by(quant, "left", "whole").ggo_ml < 1.0 and _by(quant, "right", "whole").consolidation_ml < 1.0
    assert _by(quant, "left", "lower").consolidation_ml > 0.9 * _by(quant, "left", "whole").consolidation_ml
    # score from the truth's per-region involvement with the stated mapping (left middle + lower merged)
    def pct(keys):
        lung = sum(truth[k]["lung_ml"] for k in keys)
        return 100.0 * sum(truth[k]["ggo_ml"] + truth[k]["consolidation_ml"] for k in keys) / lung
    regions = [[("right", "upper")], [("right", "middle")], [("right", "lower")], [("left", "upper")],
               [("left", "middle"), ("left", "lower")]]
    expected = [severity_points(pct(r)) for r in regions]
    assert [r.points for r in quant.severity_regions] == expected
    assert quant.severity_score == sum(expected) and 0 < quant.severity_score <= 25
    assert "zones" in quant.severity_note and "lobes" in quant.severity_note
    assert abs(quant.total_opacity_percent - 100.0 * (quant.ggo_ml + quant.consolidation_ml) /
               quant.lung_volume_ml) < 0.01


def test_severity_points_bands():
    assert [severity_points(p) for p in (0.0, 0.2, 3.0, 5.0, 25.0, 26.0, 50.0, 51.0, 75.0, 76.0)] == \
        [0, 0, 1, 2, 2, 3, 3, 4, 4, 5]


def test_thick_slices_keep_volumes(vol):
    """8 mm-class reconstructions: three 2.5 mm slices averaged into 7.5 mm (partial volume)."""
    t = ph.phantom_truth(GEOM)
    thick = vol.reshape(40, 3, GEOM.size, GEOM.size).astype(np.float32).mean(axis=1)
    q = quantify_ct(thick, (7.5, GEOM.pixel_mm, GEOM.pixel_mm))
    assert _rel(q.ggo_ml, t.ggo_ml) < 0.15
    assert _rel(q.consolidation_ml, t.consolidation_ml) < 0.15
    assert _rel(_by(q, "right", "whole").volume_ml, t.right_lung_ml) < LUNG_TOL
    assert _rel(_by(q, "left", "whole").volume_ml, t.left_lung_ml) < LUNG_TOL


@pytest.fixture(scope="module")
def sub(vol):
    """Slices 24-63 (60-157.5 mm): both lesions, a third of the cost of the whole phantom."""
    v = vol[24:64]
    return v, quantify_ct(v, SPACING)


def test_padded_field_of_view_616_matrix_and_prone(sub):
    """Padding values (-3024) outside a circular field of view on a 616^2 matrix change nothing;
    a prone layout (rows and columns reversed, PS3.3 C.7.6.2.1.1) keeps right and left."""
    vol, quant = sub
    assert quant.ggo_ml > 10 and quant.consolidation_ml > 10
    pad = np.full((vol.shape[0], 616, 616), -3024, np.int16)
    pad[:, 52:564, 52:564] = vol
    yy, xx = np.mgrid[:616, :616]
    pad[:, (yy - 308) ** 2 + (xx - 308) ** 2 > 300 ** 2] = -3024
    q = quantify_ct(pad, SPACING)
    assert abs(q.ggo_ml - quant.ggo_ml) < 0.01 * quant.ggo_ml
    assert abs(q.consolidation_ml - quant.consolidation_ml) < 0.01 * quant.consolidation_ml
    del pad
    prone = quantify_ct(vol[:, ::-1, ::-1], SPACING, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert _by(prone, "right", "whole").ggo_ml > 0.9 * quant.ggo_ml
    assert _by(prone, "left", "whole").consolidation_ml > 0.9 * quant.consolidation_ml


def test_missing_slices_warn(sub):
    vol, quant = sub
    keep = np.r_[0:30, 34:40]
    q = quantify_ct(vol[keep], SPACING, positions=(np.arange(40) * GEOM.slice_mm)[keep])
    assert any("4 slice(s) missing" in w for w in q.warnings)
    assert not any("missing" in w for w in quant.warnings)


def test_refusals():
    with pytest.raises(QuantificationRefused, match="at least 10"):
        quantify_ct(np.zeros((3, 64, 64), np.int16), (5.0, 1.0, 1.0))
    body = np.full((20, 128, 128), -1000, np.int16)      # a body of soft tissue: no lungs
    yy, xx = np.mgrid[:128, :128]
    body[:, (yy - 64) ** 2 + (xx - 64) ** 2 < 55 ** 2] = 40
    with pytest.raises(QuantificationRefused, match="No lungs"):
        quantify_ct(body, (5.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------------
# real data (../shared/data): the lung-cancer series and the CT gate
# ------------------------------------------------------------------------------------------------
def _series(path: Path):
    from engine.dicom.index import index_path

    return index_path(path).all_series()[0]


@pytest.fixture(scope="module")
def cancer(shared_data):
    from engine.dicom.volume import load_volume

    series = _series(shared_data / "dicom" / "ct_lungpetctdx_1")
    return series, load_volume(series)


def test_lung_cancer_series_small_burden_at_the_tumour(cancer):
    """TCIA Lung-PET-CT-Dx A0001 (not COVID-19): small burden, located at the left upper tumour."""
    from scipy import ndimage

    _, v = cancer
    q = quantify_ct(v.hu, v.spacing, direction=v.direction, positions=v.positions)
    assert q.total_opacity_percent < 0.5
    assert q.consolidation_ml < 2.0
    assert q.severity_score <= 2
    lu = _by(q, "left", "upper")
    assert lu.ggo_ml + lu.consolidation_ml >= 0.5 * (q.ggo_ml + q.consolidation_ml)
    lab, n = ndimage.label(q.labels > 0)
    sizes = np.bincount(lab.ravel())[1:]
    zz, yy, xx = np.nonzero(lab == int(np.argmax(sizes)) + 1)
    f = q.label_factor
    # the tumour: patient left (columns run to the patient's left), posterior, z -224 to -184 mm
    assert xx.mean() * f > v.hu.shape[2] / 2 and yy.mean() * f > v.hu.shape[1] / 2
    assert -235.0 <= v.positions[int(np.median(zz))] <= -175.0


def _gate(vol, series):
    from engine.ai.validity import GateBuilder, ct_series_checks, header_checks, volume_checks

    gate = GateBuilder()
    header_checks(gate, "ct", series.modality, series.body_part)
    volume_checks(gate, vol.hu, tuple(vol.direction))
    return gate, ct_series_checks(gate, vol, series)


def test_gate_refuses_coronal_reformat_xray_and_localizer(shared_data, tmp_path):
    from engine.dicom.volume import load_volume

    cor = _series(shared_data / "dicom" / "ct_covid19nysbu_1" / "coronal_reformat.dcm")
    gate, facts = _gate(load_volume(cor), cor)
    assert not gate.passed and gate.checks["axial"] is False and not facts.quantify
    xr = _series(shared_data / "dicom" / "xray_wg04_rg1_j2ki.dcm")
    gate, facts = _gate(load_volume(xr), xr)
    assert not gate.passed and gate.checks["ct_not_projection"] is False and not facts.quantify
    import pydicom

    src = shared_data / "dicom" / "ct_lungpetctdx_1" / "1-30.dcm"
    ds = pydicom.dcmread(src)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "scout.dcm")
    sc = _series(tmp_path / "scout.dcm")
    gate, facts = _gate(load_volume(sc), sc)
    assert gate.checks["ct_not_localizer"] is False and not facts.quantify


def test_gate_single_slice_is_slice_classifier_only(shared_data, cancer):
    from engine.dicom.volume import load_volume

    ax = _series(shared_data / "dicom" / "ct_covid19nysbu_1" / "axial_chest_ax.dcm")
    gate, facts = _gate(load_volume(ax), ax)
    assert gate.passed and not facts.quantify and facts.contiguous_slices == 1
    assert any("slice classifier only" in n for n in gate.notes)
    series, v = cancer
    gate, facts = _gate(v, series)
    assert gate.passed and facts.quantify and facts.contiguous_slices == 64 and not facts.is_phantom


# ------------------------------------------------------------------------------------------------
# a small phantom series on disk: the analysis path, export, viewer
# ------------------------------------------------------------------------------------------------
SMALL = ph.PhantomGeometry(n_slices=56, size=512, pixel_mm=0.7, slice_mm=4.0, z0_mm=20.0)


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    from engine.dicom.volume import load_volume

    d = tmp_path_factory.mktemp("phantom_ct")
    ph.write_phantom_series(d, SMALL)
    series = _series(d)
    return series, load_volume(series)


def _result(series, v):
    from engine.results import StudyResult, Validity

    q = quantify_ct(v.hu, v.spacing, direction=v.direction, positions=v.positions, is_phantom=True)
    return StudyResult(study_uid=series.study_uid, series_uid=series.series_uid, modality="CT", kind="ct",
                       validity=Validity(True), ct_quant=q)


def test_gate_labels_the_phantom(small_series):
    series, v = small_series
    gate, facts = _gate(v, series)
    assert gate.passed and facts.quantify and facts.is_phantom
    assert any("phantom" in n for n in gate.notes)


def test_analyzer_fills_ct_quant(small_series):
    """The CT path of engine.ai.analysis sets ``ct_quant`` (read by the study verdict) and its JSON form."""
    import torch

    from engine.ai.analysis import Analyzer

    torch.set_num_threads(1)
    series, v = small_series
    res = Analyzer("cpu", ct_max_slices=4).analyze_volume(series, v, want_heatmaps=False)
    assert res.error is None and res.ct_quant is not None
    assert res.ct_quant.total_opacity_percent > 0.5 and res.ct_quant.is_phantom
    d = res.to_json_dict()["ct_quant"]
    assert d["labels"]["shape"] == list(res.ct_quant.labels.shape) and d["severity_score"] == res.ct_quant.severity_score
    from engine.review.report import build_row, ct_quant_columns

    row = build_row(None, None, series, res)
    cols = ct_quant_columns(row)
    assert cols["ct:severity_score_0_25"] == res.ct_quant.severity_score and "ct:right lower ggo%" in cols


def test_seg_and_sr_written_and_reread(small_series, tmp_path):
    import pydicom

    from engine.interop.export import ExportKinds, build_exports, write_datasets

    series, v = small_series
    res = _result(series, v)
    ds = build_exports(res, v.instance_paths, ExportKinds(sr=True, parametric_map=False, segmentation=True))
    paths = write_datasets(ds, tmp_path / "out")
    seg_p = next(p for p in paths if p.name.startswith("SEG_"))
    sr_p = next(p for p in paths if p.name.startswith("SR_"))
    seg = pydicom.dcmread(seg_p)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Ground-glass opacity", "Consolidation"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "95436008"
    import highdicom as hd

    back = hd.seg.segread(seg_p)
    from engine.ai.ct_quant import full_resolution_labels

    full = full_resolution_labels(res.ct_quant)
    vox_ml = float(np.prod(v.spacing)) / 1000.0
    for n, lab in ((1, LABEL_GGO), (2, LABEL_CONSOLIDATION)):
        frames = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[v.sop_instance_uids[i] for i in np.flatnonzero((full == lab).any(axis=(1, 2)))],
            segment_numbers=[n])
        assert abs(frames.sum() * vox_ml - float((full == lab).sum()) * vox_ml) < 1e-6
    sr = pydicom.dcmread(sr_p)
    text = " ".join(str(e.value) for e in sr.iterall() if e.keyword in ("CodeValue", "CodeMeaning", "TextValue"))
    for code in ("281392002", "281394001", "3341006", "44029006", "112120", "95436008"):
        assert code in text
    assert "CT severity score" in text and "Research use only" in text
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(seg_p)], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == []


def test_overlay_on_axial_stack_and_mpr(qapp, qtbot, small_series, tmp_path):
    from PySide6.QtTest import QTest

    from viewer.main_window import MainWindow
    from viewer.settings_store import SettingsStore
    from viewer.style import apply_dark_theme

    series, _ = small_series
    apply_dark_theme(qapp)
    s = SettingsStore(tmp_path / "viewer.ini")
    s.set_value("ai/auto_run", False)
    w = MainWindow(s)
    w.resize(1500, 950)
    w.show()
    QTest.qWaitForWindowExposed(w)
    try:
        w.open_path(Path(series.instances[0].path).parent, wait=True)
        assert w.select_series(series.series_uid)
        qtbot.waitUntil(lambda: w.current_volume is not None, timeout=30000)
        res = _result(series, w.current_volume)
        w.ai.current_series = w.current_series
        w.ai.show_result(res)
        ov = w.ct_quant_overlay
        box = w.ai.panel.ct_quant_box
        assert box.isVisible() and box.table.rowCount() == 9 and "/ 25" in box.score_label.text()
        lab = res.ct_quant.labels
        z = int(np.argmax((lab == LABEL_CONSOLIDATION).sum(axis=(1, 2))))
        w.image_view.set_slice(z)
        assert ov.is_showing("stack")
        rgba = ov.items["stack"].image
        assert (rgba[..., 3] > 0).sum() == int((lab[z] > 0).sum())
        w.image_view.grab().save(str(tmp_path / "stack.png"))
        box.overlay_check.setChecked(False)
        assert not ov.is_showing("stack")
        box.overlay_check.setChecked(True)
        box.opacity_slider.setValue(80)
        assert int(ov.items["stack"].image[..., 3].max()) == round(0.8 * 255)
        w.set_layout("mpr")
        QTest.qWait(300)
        zz, yy, xx = np.argwhere(lab == LABEL_CONSOLIDATION)[len(np.argwhere(lab == LABEL_CONSOLIDATION)) // 2]
        f = res.ct_quant.label_factor
        w.mpr_view.set_position(int(zz), int(yy) * f, int(xx) * f)
        QTest.qWait(50)
        for plane in ("axial", "coronal", "sagittal"):
            assert ov.is_showing(plane), (plane, w.mpr_view.position, (int(zz), int(yy) * f, int(xx) * f))
        # coronal: consolidation drawn where the volume is; rows reversed, head on top
        cor = ov.items["coronal"].image
        assert cor[lab.shape[0] - 1 - int(zz), int(xx), 3] > 0
        box.opacity_slider.setValue(50)
        QTest.qWait(100)
        img = w.grab()
        img.save(str(tmp_path / "mpr.png"))
        out = REPO / "docs" / "images" / "ct_quant_overlay.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(str(out))
        w.ai.panel.clear()
        assert not any(ov.is_showing(p) for p in ("stack", "axial", "coronal", "sagittal"))
    finally:
        w.close()
        w.deleteLater()
