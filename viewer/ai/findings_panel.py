"""Findings panel: renders a StudyResult; computes nothing (DESIGN.md 6, napari habit).

Order is deliberate: the research-use banner and the model identity are pinned at the top and
never scroll away; then the validity-gate verdict *before* any score (a failed gate greys every
score and says why); then findings with the model's operating threshold marked on each bar;
severity (Cohen et al. 2020 scales, and the Brixia zone table of viewer.ai.zone_overlay when the zone
scorer made one) as numbers and gauges; the CT block (study probability, lung
volume, slice strip); heatmap controls; timings and device in small print.
Untrained models never produce findings here: they are listed as "untrained — no findings".
"""
from __future__ import annotations

from typing import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QPainter, QPen
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QFrame, QGridLayout, QGroupBox,
                               QHBoxLayout, QLabel, QProgressBar, QPushButton, QScrollArea,
                               QSizePolicy, QSlider, QVBoxLayout, QWidget)

from engine.results import RESEARCH_USE, Finding, ModelInfo, StudyResult, finding_rank
from viewer.view.heatmap_overlay import COLORMAPS, ColorBar
from viewer.ai.slice_strip import SliceScoreStrip

UNTRAINED_TEXT = "untrained — no findings"
NO_HEATMAP = "(none)"
GREY = QColor(150, 150, 150)
RED = QColor(215, 65, 50)
BLUE = QColor(60, 130, 205)


class ScoreBar(QWidget):
    """A value on 0..maximum as a bar, with an optional threshold tick and integer ticks (gauges)."""

    def __init__(self, value: float = 0.0, maximum: float = 1.0, threshold: float | None = None,
                 greyed: bool = False, ticks: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.value, self.maximum, self.threshold = float(value), float(maximum), threshold
        self.greyed, self.ticks = greyed, ticks
        self.setMinimumWidth(50)
        self.setFixedHeight(14)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: D102
        return QSize(120, 14)

    def fill_fraction(self) -> float:
        return max(0.0, min(1.0, self.value / self.maximum)) if self.maximum > 0 else 0.0

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        r = QRectF(1, 2, self.width() - 2, self.height() - 4)
        p.fillRect(r, self.palette().base().color().darker(115))
        above = self.threshold is not None and self.value >= self.threshold
        col = GREY if self.greyed else (RED if above else BLUE)
        p.fillRect(QRectF(r.left(), r.top(), r.width() * self.fill_fraction(), r.height()), col)
        if self.ticks and self.maximum <= 20:
            p.setPen(QPen(self.palette().window().color(), 1))
            for k in range(1, int(self.maximum)):
                x = r.left() + r.width() * k / self.maximum
                p.drawLine(QPointF(x, r.top()), QPointF(x, r.bottom()))
        if self.threshold is not None and self.maximum > 0:
            x = r.left() + r.width() * min(1.0, self.threshold / self.maximum)
            p.setPen(QPen(self.palette().text().color(), 2))
            p.drawLine(QPointF(x, 0), QPointF(x, self.height()))
        p.end()


def _small(label: QLabel, scale: float = 0.85) -> QLabel:
    f = label.font()
    f.setPointSizeF(max(6.5, f.pointSizeF() * scale))
    label.setFont(f)
    return label


def trained_lookup(models: Sequence[ModelInfo]) -> dict[tuple[str, str], bool]:
    return {(m.name, m.version): bool(m.trained) for m in models}


def finding_is_trained(f: Finding | object, lookup: dict[tuple[str, str], bool]) -> bool:
    """A model with no card entry counts as untrained (never shown as a finding)."""
    return lookup.get((getattr(f, "model_name", ""), getattr(f, "model_version", "")), False)


class FindingsPanel(QWidget):
    """The right-dock AI panel. Signals go to the AIController, which owns worker and overlay."""

    run_requested = Signal()
    cancel_requested = Signal()
    auto_run_toggled = Signal(bool)
    target_selected = Signal(object)          # heatmap target label (str) or None
    overlay_toggled = Signal(bool)
    opacity_changed = Signal(float)
    threshold_changed = Signal(float)
    colormap_changed = Signal(str)
    outline_toggled = Signal(bool)
    export_requested = Signal()               # "Export AI results…" (the controller opens the dialog)
    result_changed = Signal(object)           # the shown StudyResult, or None after clear()

    def __init__(self, parent: QWidget | None = None, blink_key_name: str = "B"):
        super().__init__(parent)
        self.result: StudyResult | None = None
        self.finding_rows: dict[str, tuple[QLabel, ScoreBar, QLabel]] = {}
        self._targets: list[str | None] = []
        self.setMinimumWidth(300)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.setSpacing(4)

        # Pinned header: research-use banner + model identity (never scrolls away).
        self.research_label = QLabel(RESEARCH_USE)
        self.research_label.setObjectName("researchUse")
        self.research_label.setWordWrap(True)
        self.research_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.research_label.setStyleSheet("QLabel#researchUse { background: #8a5a00; color: white; "
                                          "font-weight: bold; padding: 3px; border-radius: 3px; }")
        outer.addWidget(self.research_label)
        self.model_label = QLabel("Models: loading model cards…")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(_small(self.model_label, 0.9))

        # Status row: progress, Run/Cancel, auto-run.
        self.series_label = QLabel("No series open")
        self.series_label.setWordWrap(True)
        outer.addWidget(self.series_label)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(10)
        row.addWidget(self.progress, 1)
        self.run_button = QPushButton("Run AI")
        self.run_button.setToolTip("Analyse the displayed series (X-ray or CT)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        self.export_button = QPushButton("Export…")
        self.export_button.setObjectName("exportAIResults")
        self.export_button.setToolTip("Export AI results… (no AI result for the displayed series yet)")
        self.export_button.setEnabled(False)      # the controller enables it for an exportable result
        row.addWidget(self.export_button)
        outer.addLayout(row)
        self.status_label = _small(QLabel("Idle"))
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        self.auto_run = QCheckBox("Auto-analyse each opened series")
        self.auto_run.setToolTip("Queue the AI as soon as an X-ray or CT series is displayed")
        self.auto_run.setChecked(True)
        outer.addWidget(self.auto_run)
        self.run_button.clicked.connect(self.run_requested)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.export_button.clicked.connect(self.export_requested)
        self.auto_run.toggled.connect(self.auto_run_toggled)

        # Scrolling body.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget()
        self.body_layout = QVBoxLayout(body)
        self.body_layout.setContentsMargins(0, 0, 0, 0)
        scroll.setWidget(body)
        outer.addWidget(scroll, 1)

        self.error_label = QLabel()
        self.error_label.setObjectName("aiError")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setStyleSheet("QLabel#aiError { background: #7a1f1f; color: white; padding: 4px; "
                                       "border-radius: 3px; }")
        self.error_label.hide()
        self.body_layout.addWidget(self.error_label)

        self.validity_box = QGroupBox("Image check (before any score)")
        vl = QVBoxLayout(self.validity_box)
        self.validity_label = QLabel("—")
        self.validity_label.setWordWrap(True)
        vl.addWidget(self.validity_label)
        self.body_layout.addWidget(self.validity_box)

        self.findings_box = QGroupBox("Findings (tick = operating threshold)")
        self.findings_layout = QGridLayout(self.findings_box)
        self.findings_layout.setColumnStretch(1, 1)
        self.body_layout.addWidget(self.findings_box)

        self.severity_box = QGroupBox("Severity (Cohen et al. 2020)")
        sl = QGridLayout(self.severity_box)
        self.extent_bar = ScoreBar(maximum=8, ticks=True)
        self.opacity_bar = ScoreBar(maximum=6, ticks=True)
        self.extent_value = QLabel("—")
        self.opacity_value = QLabel("—")
        sl.addWidget(QLabel("Geographic extent (0–8)"), 0, 0)
        sl.addWidget(self.extent_bar, 0, 1)
        sl.addWidget(self.extent_value, 0, 2)
        sl.addWidget(QLabel("Opacity (0–6)"), 1, 0)
        sl.addWidget(self.opacity_bar, 1, 1)
        sl.addWidget(self.opacity_value, 1, 2)
        sl.setColumnStretch(1, 1)
        from viewer.ai.zone_overlay import ZoneScoreBox   # Brixia zone table + grid switch (viewer.ai.zone_overlay)
        self.severity_method = _small(QLabel(""))
        self.severity_method.setWordWrap(True)
        sl.addWidget(self.severity_method, 2, 0, 1, 3)
        self.zone_box = ZoneScoreBox()
        sl.addWidget(self.zone_box, 3, 0, 1, 3)
        self.severity_box.setToolTip("From the raw 'Lung Opacity' output (Cohen et al. 2020, 94 images, "
                                     "3 raters): MAE 1.14 (extent, 0-8) and 0.78 (opacity, 0-6)")
        self.body_layout.addWidget(self.severity_box)

        self.ct_box = QGroupBox("CT study")
        cl = QGridLayout(self.ct_box)
        self.ct_prob_bar = ScoreBar()
        self.ct_prob_value = QLabel("—")
        self.lung_volume_label = QLabel("Lung volume: —")
        self.strip = SliceScoreStrip()
        self.next_button = QPushButton("Next suspicious slice")
        self.next_button.setToolTip("Jump through the most suspicious slices, highest score first")
        self.next_button.clicked.connect(self.strip.next_suspicious)
        self.top_label = _small(QLabel(""))
        self.top_label.setWordWrap(True)
        cl.addWidget(QLabel("Study probability"), 0, 0)
        cl.addWidget(self.ct_prob_bar, 0, 1)
        cl.addWidget(self.ct_prob_value, 0, 2)
        self.ct_untrained_label = QLabel(f"CT model: <b>{UNTRAINED_TEXT}</b>; greyed slice scores are "
                                         "not findings.")
        self.ct_untrained_label.setWordWrap(True)
        self.ct_untrained_label.hide()
        cl.addWidget(self.ct_untrained_label, 4, 0, 1, 3)
        cl.addWidget(self.lung_volume_label, 1, 0, 1, 3)
        cl.addWidget(self.strip, 2, 0, 1, 3)
        cl.addWidget(self.next_button, 3, 0, 1, 3)
        cl.addWidget(self.top_label, 5, 0, 1, 3)
        cl.setColumnStretch(1, 1)
        self.body_layout.addWidget(self.ct_box)
        from viewer.ai.ct_quant_overlay import CTQuantBox   # HU quantification per lung/zone, map controls
        self.ct_quant_box = CTQuantBox()
        self.body_layout.addWidget(self.ct_quant_box)

        self.heatmap_box = QGroupBox("Heatmap (Grad-CAM)")
        hl = QFormLayout(self.heatmap_box)
        self.target_combo = QComboBox()
        self.target_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.target_combo.setMinimumContentsLength(12)
        hl.addRow("Show for", self.target_combo)
        self.heatmap_source = _small(QLabel(""))
        self.heatmap_source.setWordWrap(True)
        hl.addRow(self.heatmap_source)
        self.overlay_check = QCheckBox("Overlay on")
        self.overlay_check.setChecked(True)
        self.outline_check = QCheckBox("Outline only")
        ob = QHBoxLayout()
        ob.addWidget(self.overlay_check)
        ob.addWidget(self.outline_check)
        hl.addRow(ob)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(45)
        hl.addRow("Opacity", self.opacity_slider)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(30)
        self.threshold_slider.setToolTip("Hide heatmap values below this level")
        hl.addRow("Hide below", self.threshold_slider)
        self.colormap_combo = QComboBox()
        self.colormap_combo.addItems(list(COLORMAPS))
        hl.addRow("Colours", self.colormap_combo)
        self.colorbar = ColorBar()
        self.colorbar.set_threshold(0.30)
        hl.addRow(self.colorbar)
        self.blink_hint = f"Hold {blink_key_name} to hide the heatmap (blink compare)."
        self.heatmap_note = _small(QLabel(self.blink_hint))
        self.heatmap_note.setWordWrap(True)
        hl.addRow(self.heatmap_note)
        self.body_layout.addWidget(self.heatmap_box)
        self.target_combo.currentIndexChanged.connect(self._on_target_index)
        self.overlay_check.toggled.connect(self.overlay_toggled)
        self.outline_check.toggled.connect(self.outline_toggled)
        self.opacity_slider.valueChanged.connect(lambda v: self.opacity_changed.emit(v / 100.0))
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        self.colormap_combo.currentTextChanged.connect(self._on_colormap)

        self.warnings_label = _small(QLabel(""))
        self.warnings_label.setWordWrap(True)
        self.body_layout.addWidget(self.warnings_label)
        self.body_layout.addStretch(1)

        self.smallprint = _small(QLabel(""), 0.8)
        self.smallprint.setWordWrap(True)
        outer.addWidget(self.smallprint)
        self.clear()

    # -- extra sections ----------------------------------------------------------------------
    def add_section(self, widget: QWidget) -> None:
        """A block placed before the heatmap controls that manages its own visibility (e.g. the
        result trend of viewer.ai.trend_panel); ``clear()`` leaves it alone."""
        self.body_layout.insertWidget(self.body_layout.indexOf(self.heatmap_box), widget)

    # -- model identity ---------------------------------------------------------------------
    def set_models(self, models: Sequence[ModelInfo] | None, error: str | None = None) -> None:
        """Model name, version and trained state (from the cards, or from a result)."""
        if error:
            self.model_label.setText(f"Models: unavailable ({error})")
            return
        if not models:
            self.model_label.setText("Models: none registered — the AI cannot run")
            return
        parts = []
        for m in models:
            state = "trained" if m.trained else "UNTRAINED — no findings"
            parts.append(m.label or f"{m.name} v{m.version}")
            if m.label and ("trained" in m.label.lower()):
                continue
            parts[-1] += f" ({state})"
        self.model_label.setText("Models: " + "; ".join(parts))

    # -- state from the controller ------------------------------------------------------------
    def set_series_text(self, text: str) -> None:
        self.series_label.setText(text)

    def set_running(self, running: bool, message: str = "") -> None:
        self.cancel_button.setEnabled(running)
        self.run_button.setEnabled(not running)
        if running:
            self.progress.setValue(0)
            self.status_label.setText(message or "Analysing…")
            self.error_label.hide()

    def set_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        if message:
            self.status_label.setText(message)

    def show_error(self, message: str) -> None:
        """Analysis failed: say so in words, keep the window usable."""
        self.set_running(False)
        self.error_label.setText(message)
        self.error_label.show()
        self.status_label.setText("Analysis failed")
        self.progress.setValue(0)

    def show_cancelled(self) -> None:
        self.set_running(False)
        self.status_label.setText("Analysis cancelled")
        self.progress.setValue(0)

    def show_status(self, text: str) -> None:
        self.status_label.setText(text)

    def clear(self) -> None:
        """No result: hide the result blocks (banner, models and controls stay)."""
        self.result = None
        self.error_label.hide()
        self.validity_label.setText("—")
        self.validity_box.hide()
        self.findings_box.hide()
        self.severity_box.hide()
        self.ct_box.hide()
        self.ct_quant_box.hide()
        self.heatmap_box.hide()
        self.strip.clear()
        self.warnings_label.setText("")
        self.smallprint.setText("")
        self._set_targets([], None)
        self.result_changed.emit(None)

    # -- result rendering ---------------------------------------------------------------------
    def show_result(self, result: StudyResult, n_slices: int | None = None) -> None:
        """Render ``result``; ``n_slices`` (CT) is the displayed stack length for the slice strip."""
        self.clear()
        self._n_slices = n_slices
        self.result = result
        self.set_running(False)
        self.progress.setValue(1000)
        if result.models:
            self.set_models(result.models)
        lookup = trained_lookup(result.models)
        if result.error:
            self.error_label.setText(f"Analysis could not be completed: {result.error}")
            self.error_label.show()
            self.status_label.setText("Analysis finished with an error")
        else:
            self.status_label.setText("Analysis finished")
        greyed = not result.validity.passed
        self._show_validity(result)
        self._show_findings(result, lookup, greyed)
        self._show_severity(result, lookup, greyed)
        self._show_ct(result, lookup, greyed)
        self.ct_quant_box.show_result(result)
        self._show_heatmap_targets(result, lookup, greyed)
        if result.warnings:
            self.warnings_label.setText("Warnings: " + "; ".join(result.warnings))
        t = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
        self.smallprint.setText(f"{t}{' · ' if t else ''}device: {result.device} · "
                                f"{result.intended_use or RESEARCH_USE}")
        self.result_changed.emit(result)

    def _show_validity(self, result: StudyResult) -> None:
        v = result.validity
        if result.kind == "unsupported" and not v.reasons and not result.findings:
            self.validity_label.setText("Not analysed: only chest X-ray (CR/DX) and CT series are supported.")
        elif v.passed:
            what = "header and pixel checks"
            if v.ood_score is not None and v.ood_threshold is not None:
                what += (f"; similar to the training images (distribution score {v.ood_score:.3g}, "
                         f"limit {v.ood_threshold:.3g})")
            notes = "".join(f"<li>{r}</li>" for r in v.reasons)
            self.validity_label.setText(f"<b style='color:#3a9a3a'>Passed</b>: {what}."
                                        + (f"<ul>{notes}</ul>" if notes else ""))
        else:
            reasons = "".join(f"<li>{r}</li>" for r in (v.reasons or ["no reason given"]))
            self.validity_label.setText("<b style='color:#d04030'>Failed</b> — the scores below are greyed "
                                        f"and must not be read as findings:<ul>{reasons}</ul>")
        self.validity_box.show()

    def _show_findings(self, result: StudyResult, lookup: dict, greyed: bool) -> None:
        lay = self.findings_layout
        while lay.count():
            w = lay.takeAt(0).widget()
            if w is not None:
                w.hide()
                w.setParent(None)
                w.deleteLater()
        self.finding_rows = {}
        row = 0
        untrained_models = [m for m in result.models if not m.trained]
        for m in untrained_models:
            lab = QLabel(f"{m.name} {m.version}: <b>{UNTRAINED_TEXT}</b>")
            lab.setWordWrap(True)
            lab.setObjectName("untrained")
            lay.addWidget(lab, row, 0, 1, 3)
            row += 1
        shown = [f for f in result.findings if finding_is_trained(f, lookup)]
        hidden = [f for f in result.findings if not finding_is_trained(f, lookup)]
        if hidden and not untrained_models:   # findings from a model with no card: same rule
            lab = QLabel(f"{len(hidden)} scores from a model without a trained card: <b>{UNTRAINED_TEXT}</b>")
            lab.setWordWrap(True)
            lay.addWidget(lab, row, 0, 1, 3)
            row += 1
        for f in sorted(shown, key=finding_rank):     # the same order as engine.results.top_finding
            name = QLabel(f.label)
            bar = ScoreBar(f.probability, 1.0, f.threshold, greyed=greyed)
            flag = " ▲" if (f.positive and not greyed) else ""
            val = QLabel(f"{f.probability:.2f}{flag}")
            tip = (f"{f.label}: probability {f.probability:.3f}, operating threshold {f.threshold:.3f}"
                   f" ({f.model_name} v{f.model_version})")
            for w in (name, bar, val):
                w.setToolTip(tip)
                if greyed:
                    w.setEnabled(False)
            if f.positive and not greyed:
                fnt = QFont(name.font())
                fnt.setBold(True)
                name.setFont(fnt)
            name.mousePressEvent = lambda _e, lbl=f.label: self.select_target(lbl)  # click selects heatmap
            lay.addWidget(name, row, 0)
            lay.addWidget(bar, row, 1)
            lay.addWidget(val, row, 2)
            self.finding_rows[f.label] = (name, bar, val)
            row += 1
        if row == 0:
            lay.addWidget(QLabel("No scores."), 0, 0, 1, 3)
        self.findings_box.setVisible(True)

    def _show_severity(self, result: StudyResult, lookup: dict, greyed: bool) -> None:
        s = result.severity
        if s is None or result.kind == "ct":
            self.severity_box.hide()
            return
        if not lookup.get((s.model_name, s.model_version), False):
            self.extent_value.setText("untrained")
            self.opacity_value.setText("untrained")
            self.extent_bar.value = self.opacity_bar.value = 0.0
        else:
            self.extent_bar.value, self.opacity_bar.value = s.geographic_extent, s.opacity
            self.extent_value.setText(f"{s.geographic_extent:.1f} / 8")
            self.opacity_value.setText(f"{s.opacity:.1f} / 6")
        for w in (self.extent_bar, self.opacity_bar):
            w.greyed = greyed
            w.update()
        self.extent_value.setEnabled(not greyed)
        self.opacity_value.setEnabled(not greyed)
        self._show_severity_method(s, greyed)
        self.zone_box.show_severity(s, lookup.get((s.model_name, s.model_version), False), greyed)
        self.severity_box.show()

    def _show_severity_method(self, s, greyed: bool) -> None:
        """Say which scale each number is on and how it was made: the zone scorer's extent and
        opacity are Cohen's scales reached through the Brixia sum (engine.ai.severity_zones), not
        Cohen et al.'s own formula."""
        from viewer.ai.zone_overlay import APPROX_NOTE, method_text

        zoned = bool(getattr(s, "zone_scores", None))
        self.severity_box.setTitle("Severity — Cohen et al. 2020 scales" + (" + Brixia zones" if zoned else ""))
        self.severity_method.setText(f"Method: {method_text(getattr(s, 'method', ''))} "
                                     f"({s.model_name} v{s.model_version})")
        self.severity_method.setEnabled(not greyed)
        tip = ("Geographic extent 0–8 and opacity 0–6 (Cohen et al. 2020, 94 images, 3 raters: "
               "MAE 1.14 and 0.78 for their formula)")
        if zoned:
            tip += f"; Brixia zones 0–3 and global 0–18: {APPROX_NOTE}"
        self.severity_box.setToolTip(tip)

    def _ct_threshold(self, result: StudyResult, lookup: dict) -> float | None:
        ct = [f for f in result.findings if finding_is_trained(f, lookup)]
        if not ct:
            return None
        pick = next((f for f in ct if "covid" in f.label.lower()), None) or max(ct, key=lambda f: f.probability)
        return pick.threshold

    def _show_ct(self, result: StudyResult, lookup: dict, greyed: bool) -> None:
        if result.kind != "ct":
            self.ct_box.hide()
            return
        ct_models = [m for m in result.models if "ct" in m.name.lower()] or result.models
        trained = any(m.trained for m in ct_models)
        thr = self._ct_threshold(result, lookup) if trained else None
        p = result.ct_study_probability
        self.ct_untrained_label.setVisible(not trained)
        if p is None or not trained:
            self.ct_prob_bar.value = 0.0
            self.ct_prob_value.setText("untrained" if not trained else "—")
        else:
            self.ct_prob_bar.value = p
            self.ct_prob_value.setText(f"{p:.2f}")
        self.ct_prob_bar.threshold = thr
        self.ct_prob_bar.greyed = greyed
        self.ct_prob_bar.update()
        vol = result.lung_volume_ml
        self.lung_volume_label.setText(f"Lung volume: {vol:,.0f} mL" if vol is not None else "Lung volume: —")
        # Untrained slice scores are not findings: the strip is greyed and unranked text says so.
        self.strip.set_scores(result.ct_slice_scores, n_slices=getattr(self, "_n_slices", None), threshold=thr,
                              greyed=greyed or not trained)
        top = self.strip.top_slices()
        self.next_button.setEnabled(bool(top))
        if top:
            prefix = "Most suspicious slices" if trained else "Highest-scoring slices (untrained model)"
            self.top_label.setText(prefix + " (image numbers): " +
                                   ", ".join(str(self.strip.reading_number(i)) for i in top))
        else:
            self.top_label.setText("")
        self.ct_box.show()

    def _show_heatmap_targets(self, result: StudyResult, lookup: dict, greyed: bool) -> None:
        targets: list[str] = []
        for h in result.heatmaps:
            if h.target not in targets:
                targets.append(h.target)
        if not targets:
            self.heatmap_box.hide()
            self._set_targets([], None)
            return
        trained_t = {h.target for h in result.heatmaps if lookup.get((h.model_name, h.model_version), False)}
        labels = []
        for t in targets:
            lab = "Severity (extent, Cohen 2020)" if t == "severity" else t
            if t not in trained_t:
                lab += " (untrained model — not a finding)"
            elif greyed:
                lab += " (image check failed)"
            labels.append(lab)
        # Default: the most probable trained finding with a heatmap that is not hidden by default (a
        # negative finding's or a failed gate's map); nothing when untrained/greyed.
        default = None
        if not greyed:
            probs = {f.label: f.probability for f in result.findings if finding_is_trained(f, lookup)}
            hidden = {h.target for h in result.heatmaps if getattr(h, "hidden_by_default", False)}
            cands = [t for t in targets if t in trained_t and t not in hidden]   # others only when asked
            if cands:
                default = max(cands, key=lambda t: probs.get(t, -1.0))
        self._set_targets(list(zip(targets, labels)), default)
        self.heatmap_box.show()

    # -- heatmap target selection -------------------------------------------------------------
    def _set_targets(self, items: list[tuple[str, str]], default: str | None) -> None:
        self.target_combo.blockSignals(True)
        self.target_combo.clear()
        self._targets = [None] + [t for t, _ in items]
        self.target_combo.addItem(NO_HEATMAP)
        for _, label in items:
            self.target_combo.addItem(label)
        idx = self._targets.index(default) if default in self._targets else 0
        self.target_combo.setCurrentIndex(idx)
        self.target_combo.blockSignals(False)
        self.target_selected.emit(self._targets[idx])

    def heatmap_targets(self) -> list[str]:
        return [t for t in self._targets if t is not None]

    def selected_target(self) -> str | None:
        i = self.target_combo.currentIndex()
        return self._targets[i] if 0 <= i < len(self._targets) else None

    def select_target(self, target: str | None) -> bool:
        """Select the heatmap of ``target`` (a finding label or 'severity'); False if it has none."""
        if target not in self._targets:
            return False
        self.target_combo.setCurrentIndex(self._targets.index(target))
        return True

    def _on_target_index(self, i: int) -> None:
        self.target_selected.emit(self._targets[i] if 0 <= i < len(self._targets) else None)

    def _on_threshold(self, v: int) -> None:
        self.colorbar.set_threshold(v / 100.0)
        self.threshold_changed.emit(v / 100.0)

    def _on_colormap(self, name: str) -> None:
        self.colorbar.set_colormap(name)
        self.colormap_changed.emit(name)
