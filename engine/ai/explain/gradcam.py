"""Grad-CAM (Selvaraju et al. 2017) for any model with ``feature_map(x)`` / ``head(fmap)``.

The gradient is taken with ``torch.autograd.grad`` w.r.t. the feature map only (DenseNet:
``features.norm5``; Inception v3: ``Mixed_7c``; GoogLeNet: ``inception5b``): torchvision's in-place
ReLUs break backward hooks, and differentiating through the head alone is also much cheaper than
back-propagating through the whole network. Heatmaps are data: float32 in [0, 1] mapped back to
displayed-image (X-ray) or axial-slice (CT) pixel coordinates.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ScoreFn = Callable[[object], torch.Tensor]   # head output -> (N,) scalar score per image


def cams_from_fmap(head: Callable[[torch.Tensor], object], fmap: torch.Tensor,
                   score_fns: list[ScoreFn]) -> list[torch.Tensor]:
    """One (N, h, w) ReLU'd, per-image [0,1]-normalised CAM per score function, from a computed feature map."""
    fmap = fmap.detach().float()
    out = []
    for fn in score_fns:
        leaf = fmap.clone().requires_grad_(True)
        with torch.enable_grad():
            score = fn(head(leaf))
            (grad,) = torch.autograd.grad(score.float().sum(), leaf)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * fmap).sum(dim=1))
        out.append(normalise(cam))
    return out


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; an all-zero map stays zero."""
    n = cam.shape[0]
    flat = cam.reshape(n, -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-12)
    res = torch.where(hi - lo > 1e-12, (flat - lo) / span, torch.zeros_like(flat))
    return res.reshape(cam.shape)


def gradcam(model, x: torch.Tensor, score_fns: list[ScoreFn],
            size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Full Grad-CAM: forward the feature map, CAM per score function, bilinear upsample to ``size``
    (default the input's h, w). Returns float32 arrays (N, H, W) in [0, 1]."""
    with torch.no_grad():
        fmap = model.feature_map(x)
    size = size or (x.shape[-2], x.shape[-1])
    return [upsample(c, size) for c in cams_from_fmap(model.head, fmap, score_fns)]


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> float32 (N, H, W) bilinear, clipped to [0, 1]."""
    up = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return up.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)


def xray_heatmap(cam_hw: np.ndarray, geom) -> np.ndarray:
    """CAM over the model input -> displayed-image coordinates (undo centre crop + resize)."""
    from engine.ai.preprocess.xray import heatmap_to_image

    return np.clip(heatmap_to_image(cam_hw, geom), 0.0, 1.0).astype(np.float32)


LUNG_EDGE_SIGMA = 0.012   # Gaussian edge of the lung window, fraction of the image's longer side


def soft_lung_window(mask: np.ndarray, sigma_frac: float = LUNG_EDGE_SIGMA, work_side: int = 512) -> np.ndarray:
    """Bool lung mask (rows, cols) -> float32 window in [0, 1] with Gaussian-blurred edges.

    Blurred at <= ``work_side`` pixels and resized back bilinearly: the edge is a few millimetres
    wide at any resolution, so a 4000-pixel CR costs the same as a JPEG, and no rectangle or
    staircase edge appears in the overlay."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=np.float32)
    rows, cols = m.shape
    f = min(1.0, work_side / max(rows, cols))
    small = F.interpolate(torch.from_numpy(m)[None, None], size=(max(1, round(rows * f)), max(1, round(cols * f))),
                          mode="area")[0, 0].numpy() if f < 1.0 else m
    small = ndimage.gaussian_filter(small, sigma=sigma_frac * max(small.shape), mode="constant")
    up = F.interpolate(torch.from_numpy(small)[None, None], size=(rows, cols), mode="bilinear",
                       align_corners=False)[0, 0].numpy() if f < 1.0 else small
    return np.clip(up, 0.0, 1.0).astype(np.float32)


def restrict_to_lungs(heat: np.ndarray, lung_mask: np.ndarray | None) -> np.ndarray:
    """Heatmap outside the lungs faded to 0 through the soft lung window (no mask -> unchanged): the
    findings are lung findings, and Grad-CAM mass on labels, borders or devices outside the lungs is
    an artefact or a shortcut, not evidence (DESIGN.md section 4)."""
    if lung_mask is None or lung_mask.shape != heat.shape or not lung_mask.any():
        return heat
    return (heat * soft_lung_window(lung_mask)).astype(np.float32)


def ct_heatmap(cam_hw: np.ndarray, box: tuple[int, int, int, int], slice_shape: tuple[int, int]) -> np.ndarray:
    """CAM over a resized lung-ROI crop -> the axial slice's pixel grid; ``box`` = (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = box
    t = torch.from_numpy(np.asarray(cam_hw, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros(slice_shape, dtype=np.float32)
    out[y0:y1, x0:x1] = np.clip(up, 0.0, 1.0)
    return out
