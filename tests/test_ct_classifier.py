"""CT slice classifier v2: shared preprocessing, study verdict, model card, specificity on real CT."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "resources" / "models" / "ct-inception-2.0.0.json"


def _figure_slice(seed: int = 0, size: int = 256) -> np.ndarray:
    """A lung-window-like 8-bit slice: dark outside air, bright body, two darker lungs with vessels and a
    ground-glass patch (as a figure cut from a paper would show)."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    g = np.zeros((size, size), np.float32)
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.47 * size)) ** 2 <= 1
    g[body] = 0.85
    for cx in (0.32, 0.68):
        lung = ((yy - size / 2) / (0.3 * size)) ** 2 + ((xx - cx * size) / (0.14 * size)) ** 2 <= 1
        g[lung] = 0.3 + 0.03 * rs.standard_normal(int(lung.sum()))
    patch = ((yy - 0.55 * size) ** 2 + (xx - 0.3 * size) ** 2) <= (0.06 * size) ** 2
    g[patch] = 0.55
    for _ in range(20):  # vessels
        y, x = rs.randint(int(0.3 * size), int(0.7 * size)), rs.randint(int(0.2 * size), int(0.8 * size))
        g[max(0, y - 2):y + 2, max(0, x - 2):x + 2] = np.maximum(g[max(0, y - 2):y + 2, max(0, x - 2):x + 2], 0.8)
    return np.round(np.clip(g, 0, 1) * 255) / 255


def test_training_and_app_preprocessing_agree_on_the_same_pixels(tmp_path):
    """A figure PNG through the training path and the same pixels as HU through the app's path give one tensor."""
    from PIL import Image

    from engine.ai.analysis import Analyzer
    from engine.training.datasets import ct_batch_input, encode_ct_slice
    from engine.ai.preprocess.ct import LUNG_WINDOW
    from engine.ai.preprocess.ct_input import figure_lung_mask

    g = _figure_slice()
    png = tmp_path / "slice.png"
    Image.fromarray(np.round(g * 255).astype(np.uint8)).save(png)
    cached, fallback = encode_ct_slice(png, 160)
    assert not fallback and cached.shape == (2, 160, 160)
    train_x = ct_batch_input(cached[None])[0]

    center, width = LUNG_WINDOW
    hu = (g * width + center - width / 2).astype(np.float32)   # hu_to_gray01(hu) == g
    mask = figure_lung_mask(g)
    roi = SimpleNamespace(mask=mask[None], factor=1, boxes=[(0, 1, 0, 1)])
    app_x, box = Analyzer._ct_input(hu, roi, 0, 160)

    assert app_x.shape == (3, 160, 160)
    torch.testing.assert_close(app_x, train_x, atol=1e-5, rtol=0)
    # the crop follows the lungs, the outside is blanked, the lungs are normalised to fill [-1, 1]
    y0, y1, x0, x1 = box
    assert (y1 - y0) < 0.8 * g.shape[0] and (x1 - x0) < 0.85 * g.shape[1]
    inside = app_x[0][cached[1] > 0.5]
    assert float(inside.min()) == pytest.approx(-1.0) and float(inside.max()) == pytest.approx(1.0)
    assert torch.all(app_x[0][cached[1] < 0.5] == -1.0)


def test_normalisation_removes_overall_brightness_and_window():
    """Brighter rendering or another window of the same slice gives (nearly) the same model input."""
    from engine.ai.preprocess.ct_input import figure_lung_mask, prepare_ct_slice

    g = _figure_slice(1)
    mask = figure_lung_mask(g)
    base, _ = prepare_ct_slice(g, mask, 128)
    brighter, _ = prepare_ct_slice(np.clip(g * 0.8 + 0.15, 0, 1), mask, 128)
    assert float((base - brighter).abs().mean()) < 0.02
    # the raw crop brightness differed a lot
    assert abs(float((g * 0.8 + 0.15)[mask].mean()) - float(g[mask].mean())) > 0.05


def test_rendering_augmentation_changes_pixels_but_keeps_range():
    from engine.ai.preprocess.ct_input import augment_ct_batch, figure_lung_mask

    g = torch.from_numpy(_figure_slice(2)[::2, ::2].copy()).float()
    m = torch.from_numpy(figure_lung_mask(g.numpy()))
    x = torch.stack([torch.stack([g, m.float()])] * 4)
    out = augment_ct_batch(x, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 128, 128) and float(out.min()) >= -1 and float(out.max()) <= 1
    assert float((out[0] - out[1]).abs().mean()) > 0.01


# ---------------------------------------------------------------- study verdict
def _q(opacity: float, volume: float = 4500.0) -> SimpleNamespace:
    return SimpleNamespace(total_opacity_percent=opacity, lung_volume_ml=volume)


def test_verdict_needs_classifier_and_burden():
    from engine.ai.ct_verdict import BASIS_COMBINED, MIN_OPACITY_PERCENT, ct_verdict

    hi, lo = MIN_OPACITY_PERCENT + 4.0, MIN_OPACITY_PERCENT / 4
    v = ct_verdict(0.9, 0.6, _q(hi), is_volume=True)
    assert v.flag and v.basis == BASIS_COMBINED and v.opacity_percent == hi
    assert not ct_verdict(0.9, 0.6, _q(lo), is_volume=True).flag           # negligible burden
    assert "no pneumonia burden" in " ".join(ct_verdict(0.9, 0.6, _q(lo), is_volume=True).reasons)
    assert not ct_verdict(0.3, 0.6, _q(hi), is_volume=True).flag           # classifier below threshold
    assert not ct_verdict(0.9, 0.6, _q(hi), is_volume=True, gate_passed=False).flag
    assert not ct_verdict(0.9, 0.6, _q(hi), is_volume=True, trained=False).flag
    assert "no lungs" in " ".join(ct_verdict(None, 0.6, _q(hi), is_volume=True).reasons)
    assert not ct_verdict(0.9, 0.6, None, is_volume=True).flag             # quantification did not run
    assert not ct_verdict(0.9, 0.6, _q(hi, volume=0.0), is_volume=True).flag   # no lung volume
    edge = ct_verdict(0.6, 0.6, _q(MIN_OPACITY_PERCENT), is_volume=True)
    assert edge.flag                                                        # both thresholds inclusive


def test_single_slice_is_classifier_only_and_never_flagged():
    from engine.ai.ct_verdict import BASIS_SLICE_ONLY, ct_verdict

    v = ct_verdict(0.99, 0.5, None, is_volume=False)
    assert v.basis == BASIS_SLICE_ONLY == "slice classifier only, no volume"
    assert not v.flag and v.classifier_probability == 0.99


# ---------------------------------------------------------------- model card
@pytest.fixture(scope="module")
def card() -> dict:
    if not CARD.is_file():
        pytest.fail(f"{CARD} missing: run `main.py evaluate RUN --write-card --version 2.0.0`")
    return json.loads(CARD.read_text())


def test_card_contents(card):
    from engine.ai.models import registry

    assert card["name"] == "ct-inception" and card["version"] == "2.0.0" and card["trained"] is True
    assert card["sha256"] == registry.sha256_file(CARD.parent / card["file"])
    assert card["intended_use"].lower() == "research use only, not for diagnostic use"
    assert "All copyrights of the data belong to the authors and publishers" in " ".join(card["data_licences"])
    assert card["preprocessing"]["id"] == "lung-masked-normalised-v2"
    m = card["metrics"]
    assert "VALIDATION" in m["label"] and "optimistic" in m["label"] and m["selection_rule"]
    pooled = m["val"]["slice"]["pooled"]
    lo, hi = pooled["ci95"]["auc"]
    assert lo <= pooled["auc"] <= hi and pooled["bootstrap"]["unit"] == "patient"
    patient = m["val"]["patient_top3_mean"]
    assert patient["ci95"]["auc"][0] <= patient["auc"] <= patient["ci95"]["auc"][1]
    b = m["brightness_shortcut"]["val"]
    for key in ("model_auc", "brightness_auc", "spearman_score_vs_brightness"):
        assert key in b
    assert b["brightness_auc_ci95"][0] <= b["brightness_auc"] <= b["brightness_auc_ci95"][1]
    assert b["bootstrap"]["unit"] == "patient" and b["n"] == pooled["n"]
    assert 0.0 < card["thresholds"]["COVID-19"] < 1.0
    assert card["study_verdict"]["min_opacity_percent"] > 0
    spec = card["specificity_check"]
    assert spec["passed"] is True and spec["negatives_flagged"] == 0 and spec["negatives_checked"] >= 8
    assert spec["model"]["sha256"] == card["sha256"]
    for r in spec["items"]:   # raw scores are reported; an unscored slice says why (failed gate)
        assert r.get("classifier_study_probability") is not None or (not r["gate_passed"] and r["gate_reasons"])
        if r["expected"] == "negative":
            assert r["classifier_study_probability"] is not None and r["verdict_flag"] is False


def test_registry_ships_version_2():
    from engine.ai.models import registry

    registry.clear_cache()
    lm = registry.load_model(registry.CT_MODEL)
    assert lm.info.version == "2.0.0" and lm.trained
    registry.clear_cache()


# ---------------------------------------------------------------- real CT (skips without ../shared)
def _analyze(path: Path):
    from engine.ai.analysis import Analyzer
    from engine.dicom.index import index_path

    series = [s for s in index_path(path).all_series() if s.kind == "ct"]
    assert len(series) == 1
    return Analyzer("cpu").analyze(series[0], want_heatmaps=False)


def test_lung_cancer_series_is_not_flagged(shared_data):
    res = _analyze(shared_data / "dicom" / "ct_lungpetctdx_1")
    assert res.error is None and res.ct_study_probability is not None
    assert len(res.ct_slice_scores) >= 20
    assert res.ct_verdict is not None and res.ct_verdict.flag is False
    assert not any(f.positive for f in res.findings)


def test_nema_ct1_slice_is_not_flagged(shared_data):
    from engine.ai.ct_verdict import BASIS_SLICE_ONLY

    res = _analyze(shared_data / "dicom" / "ct_wg04_ct1_transfer_syntaxes" / "CT1_UNC_explicitLE.dcm")
    assert res.error is None and res.ct_study_probability is not None
    assert res.ct_verdict.basis == BASIS_SLICE_ONLY and res.ct_verdict.flag is False
    assert not any(f.positive for f in res.findings)
    assert any(BASIS_SLICE_ONLY in w for w in res.warnings)
