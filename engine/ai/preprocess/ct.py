"""CT model preprocessing: HU window -> [0,1] -> lung-ROI crop -> model tensor (3, S, S) in [-1, 1].

Training (8-bit PNG slices already in a lung window, /255) and inference (HU volumes windowed
here) meet at the same [0, 1] lung-window grayscale.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LUNG_WINDOW = (-600.0, 1500.0)  # (center, width)


def hu_to_gray01(hu: np.ndarray, center: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2 simplified) of HU to float32 [0, 1]."""
    lo = center - width / 2.0
    return np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)


def ct_model_input(gray01: np.ndarray, size: int) -> torch.Tensor:
    """(rows, cols) [0,1] crop -> (3, size, size) float32 in [-1, 1] (grey replicated in 3 channels)."""
    t = torch.from_numpy(np.ascontiguousarray(gray01, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t * 2.0 - 1.0
    return t[0].expand(3, size, size).contiguous()
