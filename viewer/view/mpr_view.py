"""CT multiplanar reformat: axial, coronal and sagittal panes of one ``engine.dicom.volume.Volume``
with a linked crosshair and an optional slab MIP.

Orientation (radiological convention, LPS patient axes, PS3.3 C.7.6.2.1.1): axial as acquired
(patient right on screen left, anterior up); coronal and sagittal with the head up (the volume's
index 0 is the most inferior slice, so rows are reversed); sagittal with anterior on the left.
Each image is scaled to millimetres (``QTransform.fromScale(col_mm, row_mm)``) so slice
thickness and in-plane spacing give the true aspect ratio. Coronal and sagittal reformats are
resampled along z to the in-plane spacing with linear interpolation (``resample_rows``): drawn
as-is, each thick slice became a visible step. Slice numbers are those of the stack view (reading
order, ``viewer.view.image_view.volume_reading_step``) and the slab MIP thickness is in millimetres.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, Signal
from PySide6.QtGui import QTransform
from PySide6.QtWidgets import (QCheckBox, QDoubleSpinBox, QGridLayout, QHBoxLayout, QLabel, QVBoxLayout,
                               QWidget)

from viewer.view.image_view import volume_reading_step


PLANES = ("axial", "coronal", "sagittal")
COLORS = {"axial": (240, 200, 60), "coronal": (80, 220, 120), "sagittal": (90, 170, 255)}


AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


def slab_voxels(thickness_mm: float, spacing_mm: float) -> int:
    """Voxels of a slab of ``thickness_mm`` centred on one voxel: the centre voxel plus those whose
    centres lie within half the thickness on each side (always odd, at least 1)."""
    if thickness_mm <= 0 or spacing_mm <= 0:
        return 1
    half = int(np.floor(thickness_mm / 2.0 / spacing_mm + 1e-6))
    return 2 * half + 1


def resample_rows(img: np.ndarray, src_mm: float, dst_mm: float) -> np.ndarray:
    """Linear interpolation along axis 0 from rows ``src_mm`` apart to rows ``dst_mm`` apart over
    the same height (pixel centres at (i + 0.5) * spacing; edges clamp to the first/last row)."""
    n = img.shape[0]
    if n < 2 or dst_mm <= 0 or src_mm <= dst_mm * 1.01:
        return img
    m = max(1, int(round(n * src_mm / dst_mm)))
    u = (np.arange(m, dtype=np.float64) + 0.5) * (n * src_mm / m) / src_mm - 0.5
    u = np.clip(u, 0.0, n - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (u - i0).astype(np.float32)[:, None]
    a = img.astype(np.float32, copy=False)
    return a[i0] * (1.0 - w) + a[i1] * w


def plane_image(hu: np.ndarray, plane: str, index: int, slab: int = 1) -> np.ndarray:
    """2-D image of ``plane`` at voxel ``index`` (z for axial, y for coronal, x for sagittal);
    ``slab`` > 1 gives the maximum intensity projection over that many voxels centred on index."""
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
    n = hu.shape[axis]
    half = max(0, int(slab) // 2)
    lo, hi = max(0, index - half), min(n, index + half + 1)
    sl = [slice(None)] * 3
    if hi - lo <= 1:
        sl[axis] = int(np.clip(index, 0, n - 1))
        img = hu[tuple(sl)]
    else:
        sl[axis] = slice(lo, hi)
        img = hu[tuple(sl)].max(axis=axis)
    if plane == "axial":
        return img
    return img[::-1]          # (z, x) or (z, y) with the head on top


class _PaneBox(pg.ViewBox):
    """Left click/drag moves the crosshair, right drag = W/L, wheel = slices (Ctrl = zoom)."""

    def __init__(self, pane: "MPRPane"):
        super().__init__(lockAspect=True, invertY=True, enableMenu=False, defaultPadding=0.0)
        self.pane = pane
        self._wl0 = None

    def wheelEvent(self, ev, axis=None):  # noqa: N802
        if ev.modifiers() & Qt.KeyboardModifier.ControlModifier:
            return super().wheelEvent(ev, axis)
        self.pane.mpr.scroll(self.pane.plane, -1 if ev.delta() < 0 else 1)
        ev.accept()

    def mouseClickEvent(self, ev):  # noqa: N802
        if ev.button() == Qt.MouseButton.LeftButton:
            ev.accept()
            self.pane.clicked(self.mapSceneToView(ev.scenePos()))
            if ev.double():
                self.autoRange(padding=0)

    def mouseDragEvent(self, ev, axis=None):  # noqa: N802
        if ev.button() == Qt.MouseButton.LeftButton:
            ev.accept()
            self.pane.clicked(self.mapSceneToView(ev.scenePos()))
            return
        if ev.button() == Qt.MouseButton.RightButton:
            ev.accept()
            mpr = self.pane.mpr
            if ev.isStart():
                self._wl0 = (mpr.center, mpr.width)
            if self._wl0 is None:
                return
            d = ev.screenPos() - ev.buttonDownScreenPos(ev.button())
            c0, w0 = self._wl0
            k = max(w0, 1.0) / 300.0
            mpr.set_window(c0 - d.y() * k, max(1.0, w0 + d.x() * k))
            if ev.isFinish():
                self._wl0 = None
            return
        super().mouseDragEvent(ev, axis)   # middle: pan


class MPRPane(QWidget):
    """One plane: title, image (in mm), crosshair lines of the two other planes."""

    def __init__(self, mpr: "MPRView", plane: str):
        super().__init__()
        self.mpr, self.plane = mpr, plane
        edges = {"axial": "screen left = R, top = A", "coronal": "screen left = R, top = H",
                 "sagittal": "screen left = A, top = H"}[plane]
        self.title = QLabel(f"{plane.capitalize()}   <span style='color:#9a9a9a; font-weight:normal'>"
                            f"({edges})</span>")
        self.title.setStyleSheet(f"color: rgb{COLORS[plane]}; font-weight: bold; background: transparent;")
        self.graphics = pg.GraphicsView(background="k")
        self.view_box = _PaneBox(self)
        self.graphics.setCentralItem(self.view_box)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.view_box.addItem(self.image_item)
        others = [p for p in PLANES if p != plane]
        # vertical line = the plane shown left-right; horizontal line = the plane shown up-down
        self.vline = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen(COLORS[others[-1]], width=1))
        self.hline = pg.InfiniteLine(angle=0, movable=False,
                                     pen=pg.mkPen(COLORS[others[0] if plane != "axial" else "coronal"], width=1))
        if plane == "axial":
            self.vline.setPen(pg.mkPen(COLORS["sagittal"], width=1))
        for ln in (self.vline, self.hline):
            self.view_box.addItem(ln, ignoreBounds=True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.title)
        lay.addWidget(self.graphics)
        self._shape = None

    def set_image(self, img: np.ndarray, col_mm: float, row_mm: float, levels, lut) -> None:
        self.image_item.setImage(img, autoLevels=False, levels=levels, lut=lut)
        self.image_item.setTransform(QTransform.fromScale(col_mm, row_mm))
        key = (img.shape, col_mm, row_mm)
        if key != self._shape:
            self._shape = key
            self.view_box.autoRange(padding=0)

    def clicked(self, p: QPointF) -> None:
        self.mpr.pick(self.plane, p.x(), p.y())


class MPRView(QWidget):
    """Three linked planes. ``position`` is the crosshair voxel (z, y, x) in Volume indices."""

    position_changed = Signal(int, int, int)
    window_changed = Signal(float, float)
    planes_refreshed = Signal(object)      # tuple of plane names redrawn (overlays follow, e.g. ct_quant_overlay)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.volume = None
        self.position = (0, 0, 0)
        self.center, self.width = -600.0, 1500.0
        self.slab = 1                 # axial slab in voxels (derived from slab_mm)
        self.slab_mm = 0.0            # slab MIP thickness; 0 = no slab
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.panes = {p: MPRPane(self, p) for p in PLANES}
        self.info = QLabel("")
        self.info.setStyleSheet("color: #d0d0b0; font-family: monospace; background: transparent;")
        self.info.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.mip_box = QCheckBox("Slab MIP")
        self.slab_spin = QDoubleSpinBox()
        self.slab_spin.setRange(1.0, 200.0)
        self.slab_spin.setDecimals(1)
        self.slab_spin.setSingleStep(2.0)
        self.slab_spin.setValue(10.0)
        self.slab_spin.setSuffix(" mm")
        self.slab_spin.setToolTip("Slab thickness in millimetres (rounded to whole slices of each plane)")
        self.mip_box.toggled.connect(self._slab_changed)
        self.slab_spin.valueChanged.connect(self._slab_changed)
        ctl = QWidget()
        cl = QVBoxLayout(ctl)
        row = QHBoxLayout()
        row.addWidget(self.mip_box)
        row.addWidget(self.slab_spin)
        row.addStretch(1)
        cl.addLayout(row)
        cl.addWidget(self.info, 1)
        help_ = QLabel("Left click: move crosshair  ·  wheel: scroll plane  ·  Ctrl+wheel: zoom\n"
                       "Right drag: window/level  ·  middle drag: pan  ·  double click: fit")
        help_.setStyleSheet("color: #8a8a8a; background: transparent;")
        cl.addWidget(help_)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(3)
        grid.addWidget(self.panes["axial"], 0, 0)
        grid.addWidget(self.panes["sagittal"], 0, 1)
        grid.addWidget(self.panes["coronal"], 1, 0)
        grid.addWidget(ctl, 1, 1)

    # -- data ----------------------------------------------------------------------------
    def set_volume(self, volume, position: tuple[int, int, int] | None = None,
                   window: tuple[float, float] | None = None) -> None:
        self.volume = volume
        nz, ny, nx = volume.hu.shape
        self.position = position or (nz // 2, ny // 2, nx // 2)
        if window:
            self.center, self.width = window
        for p in self.panes.values():
            p._shape = None
        self.refresh()

    def _spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.volume.spacing)  # type: ignore[return-value]

    def _levels(self) -> tuple[float, float]:
        c, w = self.center, self.width
        return (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)

    def refresh(self, planes=PLANES) -> None:
        if self.volume is None:
            return
        hu = self.volume.hu
        sz, sy, sx = self._spacing()
        z, y, x = self.position
        idx = {"axial": z, "coronal": y, "sagittal": x}
        mm = {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}
        for plane in planes:
            img = plane_image(hu, plane, idx[plane], self.slab_for(plane))
            col_mm, row_mm = mm[plane]
            if plane != "axial":          # rows are slices: interpolate to the in-plane spacing
                img = resample_rows(img, row_mm, col_mm)
                row_mm = sz * hu.shape[0] / img.shape[0]
            img = img.astype(np.float32, copy=False)     # pyqtgraph fast path
            self.panes[plane].set_image(img, col_mm, row_mm, self._levels(), None)
        self._update_crosshair()
        self._update_info()
        self.planes_refreshed.emit(tuple(planes))

    def _update_crosshair(self) -> None:
        nz = self.volume.hu.shape[0]
        sz, sy, sx = self._spacing()
        z, y, x = self.position
        zr = (nz - 1 - z + 0.5) * sz   # reversed rows: head on top
        self.panes["axial"].vline.setPos((x + 0.5) * sx)
        self.panes["axial"].hline.setPos((y + 0.5) * sy)
        self.panes["coronal"].vline.setPos((x + 0.5) * sx)
        self.panes["coronal"].hline.setPos(zr)
        self.panes["sagittal"].vline.setPos((y + 0.5) * sy)
        self.panes["sagittal"].hline.setPos(zr)

    def slab_for(self, plane: str) -> int:
        """Voxels across the slab for ``plane`` (its own axis spacing; 1 = no slab)."""
        if self.slab_mm <= 0 or self.volume is None:
            return 1
        return slab_voxels(self.slab_mm, self._spacing()[AXES[plane]])

    def reading_number(self, z: int) -> int:
        """1-based axial image number as the stack view counts it ('Im n/N', head first)."""
        nz = self.volume.hu.shape[0]
        return nz - z if volume_reading_step(self.volume) < 0 else z + 1

    def _update_info(self) -> None:
        nz, ny, nx = self.volume.hu.shape
        z, y, x = self.position
        sz, sy, sx = self._spacing()
        hu = float(self.volume.hu[z, y, x])
        pos = self.volume.positions[z] if len(self.volume.positions) > z else z * sz
        slab = ""
        if self.slab_mm > 0:
            n = self.slab_for("axial")
            slab = f"\nSlab MIP {self.slab_mm:g} mm (axial {n} slice{'s' if n > 1 else ''}, {n * sz:.1f} mm)"
        self.info.setText(
            f"Axial    {self.reading_number(z):>4}/{nz}   z {pos:.1f} mm\n"
            f"Coronal  {y + 1:>4}/{ny}\nSagittal {x + 1:>4}/{nx}\n"
            f"Voxel {sx:.2f} x {sy:.2f} x {sz:.2f} mm\n"
            f"HU at crosshair: {hu:.0f}\n"
            f"W: {self.width:.0f}  L: {self.center:.0f}" + slab)

    # -- interaction ---------------------------------------------------------------------
    def set_position(self, z: int, y: int, x: int) -> None:
        if self.volume is None:
            return
        nz, ny, nx = self.volume.hu.shape
        new = (int(np.clip(z, 0, nz - 1)), int(np.clip(y, 0, ny - 1)), int(np.clip(x, 0, nx - 1)))
        if new == self.position:
            return
        old, self.position = self.position, new
        changed = [p for p, a in zip(PLANES, range(3)) if old[a] != new[a]]
        self.refresh(changed)
        self.position_changed.emit(*new)

    def pick(self, plane: str, u_mm: float, v_mm: float) -> None:
        """Click at (u, v) millimetres in ``plane`` -> move the other two planes there."""
        if self.volume is None:
            return
        nz = self.volume.hu.shape[0]
        sz, sy, sx = self._spacing()
        z, y, x = self.position
        if plane == "axial":
            x, y = int(u_mm // sx), int(v_mm // sy)
        elif plane == "coronal":
            x, z = int(u_mm // sx), nz - 1 - int(v_mm // sz)
        else:
            y, z = int(u_mm // sy), nz - 1 - int(v_mm // sz)
        self.set_position(z, y, x)

    def scroll(self, plane: str, step: int) -> None:
        z, y, x = self.position
        if plane == "axial":
            self.set_position(z + step, y, x)
        elif plane == "coronal":
            self.set_position(z, y + step, x)
        else:
            self.set_position(z, y, x + step)

    def set_window(self, center: float, width: float) -> None:
        self.center, self.width = float(center), float(max(1.0, width))
        for p in self.panes.values():
            p.image_item.setLevels(self._levels())
        if self.volume is not None:
            self._update_info()
        self.window_changed.emit(self.center, self.width)

    def set_slab_mm(self, thickness_mm: float) -> None:
        """Slab MIP of ``thickness_mm`` (0 = single slice) in every plane."""
        self.slab_mm = max(0.0, float(thickness_mm))
        self.slab = self.slab_for("axial")
        self.refresh()

    def _slab_changed(self, *_):
        self.set_slab_mm(self.slab_spin.value() if self.mip_box.isChecked() else 0.0)

    def handle_navigation_key(self, ev) -> bool:
        """Slice keys delivered by ``viewer.view.image_view.NavigationKeys`` while a panel has focus."""
        before = self.position
        self.keyPressEvent(ev)
        return self.position != before or ev.key() in (Qt.Key.Key_Up, Qt.Key.Key_Down)

    def keyPressEvent(self, ev):  # noqa: N802
        # axial through the volume; Down / Page Down = towards the feet, as in the stack view
        step = {Qt.Key.Key_Up: 1, Qt.Key.Key_Down: -1, Qt.Key.Key_PageUp: 10, Qt.Key.Key_PageDown: -10,
                Qt.Key.Key_Left: 1, Qt.Key.Key_Right: -1}.get(ev.key())
        if step is not None:
            self.scroll("axial", step)
        else:
            super().keyPressEvent(ev)
