"""Validity gate: header checks, pixel sanity, OOD score (engine.ai.validity, engine.ai.models.ood)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.ai.models.ood import fit_ood, has_ood, ood_score, pooled_features
from engine.ai.validity import GateBuilder, header_checks, ood_check, pixel_checks_2d, volume_checks


def _gate(**kw) -> GateBuilder:
    g = GateBuilder()
    header_checks(g, **kw)
    return g


@pytest.mark.parametrize("kind,mod,bp,vp,ok", [
    ("xray", "CR", "CHEST", "PA", True),
    ("xray", "DX", "", "", True),
    ("xray", "dx", "chest", "ap", True),
    ("xray", "CR", "EXTREMITY", "AP", False),
    ("xray", "CR", "CHEST", "LATERAL", False),
    ("xray", "CR", "CHEST", "LL", False),
    ("xray", "MR", "CHEST", "PA", False),
    ("ct", "CT", "CHEST", "", True),
    ("ct", "CT", "HEAD", "", False),
    ("ct", "CR", "CHEST", "", False),
])
def test_header_checks(kind, mod, bp, vp, ok):
    g = _gate(kind=kind, modality=mod, body_part=bp, view_position=vp)
    v = g.build()
    assert v.passed is ok
    assert bool(v.reasons) is (not ok)


def test_reasons_name_the_problem():
    v = _gate(kind="xray", modality="CR", body_part="EXTREMITY", view_position="LATERAL").build()
    assert v.checks == {"modality": True, "body_part": False, "view": False}
    assert any("EXTREMITY" in r for r in v.reasons) and any("LATERAL" in r for r in v.reasons)


def test_pixel_checks():
    rng = np.random.default_rng(0)
    g = GateBuilder()
    pixel_checks_2d(g, rng.random((300, 250), dtype=np.float32))
    assert g.passed
    for bad, key in [(np.full((300, 300), 0.4, np.float32), "pixel_not_constant"),
                     (rng.random((32, 300), dtype=np.float32), "pixel_size"),
                     ((rng.random((300, 300)) > 0.5).astype(np.float32), "pixel_not_saturated")]:
        g = GateBuilder()
        pixel_checks_2d(g, bad)
        assert g.checks[key] is False and not g.passed


def test_volume_checks():
    hu = np.full((4, 128, 128), 40, np.int16)
    hu[:, 40:90, 30:100] = -850
    g = GateBuilder()
    volume_checks(g, hu, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert g.passed
    g = GateBuilder()
    volume_checks(g, hu, (1, 0, 0, 0, 0, -1, 0, 1, 0))   # coronal
    assert g.checks["axial"] is False
    g = GateBuilder()
    volume_checks(g, np.full((4, 128, 128), 1000, np.int16), None)
    assert g.checks["hu_range"] is False


def test_untrained_model_has_no_ood_check_and_says_so():
    g = GateBuilder()
    ood_check(g, None, None, trained=False)
    v = g.build()
    assert v.passed and v.ood_score is None and "untrained" in v.reasons[0]


def test_fit_ood_scores_inliers_near_one_and_outliers_high():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(8, 64))
    train = rng.normal(size=(400, 8)) @ basis + 0.05 * rng.normal(size=(400, 64))
    tensors, thr = fit_ood(train, quantile=0.99, n_components=8)
    assert has_ood(tensors) and tensors["components"].shape == (8, 64)
    inl = ood_score(torch.tensor(rng.normal(size=(200, 8)) @ basis + 0.05 * rng.normal(size=(200, 64)),
                                 dtype=torch.float32), tensors)
    assert 0.7 < float(np.median(inl)) < 1.3
    assert float(np.mean(inl <= thr)) > 0.9
    # off-subspace input (what a tibia does to chest features) is flagged by the residual term
    out = ood_score(torch.tensor(rng.normal(size=(20, 64)), dtype=torch.float32), tensors)
    assert float(out.min()) > thr
    g = GateBuilder()
    ood_check(g, float(out[0]), thr, trained=True)
    assert g.checks["ood"] is False and "out-of-distribution" in g.reasons[0]


def test_pooled_features_relu_mean():
    f = torch.tensor([[[[1.0, -1.0], [3.0, -5.0]]]])
    assert pooled_features(f).tolist() == [[1.0]]
