"""2-D lung-ROI crop for 8-bit CT *slices* (paper figures, PNG): the training-side counterpart of
the 3-D ROI used on HU volumes (DESIGN.md section 4, after Wang et al.'s M-Inception pipeline).

The PNG slices of COVID-CT have no HU values, so the HU threshold (-320 HU) becomes a threshold
on the lung-window grey level: lungs are the dark regions *inside* the body; dark regions that
touch the image border are outside air. Cropping to the lungs also removes most captions,
panel letters and scanner text around the body, which are class-correlated shortcuts in this set.
"""
from __future__ import annotations

import numpy as np

# -320 HU in the lung window (center -600, width 1500) used by engine.ai.preprocess.ct.
LUNG_GRAY_THRESHOLD = (-320.0 - (-600.0 - 750.0)) / 1500.0  # ~0.687


def lung_bbox(gray01: np.ndarray, *, threshold: float | None = None, margin: float = 0.06,
              min_area_frac: float = 0.005) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the two largest dark, non-border components, or None.

    ``threshold`` defaults to the smaller of the -320 HU grey level and the image's Otsu
    threshold, because figure slices are often windowed differently from our lung window.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    g = np.asarray(gray01, dtype=np.float32)
    if g.ndim != 2 or min(g.shape) < 16:
        return None
    if threshold is None:
        try:
            threshold = min(LUNG_GRAY_THRESHOLD, float(threshold_otsu(g)))
        except ValueError:  # constant image
            return None
    dark = ndimage.binary_opening(g < threshold, iterations=1)
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    cand = [(s, i + 1) for i, s in enumerate(sizes)
            if (i + 1) not in set(border.tolist()) and s >= min_area_frac * g.size]
    if not cand:
        return None
    keep = [i for _, i in sorted(cand, reverse=True)[:2]]
    ys, xs = np.nonzero(np.isin(labels, keep))
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = bottom - top, right - left
    if h < 0.15 * g.shape[0] or w < 0.15 * g.shape[1]:
        return None  # too small to be lungs (a bubble, a letter)
    my, mx = int(round(margin * h)), int(round(margin * w))
    return (max(0, top - my), max(0, left - mx), min(g.shape[0], bottom + my), min(g.shape[1], right + mx))


def crop_lungs(gray01: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop a [0,1] slice to its lung bounding box; falls back to the whole slice (box = full image)."""
    box = lung_bbox(gray01)
    if box is None:
        box = (0, 0, gray01.shape[0], gray01.shape[1])
    t, l, b, r = box
    return np.ascontiguousarray(gray01[t:b, l:r]), box
