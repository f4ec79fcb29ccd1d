"""Lung-only X-ray model input: the classifier and the severity scorer see the lungs, not the archive.

Why: models trained on a few hundred radiographs whose classes come from different archives learn
the archive (burned-in text, borders, exposure, resolution) instead of the lungs (DESIGN.md section 4;
our v1 model's source probe reached AUC 0.92-0.97). So every X-ray model input is built by

1. ``crop_raw``: a square box around both lungs of the segmentation (engine.ai.preprocess.xray_lungs),
   with a margin, resized to ``RAW_SIDE``; the lung mask comes along (soft-edged);
2. ``normalise_crop``: histogram equalisation over the whole crop (lungs *and* mediastinum/ribs in
   the box, so a white lung stays white relative to the heart), which is invariant to any monotonic
   grey-level change (gamma, window, detector LUT: the exposure/processing differences between
   sites), then everything outside the soft lung mask set to black;
3. ``to_model``: resize to the model's input side and map to torchxrayvision's [-1024, 1024].

The same three functions run on 8-bit training JPEGs (/255) and on the displayed grey of a DICOM
image (engine.dicom.display.display_gray01): one code path, tested equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RAW_SIDE = 256          # side of the cached crop (training cache and app alike)
MODEL_SIDE = 192        # DenseNet-121 input side of the v2 X-ray model (CPU-trained)
BOX_MARGIN = 0.06       # margin around the lungs' bounding box, fraction of the box side
MASK_DILATE = 0.025     # soft-mask dilation, fraction of RAW_SIDE (keeps the pleura and costophrenic angles)
N_BINS = 256


@dataclass(frozen=True)
class LungCropGeometry:
    """Where the square crop came from in the displayed image (to map heatmaps back)."""

    rows: int
    cols: int
    top: int            # may be negative / exceed the image: the crop is zero-padded there
    left: int
    side: int
    raw_side: int = RAW_SIDE


def lung_box(mask: np.ndarray, margin: float = BOX_MARGIN) -> tuple[int, int, int]:
    """Square (top, left, side) around the mask's bounding box plus ``margin``; centred on the box."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("empty lung mask: no lungs to crop (the anatomy gate should have refused this image)")
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = int(round(max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)))
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    return int(round(cy - side / 2.0)), int(round(cx - side / 2.0)), max(side, 8)


def _crop_padded(img: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    out = np.zeros((side, side), dtype=img.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, img.shape[0]), min(left + side, img.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = img[r0:r1, c0:c1]
    return out


def _resize(a: np.ndarray, side: int, mode: str) -> np.ndarray:
    """Square resize as the lung segmentation does it (engine.ai.preprocess.xray_lungs): area when
    shrinking, bilinear when enlarging, nearest for label images (``mode="nearest"``)."""
    from engine.ai.preprocess.xray_lungs import _resize as square_resize

    return square_resize(a, side, 0 if mode == "nearest" else 1)


def soft_mask(mask_raw: np.ndarray, dilate: float = MASK_DILATE) -> np.ndarray:
    """Binary lung mask at RAW_SIDE -> float [0, 1] mask, dilated and with a smooth (Gaussian) edge."""
    from scipy import ndimage

    side = mask_raw.shape[0]
    r = max(1, int(round(dilate * side)))
    m = ndimage.binary_dilation(mask_raw > 0.5, iterations=r)
    return np.clip(ndimage.gaussian_filter(m.astype(np.float32), sigma=max(1.0, r / 2.0)), 0.0, 1.0)


def crop_raw(gray01: np.ndarray, lung_mask: np.ndarray, zones: np.ndarray | None = None,
             raw_side: int = RAW_SIDE) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, LungCropGeometry]:
    """Displayed grey [0, 1] + lung mask (same shape) -> (crop float32 [0,1], binary mask, zone labels or None, geometry).

    ``zones`` is an optional int label image (0 = none, 1..6 = Brixia zones A..F) cropped with nearest.
    """
    if gray01.ndim != 2 or gray01.shape != lung_mask.shape:
        raise ValueError(f"expected a 2-D image and a mask of the same shape, got {gray01.shape} and {lung_mask.shape}")
    top, left, side = lung_box(lung_mask)
    crop = _resize(_crop_padded(gray01.astype(np.float32), top, left, side), raw_side, "area")
    m = _resize(_crop_padded(lung_mask.astype(np.float32), top, left, side), raw_side, "area") > 0.5
    z = None
    if zones is not None:
        z = _resize(_crop_padded(zones.astype(np.float32), top, left, side), raw_side, "nearest").astype(np.uint8)
    geom = LungCropGeometry(gray01.shape[0], gray01.shape[1], top, left, side, raw_side)
    return np.clip(crop, 0.0, 1.0), m, z, geom


def equalise(crop01: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Histogram equalisation over the whole crop: grey -> its quantile in [0, 1].

    Invariant to monotonic grey-level transforms (Gonzalez & Woods, Digital Image Processing,
    section 3.3), which removes most of what distinguishes one archive's processing from another's.
    """
    q = np.clip((crop01 * (n_bins - 1)).round().astype(np.int64), 0, n_bins - 1)
    hist = np.bincount(q.ravel(), minlength=n_bins).astype(np.float64)
    cdf = np.cumsum(hist)
    cdf = (cdf - hist / 2.0) / max(cdf[-1], 1.0)      # mid-rank: a constant image maps to 0.5
    return cdf[q].astype(np.float32)


def normalise_crop(crop01: np.ndarray, mask_raw: np.ndarray) -> np.ndarray:
    """Equalised crop with everything outside the soft lung mask black: float32 [0, 1] at RAW_SIDE."""
    return (equalise(crop01) * soft_mask(mask_raw)).astype(np.float32)


def to_model(norm01: np.ndarray, side: int = MODEL_SIDE):
    """[0, 1] at RAW_SIDE -> torch (1, side, side) in torchxrayvision's [-1024, 1024]."""
    import torch

    r = _resize(norm01, side, "area")
    return torch.from_numpy(((2.0 * r - 1.0) * 1024.0).astype(np.float32))[None]


@dataclass
class LungInput:
    """Everything the X-ray models need from one image: the tensor, the equalised lung crop (for the
    zone statistics of engine.ai.severity_zones), zones and mask at RAW_SIDE, and the geometry."""

    tensor: "object"            # torch (1, side, side)
    norm01: np.ndarray          # RAW_SIDE², float32
    zones: np.ndarray | None    # RAW_SIDE², uint8 0..6
    mask: np.ndarray            # RAW_SIDE², bool
    geom: LungCropGeometry


def lung_input(gray01: np.ndarray, lung_mask: np.ndarray, zones: np.ndarray | None = None,
               side: int = MODEL_SIDE) -> LungInput:
    """The whole chain, as the app and the training cache run it."""
    crop, m, z, geom = crop_raw(gray01, lung_mask, zones)
    norm = normalise_crop(crop, m)
    return LungInput(to_model(norm, side), norm, z, m, geom)


def lung_model_input(gray01: np.ndarray, lung_mask: np.ndarray, zones: np.ndarray | None = None,
                     side: int = MODEL_SIDE):
    """-> (tensor (1, side, side), zones at RAW_SIDE or None, geometry)."""
    li = lung_input(gray01, lung_mask, zones, side)
    return li.tensor, li.zones, li.geom


def heatmap_to_image(cam: np.ndarray, geom: LungCropGeometry, lung_mask: np.ndarray | None = None) -> np.ndarray:
    """A map over the model input -> float32 (rows, cols) on the displayed image; 0 outside the crop,
    and, when ``lung_mask`` is given, faded smoothly to 0 outside the lungs (no rectangles)."""
    from scipy import ndimage

    up = _resize(np.asarray(cam, dtype=np.float32), geom.side, "bilinear")
    out = np.zeros((geom.rows, geom.cols), dtype=np.float32)
    r0, c0 = max(geom.top, 0), max(geom.left, 0)
    r1, c1 = min(geom.top + geom.side, geom.rows), min(geom.left + geom.side, geom.cols)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = up[r0 - geom.top:r1 - geom.top, c0 - geom.left:c1 - geom.left]
    if lung_mask is not None:
        sigma = max(1.0, 0.01 * max(geom.rows, geom.cols))
        fade = np.clip(ndimage.gaussian_filter(lung_mask.astype(np.float32), sigma=sigma), 0.0, 1.0)
        out *= fade
    return out
