"""The one CT slice preprocessing shared by training (8-bit figure slices) and the app (HU volumes).

Both domains are brought to the same representation before the classifier sees them:

1. a lung-window grey image in [0, 1]: DICOM slices through ``hu_to_gray01`` (HU -> lung window
   -600/1500, engine.ai.preprocess.ct); COVID-CT figure slices are already windowed images (/255);
2. a lung mask: the 3-D lung ROI of the volume (engine.ai.preprocess.lung_roi) for DICOM, the 2-D
   threshold + components mask of ``figure_lung_mask`` for figures; both regularised here the same
   way (closing + hole filling, so opacities that fail an air threshold stay inside);
3. ``lung_crop``: the mask's bounding box plus a 6% margin, resized to the model input (area
   averaging, as a figure downscale is), mask resized alongside;
4. ``normalise_lung``: robust per-lung-region intensity normalisation (2nd..98th percentile of the
   lung pixels -> [0, 1]) and everything outside the lungs set to the darkest value.

Step 4 removes what differs between a paper figure and a scanner rendering (window, gamma, overall
brightness: the 1.0.0 model's validation scores followed crop brightness, Spearman +0.30, see
resources/models/README.md) and keeps the pattern inside the lungs. Absolute attenuation is left to the HU quantification (engine.ai.ct_quant), which
does mean the same on every scanner. Training applies ``render_augment`` between steps 3 and 4 so
that figure and DICOM renderings overlap (DESIGN.md section 4: resolution, JPEG quality, blur,
noise, gamma, window).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CROP_MARGIN = 0.06            # same margin as the v1 crop (engine.ai.preprocess.ct_slices.lung_bbox)
NORM_PERCENTILES = (2.0, 98.0)
MIN_MASK_FRACTION = 0.01      # a mask smaller than this share of the slice is not trusted (whole slice used)
PREPROCESSING_ID = "lung-masked-normalised-v2"


# ---------------------------------------------------------------- masks
def regularise_mask(mask: np.ndarray, max_components: int = 2) -> np.ndarray:
    """Keep the ``max_components`` largest components, closed (disk of 4% of the lungs' extent) and filled.

    A threshold mask leaves out dense consolidation and ground glass (they are not air); closing
    and hole filling take back what lies inside or along the lung border, as the 3-D ROI's
    closing does (engine.ai.preprocess.lung_roi._close_and_fill). A convex hull would be more
    generous but pulls the heart into the crescent-shaped lower lobes.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m
    labels, n = ndimage.label(m)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][:max_components]
    keep = [int(lab) for lab in order if sizes[lab] > 0 and sizes[lab] >= 0.1 * sizes[order[0]]]
    m = np.isin(labels, keep)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    r = max(2, int(round(0.04 * max(rows[-1] - rows[0], cols[-1] - cols[0]))))
    y0, y1 = max(0, rows[0] - r - 1), min(m.shape[0], rows[-1] + r + 2)
    x0, x1 = max(0, cols[0] - r - 1), min(m.shape[1], cols[-1] + r + 2)
    sub = np.pad(m[y0:y1, x0:x1], r + 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    closed = ndimage.binary_closing(sub, structure=(yy * yy + xx * xx) <= r * r)
    closed = ndimage.binary_fill_holes(closed)[r + 1:-(r + 1), r + 1:-(r + 1)]
    out = np.zeros_like(m)
    out[y0:y1, x0:x1] = closed
    return out | m


def figure_lung_mask(gray01: np.ndarray) -> np.ndarray | None:
    """2-D lung mask of an 8-bit figure slice (no HU): dark, non-border components, or None.

    The -320 HU threshold becomes a grey-level threshold (the smaller of -320 HU in our lung
    window and the slice's Otsu threshold, since figures come in varied windows); outside air is
    the dark region touching the image border; the two largest remaining components are the lungs
    (engine.ai.preprocess.ct_slices.lung_bbox applies the same rule to get a box).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from engine.ai.preprocess.ct_slices import LUNG_GRAY_THRESHOLD

    g = np.asarray(gray01, dtype=np.float32)
    if g.ndim != 2 or min(g.shape) < 16 or float(g.max() - g.min()) < 1e-3:
        return None
    thr = min(LUNG_GRAY_THRESHOLD, float(threshold_otsu(g)))
    dark = ndimage.binary_opening(g < thr, iterations=1)
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    cand = [(int(sizes[i]), i) for i in range(1, n + 1) if i not in border and sizes[i] >= 0.005 * g.size]
    if not cand:
        return None
    keep = [i for _, i in sorted(cand, reverse=True)[:2]]
    mask = ndimage.binary_fill_holes(np.isin(labels, keep))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows[-1] - rows[0] < 0.15 * g.shape[0] or cols[-1] - cols[0] < 0.15 * g.shape[1]:
        return None  # too small to be lungs (a bubble, a letter)
    return mask


def volume_slice_mask(mask_small: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Full-resolution 2-D mask of one slice of a LungROI mask stored ``factor`` x reduced in-plane."""
    m = np.asarray(mask_small, dtype=bool)
    if factor > 1:
        m = np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)
    return np.ascontiguousarray(m[: shape[0], : shape[1]])


# ---------------------------------------------------------------- crop and normalise
def _bbox(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    my, mx = int(round(margin * (y1 - y0))), int(round(margin * (x1 - x0)))
    h, w = mask.shape
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def _resize(a: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    if t.shape[-2] >= size and t.shape[-1] >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[0, 0]


def lung_crop(gray01: np.ndarray, mask: np.ndarray | None, size: int
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """(grey (S, S), mask (S, S) float {0,1}, crop box (y0, y1, x0, x1)) for one [0,1] slice.

    Without a usable mask the whole slice is used with an all-ones mask (normalisation over the
    slice), so nothing fails; callers report such fallbacks.
    """
    g = np.asarray(gray01, dtype=np.float32)
    m = None if mask is None else regularise_mask(mask)
    if m is None or m.sum() < MIN_MASK_FRACTION * m.size:
        return _resize(g, size), torch.ones((size, size)), (0, g.shape[0], 0, g.shape[1])
    y0, y1, x0, x1 = _bbox(m, CROP_MARGIN)
    gs = _resize(g[y0:y1, x0:x1], size)
    ms = (_resize(m[y0:y1, x0:x1].astype(np.float32), size) >= 0.5).float()
    if ms.sum() == 0:
        ms = torch.ones_like(ms)
    return gs, ms, (y0, y1, x0, x1)


def normalise_lung(gray: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(…, S, S) grey + mask -> (…, 3, S, S) in [-1, 1]: per-lung percentile scaling, outside = -1.

    Works on one slice (S, S) or a batch (N, S, S) / (N, 1, S, S); each slice is normalised over
    its own lung pixels.
    """
    g = gray.float()
    m = mask.float()
    if g.dim() == 4:
        g, m = g[:, 0], m[:, 0]
    single = g.dim() == 2
    if single:
        g, m = g[None], m[None]
    out = torch.empty_like(g)
    lo_q, hi_q = NORM_PERCENTILES[0] / 100.0, NORM_PERCENTILES[1] / 100.0
    for i in range(g.shape[0]):
        inside = g[i][m[i] > 0.5]
        if inside.numel() < 16:
            inside = g[i].flatten()
        q = torch.quantile(inside, torch.tensor([lo_q, hi_q]))
        lo, hi = float(q[0]), float(q[1])
        scale = max(hi - lo, 1e-3)
        y = ((g[i] - lo) / scale).clamp(0.0, 1.0)
        out[i] = torch.where(m[i] > 0.5, y, torch.zeros_like(y))
    out = out * 2.0 - 1.0
    out = out[:, None].expand(-1, 3, -1, -1).contiguous()
    return out[0] if single else out


def prepare_ct_slice(gray01: np.ndarray, mask: np.ndarray | None, size: int
                     ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The model input (3, S, S) in [-1, 1] and the crop box for one lung-window [0,1] slice + lung mask.

    Training (engine.training.datasets.encode_ct_slice, with augmentation between the two steps) and the app
    (engine.ai.analysis.Analyzer._ct_input) both end here.
    """
    gs, ms, box = lung_crop(gray01, mask, size)
    return normalise_lung(gs, ms), box


# ---------------------------------------------------------------- rendering augmentation (training only)
def render_augment(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random re-rendering of a [0,1] lung crop: window, gamma, resolution, blur, noise, 8-bit/JPEG.

    Simulates the ways a paper figure and a scanner slice in our lung window differ: a different
    window (clipping at other grey levels), display gamma, reduced resolution, smoothing kernels,
    quantum noise, 8-bit quantisation and JPEG compression of the figure pipeline.
    """
    from scipy import ndimage

    g = np.asarray(gray, dtype=np.float32)
    if rng.random() < 0.5:   # re-window: new centre/width in the current grey scale
        c = 0.5 + rng.uniform(-0.12, 0.12)
        w = np.exp(rng.uniform(np.log(0.7), np.log(1.3)))
        g = np.clip((g - (c - w / 2)) / w, 0.0, 1.0)
    if rng.random() < 0.5:
        g = g ** np.float32(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if rng.random() < 0.3:   # resolution: down then up
        f = rng.uniform(0.35, 0.9)
        s = g.shape[0]
        small = max(16, int(round(s * f)))
        t = torch.from_numpy(np.ascontiguousarray(g))[None, None]
        t = F.interpolate(t, size=(small, small), mode="area")
        g = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)[0, 0].numpy()
    if rng.random() < 0.3:
        g = ndimage.gaussian_filter(g, sigma=rng.uniform(0.3, 1.3))
    if rng.random() < 0.3:
        g = g + rng.normal(0.0, rng.uniform(0.005, 0.04), size=g.shape).astype(np.float32)
    g = np.clip(g, 0.0, 1.0)
    r = rng.random()
    if r < 0.3:
        g = _jpeg(g, int(rng.integers(25, 96)))
    elif r < 0.7:
        g = np.round(g * 255.0) / 255.0
    return g.astype(np.float32)


def _jpeg(g: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(g * 255.0).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def augment_ct_batch(x: torch.Tensor, rng: np.random.Generator, generator: torch.Generator | None = None, *,
                     rot_deg: float = 10.0, scale: Sequence[float] = (0.9, 1.1), shift: float = 0.06
                     ) -> torch.Tensor:
    """(N, 2, S, S) [grey, mask] -> augmented model batch (N, 3, S, S).

    Geometry (small rotation/zoom/shift, horizontal flip: COVID-19 vs not is laterality-free)
    moves grey and mask together; then ``render_augment`` per slice; then ``normalise_lung``.
    """
    import math

    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    ang = u(-rot_deg, rot_deg) * math.pi / 180.0
    sc = u(*scale)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    flip = (torch.rand(n, generator=generator) < 0.5).float() * -2 + 1
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-shift, shift)], 1),
                         torch.stack([sin * flip, cos, u(-shift, shift)], 1)], 1)
    grid = F.affine_grid(theta, [n, 2, x.shape[2], x.shape[3]], align_corners=False)
    g = F.grid_sample(x[:, :1].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    m = F.grid_sample(x[:, 1:2].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    g = torch.stack([torch.from_numpy(render_augment(gi[0].numpy(), rng)) for gi in g])
    return normalise_lung(g, m[:, 0])
