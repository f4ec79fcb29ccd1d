"""Chest X-ray lung segmentation: input preprocessing, inference, per-lung measurements, zones.

Input is the *displayed* grayscale in [0, 1] (engine.dicom.pixels: default VOI applied,
MONOCHROME1 inverted) or an 8-bit training JPEG divided by 255, exactly as for the classifier
(engine/ai/preprocess/xray.py). Preprocessing is two composable steps (DESIGN.md section 6, MONAI
habit), both used by training (engine/training/train_lungseg.py, augmentation in between) and inference:

1. ``letterbox``: pad the whole image to a centred square (nothing is cropped away, unlike the
   classifier's centre crop, because a lung apex or costophrenic angle cut off would be missed
   segmentation) and resize to ``SEG_SIZE``.
2. ``normalise_intensity``: per-image percentile stretch over the real (non-padding) pixels, then
   a fixed affine map, so the model does not depend on each archive's window, gain or bit depth.

Research use only, not for diagnostic use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEG_SIZE = 192
SEG_MODEL = "xray-lungseg"
PCT_LO, PCT_HI = 1.0, 99.0
RIGHT, LEFT = 1, 2                      # class indices of engine.ai.models.lung_unet.LUNG_CLASSES


@dataclass(frozen=True)
class Letterbox:
    """Where the square model input came from: the image (rows, cols) sits at (top, left) inside
    a ``side``-pixel square that was resized to ``size``."""

    rows: int
    cols: int
    side: int
    top: int
    left: int
    size: int = SEG_SIZE

    @property
    def scale(self) -> float:
        return self.size / self.side


def letterbox_geometry(rows: int, cols: int, size: int = SEG_SIZE) -> Letterbox:
    side = max(rows, cols)
    return Letterbox(rows, cols, side, (side - rows) // 2, (side - cols) // 2, size)


def _resize(img: np.ndarray, size: int, order: int) -> np.ndarray:
    """Square resize: area averaging when shrinking (no aliasing of rib edges), bilinear when
    enlarging, nearest (order 0) for label images."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if order == 0:
        out = F.interpolate(t, size=(size, size), mode="nearest")
    elif img.shape[0] > size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def letterbox(img: np.ndarray, size: int = SEG_SIZE, order: int = 1) -> tuple[np.ndarray, np.ndarray, Letterbox]:
    """(rows, cols) -> (image (size, size) float32, valid mask (size, size) bool, geometry).

    Padding is 0; ``valid`` marks pixels that came from the image, so intensity statistics
    ignore the padding. ``order=0`` resizes label images by nearest neighbour.
    """
    if img.ndim != 2 or min(img.shape) < 8:
        raise ValueError(f"expected a 2-D grayscale image of at least 8x8 pixels, got shape {img.shape}")
    g = letterbox_geometry(*img.shape, size=size)
    sq = np.zeros((g.side, g.side), dtype=np.float32)
    sq[g.top:g.top + g.rows, g.left:g.left + g.cols] = img
    valid = np.zeros((g.side, g.side), dtype=np.float32)
    valid[g.top:g.top + g.rows, g.left:g.left + g.cols] = 1.0
    return _resize(sq, size, order), _resize(valid, size, 1) > 0.5, g


def normalise_intensity(img: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Percentile stretch (1st..99th over valid pixels) to [0, 1], then (x - 0.5) / 0.25 (model input).

    Percentiles rather than min/max: burned-in white text and black collimation borders are
    common in web-sourced radiographs (data/xray/SOURCES.md caveats) and would set min/max.
    """
    x = np.asarray(img, dtype=np.float32)
    vals = x[valid] if valid is not None and valid.any() else x.ravel()
    lo, hi = np.percentile(vals, [PCT_LO, PCT_HI])
    x = np.clip((x - lo) / max(float(hi - lo), 1e-3), 0.0, 1.0)
    if valid is not None:
        x = np.where(valid, x, 0.0)
    return ((x - 0.5) / 0.25).astype(np.float32)


def seg_input(gray01: np.ndarray, size: int = SEG_SIZE) -> tuple[np.ndarray, Letterbox]:
    """The one preprocessing for app and evaluation: displayed gray [0,1] -> (size, size) float32 input."""
    img, valid, geom = letterbox(np.asarray(gray01, dtype=np.float32), size)
    return normalise_intensity(img, valid), geom


def split_lr_labels(lung: np.ndarray) -> np.ndarray:
    """Binary lung mask -> labels 0/RIGHT/LEFT by image x position (patient's right = image left).

    The two largest connected components are the lungs, the one further left in the image being
    the right lung; smaller pieces join the lung whose centroid column is nearer. A single merged
    component is cut at its centroid column.
    """
    from scipy import ndimage

    lung = np.asarray(lung, dtype=bool)
    out = np.zeros(lung.shape, dtype=np.uint8)
    lab, n = ndimage.label(lung)
    if n == 0:
        return out
    areas = ndimage.sum(lung, lab, index=np.arange(1, n + 1))
    cols = np.asarray(ndimage.center_of_mass(lung, lab, index=np.arange(1, n + 1)))[:, 1]
    order = np.argsort(areas)[::-1]
    if n == 1 or areas[order[1]] < 0.1 * areas[order[0]]:
        cut = float(cols[order[0]])
        xx = np.arange(lung.shape[1])[None, :]
        out[lung & (xx < cut)] = RIGHT
        out[lung & (xx >= cut)] = LEFT
        return out
    c_a, c_b = cols[order[0]], cols[order[1]]
    c_right, c_left = min(c_a, c_b), max(c_a, c_b)
    for k in range(n):
        side = RIGHT if abs(cols[k] - c_right) <= abs(cols[k] - c_left) else LEFT
        out[lab == k + 1] = side
    return out


# ---------------------------------------------------------------- inference

@dataclass(frozen=True)
class LungStats:
    """One lung of the segmentation, in displayed-image pixels (rows, cols of the input)."""

    side: str                                  # "right" or "left" (the patient's)
    area_px: int
    area_fraction: float                       # of the whole image
    bbox: tuple[int, int, int, int] | None     # (top, left, bottom, right), bottom/right exclusive
    centroid: tuple[float, float] | None       # (row, col)
    n_components: int                          # pieces of at least 1% of the lung before clean-up
    dominant_fraction: float                   # largest piece / all of this side's pixels before clean-up
    mean_probability: float                    # mean softmax probability of this class over its pixels

    @property
    def height(self) -> int:
        return 0 if self.bbox is None else self.bbox[2] - self.bbox[0]

    @property
    def width(self) -> int:
        return 0 if self.bbox is None else self.bbox[3] - self.bbox[1]


ZONE_NAMES = ("A", "B", "C", "D", "E", "F")   # Brixia: A/B/C right upper/middle/lower, D/E/F left


@dataclass
class XrayLungs:
    """Lung segmentation of one frontal chest radiograph at the input's full resolution.

    ``labels``: 0 background, 1 right lung, 2 left lung (patient's sides). ``prob``: probability
    that a pixel is lung (either side). ``zones``: 0 outside the lungs, 1..6 = Brixia zones A..F.
    The zones are the *thirds approximation* (DESIGN.md section 4): each lung's craniocaudal extent
    (top to bottom row of its mask) cut into equal upper, middle and lower thirds, instead of
    Borghesi and Maroldi's landmarks (inferior wall of the aortic arch, inferior wall of the right
    inferior pulmonary vein), which this model does not find.
    """

    labels: np.ndarray
    prob: np.ndarray
    right: LungStats
    left: LungStats
    confidence: float                          # mean max-class probability over the lung pixels
    model_version: str = ""
    zone_rows: dict[str, tuple[int, int]] = field(default_factory=dict)   # zone -> (row0, row1) exclusive

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape  # type: ignore[return-value]

    @property
    def mask(self) -> np.ndarray:
        """Both lungs, bool (rows, cols)."""
        return self.labels > 0

    @property
    def right_mask(self) -> np.ndarray:
        return self.labels == RIGHT

    @property
    def left_mask(self) -> np.ndarray:
        return self.labels == LEFT

    @property
    def zones(self) -> np.ndarray:
        """uint8 (rows, cols): 0 outside the lungs, 1..6 = zones A..F (thirds approximation)."""
        out = np.zeros(self.labels.shape, dtype=np.uint8)
        for i, name in enumerate(ZONE_NAMES):
            if name not in self.zone_rows:
                continue
            r0, r1 = self.zone_rows[name]
            side = RIGHT if i < 3 else LEFT
            band = self.labels[r0:r1] == side
            out[r0:r1][band] = i + 1
        return out

    def zone_mask(self, name: str) -> np.ndarray:
        """Bool mask of one Brixia zone ("A".."F"), thirds approximation."""
        return self.zones == (ZONE_NAMES.index(name.upper()) + 1)

    def lung_bbox(self, margin: float = 0.0) -> tuple[int, int, int, int] | None:
        """Tight (top, left, bottom, right) box around both lungs, grown by ``margin`` x its size on
        each side and clipped to the image; None when no lung was found."""
        boxes = [s.bbox for s in (self.right, self.left) if s.bbox is not None]
        if not boxes:
            return None
        t, l = min(b[0] for b in boxes), min(b[1] for b in boxes)
        b, r = max(b[2] for b in boxes), max(b[3] for b in boxes)
        dy, dx = int(round((b - t) * margin)), int(round((r - l) * margin))
        rows, cols = self.labels.shape
        return max(0, t - dy), max(0, l - dx), min(rows, b + dy), min(cols, r + dx)


def _full_res(prob: "torch.Tensor", g: Letterbox, chunk: int = 256):  # noqa: F821
    """Bilinear from the model grid back to the image -> (argmax uint8, class probs float32 (3, rows, cols)).

    Separable: first along rows to the letterbox side, cropped to the image rows, then along columns
    a band of rows at a time, cropped to the image columns, so a 4000-pixel CR never needs three
    full-square float maps. Same sample positions as resizing the whole square (align_corners=False)."""
    import torch.nn.functional as F

    p = prob[None].float()                                                     # (1, 3, n, n)
    p = F.interpolate(p, size=(g.side, p.shape[-1]), mode="bilinear", align_corners=False)
    p = p[:, :, g.top:g.top + g.rows]                                          # (1, 3, rows, n)
    probs = np.empty((3, g.rows, g.cols), dtype=np.float32)
    for r0 in range(0, g.rows, chunk):
        band = F.interpolate(p[:, :, r0:r0 + chunk], size=(min(chunk, g.rows - r0), g.side), mode="bilinear",
                             align_corners=False)
        probs[:, r0:r0 + chunk] = band[0, :, :, g.left:g.left + g.cols].numpy()
    return probs.argmax(0).astype(np.uint8), probs


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not connected to the image border become foreground (one labelling pass;
    scipy's binary_fill_holes iterates dilations and is ~10x slower on a 2000-pixel CR)."""
    from scipy import ndimage

    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    holes = ~np.isin(lab, border) & (lab > 0)
    return mask | holes


def _clean_side(side_mask: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Keep pieces of at least 15% of the largest, fill holes. -> (mask, n pieces >= 1%, largest share)."""
    from scipy import ndimage

    lab, n = ndimage.label(side_mask)
    if n == 0:
        return side_mask, 0, 0.0
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    total = float(areas.sum())
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = areas >= 0.15 * areas.max()
    return _fill_holes(keep[lab]), int((areas >= 0.01 * total).sum()), float(areas.max() / total)


def _stats(name: str, mask: np.ndarray, cls_prob: np.ndarray, n_comp: int, dominant: float) -> LungStats:
    area = int(mask.sum())
    if area == 0:
        return LungStats(name, 0, 0.0, None, None, n_comp, dominant, 0.0)
    ys, xs = np.nonzero(mask)
    bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    return LungStats(name, area, area / mask.size, bbox, (float(ys.mean()), float(xs.mean())), n_comp, dominant,
                     float(cls_prob[mask].mean()))


def _zone_rows(stats: LungStats, names: tuple[str, str, str]) -> dict[str, tuple[int, int]]:
    if stats.bbox is None:
        return {}
    top, bottom = stats.bbox[0], stats.bbox[2]
    cuts = [int(round(top + (bottom - top) * k / 3)) for k in range(4)]
    return {n: (cuts[i], cuts[i + 1]) for i, n in enumerate(names)}


def lungs_from_probabilities(prob: "torch.Tensor", g: Letterbox, model_version: str = "") -> XrayLungs:  # noqa: F821
    """Softmax map (3, size, size) on the letterboxed grid -> XrayLungs at the image's resolution."""
    raw, probs = _full_res(prob, g)
    return assemble_lungs(raw, probs, model_version)


def lungs_from_labels(labels: np.ndarray) -> XrayLungs:
    """A reference label image (0/RIGHT/LEFT, e.g. from split_lr_labels) as XrayLungs with
    probability 1, so reference masks go through the same measurements as predictions."""
    raw = np.where(np.isin(labels, (RIGHT, LEFT)), labels, 0).astype(np.uint8)
    probs = np.stack([raw == k for k in (0, RIGHT, LEFT)]).astype(np.float32)
    return assemble_lungs(raw, probs, "reference")


def assemble_lungs(raw: np.ndarray, probs: np.ndarray, model_version: str = "") -> XrayLungs:
    """Per-pixel classes + class probabilities (3, rows, cols) -> cleaned masks, stats and zones."""
    labels = np.zeros_like(raw)
    parts = {}
    for cls in (RIGHT, LEFT):
        m, n_comp, dom = _clean_side(raw == cls)
        labels[m & (labels == 0)] = cls
        parts[cls] = (n_comp, dom)
    lung = labels > 0
    right = _stats("right", labels == RIGHT, probs[RIGHT], *parts[RIGHT])
    left = _stats("left", labels == LEFT, probs[LEFT], *parts[LEFT])
    conf = float(probs.max(0)[lung].mean()) if lung.any() else 0.0
    zones = {**_zone_rows(right, ZONE_NAMES[:3]), **_zone_rows(left, ZONE_NAMES[3:])}
    return XrayLungs(labels, (1.0 - probs[0]).astype(np.float32), right, left, conf, model_version, zones)


def predict_probabilities(module, x: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """Model input (size, size) -> softmax (3, size, size) float32 on the CPU."""
    import torch

    dev = next(module.parameters()).device
    with torch.no_grad():
        logits = module(torch.from_numpy(x)[None, None].to(dev))
    return logits[0].float().softmax(0).cpu()


def load_lungseg():
    """The shipped lung model through the registry (safetensors, sha256 pinned in its card)."""
    from engine.errors import ModelError
    from engine.ai.models import registry
    from engine.paths import models_dir

    if registry.find_card(SEG_MODEL) is None:
        raise ModelError(f"the lung segmentation model ({SEG_MODEL}) has no card in {models_dir()}; "
                         "reinstall ChestView or run `python -m engine.training.evaluate_lungseg RUN --write-card`")
    return registry.load_model(SEG_MODEL)


def segment_lungs_xray(gray01: np.ndarray, model=None) -> XrayLungs:
    """Segment the lungs of a frontal chest radiograph.

    ``gray01``: displayed grayscale in [0, 1], (rows, cols) (engine.dicom.pixels, or a JPEG / 255).
    ``model``: a registry LoadedModel or a bare LungUNet; default the shipped ``xray-lungseg``.
    Returns masks, probability and zones at the input's resolution. Never refuses: whether the
    result is two plausible lungs is the anatomy gate's question (engine.ai.validity.anatomy_checks).
    """
    gray01 = np.asarray(gray01)
    if gray01.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray01.shape}")
    if model is None:
        model = load_lungseg()
    module = getattr(model, "module", model)
    version = getattr(getattr(model, "info", None), "version", "")
    x, g = seg_input(gray01)
    return lungs_from_probabilities(predict_probabilities(module, x), g, version)
