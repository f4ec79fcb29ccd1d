"""DICOM overlay planes (groups 6000-601E) as bitmaps in image pixel coordinates.

PS3.3 C.9.2 Overlay Plane Module: each plane has Overlay Rows/Columns (60xx,0010/0011), Overlay
Type (60xx,0040: G graphics, R ROI), Overlay Origin (60xx,0050: row\\column of the bitmap's first
pixel, 1-based, so "1\\1" is the image's top-left pixel and values may be negative or beyond the
image), a one-bit Overlay Data (60xx,3000) bitmap, Overlay Description (60xx,0022) and Overlay
Label (60xx,1500). PS3.3 C.9.3 Multi-frame Overlay Module: Number of Frames in Overlay (60xx,0015)
and Image Frame Origin (60xx,0051, 1-based, 1 when absent) tie overlay frame k to image frame
``origin - 1 + k``; a plane without (60xx,0015) is a single bitmap applied to every frame.

Draw order: PS3.3 C.11.7 gives a plane an Overlay Activation Layer (60xx,1001). A presentation
state orders layers with Graphic Layer Order (0070,0062) of its Graphic Layer Sequence
(C.10.7); when the image is shown without a presentation state we use the image's own Graphic
Layer Sequence when it has one, otherwise planes without a layer come first, then layers by name;
ties keep group order (6000 first). Overlays embedded in the high bits of Pixel Data (retired
since PS3.5 2004) are not read: planes without Overlay Data are skipped.

Decoding reads only the header (overlay groups precede Pixel Data, so ``read_header`` holds
them) and must run off the GUI thread. Never raises for bad input: a plane that cannot be read
is skipped and reported in ``OverlaySet.problems``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_OVERLAY_BITS = 512 * 2**20          # 64 MiB of bits: far above any real overlay (4096^2 x 32)
GROUPS = tuple(range(0x6000, 0x6020, 2))


@dataclass
class OverlayPlane:
    """One overlay plane for one image frame."""

    group: int
    bitmap: np.ndarray                  # bool (rows, cols), True = overlay pixel on
    origin: tuple[int, int]             # (row, col) of bitmap[0, 0] in 0-based image pixels
    kind: str = "G"                     # G graphics | R ROI
    label: str = ""
    description: str = ""
    layer: str = ""

    @property
    def name(self) -> str:
        return self.label or self.description or f"Overlay {self.group:04X}"


@dataclass
class OverlaySet:
    """Planes of one frame in draw order (first = bottom), and why any plane was skipped."""

    planes: list[OverlayPlane] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _get(ds: Any, group: int, elem: int, default: Any = None) -> Any:
    el = ds.get((group, elem))
    if el is None or el.value in (None, ""):
        return default
    return el.value


def _layer_order(ds: Any) -> dict[str, int]:
    """Graphic Layer Order (0070,0062) per Graphic Layer (0070,0002) when the dataset has them."""
    out: dict[str, int] = {}
    for item in _get(ds, 0x0070, 0x0060, []) or []:
        try:
            out[str(item.GraphicLayer).strip()] = int(item.GraphicLayerOrder)
        except (AttributeError, TypeError, ValueError):
            continue
    return out


def overlay_groups(ds: Any) -> list[int]:
    """Groups 60xx that carry Overlay Data (60xx,3000)."""
    return [g for g in GROUPS if (g, 0x3000) in ds]


def _plane_frames(ds: Any, group: int) -> tuple[int | None, int]:
    """(Number of Frames in Overlay or None when absent, Image Frame Origin 0-based)."""
    n = _get(ds, group, 0x0015)
    origin = _get(ds, group, 0x0051, 1)
    try:
        n = int(n) if n is not None else None
    except (TypeError, ValueError):
        n = None
    try:
        o = int(origin) - 1
    except (TypeError, ValueError):
        o = 0
    return n, max(o, 0)


def _plane(ds: Any, group: int, frame: int) -> OverlayPlane | None:
    rows, cols = int(_get(ds, group, 0x0010, 0)), int(_get(ds, group, 0x0011, 0))
    if rows <= 0 or cols <= 0:
        raise ValueError("Overlay Rows/Columns (60xx,0010/0011) missing or zero")
    n, first = _plane_frames(ds, group)
    if rows * cols * max(n or 1, 1) > MAX_OVERLAY_BITS:
        raise ValueError(f"overlay of {rows}x{cols}x{n or 1} exceeds the size limit")
    if n is not None and n > 1:
        k = frame - first
        if not 0 <= k < n:
            return None                 # no overlay frame for this image frame
    elif n is not None and frame != first:
        return None                     # a one-frame multi-frame overlay belongs to one image frame
    arr = np.asarray(ds.overlay_array(group))
    if arr.ndim == 3:
        arr = arr[min(frame - first, arr.shape[0] - 1)] if n and n > 1 else arr[0]
    origin = _get(ds, group, 0x0050, [1, 1])
    try:
        r0, c0 = int(origin[0]) - 1, int(origin[1]) - 1
    except (TypeError, ValueError, IndexError):
        r0, c0 = 0, 0
    return OverlayPlane(group=group, bitmap=arr.astype(bool), origin=(r0, c0),
                        kind=str(_get(ds, group, 0x0040, "G")).strip().upper() or "G",
                        label=str(_get(ds, group, 0x1500, "") or "").strip(),
                        description=str(_get(ds, group, 0x0022, "") or "").strip(),
                        layer=str(_get(ds, group, 0x1001, "") or "").strip())


def overlays_from_dataset(ds: Any, frame: int = 0) -> OverlaySet:
    """Overlay planes of image frame ``frame`` (0-based) in draw order."""
    out = OverlaySet()
    for g in overlay_groups(ds):
        try:
            p = _plane(ds, g, frame)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types on bad overlay data
            out.problems.append(f"overlay {g:04X} skipped: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if p is not None:
            out.planes.append(p)
    order = _layer_order(ds)
    out.planes.sort(key=lambda p: (p.layer != "", order.get(p.layer, 1 << 30), p.layer, p.group))
    return out


def load_overlays(path: str | Path, frame: int = 0) -> OverlaySet:
    """Overlay planes of one file's frame (header only; worker thread). Never raises."""
    from engine.dicom.pixels import read_header

    try:
        ds = read_header(path)
    except Exception as exc:  # noqa: BLE001 - LoadError by contract; shown as a problem, not raised
        return OverlaySet(problems=[f"overlays not read: {getattr(exc, 'reason', exc)}"])
    return overlays_from_dataset(ds, frame)


def compose_rgba(planes: list[OverlayPlane], shape: tuple[int, int],
                 colors: dict[str, tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """All planes painted in order into one RGBA image of the image's ``shape`` (rows, cols);
    bitmap pixels falling outside the image are clipped (their origin may be negative)."""
    colors = colors or {"G": (255, 255, 0, 255), "R": (0, 255, 255, 255)}
    rows, cols = shape
    out = np.zeros((rows, cols, 4), np.uint8)
    for p in planes:
        r0, c0 = p.origin
        br, bc = p.bitmap.shape
        ir0, ic0 = max(r0, 0), max(c0, 0)
        ir1, ic1 = min(r0 + br, rows), min(c0 + bc, cols)
        if ir1 <= ir0 or ic1 <= ic0:
            continue
        sub = p.bitmap[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0]
        out[ir0:ir1, ic0:ic1][sub] = colors.get(p.kind, colors["G"])
    return out
