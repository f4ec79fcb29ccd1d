"""X-ray model preprocessing, torchxrayvision style, as composable steps (DESIGN.md section 4).

Input to this module is the *displayed* grayscale in [0, 1] (default VOI applied, MONOCHROME1
inverted) from engine.dicom.pixels, or an 8-bit training JPEG divided by 255: the model sees what
the radiologist sees. torchxrayvision's ``(2*x/maxval - 1)*1024`` then maps it to [-1024, 1024].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

INPUT_SIZE = 224


@dataclass(frozen=True)
class CropGeometry:
    """Where the model input came from in the displayed image, so heatmaps can be mapped back."""

    rows: int          # displayed image size
    cols: int
    top: int           # square crop box in displayed-image pixels
    left: int
    side: int
    size: int = INPUT_SIZE


def to_xrv_range(gray01: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1024, 1024]: torchxrayvision's ``(2*x/maxval - 1)*1024`` with x/maxval = gray01."""
    return ((2.0 * gray01.astype(np.float32) - 1.0) * 1024.0).astype(np.float32)


def center_crop_box(rows: int, cols: int) -> tuple[int, int, int]:
    """Largest centred square: (top, left, side)."""
    side = min(rows, cols)
    return (rows - side) // 2, (cols - side) // 2, side


def prepare_xray(gray01: np.ndarray, size: int = INPUT_SIZE) -> tuple[torch.Tensor, CropGeometry]:
    """Displayed gray [0,1] (rows, cols) -> model tensor (1, size, size) in [-1024, 1024] + geometry."""
    if gray01.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray01.shape}")
    rows, cols = gray01.shape
    top, left, side = center_crop_box(rows, cols)
    crop = to_xrv_range(gray01[top:top + side, left:left + side])
    t = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
    t = F.interpolate(t, size=(size, size), mode="area" if side > size else "bilinear",
                      **({} if side > size else {"align_corners": False}))
    return t[0], CropGeometry(rows, cols, top, left, side, size)


def heatmap_to_image(cam: np.ndarray, geom: CropGeometry) -> np.ndarray:
    """Undo crop/resize: a (h, w) map over the model input -> float32 (rows, cols), 0 outside the crop."""
    t = torch.from_numpy(np.asarray(cam, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(geom.side, geom.side), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((geom.rows, geom.cols), dtype=np.float32)
    out[geom.top:geom.top + geom.side, geom.left:geom.left + geom.side] = up
    return out
