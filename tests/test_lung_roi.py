"""Classical lung ROI on the synthetic CT phantom (engine.ai.preprocess.lung_roi)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.ai.preprocess.lung_roi import choose_slices, margin_box, segment_lungs

phantom = pytest.importorskip("engine.demo.phantom")


def _run(geom):
    vol = phantom.phantom_volume(geom)
    roi = segment_lungs(vol, (geom.slice_mm, geom.pixel_mm, geom.pixel_mm))
    return vol, roi, phantom.phantom_truth(geom)


def test_lung_volume_full_size_phantom_within_5_percent():
    geom = phantom.PhantomGeometry()            # 120 x 512 x 512, the demo CT
    vol, roi, truth = _run(geom)
    assert roi.factor == 2 and roi.mask.shape == (120, 256, 256)
    assert abs(roi.volume_ml - truth.lung_ml) / truth.lung_ml < 0.05, (roi.volume_ml, truth.lung_ml)
    # every slice that has lung in the truth has a box containing that lung
    for k in range(0, geom.n_slices, 10):
        right, left = phantom._lung_mask_with_sides(k, geom)
        lungs = right | left
        if lungs.sum() < 200:
            continue
        box = roi.boxes[k]
        assert box is not None
        ys, xs = np.nonzero(lungs)
        y0, y1, x0, x1 = box
        assert y0 <= ys.min() + 2 and ys.max() - 2 < y1 and x0 <= xs.min() + 2 and xs.max() - 2 < x1
    # slices well below the lung bases have no lung
    assert roi.boxes[0] is None and roi.area_px[0] == 0


def test_lung_volume_coarse_phantom_within_5_percent():
    geom = phantom.PhantomGeometry(n_slices=40, size=256, pixel_mm=1.4, slice_mm=7.5)
    _, roi, truth = _run(geom)
    assert abs(roi.volume_ml - truth.lung_ml) / truth.lung_ml < 0.05


def test_no_lungs_in_solid_body():
    hu = np.full((6, 96, 96), -1000, np.int16)
    hu[:, 10:86, 10:86] = 40                       # body without air inside
    roi = segment_lungs(hu, (2.0, 1.0, 1.0))
    assert roi.volume_ml == 0 and roi.n_components == 0 and all(b is None for b in roi.boxes)
    assert choose_slices(roi) == []


def test_outside_air_dropped_and_two_lungs_kept():
    hu = np.full((10, 128, 128), -1000, np.int16)
    hu[:, 8:120, 8:120] = 40
    hu[2:8, 30:90, 20:55] = -850
    hu[2:8, 30:90, 70:105] = -850
    hu[4:6, 60:64, 60:64] = -900                   # small gas bubble: not a lung
    roi = segment_lungs(hu, (2.0, 1.0, 1.0), factor=1)
    assert roi.n_components == 2
    assert roi.volume_ml == pytest.approx(2 * 6 * 60 * 35 * 2.0 / 1000.0, rel=0.02)
    assert roi.boxes[4] == (30, 90, 20, 105)


def test_margin_box_and_slice_choice():
    assert margin_box((100, 200, 50, 250), (512, 512), margin=0.0) == (100, 200, 50, 250)
    assert margin_box((100, 200, 50, 250), (512, 512)) == (94, 206, 38, 262)     # 6% of 100 and of 200
    assert margin_box((0, 300, 10, 500), (300, 512)) == (0, 300, 0, 512)          # clipped to the slice
    roi = segment_lungs(np.zeros((1, 64, 64), np.int16), (1.0, 1.0, 1.0))
    roi.area_px = np.array([0, 10, 50, 100, 90, 20, 0], float)
    assert choose_slices(roi, 0.3) == [2, 3, 4]
    assert choose_slices(roi, 0.3, max_slices=2) == [2, 4]
