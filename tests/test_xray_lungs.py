"""Chest X-ray lung segmentation (engine.ai.preprocess.xray_lungs): preprocessing, mapping back to the
image, per-lung measurements, Brixia-thirds zones, registry loading; on real radiographs when
../shared/data is present."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.ai.preprocess.xray_lungs import (LEFT, RIGHT, SEG_MODEL, SEG_SIZE, assemble_lungs, letterbox,
                                          lungs_from_labels, lungs_from_probabilities, normalise_intensity,
                                          seg_input, split_lr_labels)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _two_lungs(shape=(300, 500)):
    """Label image with a right lung on the image's left and a left lung on its right."""
    lab = np.zeros(shape, np.uint8)
    lab[_ellipse(shape, 150, 170, 110, 55)] = RIGHT
    lab[_ellipse(shape, 155, 330, 100, 50)] = LEFT
    return lab


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_letterbox_pads_to_square_without_cropping():
    img = np.random.default_rng(0).random((100, 200), dtype=np.float32)
    out, valid, g = letterbox(img, 64)
    assert out.shape == valid.shape == (64, 64)
    assert (g.side, g.top, g.left) == (200, 50, 0)
    assert valid[:16].sum() == 0 and valid[16:48].all() and valid[48:].sum() == 0   # 50/200*64 = 16
    assert out[~valid].max() == 0.0


def test_normalisation_ignores_window_and_padding():
    rng = np.random.default_rng(1)
    sq = rng.random((120, 120), dtype=np.float32) * 0.5 + 0.2
    a, ga = seg_input(sq)
    b, gb = seg_input(0.3 * sq + 0.1)           # another window / gain: same model input
    assert ga == gb and a.shape == (SEG_SIZE, SEG_SIZE)
    np.testing.assert_allclose(a, b, atol=2e-3)
    img = sq[:, :80]
    _, valid, _ = letterbox(img)
    x = normalise_intensity(letterbox(img)[0], valid)
    assert np.all(x[~valid] == -2.0)            # padding is 0 after the stretch, (0 - 0.5) / 0.25
    assert -2.0 <= x.min() and x.max() <= 2.0


def test_split_lr_labels_by_image_position():
    lab = _two_lungs()
    got = split_lr_labels(lab > 0)
    assert np.array_equal(got, lab)
    merged = _ellipse((200, 300), 100, 150, 80, 120)       # one blob: cut at its centroid column
    m = split_lr_labels(merged)
    assert (m[:, :150] != LEFT).all() and (m[:, 151:] != RIGHT).all() and set(np.unique(m)) == {0, 1, 2}
    piece = lab > 0
    piece[20:30, 420:430] = True                           # a detached piece on the image's right
    assert (split_lr_labels(piece)[20:30, 420:430] == LEFT).all()


def test_probabilities_map_back_to_full_resolution():
    import torch

    lab = _two_lungs((300, 500))
    sq, _, g = letterbox(lab.astype(np.float32), SEG_SIZE, order=0)
    onehot = np.stack([sq == k for k in (0, RIGHT, LEFT)]).astype(np.float32)
    lungs = lungs_from_probabilities(torch.from_numpy(onehot), g, "test")
    assert lungs.labels.shape == (300, 500) and lungs.prob.shape == (300, 500)
    assert _dice(lungs.right_mask, lab == RIGHT) > 0.97 and _dice(lungs.left_mask, lab == LEFT) > 0.97
    r, l = lungs.right, lungs.left
    assert abs(r.centroid[1] - 170) < 3 and abs(l.centroid[1] - 330) < 3 and abs(r.centroid[0] - 150) < 3
    assert r.n_components == 1 and r.dominant_fraction == 1.0 and lungs.confidence > 0.95
    t, le, b, ri = lungs.lung_bbox()
    assert abs(t - 40) <= 3 and abs(b - 260) <= 3 and abs(le - 115) <= 3 and abs(ri - 380) <= 3
    t2, le2, b2, ri2 = lungs.lung_bbox(margin=0.5)
    assert (t2, b2) == (0, 300) and le2 < le and ri2 > ri


def test_zones_are_thirds_of_each_lung():
    lab = _two_lungs()
    lungs = lungs_from_labels(lab)
    z = lungs.zones
    assert set(np.unique(z)) == {0, 1, 2, 3, 4, 5, 6}
    assert np.array_equal(z > 0, lab > 0)                  # zones partition the lungs
    assert np.all(lab[(z >= 1) & (z <= 3)] == RIGHT) and np.all(lab[z >= 4] == LEFT)
    r0, r1 = lungs.zone_rows["A"][0], lungs.zone_rows["C"][1]
    assert (r0, r1) == lungs.right.bbox[::2]               # A starts at the apex, C ends at the base
    heights = [lungs.zone_rows[k][1] - lungs.zone_rows[k][0] for k in "ABC"]
    assert max(heights) - min(heights) <= 1
    rows_a = np.nonzero(lungs.zone_mask("a").any(1))[0]
    rows_c = np.nonzero(lungs.zone_mask("C").any(1))[0]
    assert rows_a.max() < rows_c.min()


def test_clean_up_drops_specks_and_counts_pieces():
    lab = _two_lungs()
    raw = lab.copy()
    raw[5:9, 5:9] = RIGHT                                  # a speck far from the lung
    raw[150:160, 165:175] = 0                              # a hole inside the right lung
    probs = np.stack([raw == k for k in (0, RIGHT, LEFT)]).astype(np.float32)
    lungs = assemble_lungs(raw, probs)
    assert not lungs.right_mask[5:9, 5:9].any()            # speck dropped
    assert lungs.right_mask[150:160, 165:175].all()        # hole filled
    assert lungs.right.dominant_fraction < 1.0


def test_registry_refuses_tampered_lung_model(tmp_path, monkeypatch):
    from engine.errors import ModelError
    from engine.ai.models import registry
    from engine.paths import REPO_ROOT
    from engine.ai.preprocess.xray_lungs import load_lungseg

    found = registry.find_card(SEG_MODEL, directory=REPO_ROOT / "resources" / "models")
    assert found is not None, "the lung model card must ship in resources/models"
    card_path, card = found
    assert card["trained"] and card["architecture"] == "LungUNet" and card["file"].endswith(".safetensors")
    assert "research use only" in card["intended_use"].lower()
    assert {"right", "left", "both"} <= set(card["metrics"]["dice"]["test"])
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(card_path, d / card_path.name)
    w = d / card["file"]
    shutil.copy(card_path.parent / card["file"], w)
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    registry.clear_cache()
    assert load_lungseg().info.trained
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    registry.clear_cache()
    with pytest.raises(ModelError, match="integrity"):
        load_lungseg()
    (d / card_path.name).unlink()
    registry.clear_cache()
    with pytest.raises(ModelError, match="no card"):
        load_lungseg()
    registry.clear_cache()


def test_training_augmentation_moves_image_and_labels_together():
    """Geometric augmentation must keep pixels and labels aligned; intensity steps never invert."""
    from engine.training.train_lungseg import IGNORE, augment

    n = SEG_SIZE
    lab = np.zeros((n, n), np.uint8)
    lab[_ellipse((n, n), 96, 60, 50, 25)] = RIGHT
    lab[_ellipse((n, n), 96, 132, 50, 25)] = LEFT
    lab[90:100, 55:65] = IGNORE
    img = np.where(lab > 0, 40, 200).astype(np.uint8)          # dark lungs in a bright chest
    valid = np.ones((n, n), bool)
    rng = np.random.default_rng(3)
    for _ in range(12):
        x, y = augment(img, valid, lab, rng)
        assert x.shape == (n, n) and x.dtype == np.float32 and set(np.unique(y)) <= {0, RIGHT, LEFT, IGNORE}
        lung = (y == RIGHT) | (y == LEFT)
        chest = (y == 0) & (x > -2.0)                           # inside the (possibly shifted) image
        assert np.median(x[lung]) < np.median(x[chest]) - 1.0   # labels still sit on the dark lungs
        cols = [np.nonzero(y == k)[1].mean() for k in (RIGHT, LEFT)]
        assert cols[0] < cols[1]                                # no flips: right lung stays image-left


# ---------------------------------------------------------------- real radiographs

def _mask_rows(shared_data, split):
    from engine.training.train_lungseg import read_mask_rows

    return [r for r in read_mask_rows(shared_data) if r["split"] == split]


def test_segments_held_out_ieee8023_images(shared_data):
    """A few test-split images with reference masks: both lungs found where the annotators drew them."""
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray
    from engine.training.train_lungseg import dice_scores, load_pair

    rows = _mask_rows(shared_data, "test")[::15][:5]
    scores = []
    for row in rows:
        gray, lab = load_pair(shared_data, row)
        lungs = segment_lungs_xray(gray)
        assert lungs.labels.shape == gray.shape and lungs.prob.dtype == np.float32
        scores.append(dice_scores(lungs.labels, lab))
    both = np.mean([s[2] for s in scores])
    assert both > 0.85, scores


def test_segments_nih_and_dicom_radiographs(shared_data):
    """No masks exist for these sources: two lungs, right lung on the image's left, above the bottom."""
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame
    from engine.training.datasets import load_gray01
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray

    nih = sorted((shared_data / "xray" / "images" / "nih_cxr8_talo").glob("*"))[:2]
    grays = [load_gray01(p) for p in nih]
    grays.append(display_gray01(load_frame(shared_data / "dicom" / "xray_siim_1.dcm")))
    for g in grays:
        lungs = segment_lungs_xray(g)
        r, l = lungs.right, lungs.left
        assert r.area_fraction > 0.04 and l.area_fraction > 0.04
        assert r.centroid[1] < g.shape[1] / 2 < l.centroid[1]
        assert abs(r.centroid[0] - l.centroid[0]) < 0.25 * g.shape[0]


def test_card_dice_matches_its_own_file(shared_data):
    """The card's numbers belong to the shipped weights: same sha256 as the file."""
    from engine.ai.models.registry import find_card, sha256_file
    from engine.paths import REPO_ROOT

    card_path, card = find_card(SEG_MODEL, directory=REPO_ROOT / "resources" / "models")
    assert sha256_file(card_path.parent / card["file"]) == card["sha256"]
    test = card["metrics"]["dice"]["test"]
    assert test["n_images"] == len(_mask_rows(shared_data, "test"))
    lo, hi = test["both"]["ci95"]
    assert lo <= test["both"]["mean"] <= hi
    json.dumps(card)


# ---------------------------------------------------------------- lung-restricted heatmaps

def test_restrict_to_lungs_has_soft_edges():
    from engine.ai.explain.gradcam import restrict_to_lungs, soft_lung_window

    lab = _two_lungs((300, 500))
    heat = np.ones((300, 500), np.float32)
    out = restrict_to_lungs(heat, lab > 0)
    assert out.dtype == np.float32 and out.shape == heat.shape
    assert out[150, 170] > 0.99 and out[150, 330] > 0.99      # lung centres untouched
    assert out[5, 5] < 1e-3 and out[150, 250] < 0.05            # corner and mediastinum faded out
    row = out[150, 100:170]                                     # across the right lung's lateral edge
    assert np.all(np.diff(row) >= -1e-6) and np.max(np.diff(row)) < 0.2   # a ramp, not a step
    assert restrict_to_lungs(heat, None) is heat                # no segmentation: unchanged
    big = np.zeros((2400, 2000), bool)
    big[400:2000, 300:900] = True
    w = soft_lung_window(big)                                   # large CR: blurred at <= 512 px, same shape
    assert w.shape == big.shape and 0.4 < w[400, 600] < 0.6 and w[1200, 600] > 0.99


def test_xray_heatmaps_stay_in_the_lungs_and_negatives_are_hidden(tmp_path, monkeypatch, shared_data):
    """Analysis path: Grad-CAM faded out beyond the lungs; only positive findings' maps shown by default."""
    import torch

    from engine.ai.analysis import Analyzer
    from engine.dicom.display import display_gray01
    from engine.dicom.pixels import load_frame
    from engine.dicom.records import InstanceRecord, SeriesRecord
    from engine.ai.models import registry
    from engine.ai.models.densenet_xray import COVID_CLASSES, XRV_PATHOLOGIES
    from engine.paths import REPO_ROOT
    from engine.ai.preprocess.xray_lungs import segment_lungs_xray

    d = tmp_path / "models"
    xstate = registry._untrained_module(registry.default_card(registry.XRAY_MODEL)).state_dict()
    big = {"mean": torch.zeros(1024), "components": torch.eye(2, 1024), "variance": torch.full((2,), 1e6),
           "residual_variance": torch.tensor(1e6)}
    registry.write_card(d, name=registry.XRAY_MODEL, version="9.9.9", state_dict=xstate, trained=True,
                        labels={"pathologies": XRV_PATHOLOGIES, "covid": COVID_CLASSES},
                        thresholds={"COVID-19": 1.5, "Normal": 1.5, "Lung Opacity": 1.5},   # nothing positive
                        ood_tensors=big, ood={"method": "pca-mahalanobis", "threshold": 1.0})
    card_path, card = registry.find_card(SEG_MODEL, directory=REPO_ROOT / "resources" / "models")
    shutil.copy(card_path, d / card_path.name)
    shutil.copy(card_path.parent / card["file"], d / card["file"])
    monkeypatch.setenv("CHESTVIEW_MODELS", str(d))
    registry.clear_cache()
    path = str(shared_data / "dicom" / "xray_barre_crmono1chest.dcm")    # 440 px: a fast real CR
    s = SeriesRecord("2.25.1", "2.25.2", "anon", "CR", body_part="CHEST", view_position="PA",
                     instances=[InstanceRecord(path, "2.25.3", 1)])
    try:
        r = Analyzer("cpu").analyze(s, want_heatmaps=True)
    finally:
        registry.clear_cache()
    assert r.validity.passed and r.validity.checks["two_lungs"] and r.validity.checks["lungs_side_by_side"]
    assert r.heatmaps
    t, le, b, ri = segment_lungs_xray(display_gray01(load_frame(path))).lung_bbox(margin=0.1)
    positive = {f.label for f in r.findings if f.positive}
    for h in r.heatmaps:
        outside = h.array.copy()
        outside[t:b, le:ri] = 0
        assert float(outside.max()) < 1e-3, h.target
        assert h.hidden_by_default == (h.target != "severity" and h.target not in positive), h.target
    assert not positive and {h.target for h in r.heatmaps} == {r.findings[0].label, "severity"}
    assert [h.hidden_by_default for h in r.heatmaps] == [True, False]   # top negative finding hidden


def test_findings_panel_shows_hidden_heatmaps_only_when_asked(qtbot):
    from engine.results import Finding, Heatmap, ModelInfo, StudyResult, Validity
    from viewer.ai.findings_panel import FindingsPanel

    m = ModelInfo("xray-densenet121", "1.0.0", True, "0" * 64)
    blob = np.zeros((64, 64), np.float32)
    blob[20:40, 10:30] = 1.0
    res = StudyResult("1.2", "1.2.3", "CR", "xray", Validity(True, []),
                      [Finding("Pneumonia", 0.9, 0.95, False, m.name, m.version),
                       Finding("Lung Opacity", 0.4, 0.3, True, m.name, m.version)],
                      None, [Heatmap("Pneumonia", blob, m.name, m.version, hidden_by_default=True),
                             Heatmap("Lung Opacity", blob, m.name, m.version)], [m])
    p = FindingsPanel()
    qtbot.addWidget(p)
    p.show_result(res)
    # the more probable finding is negative: its map is not the default, the positive one is
    assert p.selected_target() == "Lung Opacity"
    assert set(p.heatmap_targets()) == {"Pneumonia", "Lung Opacity"}
    assert p.select_target("Pneumonia") and p.selected_target() == "Pneumonia"    # shown when asked
    res.heatmaps = res.heatmaps[:1]
    p.show_result(res)
    assert p.selected_target() is None and p.heatmap_targets() == ["Pneumonia"]
