"""CT pneumonia quantification in Hounsfield units, per lung and per craniocaudal zone.

Pure numpy/scipy (no torch, no Qt). Steps, each a small function below:

1. **Lung mask** from the classical ROI (engine.ai.preprocess.lung_roi: threshold -320 HU, 3-D
   components, closing, small-hole fill), on the ROI's in-plane block-averaged grid (2x2 for
   >= 256 px matrices). Block means halve the noise and make a 300-slice series cheap; every
   percentage below is measured on that grid. HU are clipped to [-1024, 3071] first, so padding
   values outside the field of view (-2000, -3024, PS3.3 C.7.5.1.1.2 Pixel Padding Value) act
   as air and never reach a class.
2. **Trachea and main bronchi removed**: very low HU (< -900) region grown from the trachea in the
   most superior lung slices towards the feet, slice by slice, with explosion control (a slice
   whose airway area jumps is a leak into the lung and stops the growth), continued
   ``MAIN_BRONCHI_MM`` below the carina (where the airway splits in two), then dilated by one
   voxel for the airway wall (after Hu, Hoffman & Reinhardt, IEEE TMI 2001;20:490).
3. **Left/right**: two large 3-D components when the lungs are apart; when they touch (anterior
   junction line), each slice is cut at the column of least lung near the midline. Patient left
   follows the row direction cosine (PS3.3 C.7.6.2.1.1), so prone and feet-first series are right.
4. **Zones**: upper / middle / lower thirds of each lung's own craniocaudal extent in mm (from the
   slice positions, so gaps from missing slices do not shift the zones). Zones, not lobes.
5. **HU classes** inside each lung (DESIGN.md section 4): emphysema-range < -950 HU; normally
   aerated -950 to -700 HU (well-aerated lung, Colombi et al., Radiology 2020;296:E86);
   ground-glass -700 to -300 HU and consolidation -300 to +50 HU (the bands of DESIGN.md
   section 4; ground glass = hazy increase that keeps vessels visible, consolidation = opacity
   that hides them, Fleischner glossary, Hansell et al., Radiology 2008;246:697, as used for
   COVID-19 by Chung et al., Radiology 2020;295:202).
6. **Vessels and airway walls excluded** from the opacity classes by size and shape: dense voxels
   (>= -300 HU) are kept as consolidation only where a ball of ``MIN_CONSOLIDATION_RADIUS_MM``
   fits inside the dense region (a morphological opening computed with two Euclidean distance
   transforms); intrapulmonary vessels and bronchial walls are thinner than its 10 mm diameter
   and drop out. Ground-glass voxels within one voxel of a removed dense structure (the partial
   volume rim of vessels) are dropped, then ground glass is opened in-plane with a disk of
   ``MIN_GGO_RADIUS_MM``: fissures, the pleural rim of the mask and the partial-volume bands that
   thick slices leave along oblique pleura and the diaphragm dome are thinner and drop out.
7. **CT severity score** 0-25 (Pan et al., Radiology 2020;295:715; Chung et al. 2020): 5 regions
   x 0-5 by % involved (0 none, 1 < 5%, 2 5-25%, 3 26-50%, 4 51-75%, 5 > 75%). Zones stand in
   for lobes (an approximation): right upper/middle/lower zone -> RUL/RML/RLL, left upper zone ->
   LUL, left middle + lower zones merged -> LLL. "None" is below ``NONE_BELOW_PERCENT``.

Limitations: subpleural opacities larger than the ROI's hole-fill radius that touch the chest wall
can be left outside the threshold-based lung mask; dependent atelectasis is counted as
ground glass; hilar vessels thicker than 10 mm inside the mask count as consolidation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from engine.ai.preprocess.lung_roi import LungROI, segment_lungs
from engine.results import CTQuantification, CTZoneStats, CTSeverityRegion

METHOD_NAME = "ct-quant"
METHOD_VERSION = "1.0.0"

HU_MIN, HU_MAX = -1024.0, 3071.0
EMPHYSEMA_HU = -950.0            # below: emphysema-range (low attenuation area)
GGO_LOW_HU = -700.0              # normally aerated: [-950, -700)
CONSOLIDATION_LOW_HU = -300.0    # ground glass: [-700, -300)
CONSOLIDATION_HIGH_HU = 50.0     # consolidation: [-300, +50]; above: vessels with contrast, calcium
AIRWAY_HU = -900.0               # airway lumen (air) inside the lung mask
MIN_CONSOLIDATION_RADIUS_MM = 5.0
MIN_GGO_RADIUS_MM = 3.0          # in-plane: thick-slice partial volume bands along the pleura are thinner
GGO_OPENING_Z_MM = 1.0e4         # a z step this large makes the ground-glass opening purely in-plane
MAX_TRACHEA_AREA_MM2 = 900.0     # trachea cross-section (adult up to about 25 mm diameter -> 490 mm2)
MIN_TRACHEA_AREA_MM2 = 25.0
MAIN_BRONCHI_MM = 25.0
TRACHEA_SEARCH_MM = 60.0
NONE_BELOW_PERCENT = 0.5
MIN_QUANT_SLICES = 10
SECOND_LUNG_MIN_FRACTION = 0.15

LABEL_NONE, LABEL_GGO, LABEL_CONSOLIDATION = 0, 1, 2
ZONES = ("upper", "middle", "lower")
SIDES = ("right", "left")
# Five scored regions standing in for the lobes: (name, [(side, zone), ...])
SCORE_REGIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("right upper zone (for RUL)", (("right", "upper"),)),
    ("right middle zone (for RML)", (("right", "middle"),)),
    ("right lower zone (for RLL)", (("right", "lower"),)),
    ("left upper zone (for LUL)", (("left", "upper"),)),
    ("left middle + lower zones (for LLL)", (("left", "middle"), ("left", "lower"))),
)
SCORE_NOTE = ("CT severity score approximated on zones (thirds of each lung's height), not lobes: right "
              "upper/middle/lower zones stand for RUL/RML/RLL, the left upper zone for the LUL and the left "
              "middle + lower zones together for the LLL.")
THRESHOLDS = {
    "emphysema_below_hu": EMPHYSEMA_HU, "normal_hu": [EMPHYSEMA_HU, GGO_LOW_HU],
    "ggo_hu": [GGO_LOW_HU, CONSOLIDATION_LOW_HU], "consolidation_hu": [CONSOLIDATION_LOW_HU, CONSOLIDATION_HIGH_HU],
    "min_consolidation_radius_mm": MIN_CONSOLIDATION_RADIUS_MM, "min_ggo_radius_mm_in_plane": MIN_GGO_RADIUS_MM,
    "none_below_percent": NONE_BELOW_PERCENT,
}


class QuantificationRefused(ValueError):
    """The volume cannot be quantified; the message says why and what to do."""


@dataclass
class _Grid:
    """The block-averaged grid the quantification runs on."""

    hu: np.ndarray                   # float32 (z, y, x), clipped HU, block means
    spacing: tuple[float, float, float]
    factor: int
    positions: np.ndarray            # mm along the slice normal, one per slice
    superior_is_high: bool
    left_is_high_col: bool
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------
def quantify_ct(hu: np.ndarray, spacing_zyx: Sequence[float], roi: LungROI | None = None, *,
                direction: Sequence[float] | None = None, positions: Sequence[float] | None = None,
                is_phantom: bool = False, cancel: Callable[[], bool] | None = None) -> CTQuantification:
    """Quantify a (z, y, x) HU volume; see the module docstring for the method.

    ``direction``: engine.dicom.volume.Volume.direction (row cosines, column cosines, normal);
    None means the standard axial head-first-supine layout. ``positions``: slice positions in mm
    along the normal (Volume.positions); None means evenly spaced. Raises QuantificationRefused
    when the volume has too few slices or no lungs.
    """
    t0 = time.perf_counter()
    if hu.ndim != 3 or hu.shape[0] < MIN_QUANT_SLICES:
        raise QuantificationRefused(
            f"Quantification needs a volume of at least {MIN_QUANT_SLICES} contiguous axial slices; this series "
            f"has {hu.shape[0] if hu.ndim == 3 else 1}. Open the thin-slice axial series of the study.")
    spacing = tuple(float(s) for s in spacing_zyx)
    if roi is None:
        roi = segment_lungs(hu, spacing)  # type: ignore[arg-type]
    if roi.mask.shape[0] != hu.shape[0] or not roi.mask.any():
        raise QuantificationRefused("No lungs found (no large air-filled region inside the body): "
                                    "quantification needs a chest CT in a lung-compatible reconstruction.")
    grid = _make_grid(hu, spacing, roi.factor, direction, positions)
    _check(cancel)
    lung = roi.mask.copy()
    airway = _airway_mask(grid, lung)
    if airway.any():
        lung &= ~airway
    side = _split_sides(lung, grid)
    _check(cancel)
    labels, excluded = _classify(grid, lung)
    _check(cancel)
    zone = _zone_index(side, grid)
    q = _summarise(grid, lung, side, zone, labels, excluded, airway)
    q.is_phantom = bool(is_phantom)
    q.warnings = list(grid.warnings) + q.warnings
    if is_phantom:
        q.warnings.append("Synthetic demo phantom, not a patient: numbers validate the method only.")
    q.labels = labels
    q.label_factor = int(roi.factor)
    q.shape = tuple(int(s) for s in hu.shape)  # type: ignore[assignment]
    q.timings_ms["quantification"] = (time.perf_counter() - t0) * 1000.0
    return q


def full_resolution_labels(q: CTQuantification) -> np.ndarray:
    """The label map on the source image grid (nearest-neighbour repeat of the block grid)."""
    if q.labels is None:
        raise ValueError("this quantification carries no label map")
    f = int(q.label_factor)
    z, y, x = q.shape
    if f == 1:
        return q.labels[:, :y, :x]
    out = np.repeat(np.repeat(q.labels, f, axis=1), f, axis=2)
    return np.ascontiguousarray(out[:, :y, :x])


def labels_slice(q: CTQuantification, plane: str, index: int) -> np.ndarray:
    """One plane of the (block-grid) label map: axial (z), coronal (y) or sagittal (x) index in
    source-image voxels; rows/cols stay on the block grid (the caller scales by ``label_factor``)."""
    if q.labels is None:
        raise ValueError("this quantification carries no label map")
    f = int(q.label_factor)
    if plane == "axial":
        return q.labels[int(np.clip(index, 0, q.labels.shape[0] - 1))]
    if plane == "coronal":
        return q.labels[:, int(np.clip(index // f, 0, q.labels.shape[1] - 1)), :]
    return q.labels[:, :, int(np.clip(index // f, 0, q.labels.shape[2] - 1))]


def severity_points(percent: float) -> int:
    """Pan et al. 2020 / Chung et al. 2020 lobe points from % of the region involved."""
    if percent < NONE_BELOW_PERCENT:
        return 0
    if percent < 5.0:
        return 1
    if percent <= 25.0:
        return 2
    if percent <= 50.0:
        return 3
    if percent <= 75.0:
        return 4
    return 5


def longest_contiguous_run(positions: Sequence[float]) -> int:
    """Longest run of slices without a gap (a step > 1.5 x the median step means missing slices)."""
    p = np.sort(np.asarray(list(positions), dtype=np.float64))
    if p.size < 2:
        return int(p.size)
    d = np.diff(p)
    med = float(np.median(d))
    if med <= 0:
        return 1
    best = run = 1
    for step in d:
        run = run + 1 if step <= 1.5 * med else 1
        best = max(best, run)
    return best


# ------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------
def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        from engine.errors import AnalysisCancelled

        raise AnalysisCancelled("analysis cancelled by the user")


def _make_grid(hu: np.ndarray, spacing: tuple[float, ...], f: int, direction, positions) -> _Grid:
    z, y, x = hu.shape
    py, px = (-y) % f, (-x) % f
    small = np.empty((z, (y + py) // f, (x + px) // f), dtype=np.float32)
    inv = np.float32(1.0 / (f * f))
    for i in range(z):   # one slice at a time: peak memory one padded float slice
        s = hu[i].astype(np.float32)
        np.clip(s, HU_MIN, HU_MAX, out=s)
        if py or px:
            s = np.pad(s, ((0, py), (0, px)), mode="edge")
        if f == 1:
            small[i] = s
            continue
        acc = small[i]
        acc[...] = s[0::f, 0::f]
        for dy in range(f):
            for dx in range(f):
                if dy or dx:
                    acc += s[dy::f, dx::f]
        acc *= inv
    warnings: list[str] = []
    if positions is not None and len(positions) == z:
        pos = np.asarray(list(positions), dtype=np.float64)
    else:
        pos = np.arange(z, dtype=np.float64) * float(spacing[0])
    if z > 1:
        d = np.diff(pos)
        med = float(np.median(d)) if d.size else float(spacing[0])
        if med > 0 and np.any(d > 1.5 * med):
            missing = int(sum(round(float(s) / med) - 1 for s in d[d > 1.5 * med]))
            warnings.append(f"About {missing} slice(s) missing: lung and lesion volumes leave out the gap(s) "
                            "and are underestimated there.")
    superior_high, left_high = True, True
    if direction is not None and len(direction) >= 9:
        superior_high = float(direction[8]) >= 0.0        # normal's patient-z (LPS +z = superior)
        left_high = float(direction[0]) >= 0.0            # row cosine x: columns run towards patient left
    return _Grid(small, (float(spacing[0]), float(spacing[1]) * f, float(spacing[2]) * f), f, pos,
                 superior_high, left_high, warnings)


def _airway_mask(grid: _Grid, lung: np.ndarray) -> np.ndarray:
    """Trachea and main bronchi inside the lung mask (see module docstring, step 2)."""
    out = np.zeros_like(lung)
    z_has = np.flatnonzero(lung.any(axis=(1, 2)))
    if z_has.size < 3:
        return out
    order = z_has[::-1] if grid.superior_is_high else z_has   # superior -> inferior
    px_mm2 = grid.spacing[1] * grid.spacing[2]
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    mid_col = 0.5 * (cols[0] + cols[-1])
    width = max(1.0, float(cols[-1] - cols[0]))
    dz = max(grid.spacing[0], 1e-3)
    seed_slices = order[: max(1, int(round(TRACHEA_SEARCH_MM / dz)))]
    prev = None
    start = 0
    for k, zi in enumerate(seed_slices):
        cand = lung[zi] & (grid.hu[zi] < AIRWAY_HU)
        lab, n = ndimage.label(cand)
        if n == 0:
            continue
        areas = np.bincount(lab.ravel(), minlength=n + 1) * px_mm2
        cms = ndimage.center_of_mass(cand, lab, range(1, n + 1))
        best, best_d = 0, 1e9
        for j in range(1, n + 1):
            if not (MIN_TRACHEA_AREA_MM2 <= areas[j] <= MAX_TRACHEA_AREA_MM2):
                continue
            dcol = abs(cms[j - 1][1] - mid_col) / width
            if dcol < 0.15 and dcol < best_d:
                best, best_d = j, dcol
        if best:
            prev = lab == best
            out[zi] = prev
            start = k + 1
            break
    if prev is None:
        return out
    split_at_mm: float | None = None
    for zi in order[order.tolist().index(seed_slices[start - 1]) + 1:]:
        cand = lung[zi] & (grid.hu[zi] < AIRWAY_HU)
        lab, n = ndimage.label(cand)
        if n == 0:
            break
        touch = np.unique(lab[ndimage.binary_dilation(prev) & cand])
        touch = touch[touch > 0]
        if touch.size == 0:
            break
        cur = np.isin(lab, touch)
        a_prev, a_cur = float(prev.sum()) * px_mm2, float(cur.sum()) * px_mm2
        if a_cur > max(2.5 * a_prev, a_prev + 300.0):
            break                                     # leak into the lung: stop here
        out[zi] = cur
        prev = cur
        if touch.size >= 2 and split_at_mm is None:
            split_at_mm = float(grid.positions[zi])
        if split_at_mm is not None and abs(float(grid.positions[zi]) - split_at_mm) >= MAIN_BRONCHI_MM:
            break
    if out.any():
        out = ndimage.binary_dilation(out, structure=_cross2d()) & lung
    return out


def _cross2d() -> np.ndarray:
    s = np.zeros((3, 3, 3), bool)
    s[1] = ndimage.generate_binary_structure(2, 1)
    return s


def _split_sides(lung: np.ndarray, grid: _Grid) -> np.ndarray:
    """int8 (z, y, x): 0 outside, 1 right lung, 2 left lung (see module docstring, step 3)."""
    side = np.zeros(lung.shape, dtype=np.int8)
    lab, n = ndimage.label(lung)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    two = n >= 2 and sizes[order[1]] >= SECOND_LUNG_MIN_FRACTION * sizes[order[0]]
    if two:
        a, b = int(order[0]), int(order[1])
        cols = _column_centroids(lab, n)
        low_col, high_col = sorted((cols[a - 1], cols[b - 1]))
        side_low, side_high = (1, 2) if grid.left_is_high_col else (2, 1)
        # every component (small pieces cut off by the airway removal too) goes to the nearer lung centre
        comp_side = np.zeros(n + 1, dtype=np.int8)
        comp_side[1:] = np.where(np.abs(cols - low_col) <= np.abs(cols - high_col), side_low, side_high)
        return comp_side[lab]
    # one merged component: cut each slice at the column of least lung near the midline
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    if cols.size == 0:
        return side
    c0, c1 = int(cols[0]), int(cols[-1])
    centre = 0.5 * (c0 + c1)
    half = 0.2 * (c1 - c0)
    lo, hi = int(max(c0, centre - half)), int(min(c1, centre + half)) + 1
    for zi in np.flatnonzero(lung.any(axis=(1, 2))):
        prof = lung[zi].sum(axis=0).astype(np.float32)
        prof = ndimage.uniform_filter1d(prof, 3)
        cut = lo + int(np.argmin(prof[lo:hi])) if hi > lo else int(centre)
        low_side, high_side = (1, 2) if grid.left_is_high_col else (2, 1)
        side[zi, :, :cut][lung[zi, :, :cut]] = low_side
        side[zi, :, cut:][lung[zi, :, cut:]] = high_side
    grid.warnings.append("The lungs touch (one connected region): left and right were separated slice by slice "
                         "at the narrowest point near the midline.")
    return side


def _column_centroids(lab: np.ndarray, n: int) -> np.ndarray:
    """Mean column of each label 1..n (per-column bincounts: no full-size index array)."""
    acc = np.zeros(n + 1, dtype=np.float64)
    cnt = np.zeros(n + 1, dtype=np.float64)
    for x in range(lab.shape[2]):
        c = np.bincount(lab[:, :, x].ravel(), minlength=n + 1)
        acc += c * float(x)
        cnt += c
    return acc[1:] / np.maximum(cnt[1:], 1.0)


def _classify(grid: _Grid, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 labels (0 none, 1 GGO, 2 consolidation) and a bool mask of excluded lung voxels."""
    labels = np.zeros(lung.shape, dtype=np.uint8)
    zz, yy, xx = (np.flatnonzero(lung.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if zz.size == 0:
        return labels, np.zeros(lung.shape, bool)
    pad = 2
    sl = (slice(max(0, zz[0] - pad), zz[-1] + pad + 1), slice(max(0, yy[0] - pad), yy[-1] + pad + 1),
          slice(max(0, xx[0] - pad), xx[-1] + pad + 1))
    hu, m = grid.hu[sl], lung[sl]
    dense = m & (hu >= CONSOLIDATION_LOW_HU)
    core = _open_ball(dense, grid.spacing, MIN_CONSOLIDATION_RADIUS_MM)
    wall = ~m & (hu >= CONSOLIDATION_LOW_HU)         # chest wall, mediastinum, diaphragm
    wall |= _attached(core, wall)                    # dome tops and hilar tissue inside the mask
    core &= ~wall
    thin_dense = dense & ~core                      # vessels, bronchial walls, fissures, attached tissue
    rim = ndimage.binary_dilation(thin_dense, structure=_cross2d()) if thin_dense.any() else thin_dense
    # partial volume with the wall (thick slices cut the diaphragm dome and oblique pleura)
    band_mm = max(grid.spacing[0], 2.0 * max(grid.spacing[1], grid.spacing[2]))
    near_wall = _dilate_box(wall, grid.spacing, band_mm)
    cons = core & (hu <= CONSOLIDATION_HIGH_HU)
    ggo = m & (hu >= GGO_LOW_HU) & (hu < CONSOLIDATION_LOW_HU) & ~rim & ~near_wall
    ggo = _open_ball(ggo, (GGO_OPENING_Z_MM,) + tuple(grid.spacing[1:]), MIN_GGO_RADIUS_MM)
    lab = labels[sl]
    lab[ggo] = LABEL_GGO
    lab[cons] = LABEL_CONSOLIDATION
    aerated = hu < GGO_LOW_HU
    excluded = np.zeros(lung.shape, bool)
    excluded[sl] = m & ~aerated & (lab == LABEL_NONE)
    return labels, excluded


def _attached(mask: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Components of ``mask`` (3-D, face-connected) that touch ``wall``: tissue continuous with the
    diaphragm, heart or mediastinum seen inside the lung mask (dome tops, hilar vessels)."""
    if not mask.any() or not wall.any():
        return np.zeros_like(mask)
    lab, n = ndimage.label(mask)
    touch = np.unique(lab[ndimage.binary_dilation(wall) & mask])
    keep = np.zeros(n + 1, dtype=bool)
    keep[touch] = True
    keep[0] = False
    return keep[lab]


def _open_ball(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological opening by a ball of ``radius_mm`` (anisotropic voxels) via two EDTs:
    erosion = points farther than r from the background, dilation = points within r of that."""
    out = np.zeros_like(mask)
    box = _bbox(mask, 1)
    if box is None:
        return out
    inner = np.zeros_like(mask)
    inner[box] = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1] > radius_mm
    # the dilation only reaches r around the eroded set: one small box instead of the whole volume
    margin = tuple(int(np.ceil(radius_mm / max(s, 1e-6))) + 1 for s in spacing)
    box2 = _bbox(inner, margin)
    if box2 is None:
        return out
    out[box2] = ndimage.distance_transform_edt(~inner[box2], sampling=spacing) <= radius_mm
    return out & mask


def _bbox(mask: np.ndarray, margin) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels (int or one per axis), or None if empty."""
    m = (margin,) * 3 if isinstance(margin, int) else tuple(margin)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        out.append(slice(max(0, int(idx[0]) - m[axis]), min(mask.shape[axis], int(idx[-1]) + m[axis] + 1)))
    return tuple(out)  # type: ignore[return-value]


def _dilate_box(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Dilation by the box of half-size ``radius_mm`` (separable running maxima: linear time; a
    box is slightly larger than the ball, which only widens an exclusion band)."""
    out = mask.view(np.uint8)
    for axis, s in enumerate(spacing):
        k = int(np.ceil(radius_mm / max(s, 1e-6) - 1e-6))
        if k > 0:
            out = ndimage.maximum_filter1d(out, size=2 * k + 1, axis=axis, mode="constant")
    return out.astype(bool)


def _zone_index(side: np.ndarray, grid: _Grid) -> np.ndarray:
    """int8 per (side, slice): zone 0 upper, 1 middle, 2 lower, -1 no lung; shape (3, z)."""
    z = side.shape[0]
    out = np.full((3, z), -1, dtype=np.int8)
    pos = grid.positions
    for s in (1, 2):
        has = np.flatnonzero((side == s).any(axis=(1, 2)))
        if has.size == 0:
            continue
        p = pos[has]
        lo, hi = float(p.min()), float(p.max())
        span = max(hi - lo, 1e-6)
        frac = (pos[has] - lo) / span                 # 0 at the lowest position
        height = frac if grid.superior_is_high else 1.0 - frac   # 1 = most superior
        zone = np.where(height > 2.0 / 3.0, 0, np.where(height > 1.0 / 3.0, 1, 2))
        out[s, has] = zone
    return out


def _summarise(grid: _Grid, lung: np.ndarray, side: np.ndarray, zone: np.ndarray, labels: np.ndarray,
               excluded: np.ndarray, airway: np.ndarray) -> CTQuantification:
    vox_ml = grid.spacing[0] * grid.spacing[1] * grid.spacing[2] / 1000.0
    hu = grid.hu
    # per-slice counts per side and class: (side 1..2, z, class)
    n_classes = 6   # emphysema, normal, ggo, consolidation, excluded, total
    counts = np.zeros((3, lung.shape[0], n_classes), dtype=np.int64)
    for zi in np.flatnonzero(lung.any(axis=(1, 2))):
        for s in (1, 2):
            m = side[zi] == s
            if not m.any():
                continue
            h, lab, ex = hu[zi][m], labels[zi][m], excluded[zi][m]
            counts[s, zi] = (int(np.count_nonzero(h < EMPHYSEMA_HU)),
                             int(np.count_nonzero((h >= EMPHYSEMA_HU) & (h < GGO_LOW_HU))),
                             int(np.count_nonzero(lab == LABEL_GGO)),
                             int(np.count_nonzero(lab == LABEL_CONSOLIDATION)),
                             int(np.count_nonzero(ex)), int(m.sum()))
    pos = grid.positions

    def stats(lung_name: str, zone_name: str, sel: np.ndarray) -> CTZoneStats:
        c = sel.sum(axis=0)
        total = int(c[5])
        zs = np.flatnonzero(sel[:, 5] > 0)
        zr = (float(pos[zs].min()), float(pos[zs].max())) if zs.size else (0.0, 0.0)
        pct = (lambda k: round(100.0 * float(c[k]) / total, 3)) if total else (lambda k: 0.0)
        return CTZoneStats(lung=lung_name, zone=zone_name, volume_ml=round(total * vox_ml, 2),
                           emphysema_percent=pct(0), normal_percent=pct(1), ggo_percent=pct(2),
                           consolidation_percent=pct(3), excluded_percent=pct(4),
                           ggo_ml=round(float(c[2]) * vox_ml, 3), consolidation_ml=round(float(c[3]) * vox_ml, 3),
                           involved_percent=round(pct(2) + pct(3), 3), z_range_mm=zr)

    zones: list[CTZoneStats] = []
    lungs: list[CTZoneStats] = []
    for s, sname in ((1, "right"), (2, "left")):
        lungs.append(stats(sname, "whole", counts[s]))
        for zi_, zname in enumerate(ZONES):
            sel = counts[s] * (zone[s] == zi_)[:, None]
            zones.append(stats(sname, zname, sel))
    total = stats("both", "whole", counts[1] + counts[2])
    by_key = {(z.lung, z.zone): z for z in zones}
    regions: list[CTSeverityRegion] = []
    for name, members in SCORE_REGIONS:
        vol = sum(by_key[m].volume_ml for m in members)
        inv = sum(by_key[m].ggo_ml + by_key[m].consolidation_ml for m in members)
        pct = 100.0 * inv / vol if vol > 0 else 0.0
        regions.append(CTSeverityRegion(name=name, zones=[f"{a} {b}" for a, b in members],
                                        involved_percent=round(pct, 3), points=severity_points(pct)))
    warnings: list[str] = []
    if lungs[0].volume_ml == 0 or lungs[1].volume_ml == 0:
        warnings.append("Only one lung was found: the other side's numbers are empty.")
    return CTQuantification(
        method=METHOD_NAME, version=METHOD_VERSION, lungs=lungs, zones=zones, total=total,
        severity_regions=regions, severity_score=int(sum(r.points for r in regions)), severity_note=SCORE_NOTE,
        total_opacity_percent=total.involved_percent, ggo_ml=total.ggo_ml,
        consolidation_ml=total.consolidation_ml, lung_volume_ml=total.volume_ml,
        airway_removed_ml=round(float(airway.sum()) * vox_ml, 2), thresholds=dict(THRESHOLDS),
        grid_spacing_mm=tuple(round(float(s), 4) for s in grid.spacing), warnings=warnings)
