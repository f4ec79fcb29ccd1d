"""Brixia zone severity where the radiologist looks: a 2x3 score table for the findings panel and a
zone grid drawn on the X-ray.

The scores are data in the StudyResult (``engine.results.Severity.zone_scores`` /
``brixia_global`` / ``zone_boxes``, made by engine.ai.severity_zones); nothing is computed here but
colours and positions. The zones are the *thirds approximation* of Borghesi & Maroldi's Brixia zones
(each lung's height cut in thirds instead of at the aortic arch and the inferior pulmonary vein,
DESIGN.md section 4), and every place that shows them says so.

Geometry: the zone outlines live in ``ImageView.content`` through ``ImageView.add_overlay`` (image
pixel coordinates, viewer.view.image_view docstring), exactly as the Grad-CAM overlay of
viewer.ai.ai_controller, so zoom, pan, rotation and flips move them with the pixels. The labels ignore
the view's scale, rotation and mirroring (QGraphicsItem.ItemIgnoresTransformations) so they stay
upright and readable, and are re-anchored at whichever corner of their zone is top-left on screen
whenever the image transform changes (``image_item.sigImageChanged``, emitted after every
rotate/flip by viewer.view.image_view ``_apply_transform``).
"""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QAction, QColor, QFont, QKeySequence, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import (QCheckBox, QGraphicsItem, QGridLayout, QLabel, QVBoxLayout, QWidget)

ZONES = ("A", "B", "C", "D", "E", "F")          # Brixia: A/B/C right upper/middle/lower, D/E/F left
ROWS = ("upper", "middle", "lower")
ZONE_TEXT = {z: f"{'right' if i < 3 else 'left'} {ROWS[i % 3]}" for i, z in enumerate(ZONES)}
ZONE_MAX, GLOBAL_MAX = 3.0, 18.0               # Borghesi & Maroldi 2020: 0-3 per zone, 0-18 in all
APPROX_NOTE = "thirds approximation of the Brixia zones; research use only"
GRID_KEY = "Z"                                  # free in viewer.main_window's single-key shortcuts
OVERLAY_Z = 52                                  # above the Grad-CAM (viewer.view.heatmap_overlay OVERLAY_Z 50)
GREY = QColor(150, 150, 150)
# Score colours at 0, 1, 2, 3 (none, interstitial, mixed, alveolar predominance): green to red, each
# light enough to read under a dark halo on a dark lung and saturated enough to stand out on a white one.
_STOPS = ((0.0, (80, 200, 120)), (1.0, (240, 215, 60)), (2.0, (250, 145, 40)), (3.0, (235, 55, 55)))


def score_color(score: float | None, greyed: bool = False) -> QColor:
    """Colour of a zone score on 0-3 (linear between the stops); grey when greyed or unknown."""
    if greyed or score is None:
        return QColor(GREY)
    s = max(0.0, min(ZONE_MAX, float(score)))
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if s <= b:
            t = (s - a) / (b - a)
            return QColor(*(round(x + (y - x) * t) for x, y in zip(ca, cb)))
    return QColor(*_STOPS[-1][1])


def severity_trained(result: Any) -> bool:
    """The severity's model has a trained card in the result (an untrained model scores nothing,
    README "AI findings"; the same rule as viewer.ai.findings_panel.finding_is_trained)."""
    s = getattr(result, "severity", None)
    if s is None:
        return False
    return any(m.trained and (m.name, m.version) == (s.model_name, s.model_version)
               for m in getattr(result, "models", []) or [])


def method_text(method: str) -> str:
    """How the severity numbers were made, in words for the panel."""
    if method == "zone-ridge":
        return "Brixia zone scores (ridge on lung-zone features), mapped to Cohen's scales"
    if method == "cohen-logit":
        return "Cohen et al. 2020 formula on the Lung Opacity output"
    return method or "unknown method"


# ----------------------------------------------------------------------------------------------
# Findings-panel block
# ----------------------------------------------------------------------------------------------
class ZoneScoreBox(QWidget):
    """2x3 table (columns patient right / left as on a PA image, rows upper / middle / lower) of the
    zone scores with one decimal, colour-coded, plus the Brixia global 0-18 and the grid switch."""

    grid_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 2, 0, 0)
        lay.setSpacing(3)
        self.title = QLabel("Brixia zones (0–3)")
        lay.addWidget(self.title)
        grid = QGridLayout()
        grid.setHorizontalSpacing(3)
        grid.setVerticalSpacing(3)
        for c, head in enumerate(("", "Right", "Left")):
            h = QLabel(head)
            h.setAlignment(Qt.AlignmentFlag.AlignCenter)
            grid.addWidget(h, 0, c)
        self.cells: dict[str, QLabel] = {}
        for r, row in enumerate(ROWS):
            grid.addWidget(QLabel(row), r + 1, 0)
            for c, zone in enumerate((ZONES[r], ZONES[r + 3])):
                cell = QLabel("—")
                cell.setObjectName(f"zone{zone}")
                cell.setAlignment(Qt.AlignmentFlag.AlignCenter)
                cell.setMinimumWidth(64)
                grid.addWidget(cell, r + 1, c + 1)
                self.cells[zone] = cell
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(2, 1)
        lay.addLayout(grid)
        self.global_label = QLabel("Brixia global: —")
        lay.addWidget(self.global_label)
        self.note = QLabel("Zones = thirds of each lung's height, an approximation of the Brixia landmarks.")
        self.note.setWordWrap(True)
        f = self.note.font()
        f.setPointSizeF(max(6.5, f.pointSizeF() * 0.85))
        self.note.setFont(f)
        lay.addWidget(self.note)
        self.grid_check = QCheckBox(f"Zone grid on image ({GRID_KEY})")
        self.grid_check.setChecked(True)
        self.grid_check.setToolTip("Outline each zone on the radiograph with its letter and score "
                                   f"({APPROX_NOTE})")
        self.grid_check.toggled.connect(self.grid_toggled)
        lay.addWidget(self.grid_check)
        self.setToolTip(f"Brixia score (Borghesi & Maroldi 2020): {APPROX_NOTE}")
        self.hide()

    def show_severity(self, severity: Any, trained: bool, greyed: bool) -> None:
        """Render the zone scores of ``severity``; hidden when it has none (a formula-only score)."""
        zs = dict(getattr(severity, "zone_scores", None) or {})
        if severity is None or not zs:
            self.hide()
            return
        for zone, cell in self.cells.items():
            v = zs.get(zone)
            text = "—" if v is None else ("untrained" if not trained else f"{zone}  {float(v):.1f}")
            cell.setText(text)
            col = score_color(v if trained else None, greyed)
            fg = "#111" if not greyed else "#555"
            cell.setStyleSheet(f"QLabel {{ background: {col.name()}; color: {fg}; border-radius: 3px; "
                               "padding: 2px 4px; font-weight: bold; }")
            cell.setToolTip(f"Zone {zone} ({ZONE_TEXT[zone]}): "
                            + ("no score" if v is None else f"{float(v):.2f} / 3") + f" — {APPROX_NOTE}"
                            + (" — image check failed: not a finding" if greyed else ""))
            cell.setEnabled(not greyed)
        g = getattr(severity, "brixia_global", None)
        if not trained:
            self.global_label.setText("Brixia global: untrained")
        elif g is None:
            self.global_label.setText("Brixia global: —")
        else:
            self.global_label.setText(f"Brixia global: <b>{float(g):.1f}</b> / 18"
                                      + (" <i>(image check failed)</i>" if greyed else ""))
        self.global_label.setToolTip(f"Sum of the six zone scores, 0–18 — {APPROX_NOTE}")
        self.global_label.setEnabled(not greyed)
        self.show()


# ----------------------------------------------------------------------------------------------
# Graphics items
# ----------------------------------------------------------------------------------------------
class ZoneOutlineItem(QGraphicsItem):
    """A zone rectangle in image pixels: a thin coloured line over a dark one (cosmetic pens, so the
    line is the same width on screen at every zoom and shows on bright and dark lungs alike)."""

    def __init__(self, rect: QRectF, color: QColor, dashed: bool = False, parent: QGraphicsItem | None = None):
        super().__init__(parent)
        self.rect, self.color, self.dashed = QRectF(rect), QColor(color), dashed

    def boundingRect(self) -> QRectF:  # noqa: N802 - Qt API
        return self.rect.adjusted(-2, -2, 2, 2)

    def paint(self, painter: QPainter, option, widget=None) -> None:  # noqa: D102 - Qt API
        dark = QPen(QColor(0, 0, 0, 170), 3.0)
        dark.setCosmetic(True)
        line = QPen(self.color, 1.4, Qt.PenStyle.DashLine if self.dashed else Qt.PenStyle.SolidLine)
        line.setCosmetic(True)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        for pen in (dark, line):
            painter.setPen(pen)
            painter.drawRect(self.rect)


class HaloLabel(QGraphicsItem):
    """Upright text with a dark halo, drawn down-right of its anchor point in screen pixels."""

    PAD = 4.0

    def __init__(self, text: str, color: QColor, parent: QGraphicsItem | None = None):
        super().__init__(parent)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations, True)
        self.text, self.color = text, QColor(color)
        font = QFont()
        font.setPointSizeF(10.5)
        font.setBold(True)
        self.path = QPainterPath()
        self.path.addText(0.0, 0.0, font, text)
        b = self.path.boundingRect()
        self.path.translate(self.PAD - b.left(), self.PAD - b.top())

    def boundingRect(self) -> QRectF:  # noqa: N802 - Qt API
        return self.path.boundingRect().adjusted(-3, -3, 3, 3)

    def paint(self, painter: QPainter, option, widget=None) -> None:  # noqa: D102 - Qt API
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        halo = QPen(QColor(0, 0, 0, 220), 3.5)
        halo.setJoinStyle(Qt.PenJoinStyle.RoundJoin)
        painter.strokePath(self.path, halo)
        painter.fillPath(self.path, self.color)


# ----------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------
class ZoneGridOverlay(QObject):
    """Draws ``result.severity.zone_boxes`` with letters and scores on an ImageView."""

    changed = Signal()

    def __init__(self, image_view: Any, panel: Any = None, parent: QObject | None = None):
        super().__init__(parent)
        self.image_view = image_view
        self.result: Any = None
        self.enabled = True
        self.outlines: dict[str, ZoneOutlineItem] = {}
        self.labels: dict[str, HaloLabel] = {}
        ii = getattr(image_view, "image_item", None)
        if ii is not None and hasattr(ii, "sigImageChanged"):
            ii.sigImageChanged.connect(self._place_labels)
        if hasattr(image_view, "stack_changed"):
            image_view.stack_changed.connect(self.refresh)
        box = getattr(panel, "zone_box", None) if panel is not None else None
        self.box: ZoneScoreBox | None = box
        if panel is not None:
            panel.result_changed.connect(self.set_result)
        if box is not None:
            box.grid_toggled.connect(self.set_enabled)
            self.enabled = box.grid_check.isChecked()

    # -- data and controls ---------------------------------------------------------------------
    def set_result(self, result: Any) -> None:
        """The shown StudyResult (None clears)."""
        self.result = result
        self.refresh()

    def set_enabled(self, on: bool) -> None:
        self.enabled = bool(on)
        self.refresh()

    def toggle(self) -> None:
        """Grid on/off; through the panel's check box when there is one, so both agree."""
        if self.box is not None:
            self.box.grid_check.toggle()
        else:
            self.set_enabled(not self.enabled)

    def is_showing(self) -> bool:
        return bool(self.outlines) and all(i.isVisible() for i in self.outlines.values())

    def label_scene_positions(self) -> dict[str, tuple[float, float]]:
        """Where each zone label is anchored on the scene (tests: it follows rotation and flips)."""
        out = {}
        for z, item in self.labels.items():
            p = item.scenePos()
            out[z] = (round(p.x(), 2), round(p.y(), 2))
        return out

    # -- rendering -----------------------------------------------------------------------------
    def _boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """The zone boxes to draw, or {} when the shown result does not belong on the displayed image."""
        r, iv = self.result, self.image_view
        s = getattr(r, "severity", None) if r is not None else None
        if s is None or getattr(r, "kind", "") != "xray" or not s.zone_boxes or not severity_trained(r):
            return {}
        meta_uid = getattr(getattr(iv, "meta", None), "series_uid", "")
        if meta_uid and meta_uid != getattr(r, "series_uid", meta_uid):
            return {}
        shape = iv.current_frame_shape() if hasattr(iv, "current_frame_shape") else None
        if shape is None:
            return {}
        rows, cols = shape
        boxes = {z: tuple(int(v) for v in b) for z, b in s.zone_boxes.items() if z in ZONES}
        # Boxes are in displayed-image pixels (engine.results.Severity): a box outside this frame means
        # the result was made for another image size, and drawing it would point at the wrong place.
        if any(t < 0 or lft < 0 or b > rows or rt > cols or b <= t or rt <= lft for t, lft, b, rt in boxes.values()):
            return {}
        return boxes

    def _clear_items(self) -> None:
        for item in list(self.outlines.values()) + list(self.labels.values()):
            sc = item.scene()
            item.setParentItem(None)
            if sc is not None:
                sc.removeItem(item)
        self.outlines, self.labels = {}, {}

    def refresh(self) -> None:
        self._clear_items()
        boxes = self._boxes() if self.enabled else {}
        if boxes:
            s = self.result.severity
            greyed = not self.result.validity.passed
            for z, (top, left, bottom, right) in boxes.items():
                v = s.zone_scores.get(z)
                col = score_color(v, greyed)
                rect = QRectF(float(left), float(top), float(right - left), float(bottom - top))
                outline = ZoneOutlineItem(rect, col, dashed=greyed)
                label = HaloLabel(f"{z} {float(v):.1f}" if v is not None else z, col)
                outline.setToolTip(f"Brixia zone {z} ({ZONE_TEXT[z]})"
                                   + (f": {float(v):.1f} / 3" if v is not None else "") + f" — {APPROX_NOTE}"
                                   + (" — image check failed: not a finding" if greyed else ""))
                for item in (outline, label):
                    item.setZValue(OVERLAY_Z)
                    self.image_view.add_overlay(item)
                self.outlines[z], self.labels[z] = outline, label
            self._place_labels()
        self.changed.emit()

    def _place_labels(self) -> None:
        """Anchor each label at its zone's corner that is top-left on screen, whatever the rotation
        and flips (the label is drawn down-right of its anchor, so it stays inside the zone)."""
        content = getattr(self.image_view, "content", None)
        if content is None or not self.labels:
            return
        to_scene = content.sceneTransform()
        for z, label in self.labels.items():
            rect = self.outlines[z].rect
            corners = (rect.topLeft(), rect.topRight(), rect.bottomLeft(), rect.bottomRight())
            on_screen = [to_scene.map(p) for p in corners]
            k = min(range(4), key=lambda i: on_screen[i].x() + on_screen[i].y())
            label.setPos(QPointF(corners[k]))


def install_zone_grid(main_window: Any, panel: Any) -> ZoneGridOverlay:
    """The zone grid on the main window's image view, with its key (listed in Help > Shortcuts,
    which lists the window's actions: viewer.main_window ``shortcut_rows``)."""
    overlay = ZoneGridOverlay(main_window.image_view, panel, parent=main_window)
    act = QAction("Brixia zone grid on/off (X-ray severity)", main_window)
    act.setShortcut(QKeySequence(GRID_KEY))
    act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
    act.setToolTip(f"Show or hide the zone grid ({GRID_KEY}); {APPROX_NOTE}")
    act.triggered.connect(overlay.toggle)
    main_window.addAction(act)
    overlay.action = act
    return overlay
