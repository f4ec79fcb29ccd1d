"""CT opacity map (ground glass / consolidation from engine.ai.ct_quant) over the axial stack and the
coronal and sagittal MPR panes, plus the findings-panel block with the per-zone table and score.

The map is data in the StudyResult (``CTQuantification.labels``, uint8 on the quantification's
block grid, ``label_factor`` source pixels a side); nothing is computed here but the colouring of
the displayed plane. Each view gets one pyqtgraph ImageItem above the image:

* stack view: inside ``ImageView.content`` (image pixel coordinates, viewer.view.image_view docstring),
  scaled by ``label_factor``, so zoom, pan, rotation and flips follow by themselves;
* MPR panes: in each pane's ViewBox with the pane's millimetre transform (viewer.view.mpr_view), rows
  reversed for coronal/sagittal (head up) exactly as ``plane_image`` does; a slab MIP shows the
  highest label across the slab (consolidation wins over ground glass).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QTransform
from PySide6.QtWidgets import (QCheckBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QSlider, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

GGO_RGB = (255, 205, 0)          # ground glass: yellow
CONSOLIDATION_RGB = (235, 40, 90)  # consolidation: crimson
OVERLAY_Z = 45                   # above the image, below the Grad-CAM overlay (viewer.view.heatmap_overlay, z 50)
PLANES = ("axial", "coronal", "sagittal")


def label_rgba(labels: np.ndarray, opacity: float) -> np.ndarray:
    """uint8 labels (0 none, 1 GGO, 2 consolidation) -> RGBA uint8 with two colours."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    a = np.uint8(round(float(np.clip(opacity, 0.0, 1.0)) * 255))
    lut[1] = (*GGO_RGB, a)
    lut[2] = (*CONSOLIDATION_RGB, a)
    return lut[np.asarray(labels, dtype=np.uint8)]


def plane_labels(labels: np.ndarray, factor: int, plane: str, index: int, slab: int = 1) -> np.ndarray:
    """The label map in ``plane`` at source voxel ``index`` on the block grid, oriented as
    viewer.view.mpr_view.plane_image (axial as stored; coronal/sagittal with the head on top)."""
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[plane]
    f = 1 if axis == 0 else max(1, int(factor))
    n = labels.shape[axis]
    half = max(0, int(slab) // 2)
    lo = int(np.clip((index - half) // f, 0, n - 1))
    hi = int(np.clip((index + half) // f, 0, n - 1)) + 1
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = slice(lo, hi)
    img = labels[tuple(sl)].max(axis=axis)
    return img if plane == "axial" else img[::-1]


class CTQuantOverlay(QObject):
    """Shows ``result.ct_quant.labels`` on an ImageView (axial stack) and an MPRView."""

    changed = Signal()

    def __init__(self, image_view: Any = None, mpr_view: Any = None, panel: Any = None,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.image_view, self.mpr_view = image_view, mpr_view
        self.quant = None
        self.series_uid: str | None = None
        self.enabled = True
        self.opacity = 0.5
        self.items: dict[str, pg.ImageItem] = {}
        if image_view is not None and hasattr(image_view, "add_overlay"):
            self.items["stack"] = self._new_item()
            image_view.add_overlay(self.items["stack"])
            image_view.slice_changed.connect(lambda _i: self._update_stack())
            if hasattr(image_view, "stack_changed"):
                image_view.stack_changed.connect(self._update_stack)
        if mpr_view is not None:
            for plane in PLANES:
                item = self._new_item()
                mpr_view.panes[plane].view_box.addItem(item, ignoreBounds=True)
                self.items[plane] = item
            if hasattr(mpr_view, "planes_refreshed"):
                mpr_view.planes_refreshed.connect(self._update_mpr)
        if panel is not None:
            panel.result_changed.connect(self.set_result)
            box = getattr(panel, "ct_quant_box", None)
            if box is not None:
                box.overlay_toggled.connect(self.set_enabled)
                box.opacity_changed.connect(self.set_opacity)
                self.opacity = box.opacity_slider.value() / 100.0

    @staticmethod
    def _new_item() -> pg.ImageItem:
        item = pg.ImageItem(axisOrder="row-major")
        item.setZValue(OVERLAY_Z)
        item.setAutoDownsample(False)
        item.setVisible(False)
        return item

    # -- data and controls ---------------------------------------------------------------------
    def set_result(self, result: Any) -> None:
        """The shown StudyResult (None clears); only a CT result with a label map draws anything."""
        q = getattr(result, "ct_quant", None) if result is not None else None
        self.quant = q if q is not None and getattr(q, "labels", None) is not None else None
        self.series_uid = getattr(result, "series_uid", None) if self.quant is not None else None
        self.refresh()

    def set_enabled(self, on: bool) -> None:
        self.enabled = bool(on)
        self.refresh()

    def set_opacity(self, value: float) -> None:
        self.opacity = float(np.clip(value, 0.0, 1.0))
        self.refresh()

    def refresh(self) -> None:
        self._update_stack()
        self._update_mpr()
        self.changed.emit()

    def is_showing(self, view: str) -> bool:
        """True when the map is drawn with at least one labelled pixel in ``view``
        ('stack', 'axial', 'coronal' or 'sagittal')."""
        item = self.items.get(view)
        return bool(item is not None and item.isVisible() and item.image is not None
                    and np.any(item.image[..., 3] > 0))

    # -- rendering -----------------------------------------------------------------------------
    def _show(self, item: pg.ImageItem, labels2d: np.ndarray | None, transform: QTransform) -> None:
        if labels2d is None or not self.enabled or not labels2d.any():
            item.setVisible(False)
            return
        item.setImage(label_rgba(labels2d, self.opacity), autoLevels=False, levels=None)
        item.setTransform(transform)
        item.setVisible(True)

    def _update_stack(self) -> None:
        item = self.items.get("stack")
        iv = self.image_view
        if item is None:
            return
        q = self.quant
        n = iv.n_slices() if iv is not None and hasattr(iv, "n_slices") else 0
        if q is None or n != q.labels.shape[0] or iv.current_frame_shape() != tuple(q.shape[1:]):
            item.setVisible(False)
            return
        f = float(q.label_factor)
        self._show(item, q.labels[int(np.clip(iv.current_slice(), 0, n - 1))], QTransform.fromScale(f, f))

    def _update_mpr(self, planes: Any = PLANES) -> None:
        mpr = self.mpr_view
        if mpr is None:
            return
        vol = getattr(mpr, "volume", None)
        q = self.quant
        ok = (q is not None and vol is not None and getattr(vol, "series_uid", None) == self.series_uid
              and tuple(vol.hu.shape) == tuple(q.shape))
        for plane in planes:
            item = self.items[plane]
            if not ok:
                item.setVisible(False)
                continue
            sz, sy, sx = (float(s) for s in vol.spacing)
            z, y, x = mpr.position
            f = float(q.label_factor)
            idx = {"axial": z, "coronal": y, "sagittal": x}[plane]
            scale = {"axial": (sx * f, sy * f), "coronal": (sx * f, sz), "sagittal": (sy * f, sz)}[plane]
            slab = mpr.slab_for(plane) if hasattr(mpr, "slab_for") else getattr(mpr, "slab", 1)
            lab = plane_labels(q.labels, q.label_factor, plane, idx, slab)
            self._show(item, lab, QTransform.fromScale(*scale))


class CTQuantBox(QGroupBox):
    """Findings-panel block: CT severity score (zones), burden, per-zone table, map controls."""

    overlay_toggled = Signal(bool)
    opacity_changed = Signal(float)

    COLUMNS = ("Zone", "mL", "GGO %", "Cons. %", "Emph. %")

    def __init__(self, parent: QWidget | None = None):
        super().__init__("CT quantification (HU, zones — not lobes)", parent)
        lay = QVBoxLayout(self)
        self.score_label = QLabel("—")
        self.score_label.setWordWrap(True)
        self.score_label.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.score_label)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(150)
        lay.addWidget(self.table)
        self.note_label = QLabel("")
        self.note_label.setWordWrap(True)
        f = self.note_label.font()
        f.setPointSizeF(max(6.5, f.pointSizeF() * 0.85))
        self.note_label.setFont(f)
        lay.addWidget(self.note_label)
        row = QHBoxLayout()
        self.overlay_check = QCheckBox("Opacity map")
        self.overlay_check.setChecked(True)
        self.overlay_check.setToolTip("Ground glass (yellow) and consolidation (crimson) on the axial, coronal "
                                      "and sagittal views")
        row.addWidget(self.overlay_check)
        legend = QLabel(f"<span style='color:rgb{GGO_RGB}'>■</span> GGO "
                        f"<span style='color:rgb{CONSOLIDATION_RGB}'>■</span> consolidation")
        row.addWidget(legend)
        row.addStretch(1)
        lay.addLayout(row)
        grid = QGridLayout()
        grid.addWidget(QLabel("Map opacity"), 0, 0)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(50)
        grid.addWidget(self.opacity_slider, 0, 1)
        lay.addLayout(grid)
        self.overlay_check.toggled.connect(self.overlay_toggled)
        self.opacity_slider.valueChanged.connect(lambda v: self.opacity_changed.emit(v / 100.0))
        self.hide()

    def show_result(self, result: Any) -> None:
        """Render ``result.ct_quant`` (hidden for non-CT results; a CT without one says why)."""
        q = getattr(result, "ct_quant", None) if result is not None else None
        if result is None or getattr(result, "kind", "") != "ct":
            self.hide()
            return
        if q is None:
            self.score_label.setText("No HU quantification for this series (needs an axial volume of at least "
                                     "10 contiguous slices with lungs; see the image check and warnings).")
            self.table.setRowCount(0)
            self.note_label.setText("")
            self.show()
            return
        greyed = not result.validity.passed
        demo = " <b>(synthetic demo phantom)</b>" if q.is_phantom else ""
        self.score_label.setText(
            f"CT severity score <b>{q.severity_score}</b> / 25 (approximation on zones){demo}<br>"
            f"Opacity burden {q.total_opacity_percent:.2f}% of {q.lung_volume_ml:,.0f} mL lung: "
            f"GGO {q.ggo_ml:.1f} mL, consolidation {q.consolidation_ml:.1f} mL"
            + ("<br><i>Image check failed: do not interpret.</i>" if greyed else ""))
        rows = list(q.lungs) + list(q.zones) + [q.total]
        self.table.setRowCount(len(rows))
        for i, z in enumerate(rows):
            name = f"{z.lung} {z.zone}" if z.zone != "whole" else f"{z.lung} lung"
            if z.lung == "both":
                name = "both lungs"
            vals = (name, f"{z.volume_ml:.0f}", f"{z.ggo_percent:.1f}", f"{z.consolidation_percent:.1f}",
                    f"{z.emphysema_percent:.1f}")
            for j, v in enumerate(vals):
                it = QTableWidgetItem(v)
                if j:
                    it.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if greyed:
                    it.setForeground(Qt.GlobalColor.gray)
                self.table.setItem(i, j, it)
        self.table.resizeColumnsToContents()
        pts = ", ".join(f"{r.name}: {r.points}" for r in q.severity_regions)
        self.note_label.setText(f"{q.severity_note} Points: {pts}. Vessels and airway walls are excluded by size "
                                f"and shape. Method {q.method} {q.version}.")
        self.show()
