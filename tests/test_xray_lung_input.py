"""Lung-only X-ray input (engine.ai.preprocess.xray_lung_input), zone severity (engine.ai.severity_zones),
severity cross-validation and local validation (engine.training.local_validation)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engine.ai.preprocess import xray_lung_input as LI


def _phantom_cxr(rows: int = 300, cols: int = 260, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey 'radiograph' with two dark lung ellipses and its lung mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    img = 0.75 + 0.05 * rng.standard_normal((rows, cols))
    mask = np.zeros((rows, cols), bool)
    for cx in (0.3, 0.7):
        e = ((xx / cols - cx) / 0.14) ** 2 + ((yy / rows - 0.5) / 0.3) ** 2 < 1
        mask |= e
    img[mask] -= 0.4
    return np.clip(img, 0, 1).astype(np.float32), mask


def test_equalise_is_invariant_to_monotonic_grey_changes():
    img, _ = _phantom_cxr()
    a = LI.equalise(img)
    b = LI.equalise(img ** 0.6)          # gamma: another site's processing
    c = LI.equalise(0.2 + 0.5 * img)     # window/gain
    assert np.abs(a - b).mean() < 0.02
    assert np.abs(a - c).mean() < 0.02
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_lung_input_is_black_outside_the_lungs_and_in_model_range():
    img, mask = _phantom_cxr()
    li = LI.lung_input(img, mask)
    t = li.tensor.numpy()[0]
    assert t.shape == (LI.MODEL_SIDE, LI.MODEL_SIDE)
    assert t.min() >= -1024.0 - 1e-3 and t.max() <= 1024.0 + 1e-3
    # corners of the crop are outside the lungs: black
    assert li.norm01[:5, :5].max() == 0.0
    assert li.norm01[li.mask].mean() > 0.05
    with pytest.raises(ValueError, match="empty lung mask"):
        LI.lung_input(img, np.zeros_like(mask))


def test_same_pixels_same_input_from_jpeg_and_dicom(tmp_path: Path):
    """One preprocessing path: a JPEG's pixels /255 and the same pixels read as DICOM through the
    viewer's pixel pipeline give the identical model input."""
    from PIL import Image

    from engine.training.datasets import load_gray01
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame
    from engine.training.local_validation import _image_to_dicom

    img, mask = _phantom_cxr()
    png = tmp_path / "x.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(png)
    g_train = load_gray01(png)
    dcm = _image_to_dicom(png, tmp_path, 1)
    g_app = display_gray01(load_frame(dcm))
    assert g_app.shape == g_train.shape
    np.testing.assert_allclose(g_app, g_train, atol=1e-6)
    a = LI.lung_input(g_train, mask).tensor.numpy()
    b = LI.lung_input(g_app, mask).tensor.numpy()
    # equal up to float rounding at a histogram bin edge (one bin = 2048/256 = 8 units of the range)
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 16.0


def test_heatmap_is_restricted_to_the_lungs_with_smooth_edges():
    img, mask = _phantom_cxr()
    li = LI.lung_input(img, mask)
    cam = np.ones((6, 6), np.float32)
    hm = LI.heatmap_to_image(cam, li.geom, mask)
    assert hm.shape == img.shape
    far = np.ones_like(mask)
    far[20:-20, 20:-20] = False
    assert hm[far & ~mask].max() < 0.05           # nothing far outside the lungs
    assert hm[mask].mean() > 0.5
    # no hard rectangle edge: values between 0.1 and 0.9 exist along the lung border
    assert ((hm > 0.1) & (hm < 0.9)).sum() > 50


def test_zone_features_and_ridge_roundtrip():
    from engine.ai import severity_zones as SZ

    rng = np.random.default_rng(0)
    zones = np.zeros((LI.RAW_SIDE, LI.RAW_SIDE), np.uint8)
    for z in range(6):
        r0 = 40 + (z % 3) * 50
        c0 = 30 if z < 3 else 150
        zones[r0:r0 + 50, c0:c0 + 70] = z + 1
    fmap = rng.random((8, 6, 6)).astype(np.float32)
    w = SZ.zone_weights(zones, (6, 6))
    np.testing.assert_allclose(w.sum(axis=(1, 2)), 1.0, atol=1e-5)
    rows = SZ.zone_features(fmap, zones, rng.random(zones.shape).astype(np.float32))
    assert rows.shape == (6, 8 + SZ.N_STATS + 6)
    # a learnable relation is recovered; the model survives a tensor round trip
    x = rng.standard_normal((120, 6, 10)).astype(np.float32)
    y = np.clip(1.5 + 0.8 * x[..., 0] - 0.5 * x[..., 1], 0, 3)
    m = SZ.fit(x, y, x[:30], y[:30].sum(-1) / 18 * 8, y[:30].sum(-1) / 18 * 6, alpha=1.0)
    assert np.abs(m.zone_scores(x) - y).mean() < 0.25
    m2 = SZ.ZoneSeverityModel.from_tensors(m.to_tensors())
    np.testing.assert_allclose(m2.zone_scores(x), m.zone_scores(x), atol=1e-4)
    e, o = m.cohen(np.array([0.0, 18.0]))
    assert 0 <= e[0] <= e[1] <= 8 and 0 <= o[0] <= o[1] <= 6


@pytest.mark.parametrize("signal", [True, False])
def test_severity_cv_enables_only_what_beats_a_constant(signal: bool):
    """The enable rule: a scorer with signal is switched on, one without is not."""
    from engine.training.evaluate_xray_lung import severity_cv

    rng = np.random.default_rng(1)
    n_b, n_c = 90, 60
    n = n_b + n_c
    rows = [{"patient_id": f"p{i}"} for i in range(n)]
    zf = rng.standard_normal((n, 6, 12)).astype(np.float32)
    latent = np.clip(1.5 + 0.9 * zf[..., 0], 0, 3) if signal else np.clip(1.5 + 0.9 * rng.standard_normal((n, 6)), 0, 3)
    zone = np.full((n, 6), np.nan)
    zone[:n_b] = latent[:n_b]
    ext = np.full(n, np.nan)
    opa = np.full(n, np.nan)
    ext[n_b:] = latent[n_b:].sum(-1) / 18 * 8
    opa[n_b:] = latent[n_b:].sum(-1) / 18 * 6
    tg = {"zone": zone, "global_s": np.nan_to_num(zone.sum(-1)), "global_j": np.nan_to_num(zone.sum(-1)),
          "extent": ext, "opacity": opa}
    res = severity_cv(rows, np.ones(n, bool), zf, tg, repeats=2, folds=4)
    assert res["enabled"] is signal
    if signal:
        assert res["geographic_extent"]["pearson_r"] > 0.7


def test_local_validation_lists_bad_rows_and_writes_reports(tmp_path: Path):
    """Generated images (no lungs: refused by the gate), a DICOM file, a missing file and an
    unknown label: nothing is fatal, every row is accounted for."""
    from PIL import Image

    from engine.training.local_validation import run_rows, summarise, write_outputs

    img, _ = _phantom_cxr()
    for k in range(3):
        Image.fromarray(np.round(np.roll(img, 7 * k, axis=1) * 255).astype(np.uint8)).save(tmp_path / f"a{k}.png")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        w.writerow(["a0.png", "normal", "p0", "site"])
        w.writerow(["a1.png", "abnormal", "p1", "site"])
        w.writerow(["a2.png", "banana", "p2", "site"])
        w.writerow(["missing.png", "normal", "p3", "site"])
        w.writerow(["notes.txt", "normal", "p4", "other"])
    (tmp_path / "notes.txt").write_text("not an image")
    outs = run_rows(tmp_path / "labels.csv", None, "xray", "Lung Opacity", progress=None)
    assert len(outs) == 5
    res = summarise(outs, "test model", "Lung Opacity")
    reasons = {b["row"]: b["reason"] for b in res["bad_rows"]}
    assert "unknown label" in reasons[4]
    assert "not found" in reasons[5]
    assert "unreadable" in reasons[6] or "no X-ray" in reasons[6]
    jp, hp = write_outputs(res, tmp_path / "out")
    assert json.loads(jp.read_text())["n_rows"] == 5
    assert "Local validation" in hp.read_text()


@pytest.mark.shared_data
def test_local_validation_on_real_jpegs_and_dicom(shared_data: Path, tmp_path: Path):
    """Real NIH JPEGs and the real DICOM CRs of ../shared/data go through the app pipeline."""
    from engine.training.local_validation import run_rows, summarise

    rows = list(csv.DictReader(open(shared_data / "xray" / "labels.csv")))
    nih = [r for r in rows if r["source"] == "nih_cxr8_talo" and r["split"] == "test"]
    pick = [r for r in nih if r["label"] == "normal"][:3] + [r for r in nih if r["label"] != "normal"][:3]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        for r in pick:
            w.writerow([str(shared_data / "xray" / r["path"]), r["label"], r["patient_id"], "nih"])
        w.writerow([str(shared_data / "dicom" / "xray_siim_1.dcm"), "normal", "siim1", "dicom"])
    outs = run_rows(tmp_path / "labels.csv", None, "xray", "Lung Opacity", progress=None)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    res = summarise(outs, "shipped", "Lung Opacity")
    assert res["per_source"]["nih"]["rows"] == 6
    assert res["per_source"]["dicom"]["rows"] == 1
