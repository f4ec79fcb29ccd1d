"""Distance, angle and ellipse/rectangle ROI measurements on the displayed image.

Geometry is in image pixel coordinates (x = column, y = row; pixel (r, c) covers [c, c+1] x [r, r+1]),
converted to millimetres with the frame's pixel spacing: Pixel Spacing (0028,0030) for CT,
Imager Pixel Spacing (0018,1164) for projection radiographs when Pixel Spacing is absent
(PS3.3 10.7.1.3: then it is the spacing at the detector, not at the patient; the label says so).
The math is plain numpy (tested alone); the Qt items only draw and edit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, QPointF, Signal

Spacing = tuple[float, float] | None   # (row_mm, col_mm)
COLOR = (255, 210, 60)


# --------------------------------------------------------------------------------------------
# math
def distance_mm(p1: tuple[float, float], p2: tuple[float, float], spacing: Spacing) -> float:
    """Length of p1->p2 (x=col, y=row) in mm; in pixels when ``spacing`` is None."""
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    if spacing is None:
        return float(math.hypot(dx, dy))
    return float(math.hypot(dx * spacing[1], dy * spacing[0]))


def angle_deg(a: tuple[float, float], vertex: tuple[float, float], b: tuple[float, float],
              spacing: Spacing) -> float:
    """Angle a-vertex-b in degrees, measured in physical space (non-square pixels matter)."""
    sy, sx = spacing if spacing is not None else (1.0, 1.0)
    u = np.array([(a[0] - vertex[0]) * sx, (a[1] - vertex[1]) * sy])
    v = np.array([(b[0] - vertex[0]) * sx, (b[1] - vertex[1]) * sy])
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return 0.0
    return float(np.degrees(np.arccos(np.clip(np.dot(u, v) / (nu * nv), -1.0, 1.0))))


def ellipse_mask(shape: tuple[int, int], x: float, y: float, w: float, h: float) -> np.ndarray:
    """Pixels whose centres lie inside the axis-aligned ellipse in the box (x, y, w, h)."""
    rows, cols = shape
    if w <= 0 or h <= 0:
        return np.zeros(shape, bool)
    cy, cx = np.ogrid[0:rows, 0:cols]
    return ((cx + 0.5 - (x + w / 2)) / (w / 2)) ** 2 + ((cy + 0.5 - (y + h / 2)) / (h / 2)) ** 2 <= 1.0


def rect_mask(shape: tuple[int, int], x: float, y: float, w: float, h: float) -> np.ndarray:
    """Pixels whose centres lie inside the rectangle (x, y, w, h)."""
    rows, cols = shape
    cy, cx = np.ogrid[0:rows, 0:cols]
    return (cx + 0.5 >= x) & (cx + 0.5 <= x + w) & (cy + 0.5 >= y) & (cy + 0.5 <= y + h)


@dataclass
class RoiStats:
    mean: float
    sd: float
    min: float
    max: float
    n_pixels: int
    area_mm2: float | None       # analytic area of the drawn shape (None without spacing)
    area_px: float


def roi_stats(values: np.ndarray, mask: np.ndarray, shape_area_px: float, spacing: Spacing) -> RoiStats | None:
    """Mean/SD (population)/min/max of ``values`` under ``mask``; None when the mask is empty."""
    vals = np.asarray(values)[mask]
    if vals.size == 0:
        return None
    vals = vals.astype(np.float64)
    area = shape_area_px * spacing[0] * spacing[1] if spacing is not None else None
    return RoiStats(float(vals.mean()), float(vals.std()), float(vals.min()), float(vals.max()),
                    int(vals.size), area, float(shape_area_px))


def format_stats(st: RoiStats | None, unit: str) -> str:
    if st is None:
        return "ROI outside image"
    area = f"{st.area_mm2:.1f} mm²" if st.area_mm2 is not None else f"{st.area_px:.0f} px²"
    return (f"mean {st.mean:.1f} {unit}  SD {st.sd:.1f}\n"
            f"min {st.min:.0f}  max {st.max:.0f}  area {area}")


# --------------------------------------------------------------------------------------------
# Qt items
def _pen():
    return pg.mkPen(COLOR, width=1.5, cosmetic=True)


class Measurement(QObject):
    """Base: a graphics item + a text label; ``text`` is what the user sees, ``value`` the number."""

    changed = Signal()
    kind = "measurement"

    def __init__(self, layer: "MeasurementLayer", slice_index: int):
        super().__init__()
        self.layer, self.slice_index = layer, slice_index
        self.label = pg.TextItem("", color=COLOR, anchor=(0, 1), fill=pg.mkBrush(0, 0, 0, 150))
        self.value: float | None = None
        self.text = ""
        self.items: list = []

    def add_to(self, parent) -> None:
        for it in self.items + [self.label]:
            it.setParentItem(parent)

    def remove(self) -> None:
        for it in self.items + [self.label]:
            sc = it.scene()
            if sc is not None:
                sc.removeItem(it)
            it.setParentItem(None)

    def set_visible(self, on: bool) -> None:
        for it in self.items + [self.label]:
            it.setVisible(on)

    def set_editable(self, on: bool) -> None:
        """Whether the shape and its handles take the mouse (see ``MeasurementLayer.set_editable``)."""
        # pyqtgraph's scene skips disabled items (and their handles) for hover, click and drag
        for it in self.items:
            it.setEnabled(on)

    def update_text(self) -> None:
        raise NotImplementedError

    def place_label(self, x: float, y: float) -> None:
        """Put the label at (x, y) (image pixels), flipped to stay inside the visible view."""
        self.label.setAnchor((0, 1))
        self.label.setPos(QPointF(x, y))
        try:
            vr = self.layer.view.view_box.sceneBoundingRect()
            br = self.label.sceneBoundingRect()
        except (AttributeError, RuntimeError):
            return
        ax = 1 if br.right() > vr.right() else 0
        ay = 0 if br.top() < vr.top() else 1
        if (ax, ay) != (0, 1):
            self.label.setAnchor((ax, ay))


class DistanceMeasurement(Measurement):
    kind = "distance"

    def __init__(self, layer, slice_index, p1, p2):
        super().__init__(layer, slice_index)
        self.roi = pg.LineSegmentROI([p1, p2], pen=_pen(), hoverPen=pg.mkPen((255, 255, 255), width=2))
        self.roi.sigRegionChanged.connect(self.update_text)
        self.items = [self.roi]

    def points(self) -> tuple[tuple[float, float], tuple[float, float]]:
        hs = self.roi.getHandles()
        p = [self.roi.mapToParent(h.pos()) for h in hs]
        return (p[0].x(), p[0].y()), (p[1].x(), p[1].y())

    def set_end(self, p) -> None:
        self.roi.movePoint(self.roi.getHandles()[1], QPointF(*p), finish=False, coords="parent")

    def update_text(self) -> None:
        a, b = self.points()
        sp = self.layer.spacing()
        self.value = distance_mm(a, b, sp)
        self.text = f"{self.value:.1f} mm" if sp is not None else f"{self.value:.1f} px (no spacing)"
        if sp is not None and self.layer.spacing_note():
            self.text += f" {self.layer.spacing_note()}"
        self.label.setText(self.text)
        self.place_label(*b)
        self.changed.emit()


class AngleMeasurement(Measurement):
    kind = "angle"

    def __init__(self, layer, slice_index, a, vertex, b):
        super().__init__(layer, slice_index)
        self.roi = pg.PolyLineROI([a, vertex, b], closed=False, pen=_pen(), movable=True)
        self.roi.sigRegionChanged.connect(self.update_text)
        self.items = [self.roi]

    def points(self):
        return [(p.x(), p.y()) for p in (self.roi.mapToParent(h.pos()) for h in self.roi.getHandles())]

    def update_text(self) -> None:
        pts = self.points()
        if len(pts) < 3:
            return
        self.value = angle_deg(pts[0], pts[1], pts[2], self.layer.spacing())
        self.text = f"{self.value:.1f}°"
        self.label.setText(self.text)
        self.place_label(*pts[1])
        self.changed.emit()


class _NoRotateEllipse(pg.EllipseROI):
    def __init__(self, pos, size, **kw):
        super().__init__(pos, size, rotatable=False, **kw)
        for h in list(self.getHandles()):
            if h.typ == "r":
                self.removeHandle(h)
        self.addScaleHandle([1, 1], [0, 0])
        self.addScaleHandle([0, 0], [1, 1])


class RoiMeasurement(Measurement):
    """Ellipse or rectangle ROI: mean/SD/min/max of the frame values (HU for CT) and area."""

    def __init__(self, layer, slice_index, x, y, w, h, shape: str = "ellipse"):
        super().__init__(layer, slice_index)
        self.kind = shape
        self.stats: RoiStats | None = None
        cls = _NoRotateEllipse if shape == "ellipse" else pg.RectROI
        kw = {} if shape == "ellipse" else {"sideScalers": True}
        self.roi = cls([x, y], [max(w, 1e-3), max(h, 1e-3)], pen=_pen(), **kw)
        self.roi.sigRegionChanged.connect(self.update_text)
        self.items = [self.roi]

    def box(self) -> tuple[float, float, float, float]:
        p, s = self.roi.pos(), self.roi.size()
        x, y, w, h = p.x(), p.y(), s.x(), s.y()
        if w < 0:
            x, w = x + w, -w
        if h < 0:
            y, h = y + h, -h
        return x, y, w, h

    def set_box(self, x, y, w, h) -> None:
        self.roi.setPos([x, y], update=False)
        self.roi.setSize([w, h])

    def update_text(self) -> None:
        values = self.layer.values()
        x, y, w, h = self.box()
        if values is None or values.ndim != 2:
            self.text = "ROI needs a grayscale image"
        else:
            if self.kind == "ellipse":
                mask, area_px = ellipse_mask(values.shape, x, y, w, h), math.pi * w * h / 4
            else:
                mask, area_px = rect_mask(values.shape, x, y, w, h), w * h
            self.stats = roi_stats(values, mask, area_px, self.layer.spacing())
            self.value = self.stats.mean if self.stats else None
            self.text = format_stats(self.stats, self.layer.unit())
        self.label.setText(self.text)
        self.place_label(x + w, y)
        self.changed.emit()


class MeasurementLayer(QObject):
    """Owns the measurements of one image view; they belong to the slice they were drawn on."""

    changed = Signal()
    TOOLS = ("distance", "angle", "ellipse", "rect")

    def __init__(self, view):
        super().__init__()
        self.view = view          # viewer.view.image_view.ImageView
        self.items: list[Measurement] = []
        self._draft: Measurement | None = None
        self._angle_pts: list[tuple[float, float]] = []
        self._angle_preview: pg.PlotCurveItem | None = None
        self.editable = True

    # context from the view
    def spacing(self) -> Spacing:
        return self.view.pixel_spacing()

    def spacing_note(self) -> str:
        return self.view.spacing_note()

    def values(self) -> np.ndarray | None:
        return self.view.current_values()

    def unit(self) -> str:
        return "HU" if self.view.modality() == "CT" else ""

    # creation API (also used by the mouse handlers)
    def set_editable(self, on: bool) -> None:
        """Finished measurements take the mouse only when no drawing tool is active. While one is,
        a drag must draw: the third click of an angle leaves the pointer on that angle's handle,
        and the next drag moved the handle (editing the finished angle) instead of drawing."""
        self.editable = bool(on)
        for m in self.items:
            m.set_editable(self.editable)

    def _add(self, m: Measurement) -> Measurement:
        m.add_to(self.view.content)
        m.set_editable(self.editable)
        m.update_text()
        m.changed.connect(self.changed)
        self.items.append(m)
        self.changed.emit()
        return m

    def add_distance(self, p1, p2) -> DistanceMeasurement:
        return self._add(DistanceMeasurement(self, self.view.current_slice(), p1, p2))  # type: ignore[return-value]

    def add_angle(self, a, vertex, b) -> AngleMeasurement:
        return self._add(AngleMeasurement(self, self.view.current_slice(), a, vertex, b))  # type: ignore[return-value]

    def add_roi(self, x, y, w, h, shape: str = "ellipse") -> RoiMeasurement:
        return self._add(RoiMeasurement(self, self.view.current_slice(), x, y, w, h, shape))  # type: ignore[return-value]

    def clear(self) -> None:
        for m in self.items:
            m.remove()
        self.items.clear()
        self.cancel_draft()
        self.changed.emit()

    def remove_last(self) -> None:
        if self.items:
            self.items.pop().remove()
            self.changed.emit()

    def on_slice_changed(self, index: int) -> None:
        for m in self.items:
            m.set_visible(m.slice_index == index)
            if m.slice_index == index and isinstance(m, RoiMeasurement):
                m.update_text()

    def refresh(self) -> None:
        for m in self.items:
            m.update_text()

    # mouse-driven drawing: begin/update/finish from the view's drag handler (pixel coords)
    def begin(self, tool: str, p: tuple[float, float]) -> None:
        if tool == "distance":
            self._draft = self.add_distance(p, (p[0] + 1e-3, p[1]))
        elif tool in ("ellipse", "rect"):
            self._draft = self.add_roi(p[0], p[1], 1e-3, 1e-3, tool)
            self._draft_origin = p

    def update(self, p: tuple[float, float]) -> None:
        d = self._draft
        if isinstance(d, DistanceMeasurement):
            d.set_end(p)
        elif isinstance(d, RoiMeasurement):
            x0, y0 = self._draft_origin
            d.set_box(min(x0, p[0]), min(y0, p[1]), max(abs(p[0] - x0), 1e-3), max(abs(p[1] - y0), 1e-3))

    def finish(self, p: tuple[float, float]) -> None:
        self.update(p)
        self._draft = None

    def click_angle_point(self, p: tuple[float, float]) -> AngleMeasurement | None:
        """Angle by three clicks: first arm end, vertex, second arm end."""
        self._angle_pts.append(p)
        if self._angle_preview is None:
            self._angle_preview = pg.PlotCurveItem(pen=_pen())
            self._angle_preview.setParentItem(self.view.content)
        xs, ys = zip(*self._angle_pts)
        self._angle_preview.setData(np.array(xs, float), np.array(ys, float))
        if len(self._angle_pts) == 3:
            a, v, b = self._angle_pts
            self.cancel_draft()
            return self.add_angle(a, v, b)
        return None

    def cancel_draft(self) -> None:
        self._angle_pts = []
        if self._angle_preview is not None:
            sc = self._angle_preview.scene()
            if sc is not None:
                sc.removeItem(self._angle_preview)
            self._angle_preview = None
        self._draft = None
