"""Stored values to display pixels (PS3.3 C.11, C.7.6.3.1.2, C.7.9).

Pipeline (the display and the AI models share it, DESIGN.md section 2/5):
stored values -> Modality LUT (C.11.1: Rescale Slope/Intercept or Modality LUT Sequence)
-> VOI LUT (C.11.2: Window Center/Width with a VOI LUT Function, or VOI LUT Sequence)
-> MONOCHROME1 inversion (C.7.6.3.1.2) -> display. engine.dicom.pixels decodes a file into a
:class:`Frame`; the functions here turn it into what the radiologist sees and the X-ray model gets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.dicom.attributes import _functional_item


@dataclass
class Frame:
    """One decoded frame and everything needed to display it as the header intends."""

    values: np.ndarray                # float32 (rows, cols) after Modality LUT, or uint8 (rows, cols, 3)
    stored: np.ndarray                # raw stored values (pixel readout)
    is_color: bool
    photometric: str
    monochrome1: bool                 # low values display bright: MONOCHROME1 (C.7.6.3.1.2) or
                                      # Presentation LUT Shape INVERSE (C.11.6); see photometric
    window: tuple[float, float]       # default (center, width) in Modality-LUT output units
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    voi_function: str = "LINEAR"
    pixel_spacing: tuple[float, float] | None = None
    spacing_source: str = ""
    bits_stored: int = 16
    modality: str = ""
    n_frames: int = 1
    frame_index: int = 0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    path: str = ""
    voi_lut: tuple[float, np.ndarray] | None = None   # (first mapped value, LUT scaled to [0,1])
    window_source: str = "header"     # 'header' | 'voi_lut' | 'computed'
    rescale_type: str = ""
    linear_modality: bool = True      # False when a Modality LUT Sequence (not slope/intercept) applied
    presentation_lut_shape: str = ""  # IDENTITY | INVERSE | "" (PS3.3 C.11.6)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])


# --------------------------------------------------------------------------------------------
# Modality LUT, header windows, colour
# --------------------------------------------------------------------------------------------

def modality_lut(arr: np.ndarray, ds, frame: int = 0) -> tuple[np.ndarray, float, float, str]:
    """Stored values -> float32 Modality LUT output (PS3.3 C.11.1): HU for CT."""
    try:
        mlut = ds.get("ModalityLUTSequence")
    except Exception:
        mlut = None
    if mlut:
        from pydicom.pixels import apply_modality_lut

        out = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
        return out, 1.0, 0.0, str(mlut[0].get("ModalityLUTType", ""))
    item = _functional_item(ds, frame, "PixelValueTransformationSequence")
    src = item if item is not None and "RescaleSlope" in item else ds
    try:
        slope = float(src.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    except Exception:
        slope, intercept = 1.0, 0.0
    rtype = str(src.get("RescaleType", "") or "")
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out, slope, intercept, rtype


def header_windows(ds, frame: int = 0) -> tuple[list[tuple[str, float, float]], str]:
    """Window Center/Width pairs with their explanations and the VOI LUT Function (C.11.2.1.2)."""
    item = _functional_item(ds, frame, "FrameVOILUTSequence")
    src = item if item is not None and "WindowCenter" in item else ds
    try:
        wc, ww = src.get("WindowCenter"), src.get("WindowWidth")
    except Exception:
        return [], "LINEAR"
    if wc is None or ww is None or wc == "" or ww == "":
        return [], "LINEAR"
    wcs = list(wc) if _is_multi(wc) else [wc]
    wws = list(ww) if _is_multi(ww) else [ww]
    try:
        expl = src.get("WindowCenterWidthExplanation", "")
    except Exception:
        expl = ""
    names = list(expl) if _is_multi(expl) else [expl]
    out = []
    for i, (c, w) in enumerate(zip(wcs, wws)):
        try:
            c, w = float(c), float(w)
        except Exception:
            continue
        if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
            continue
        name = str(names[i]) if i < len(names) and names[i] else f"Window {i + 1}"
        out.append((name, c, w))
    function = str(src.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    return out, function


def _is_multi(v) -> bool:
    return isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue"


def voi_lut_of(ds, values: np.ndarray) -> tuple[float, np.ndarray] | None:
    """First VOI LUT Sequence item as (first mapped value, LUT scaled to [0,1]) (PS3.3 C.11.2.1.1)."""
    try:
        seq = ds.get("VOILUTSequence")
        if not seq:
            return None
        item = seq[0]
        desc = [int(x) for x in item.LUTDescriptor]
        n = desc[0] or 65536
        first = desc[1]
        if ds.get("PixelRepresentation", 0) == 1 and first >= 2**15:
            first -= 2**16
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):
            dtype = np.uint8 if desc[2] <= 8 and len(raw) == n else np.uint16
            lut = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            lut = np.asarray(list(raw) if _is_multi(raw) else [raw], dtype=np.float64)
        lut = lut[:n].astype(np.float32)
        top = float(2 ** desc[2] - 1) if desc[2] > 0 else float(lut.max() or 1)
        top = max(top, float(lut.max()))  # some files misdeclare the LUT bit depth
        return float(first), (lut / np.float32(top if top > 0 else 1.0)).astype(np.float32)
    except Exception:
        return None


def robust_window(values: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """Default window from the 0.5–99.5 percentiles when the header has none."""
    v = values
    if v.size > 262144:
        step = int(math.ceil(math.sqrt(v.size / 262144)))
        v = v[::step, ::step]
    v = v[np.isfinite(v)] if v.dtype.kind == "f" else v.ravel()
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def _to_rgb8(arr: np.ndarray, ds, photometric: str, bits_stored: int) -> np.ndarray:
    """PALETTE COLOR / RGB / YBR_* -> uint8 RGB (PS3.3 C.7.6.3.1.2, C.7.9)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        top = float(rgb.max()) if rgb.size else 255.0
        shift = 8 if top > 255 else 0
        return (rgb >> shift).astype(np.uint8) if rgb.dtype.kind in "ui" else \
            np.clip(rgb, 0, 255).astype(np.uint8)
    if photometric in ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"):
        # pixel_array already converts YBR_FULL(_422) to RGB; partial/other ones we convert here
        if photometric.startswith("YBR_PARTIAL"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr[..., :3])
    if arr.dtype.kind in "ui" and bits_stored > 8:
        return (np.clip(arr, 0, None).astype(np.uint32) >> (bits_stored - 8)).clip(0, 255).astype(np.uint8)[..., :3]
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)[..., :3]


# --------------------------------------------------------------------------------------------
# VOI LUT and display
# --------------------------------------------------------------------------------------------

def _voi_linear_coeffs(center: float, width: float, function: str) -> tuple[float, float]:
    """y = clip(a*x + b, 0, 1) for LINEAR (C.11.2.1.2.1) and LINEAR_EXACT (C.11.2.1.3.2)."""
    if function == "LINEAR_EXACT":
        w = max(float(width), 1e-6)
        return 1.0 / w, 0.5 - center / w
    w = max(float(width), 1.0)
    if w <= 1.0:  # degenerate LINEAR window: a step at c - 0.5
        return 1e6, -(center - 0.5) * 1e6
    # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), 0 below c-0.5-(w-1)/2, 1 above c-0.5+(w-1)/2
    return 1.0 / (w - 1.0), 0.5 - (center - 0.5) / (w - 1.0)


def apply_voi(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
              out: np.ndarray | None = None) -> np.ndarray:
    """Window ``values`` to float32 [0, 1] (PS3.3 C.11.2.1.2), vectorised in float32.

    LINEAR: 0 if x <= c-0.5-(w-1)/2, 1 if x > c-0.5+(w-1)/2, else (x-(c-0.5))/(w-1)+0.5.
    LINEAR_EXACT: 0 if x <= c-w/2, 1 if x > c+w/2, else (x-c)/w+0.5.
    SIGMOID: 1/(1+exp(-4(x-c)/w)).
    """
    function = (function or "LINEAR").upper()
    x = np.asarray(values)
    if function == "SIGMOID":
        w = max(float(width), 1e-6)
        y = np.empty(x.shape, dtype=np.float32) if out is None else out
        np.copyto(y, x, casting="unsafe")
        y -= np.float32(center)
        y *= np.float32(-4.0 / w)
        np.exp(y, out=y)
        y += np.float32(1.0)
        np.reciprocal(y, out=y)
        return y
    a, b = _voi_linear_coeffs(center, width, function)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    np.multiply(x, np.float32(a), out=out, casting="unsafe")
    out += np.float32(b)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_voi_lut_table(values: np.ndarray, first: float, lut: np.ndarray) -> np.ndarray:
    """VOI LUT Sequence lookup (C.11.2.1.1): values below/above the LUT take its ends."""
    idx = np.clip(np.rint(values - first), 0, len(lut) - 1).astype(np.intp)
    return lut[idx]


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR",
                    invert: bool = False) -> np.ndarray:
    """apply_voi scaled to 0..255 (and optionally inverted) fused into one float32 buffer.

    Measured (bench_pixels.py): faster than an 8-bit lookup table gathered by stored value,
    because numpy's take() on a 512x512 index costs more than these few vectorised passes.
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        y = apply_voi(values, center, width, function)
        if invert:
            np.subtract(1.0, y, out=y)
        y *= 255.0
        return np.rint(y, out=y).astype(np.uint8)
    a, b = _voi_linear_coeffs(center, width, function)
    if invert:
        a, b = -a, 1.0 - b
    out = np.multiply(values, np.float32(a * 255.0), dtype=np.float32)
    out += np.float32(b * 255.0)
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def render_display(frame: Frame, center: float | None = None, width: float | None = None,
                   invert: bool | None = None) -> np.ndarray:
    """uint8 display image: (rows, cols) grey, or (rows, cols, 3) for colour.

    Default VOI from the header (window, else VOI LUT Sequence, else computed percentiles);
    MONOCHROME1 is shown inverted (PS3.3 C.7.6.3.1.2) unless ``invert`` is given: True/False is
    absolute (whether to show low values bright), not relative to the photometric default.
    """
    if frame.is_color:
        return frame.values if invert is not True else 255 - frame.values
    inv = frame.monochrome1 if invert is None else bool(invert)
    if center is None and width is None and frame.window_source == "voi_lut" and frame.voi_lut:
        y = apply_voi_lut_table(frame.values, *frame.voi_lut)
        if inv:
            y = 1.0 - y
        return np.rint(y * 255.0).astype(np.uint8)
    c = frame.window[0] if center is None else float(center)
    w = frame.window[1] if width is None else float(width)
    return window_to_uint8(frame.values, c, w, frame.voi_function, inv)


def display_gray01(frame: Frame) -> np.ndarray:
    """float32 [0,1]: default VOI, MONOCHROME1 inverted — what the radiologist sees and the X-ray model gets."""
    if frame.is_color:
        rgb = frame.values.astype(np.float32)
        return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / np.float32(255.0)
    if frame.window_source == "voi_lut" and frame.voi_lut is not None:
        y = apply_voi_lut_table(frame.values, *frame.voi_lut).astype(np.float32)
    else:
        y = apply_voi(frame.values, frame.window[0], frame.window[1], frame.voi_function)
    if frame.monochrome1:
        y = np.subtract(np.float32(1.0), y, dtype=np.float32)
    return y
