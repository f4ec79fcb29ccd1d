"""Datasets: label mapping, sampling weights, training preprocessing == inference preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.training.datasets import (SUPPORTED_PATHOLOGIES, encode_ct_slice, encode_xray, load_gray01, read_csv_rows,
                             source_balanced_weights, xray_targets)


def test_xray_targets_mask_unlabelled_outputs():
    from engine.ai.models.densenet_xray import LUNG_OPACITY_INDEX, XRV_PATHOLOGIES

    rows = [{"label": "covid"}, {"label": "other_pneumonia"}, {"label": "normal"}, {"label": "other_finding"}]
    cov, tgt, mask = xray_targets(rows)
    assert cov.tolist() == [0, 1, 2, -1]
    pn = XRV_PATHOLOGIES.index("Pneumonia")
    assert tgt[:, pn].tolist() == [1, 1, 0, 0] and mask[:, pn].tolist() == [1, 1, 1, 0]
    assert tgt[:, LUNG_OPACITY_INDEX].tolist() == [1, 1, 0, 1] and mask[:, LUNG_OPACITY_INDEX].tolist() == [1, 1, 1, 1]
    unsupported = [j for j, n in enumerate(XRV_PATHOLOGIES) if n not in SUPPORTED_PATHOLOGIES]
    assert len(unsupported) == 16 and mask[:, unsupported].sum() == 0


def test_source_balanced_weights():
    rows = ([{"label": "a", "source": "s1"}] * 90 + [{"label": "a", "source": "s2"}] * 10
            + [{"label": "b", "source": "s1"}] * 25)
    w = source_balanced_weights(rows, power=0.5)
    assert w.sum() == pytest.approx(1.0)
    assert w[:100].sum() == pytest.approx(0.5) and w[100:].sum() == pytest.approx(0.5)  # classes equal
    # within class a, s2 gets sqrt(10)/(sqrt(90)+sqrt(10)) = 0.25 of the draws instead of 0.10
    assert w[90:100].sum() / w[:100].sum() == pytest.approx(0.25)
    plain = source_balanced_weights(rows, power=1.0)
    assert plain[90:100].sum() / plain[:100].sum() == pytest.approx(0.10)


def test_xray_training_input_is_exactly_prepare_xray(shared_data):
    from engine.ai.preprocess.xray import prepare_xray

    rows = read_csv_rows(shared_data / "xray" / "labels.csv")
    p = shared_data / "xray" / rows[0]["path"]
    t, _ = encode_xray(p)
    ref, _ = prepare_xray(load_gray01(p))
    assert t.shape == (1, 224, 224)
    assert torch.equal(t, ref)
    assert float(t.min()) >= -1024 and float(t.max()) <= 1024


def test_ct_slice_crop_keeps_the_lungs(shared_data):
    from engine.ai.preprocess.ct_slices import crop_lungs, lung_bbox

    rows = read_csv_rows(shared_data / "ct" / "slices.csv")
    found = 0
    for r in rows[:6]:
        g = load_gray01(shared_data / "ct" / r["path"])
        crop, (t, l, b, rr) = crop_lungs(g)
        assert crop.shape == (b - t, rr - l) and crop.size <= g.size
        if lung_bbox(g) is not None:
            found += 1
            # the crop drops the air/caption border and keeps the middle of the chest
            assert crop.size < 0.9 * g.size
            assert t < g.shape[0] / 2 < b and l < g.shape[1] / 2 < rr
    assert found >= 4
    x, _ = encode_ct_slice(shared_data / "ct" / rows[0]["path"])
    # cached before the per-lung normalisation: [lung-window grey in [0, 1], lung mask]
    assert x.shape == (2, 224, 224) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(torch.unique(x[1]).tolist()) <= {0.0, 1.0} and float(x[1].mean()) > 0.1


def test_ct_crop_falls_back_on_images_without_lungs():
    from engine.ai.preprocess.ct_slices import crop_lungs

    flat = np.full((64, 80), 0.5, np.float32)
    crop, box = crop_lungs(flat)
    assert box == (0, 0, 64, 80) and crop.shape == flat.shape
