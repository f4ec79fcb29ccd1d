"""Classical 3-D lung segmentation on a HU volume (DESIGN.md section 4, after Wang et al.'s ROI step).

Air below about -320 HU -> 3-D connected components -> drop air touching the in-plane border
(outside the body, the table) -> keep the two largest components (one if the lungs are merged) ->
morphological closing + per-slice filling of small holes (vessels, nodules). Works on an in-plane 2x
block-averaged volume to stay fast and memory-light (a 120x512x512 study becomes 120x256x256);
per-slice bounding boxes are scaled back to full resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LUNG_THRESHOLD_HU = -320.0
MAX_HOLE_RADIUS_MM = 20.0        # enclosed non-air regions up to this size are lung (vessels, lesions)
SECOND_LUNG_MIN_FRACTION = 0.15   # a second component smaller than this x the largest is not a lung (gut gas)


@dataclass
class LungROI:
    """Lung mask (at ``factor`` x reduced in-plane resolution), volume and per-slice boxes."""

    mask: np.ndarray                       # bool (z, ceil(y/f), ceil(x/f))
    factor: int
    volume_ml: float
    boxes: list[tuple[int, int, int, int] | None]   # per slice (y0, y1, x0, x1), full-res, end-exclusive
    area_px: np.ndarray                    # per-slice lung area in full-resolution pixels (float)
    n_components: int                      # 0, 1 (merged lungs) or 2
    shape: tuple[int, int, int]            # full-resolution volume shape

    def area_fraction(self) -> np.ndarray:
        return self.area_px / float(self.shape[1] * self.shape[2])


def _downsample(hu: np.ndarray, f: int) -> np.ndarray:
    """In-plane f x f block mean (float32), padding odd edges by replication."""
    if f == 1:
        return hu.astype(np.float32, copy=False)
    z, y, x = hu.shape
    py, px = (-y) % f, (-x) % f
    out = np.empty((z, (y + py) // f, (x + px) // f), dtype=np.float32)
    for i in range(z):   # slice by slice keeps the peak memory at one padded slice
        s = hu[i]
        if py or px:
            s = np.pad(s, ((0, py), (0, px)), mode="edge")
        out[i] = s.reshape(s.shape[0] // f, f, s.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)
    return out


def segment_lungs(hu: np.ndarray, spacing: tuple[float, float, float], *, threshold: float = LUNG_THRESHOLD_HU,
                  factor: int | None = None, margin_px: int = 0) -> LungROI:
    """Segment the lungs of a (z, y, x) HU volume with voxel ``spacing`` (z, y, x) in mm."""
    if hu.ndim == 2:
        hu = hu[None]
    z, y, x = hu.shape
    f = factor if factor is not None else (2 if min(y, x) >= 256 else 1)
    small = _downsample(hu, f)
    air = small < threshold
    del small
    labels, n = ndimage.label(air)     # 6-connectivity in 3-D
    del air
    empty = LungROI(np.zeros(labels.shape, bool), f, 0.0, [None] * z, np.zeros(z), 0, (z, y, x))
    if n == 0:
        return empty
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    sizes[border] = 0
    order = np.argsort(sizes)[::-1]
    keep = [int(order[0])] if sizes[order[0]] > 0 else []
    if len(order) > 1 and keep and sizes[order[1]] >= SECOND_LUNG_MIN_FRACTION * sizes[order[0]]:
        keep.append(int(order[1]))
    if not keep:
        return empty
    mask = np.isin(labels, keep)
    del labels
    mask = _close_and_fill(mask, spacing, f)
    voxel_ml = float(spacing[0]) * float(spacing[1]) * f * float(spacing[2]) * f / 1000.0
    counts = mask.sum(axis=(1, 2)).astype(np.float64)
    boxes: list[tuple[int, int, int, int] | None] = []
    for i in range(z):
        if counts[i] == 0:
            boxes.append(None)
            continue
        rows = np.flatnonzero(mask[i].any(axis=1))
        cols = np.flatnonzero(mask[i].any(axis=0))
        boxes.append((max(0, int(rows[0]) * f - margin_px), min(y, (int(rows[-1]) + 1) * f + margin_px),
                       max(0, int(cols[0]) * f - margin_px), min(x, (int(cols[-1]) + 1) * f + margin_px)))
    return LungROI(mask, f, float(counts.sum() * voxel_ml), boxes, counts * f * f, len(keep), (z, y, x))


def _close_and_fill(mask: np.ndarray, spacing: tuple[float, float, float], f: int) -> np.ndarray:
    """Closing (about 3 mm radius in-plane, one slice through-plane) on the mask's bounding box, then 2-D hole fill."""
    zz, yy, xx = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    r = max(1, int(round(3.0 / max(float(spacing[1]) * f, 1e-3))))
    r = min(r, 4)
    pad = r + 1
    z0, z1 = max(0, zz[0] - 1), min(mask.shape[0], zz[-1] + 2)
    y0, y1 = max(0, yy[0] - pad), min(mask.shape[1], yy[-1] + pad + 1)
    x0, x1 = max(0, xx[0] - pad), min(mask.shape[2], xx[-1] + pad + 1)
    sub = mask[z0:z1, y0:y1, x0:x1]
    disk = _disk(r)
    struct = np.zeros((3,) + disk.shape, bool)
    struct[1] = disk
    struct[0, r, r] = struct[2, r, r] = True
    # pad so closing does not glue the mask to the crop edge
    padded = np.pad(sub, ((1, 1), (pad, pad), (pad, pad)))
    closed = ndimage.binary_closing(padded, structure=struct)[1:-1, pad:-pad, pad:-pad]
    max_hole_px = np.pi * MAX_HOLE_RADIUS_MM ** 2 / (float(spacing[1]) * float(spacing[2]) * f * f)
    for i in range(closed.shape[0]):
        if closed[i].any():
            closed[i] = _fill_small_holes(closed[i], max_hole_px)
    out = np.zeros_like(mask)
    out[z0:z1, y0:y1, x0:x1] = closed | sub
    return out


def _fill_small_holes(sl: np.ndarray, max_px: float) -> np.ndarray:
    """Fill enclosed holes up to ``max_px`` (vessels, nodules, small consolidations), not large ones
    such as the diaphragm dome seen through an annular lung base."""
    holes = ndimage.binary_fill_holes(sl) & ~sl
    if not holes.any():
        return sl
    lab, n = ndimage.label(holes)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes <= max_px
    small[0] = False
    return sl | small[lab]


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r


def margin_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float = 0.06) -> tuple[int, int, int, int]:
    """Expand a (y0, y1, x0, x1) lung box by ``margin`` of its height/width on each side (inside ``shape``).

    Same rule as the training-side 2-D crop (engine.ai.preprocess.ct_slices.lung_bbox, 6% margin, no
    squaring: the crop is stretched to the model input), so training and inference crops match.
    """
    y0, y1, x0, x1 = box
    my, mx = int(round(margin * (y1 - y0))), int(round(margin * (x1 - x0)))
    return max(0, y0 - my), min(shape[0], y1 + my), max(0, x0 - mx), min(shape[1], x1 + mx)


def choose_slices(roi: LungROI, min_fraction_of_max: float = 0.3, max_slices: int = 48) -> list[int]:
    """Slices with enough lung (>= ``min_fraction_of_max`` of the largest lung area), evenly thinned to ``max_slices``."""
    if roi.area_px.size == 0 or roi.area_px.max() <= 0:
        return []
    idx = np.flatnonzero(roi.area_px >= min_fraction_of_max * roi.area_px.max())
    if len(idx) > max_slices:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_slices)).astype(int)]
    return [int(i) for i in idx]
