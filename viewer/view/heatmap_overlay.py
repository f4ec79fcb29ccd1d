"""Grad-CAM heatmap overlay on the image view's ViewBox (DESIGN.md 4: heatmaps are data).

The overlay is a separate pyqtgraph ImageItem in the same ViewBox as the image, so zoom and pan
follow automatically; its geometry is copied from the image item (position, transform, size) so
rotate/flip done by the view's item transform follow too. Colours are computed here from the
float heatmap each time a control changes (opacity, threshold, colormap), never burned into the
image. Outline mode draws the threshold iso-contour as a cosmetic-pen path (constant width at
any zoom). CT heatmaps are per axial slice (``Heatmap.slice_index``) and are only shown while
that slice is displayed.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, QPointF, QRectF, QRunnable, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QLinearGradient, QPainter, QPainterPath, QPen, QTransform
from PySide6.QtWidgets import QGraphicsPathItem, QSizePolicy, QWidget

from engine.results import Heatmap
from viewer.qt_workers import owned_pool

COLORMAPS: tuple[str, ...] = ("turbo", "inferno", "viridis", "magma", "plasma")
MAX_RENDER_SIDE = 1024       # Grad-CAM is a smooth upsampled 7x7-ish map: more pixels add nothing
MAX_CONTOUR_SIDE = 256
OVERLAY_Z = 50               # above the image (z 0) and below measurement tools
PLANES_Z = 40                # DICOM overlay planes: above the image, below the heatmap
PLANE_CACHE = 64             # (file, frame) overlay sets kept
PLANES_SETTLE_MS = 60        # a slice shown this long has its header read (not while scrolling)


@functools.lru_cache(maxsize=16)
def colormap_lut(name: str, n: int = 256) -> np.ndarray:
    """(n, 3) uint8 lookup table of a pyqtgraph colormap, read-only and computed once per name:
    pyqtgraph parses the map's CSV file each time (~7 ms, twice while the window is built)."""
    cmap = pg.colormap.get(name)
    lut = np.ascontiguousarray(cmap.getLookupTable(0.0, 1.0, n, alpha=False)[:, :3], dtype=np.uint8)
    lut.flags.writeable = False
    return lut


def _downsample(array: np.ndarray, max_side: int) -> np.ndarray:
    """Stride-downsample so the longest side is <= max_side (keeps the value range exactly)."""
    step = int(np.ceil(max(array.shape) / max_side)) if max(array.shape) > max_side else 1
    return array[::step, ::step] if step > 1 else array


def render_heatmap_rgba(array: np.ndarray, opacity: float, threshold: float, lut: np.ndarray) -> np.ndarray:
    """Heatmap [0,1] -> RGBA uint8: colour from ``lut``; alpha = opacity, 0 where value < threshold."""
    a = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0)
    a = np.clip(a, 0.0, 1.0)
    idx = np.minimum((a * (len(lut) - 1) + 0.5).astype(np.intp), len(lut) - 1)
    rgba = np.empty(a.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = lut[idx]
    alpha = np.uint8(round(float(np.clip(opacity, 0.0, 1.0)) * 255))
    rgba[..., 3] = np.where(a >= threshold, alpha, np.uint8(0))
    return rgba


def threshold_contours(array: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Iso-contours at ``threshold`` as (N, 2) (row, col) arrays in ``array``'s pixel coordinates."""
    from skimage.measure import find_contours  # lazy: only outline mode needs it

    small = _downsample(np.asarray(array, dtype=np.float32), MAX_CONTOUR_SIDE)
    if small.size == 0 or not (small.min() < threshold <= small.max()):
        return []
    # Pad with the minimum so contours close at the image border instead of stopping there.
    padded = np.pad(small, 1, mode="constant", constant_values=min(float(small.min()), threshold - 1e-3))
    sy = array.shape[0] / small.shape[0]
    sx = array.shape[1] / small.shape[1]
    out = []
    for c in find_contours(padded, threshold):
        c = c - 1.0
        # Contour points are pixel-centre coordinates; ImageItem pixel i spans [i, i+1).
        out.append(np.column_stack(((c[:, 0] + 0.5) * sy, (c[:, 1] + 0.5) * sx)))
    return out


class HeatmapOverlay(QObject):
    """Heatmap layer for one pyqtgraph ViewBox, tracking an image item's geometry.

    ``set_heatmaps`` takes the heatmaps of one target (one for X-ray, one per slice for CT);
    ``set_slice`` tells which slice is displayed. Controls: ``set_enabled``, ``set_opacity``,
    ``set_threshold``, ``set_colormap``, ``set_outline``, ``set_blink_hidden``.
    """

    changed = Signal()

    def __init__(self, view_box: pg.ViewBox, image_item: pg.ImageItem | None = None,
                 parent: QObject | None = None, container: Any = None):
        super().__init__(parent)
        self.view_box = view_box
        self.image_item = image_item
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setZValue(OVERLAY_Z)
        self.image.setAutoDownsample(False)
        self.outline = QGraphicsPathItem()
        self.outline.setZValue(OVERLAY_Z + 1)
        for item in (self.image, self.outline):
            view_box.addItem(item, ignoreBounds=True)
            if container is not None:     # e.g. ImageView.content: image pixel coordinates
                item.setParentItem(container)
        self._heatmaps: dict[int | None, Heatmap] = {}
        self._slice: int | None = None
        self.enabled = True
        self.blink_hidden = False
        self.opacity = 0.45
        self.threshold = 0.3
        self.colormap = COLORMAPS[0]
        self.outline_mode = False
        self._lut = colormap_lut(self.colormap)
        self._shown: Heatmap | None = None
        self.rgba: np.ndarray | None = None     # what the ImageItem currently shows (tests read it)
        if image_item is not None and hasattr(image_item, "sigImageChanged"):
            image_item.sigImageChanged.connect(self._sync_geometry)
        self._refresh()

    # -- data -------------------------------------------------------------------------------
    def set_heatmaps(self, heatmaps: Iterable[Heatmap]) -> None:
        """Heatmaps of one target; X-ray: slice_index None; CT: one per axial slice index."""
        self._heatmaps = {h.slice_index: h for h in heatmaps}
        self._refresh()

    def clear(self) -> None:
        self.set_heatmaps([])

    def set_slice(self, index: int | None) -> None:
        if index != self._slice:
            self._slice = index
            self._refresh()

    def heatmap_slices(self) -> list[int]:
        return sorted(k for k in self._heatmaps if k is not None)

    # -- controls ---------------------------------------------------------------------------
    def set_enabled(self, on: bool) -> None:
        self.enabled = bool(on)
        self._apply_visibility()

    def set_blink_hidden(self, hidden: bool) -> None:
        """Blink compare: hide while a key is held, show again on release."""
        self.blink_hidden = bool(hidden)
        self._apply_visibility()

    def set_opacity(self, value: float) -> None:
        self.opacity = float(np.clip(value, 0.0, 1.0))
        self._render()

    def set_threshold(self, value: float) -> None:
        self.threshold = float(np.clip(value, 0.0, 1.0))
        self._render()

    def set_colormap(self, name: str) -> None:
        self.colormap = name
        self._lut = colormap_lut(name)
        self._render()

    def set_outline(self, on: bool) -> None:
        self.outline_mode = bool(on)
        self._render()

    # -- state ------------------------------------------------------------------------------
    def current_heatmap(self) -> Heatmap | None:
        """The heatmap for the displayed slice (X-ray: the only one), or None."""
        if None in self._heatmaps:
            return self._heatmaps[None]
        return self._heatmaps.get(self._slice)

    def is_showing(self) -> bool:
        """True when a heatmap is actually drawn over the image right now."""
        return self._shown is not None and (self.image.isVisible() or self.outline.isVisible())

    # -- internals --------------------------------------------------------------------------
    def _refresh(self) -> None:
        self._shown = self.current_heatmap()
        self._sync_geometry()
        self._render()

    def _render(self) -> None:
        hm = self._shown
        if hm is None:
            self.rgba = None
            self.image.clear()
            self.outline.setPath(QPainterPath())
            self._apply_visibility()
            self.changed.emit()
            return
        small = _downsample(hm.array, MAX_RENDER_SIDE)
        if self.outline_mode:
            self.rgba = None
            self.image.clear()
            self._draw_outline(hm.array)
        else:
            self.rgba = render_heatmap_rgba(small, self.opacity, self.threshold, self._lut)
            self.image.setImage(self.rgba, autoLevels=False, levels=None)
            self.outline.setPath(QPainterPath())
        self._sync_geometry()
        self._apply_visibility()
        self.changed.emit()

    def _draw_outline(self, array: np.ndarray) -> None:
        path = QPainterPath()
        for c in threshold_contours(array, self.threshold):
            path.moveTo(QPointF(float(c[0, 1]), float(c[0, 0])))
            for r, col in c[1:]:
                path.lineTo(QPointF(float(col), float(r)))
        idx = int(round(self.threshold * (len(self._lut) - 1)))
        r, g, b = (int(v) for v in self._lut[max(idx, int(0.85 * (len(self._lut) - 1)))])
        pen = QPen(QColor(r, g, b, max(int(round(self.opacity * 255)), 220)))
        pen.setCosmetic(True)
        pen.setWidthF(2.0)
        self.outline.setPen(pen)
        self.outline.setPath(path)

    def _sync_geometry(self) -> None:
        """Heatmap pixel (r, c) -> the image item's pixel (r, c), whatever transform the view uses.

        The image item may be rotated/flipped by its item transform and may show a downsampled
        copy of the frame; its full item->ViewBox transform is composed after a scale from
        heatmap pixels to item pixels, so the overlay lands where the image is.
        """
        hm = self._shown
        if hm is None:
            return
        rows, cols = hm.array.shape[:2]
        ii = self.image_item
        to_view = QTransform()
        kx = ky = 1.0                      # heatmap pixel -> image-item pixel
        if ii is not None and ii.image is not None and ii.width() and ii.height():
            iw, ih = float(ii.width()), float(ii.height())
            if abs(iw / ih - cols / rows) < 0.02 * (cols / rows):
                kx, ky = iw / cols, ih / rows
            t, ok = ii.itemTransform(self.image.parentItem() or self.view_box.childGroup)
            if ok:
                to_view = t
        img = self.image.image
        if img is not None:
            sr, sc = img.shape[:2]
            self.image.setPos(0.0, 0.0)
            self.image.setTransform(QTransform.fromScale(kx * cols / sc, ky * rows / sr) * to_view)
        self.outline.setPos(0.0, 0.0)
        self.outline.setTransform(QTransform.fromScale(kx, ky) * to_view)

    def _apply_visibility(self) -> None:
        show = self.enabled and not self.blink_hidden and self._shown is not None
        self.image.setVisible(show and not self.outline_mode)
        self.outline.setVisible(show and self.outline_mode)


class ColorBar(QWidget):
    """Horizontal colorbar 0..1 for the overlay colormap, with the threshold marked."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._lut = colormap_lut(COLORMAPS[0])
        self._threshold = 0.3
        self.setMinimumHeight(26)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Heatmap colour scale (Grad-CAM, 0 = none, 1 = strongest); the tick is the "
                        "display threshold: values below it are hidden")

    def set_colormap(self, name: str) -> None:
        self._lut = colormap_lut(name)
        self.update()

    def set_threshold(self, value: float) -> None:
        self._threshold = float(value)
        self.update()

    def _bar(self) -> QRectF:
        return QRectF(4, 2, self.width() - 8, 10)

    def label_font(self) -> QFont:
        f = QFont(self.font())
        f.setPointSizeF(max(6.5, f.pointSizeF() * 0.8))
        return f

    def label_rects(self) -> dict[str, tuple[QRectF, str]]:
        """The labels to draw under the bar: the threshold value always (kept inside the bar's
        span), the 0 and 1 end marks only where the threshold label leaves room for them;
        measured with the label font, so they never overlap."""
        bar = self._bar()
        fm = QFontMetricsF(self.label_font())
        h = fm.height()
        y = bar.bottom() + 1
        texts = {"zero": "0", "one": "1", "threshold": f"{self._threshold:.2f}"}
        w = {k: fm.horizontalAdvance(t) + 2 for k, t in texts.items()}
        zero = QRectF(bar.left(), y, w["zero"], h)
        one = QRectF(bar.right() - w["one"], y, w["one"], h)
        x = bar.left() + bar.width() * self._threshold
        left = min(max(x - w["threshold"] / 2, bar.left()), max(bar.left(), bar.right() - w["threshold"]))
        thr = QRectF(left, y, w["threshold"], h)
        out = {"threshold": (thr, texts["threshold"])}
        gap = 3.0
        if not thr.adjusted(-gap, 0, gap, 0).intersects(zero):
            out["zero"] = (zero, texts["zero"])
        if not thr.adjusted(-gap, 0, gap, 0).intersects(one):
            out["one"] = (one, texts["one"])
        return out

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        bar = self._bar()
        grad = QLinearGradient(bar.topLeft(), bar.topRight())
        n = len(self._lut)
        for i in range(0, n, max(1, n // 32)):
            r, g, b = (int(v) for v in self._lut[i])
            grad.setColorAt(i / (n - 1), QColor(r, g, b))
        r, g, b = (int(v) for v in self._lut[-1])
        grad.setColorAt(1.0, QColor(r, g, b))
        p.fillRect(bar, grad)
        # Hatch the hidden part (below the threshold).
        hidden = QRectF(bar.left(), bar.top(), bar.width() * self._threshold, bar.height())
        p.fillRect(hidden, QColor(40, 40, 40, 170))
        x = bar.left() + bar.width() * self._threshold
        p.setPen(QPen(self.palette().text().color(), 2))
        p.drawLine(QPointF(x, bar.top() - 2), QPointF(x, bar.bottom() + 2))
        p.setPen(self.palette().text().color())
        p.setFont(self.label_font())
        for rect, text in self.label_rects().values():
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, text)
        p.end()


# --------------------------------------------------------------------------------------------
# DICOM overlay planes (60xx), decoded by engine.dicom.overlays in a worker thread
class _PlanesBridge(QObject):
    done = Signal(object, object)          # (key, OverlaySet)


class _PlanesJob(QRunnable):
    def __init__(self, key: tuple[str, int], bridge: _PlanesBridge):
        super().__init__()
        self.key, self.bridge = key, bridge

    def run(self) -> None:  # noqa: D102 - worker thread
        from engine.service import overlay_planes

        result = overlay_planes(self.key[0], self.key[1])
        try:
            self.bridge.done.emit(self.key, result)
        except RuntimeError:      # the view was deleted meanwhile
            pass


class OverlayPlaneLayer(QObject):
    """The displayed frame's DICOM overlay planes (PS3.3 C.9.2) drawn over the image.

    The planes are composed into one RGBA image (``engine.dicom.overlays.compose_rgba``, planes
    in their activation-layer order) in image pixel coordinates inside the view's ``content``, so
    zoom, pan, rotation and flips follow. Headers are read in one worker thread (through
    ``engine.service.overlay_planes``), one request at a time, once a slice has stayed on screen
    for PLANES_SETTLE_MS: scrolling through a CT at 170 slices/s reads no header at all.
    ``set_visible`` toggles them (graphics overlays can hide anatomy).
    """

    changed = Signal()

    def __init__(self, view: Any, parent: QObject | None = None):
        super().__init__(parent or view)
        self.view = view
        self.item = pg.ImageItem(axisOrder="row-major")
        self.item.setZValue(PLANES_Z)
        view.view_box.addItem(self.item, ignoreBounds=True)
        self.item.setParentItem(view.content)
        self.visible = True
        self.current: Any = None                    # OverlaySet of the displayed frame (or None)
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._pool = owned_pool(self, 1)
        self._bridge = _PlanesBridge()
        self._bridge.done.connect(self._on_loaded)
        self._inflight: tuple[str, int] | None = None
        self._settle = QTimer(self)
        self._settle.setSingleShot(True)
        self._settle.setInterval(PLANES_SETTLE_MS)
        self._settle.timeout.connect(self._request)

    def key(self) -> tuple[str, int] | None:
        """(file, frame) of the displayed slice, or None (no image, or an image not from a file)."""
        d = self.view.current_data()
        if d is None:
            return None
        path = d.path or getattr(d, "source_file", "")
        return (path, int(getattr(d, "frame_index", 0) or 0)) if path else None

    def refresh(self) -> None:
        key = self.key()
        if key is None:
            self._show(None)
            return
        if key in self._cache:
            self._cache.move_to_end(key)
            self._show(self._cache[key])
            return
        self._show(None)
        self._settle.start()

    def _request(self) -> None:
        key = self.key()
        if key is None or key in self._cache or self._inflight is not None:
            return
        self._inflight = key
        self._pool.start(_PlanesJob(key, self._bridge))

    def _on_loaded(self, key: tuple[str, int], result: Any) -> None:
        self._inflight = None
        self._cache[key] = result
        while len(self._cache) > PLANE_CACHE:
            self._cache.popitem(last=False)
        if key == self.key():
            self._show(result)
        else:
            self._request()         # the user moved on meanwhile: read the slice shown now

    def _show(self, result: Any) -> None:
        self.current = result
        d = self.view.current_data()
        if result is None or not result.planes or d is None:
            self.item.clear()
            self.item.setVisible(False)
        else:
            from engine.dicom.overlays import compose_rgba

            rgba = compose_rgba(result.planes, tuple(d.values.shape[:2]))
            self.item.setImage(rgba, autoLevels=False, levels=None)
            self.item.setPos(0.0, 0.0)
            self.item.setVisible(self.visible)
        self.changed.emit()

    def set_visible(self, on: bool) -> None:
        self.visible = bool(on)
        self.item.setVisible(self.visible and self.current is not None and bool(self.current.planes))
        self.changed.emit()

    def is_showing(self) -> bool:
        return self.item.isVisible() and self.current is not None and bool(self.current.planes)

    def plane_names(self) -> list[str]:
        return [p.name for p in self.current.planes] if self.current is not None else []

    def wait(self, msecs: int = 10000) -> bool:
        """Block until the pending header read is delivered (tests)."""
        from PySide6.QtCore import QCoreApplication, QElapsedTimer

        t = QElapsedTimer()
        t.start()
        while t.elapsed() < msecs:
            self._pool.waitForDone(20)
            QCoreApplication.processEvents()
            if self._inflight is None and not self._settle.isActive():
                return True
        return False
