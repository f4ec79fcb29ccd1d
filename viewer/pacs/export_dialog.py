"""Send the AI result of the displayed series back as standard DICOM (research use only).

What: a Comprehensive 3D SR / TID 1500 measurement report, the Grad-CAM heatmaps as Parametric
Maps (PS3.3 A.75) and/or as labelled Secondary Captures (PS3.3 A.8) for PACS that cannot show
Parametric Maps (``engine.interop.export.ExportKinds``). Where: a folder that is not an input
folder (the engine refuses those; its message is shown) or a PACS peer from the network settings
(C-STORE, PS3.4 B). Building and sending run in a ``viewer.qt_workers.TaskRunner`` thread; the
GUI thread only validates paths and shows progress.

Untrained models never produce findings: the engine leaves their findings out of the SR, and
this dialog also leaves out their heatmaps (a Grad-CAM of an untrained model is no finding).
No patient identifiers are shown or logged here; the series is named by modality/number/text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QComboBox, QDialog, QFileDialog, QGridLayout,
                               QGroupBox, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QRadioButton, QVBoxLayout, QWidget)

from engine.interop.export import ExportError, ExportKinds, check_output_folder
from engine.interop.netconfig import NetworkSettings, Peer, load_settings
from engine.results import RESEARCH_USE, StudyResult
from viewer.qt_workers import TaskRunner

log = logging.getLogger(__name__)

UNTRAINED_NOTE = "Findings of untrained models are not exported."
EXPORT_DIR_KEY = "ai/export_dir"
OK_STYLE = "color: #3a9a3a;"
ERROR_STYLE = "color: #d9534f;"
KIND_NAMES = {"SR": "SR report", "PM": "Parametric Map", "SC": "Secondary Capture"}
PM_TEXT = "Heatmap as Parametric Map (float Grad-CAM values, for current PACS)"
# A Parametric Map needs a Frame of Reference (PS3.3 A.75, C.7.4.1); a radiograph has none, so
# engine.interop.export writes its heatmap as a labelled Secondary Capture instead.
PM_TEXT_RADIOGRAPH = ("Heatmap as Parametric Map: a radiograph has no Frame of Reference, so it is "
                      "written as the Secondary Capture below")


# --------------------------------------------------------------------------------------------
# what to export (GUI-free helpers, also used by the controller)
# --------------------------------------------------------------------------------------------
@dataclass
class ExportTarget:
    """The analysed series' result and its source images (the controller builds this).

    ``source_paths``: X-ray = the analysed image; CT = ``Volume.instance_paths`` order, so that
    heatmap and slice-score indices pick the right slice. When the viewer has no volume yet,
    ``resolve_sources`` computes that order in the worker thread. ``input_paths`` (any order)
    are used to refuse writing into an input folder before anything runs.
    """

    result: StudyResult
    source_paths: Sequence[str] | None
    input_paths: Sequence[str]
    description: str = ""
    resolve_sources: Callable[[], Sequence[str]] | None = None


@dataclass
class ExportOutcome:
    ok: bool
    message: str
    paths: list[Path]
    sent: list[str]
    failed: list[tuple[str, str]]


def default_export_folder() -> str:
    """``user_data_dir()/exports``: ChestView's own folder, never next to the input images."""
    try:
        from engine.paths import user_data_dir

        return str(user_data_dir() / "exports")
    except OSError:
        return ""


def untrained_models(result: StudyResult) -> list[str]:
    """'name version' of each model in the result that has no trained card."""
    trained = {(m.name, m.version) for m in result.models if m.trained}
    names = {(m.name, m.version) for m in result.models if not m.trained}
    names |= {(f.model_name, f.model_version) for f in result.findings} - trained
    names |= {(h.model_name, h.model_version) for h in result.heatmaps} - trained
    return [f"{n} {v}" for n, v in sorted(names)]


def exportable_result(result: StudyResult) -> StudyResult:
    """A copy without heatmaps of untrained models (the SR builder already skips their findings)."""
    trained = {(m.name, m.version) for m in result.models if m.trained}
    return replace(result, heatmaps=[h for h in result.heatmaps if (h.model_name, h.model_version) in trained])


def run_export(target: ExportTarget, kinds: ExportKinds, folder: str | None,
               settings: NetworkSettings | None, peer: Peer | None,
               progress: Callable[[float, str], None] | None = None) -> ExportOutcome:
    """Worker-thread job: build the objects, then write them to ``folder`` or C-STORE them to ``peer``."""
    from engine.interop import export as ex

    def say(f: float, text: str) -> None:
        if progress is not None:
            progress(f, text)

    sources = target.source_paths
    if sources is None:
        say(0.0, "Reading the CT series order…")
        sources = list(target.resolve_sources()) if target.resolve_sources else []
    result = exportable_result(target.result)
    say(0.0, "Building DICOM objects…")
    if folder is not None:
        paths = ex.export_to_folder(result, sources, folder, kinds)
        say(1.0, "Written")
        if not paths:
            return ExportOutcome(False, "Nothing was exported: choose at least one object type.", [], [], [])
        counts: dict[str, int] = {}
        for p in paths:
            k = KIND_NAMES.get(p.name.split("_", 1)[0], "DICOM object")
            counts[k] = counts.get(k, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in counts.items())
        return ExportOutcome(True, f"Exported {len(paths)} DICOM object(s) ({what}) to {Path(folder).resolve()}.",
                             paths, [], [])
    if settings is None or peer is None:
        raise ExportError("No export destination: choose a folder or a PACS.")
    res = ex.send_results(result, sources, settings, peer, kinds,
                          progress=lambda f, t: say(max(0.01, f), f"C-STORE to {peer.name}: {t}"))
    total = len(res.sent) + len(res.failed)
    if total == 0:
        return ExportOutcome(False, "Nothing was sent: choose at least one object type.", [], [], [])
    if res.ok:
        return ExportOutcome(True, f"Sent {len(res.sent)} DICOM object(s) to {peer.name} "
                             f"({peer.ae_title}@{peer.host}:{peer.port}).", [], list(res.sent), [])
    reasons = "; ".join(f"…{uid[-8:]}: {why}" for uid, why in res.failed[:3])
    return ExportOutcome(False, f"{peer.name} stored {len(res.sent)} of {total} object(s). Not stored: {reasons}. "
                         "Check that the PACS accepts SR / Parametric Map / Secondary Capture storage, "
                         "or send the Secondary Capture only.", [], list(res.sent), list(res.failed))


def error_text(exc: BaseException) -> str:
    """A worker exception as a message the radiologist can act on."""
    reason = getattr(exc, "reason", None)          # engine.errors.LoadError(path, reason)
    if reason:
        name = Path(str(getattr(exc, "path", "") or "").split("::")[-1]).name
        return f"Could not read the source image {name}: {reason}"
    try:
        from engine.interop.network import NetworkError
    except ImportError:  # pragma: no cover - pynetdicom missing
        NetworkError = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, (ExportError, NetworkError, ValueError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"Could not write the files ({exc.strerror or exc}): choose a folder you can write to."
    return f"Export failed ({type(exc).__name__}: {exc}); please report this."


# --------------------------------------------------------------------------------------------
# the dialog
# --------------------------------------------------------------------------------------------
class ExportDialog(QDialog):
    """Choose what (SR / Parametric Map / Secondary Capture) and where (folder / PACS), then export."""

    export_finished = Signal(bool, str)          # ok, message (also shown in the dialog)

    def __init__(self, parent: QWidget | None = None, settings_store: Any = None):
        super().__init__(parent)
        self.setWindowTitle(f"Export AI results  —  {RESEARCH_USE}")
        self.setObjectName("export_ai_results")
        self.settings_store = settings_store
        self.runner = TaskRunner(self, max_threads=1)
        self.target: ExportTarget | None = None
        self.net_settings = NetworkSettings()
        self.last_outcome: ExportOutcome | None = None
        self._job = None
        self._pending: tuple[ExportTarget | None, str] | None = None
        self._disabled_reason = "No AI result for the displayed series."
        self._has_heatmaps = False
        self._build()
        self.folder_edit.setText(self.remembered_folder() or default_export_folder())
        self.reload_network()
        self.set_target(None, self._disabled_reason)
        self.resize(620, 0)

    # -- layout ----------------------------------------------------------------------------------
    def _build(self) -> None:
        banner = QLabel(RESEARCH_USE)
        banner.setObjectName("researchUse")
        banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
        banner.setStyleSheet("QLabel#researchUse { background: #8a5a00; color: white; font-weight: bold; "
                             "padding: 3px; border-radius: 3px; }")
        self.series_label = QLabel()
        self.series_label.setWordWrap(True)
        self.untrained_label = QLabel()
        self.untrained_label.setObjectName("untrainedNote")
        self.untrained_label.setWordWrap(True)
        self.validity_label = QLabel()
        self.validity_label.setWordWrap(True)
        self.validity_label.setStyleSheet(ERROR_STYLE)

        what = QGroupBox("What to export")
        wl = QVBoxLayout(what)
        self.sr_check = QCheckBox("DICOM SR measurement report (Comprehensive 3D SR, TID 1500): findings, "
                                  "probabilities, severity, model name and version")
        self.pm_check = QCheckBox(PM_TEXT)
        self.sc_check = QCheckBox("Heatmap as Secondary Capture (image with burned-in heatmap and label, "
                                  "for older PACS)")
        self.sr_check.setChecked(True)
        self.pm_check.setChecked(True)          # ExportKinds defaults: SR + Parametric Map
        for c in (self.sr_check, self.pm_check, self.sc_check):
            wl.addWidget(c)
            c.toggled.connect(self._refresh_buttons)
        self.heatmap_note = QLabel()
        self.heatmap_note.setWordWrap(True)
        wl.addWidget(self.heatmap_note)

        where = QGroupBox("Where")
        gl = QGridLayout(where)
        self.folder_radio = QRadioButton("Folder")
        self.pacs_radio = QRadioButton("PACS")
        self.dest_group = QButtonGroup(self)
        self.dest_group.addButton(self.folder_radio)
        self.dest_group.addButton(self.pacs_radio)
        self.folder_radio.setChecked(True)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder for the result files (not the folder of the images)")
        self.browse_btn = QPushButton("Browse…")
        self.browse_btn.clicked.connect(self.browse)
        self.peer_combo = QComboBox()
        self.peer_combo.setMinimumWidth(260)
        self.peer_note = QLabel()
        self.peer_note.setWordWrap(True)
        gl.addWidget(self.folder_radio, 0, 0)
        gl.addWidget(self.folder_edit, 0, 1)
        gl.addWidget(self.browse_btn, 0, 2)
        gl.addWidget(self.pacs_radio, 1, 0)
        gl.addWidget(self.peer_combo, 1, 1, 1, 2)
        gl.addWidget(self.peer_note, 2, 1, 1, 2)
        gl.setColumnStretch(1, 1)
        self.folder_edit.textChanged.connect(self._refresh_buttons)
        self.folder_radio.toggled.connect(self._refresh_buttons)
        self.peer_combo.currentIndexChanged.connect(self._refresh_buttons)

        self.hint = QLabel("")
        self.hint.setObjectName("exportHint")
        self.hint.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(12)
        self.status = QLabel("")
        self.status.setObjectName("exportStatus")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_btn = QPushButton("Export")
        self.export_btn.setDefault(True)
        self.export_btn.clicked.connect(self.start_export)
        self.close_btn = QPushButton("Close")
        self.close_btn.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_btn)
        buttons.addWidget(self.close_btn)

        lay = QVBoxLayout(self)
        lay.addWidget(banner)
        lay.addWidget(self.series_label)
        lay.addWidget(self.untrained_label)
        lay.addWidget(self.validity_label)
        lay.addWidget(what)
        lay.addWidget(where)
        lay.addWidget(self.hint)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addLayout(buttons)

    # -- state -----------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._job is not None

    def set_target(self, target: ExportTarget | None, reason: str = "") -> None:
        """Show what would be exported; ``None`` (with ``reason``) disables export.

        While an export runs the change waits until it has finished (the job keeps its own copy)."""
        if self.is_running():
            self._pending = (target, reason)
            return
        self.target = target
        self._disabled_reason = reason or "No AI result for the displayed series."
        if target is None:
            self._has_heatmaps = False
            self.series_label.setText(f"<b>Nothing to export:</b> {self._disabled_reason}")
            self.untrained_label.setText(UNTRAINED_NOTE)
            self.validity_label.hide()
            self.heatmap_note.setText("")
            self._refresh_buttons()
            return
        r = target.result
        models = ", ".join(f"{m.name} {m.version} ({'trained' if m.trained else 'UNTRAINED'})"
                           for m in r.models) or "no model information"
        self.series_label.setText(f"<b>AI result of {target.description or r.modality + ' series'}</b>"
                                  f"<br>Models: {models}")
        untrained = untrained_models(r)
        if untrained:
            self.untrained_label.setText(
                f"<b>{UNTRAINED_NOTE}</b> {', '.join(untrained)} "
                f"{'is' if len(untrained) == 1 else 'are'} untrained: "
                f"no findings, severity or heatmaps of {'it' if len(untrained) == 1 else 'them'} are exported; "
                "the report states only that no findings were produced.")
        else:
            self.untrained_label.setText(f"{UNTRAINED_NOTE} All models of this result are trained.")
        if not r.validity.passed:
            self.validity_label.setText("The image check failed: the report records why, and the scores and "
                                        "heatmaps must not be interpreted. Reasons: "
                                        + ("; ".join(r.validity.reasons) or "none given"))
            self.validity_label.show()
        else:
            self.validity_label.hide()
        n_hm = len(exportable_result(r).heatmaps)
        has_hm = self._has_heatmaps = n_hm > 0
        self.pm_check.setText(PM_TEXT if r.kind == "ct" else PM_TEXT_RADIOGRAPH)
        for c in (self.pm_check, self.sc_check):
            c.setEnabled(has_hm)
        if has_hm:
            self.heatmap_note.setText(f"{n_hm} heatmap(s) from trained models"
                                      + (", each on its CT slice." if r.kind == "ct" else "."))
        elif r.heatmaps:
            self.heatmap_note.setText("Heatmaps come from untrained models only: none are exported.")
        else:
            self.heatmap_note.setText("This result has no heatmaps: only the report can be exported.")
        self._refresh_buttons()

    def reload_network(self, settings: NetworkSettings | None = None) -> None:
        """PACS peers from ``engine.interop.netconfig`` (Settings ▸ Network…)."""
        try:
            self.net_settings = settings or load_settings()
            problem = ""
        except ValueError as exc:
            self.net_settings, problem = NetworkSettings(), str(exc)
        current = self.peer_combo.currentData()
        self.peer_combo.blockSignals(True)
        self.peer_combo.clear()
        for p in self.net_settings.peers:
            self.peer_combo.addItem(f"{p.name}  ({p.ae_title}@{p.host}:{p.port})", p.name)
        i = self.peer_combo.findData(current)
        self.peer_combo.setCurrentIndex(i if i >= 0 else 0)
        self.peer_combo.blockSignals(False)
        has = bool(self.net_settings.peers)
        self.pacs_radio.setEnabled(has)
        if not has and self.pacs_radio.isChecked():
            self.folder_radio.setChecked(True)
        self.peer_note.setText(problem or ("" if has else "No PACS configured: add one in Settings ▸ Network…"))
        self.peer_note.setStyleSheet(ERROR_STYLE if problem else "")
        self._refresh_buttons()

    def set_folder(self, folder: str | Path) -> None:
        self.folder_edit.setText(str(folder))
        self.folder_radio.setChecked(True)

    def remembered_folder(self) -> str:
        s = self.settings_store
        v = s.value(EXPORT_DIR_KEY, "") if s is not None and hasattr(s, "value") else ""
        return str(v or "")

    def kinds(self) -> ExportKinds:
        return ExportKinds(sr=self.sr_check.isChecked(),
                           parametric_map=self.pm_check.isChecked() and self._has_heatmaps,
                           secondary_capture=self.sc_check.isChecked() and self._has_heatmaps)

    def current_peer(self) -> Peer | None:
        name = self.peer_combo.currentData()
        try:
            return self.net_settings.peer(name) if name else None
        except KeyError:
            return None

    def folder_problem(self) -> str:
        """Why the folder cannot be used ('' when it can): empty, or the engine's input-folder refusal."""
        text = self.folder_edit.text().strip()
        if not text:
            return "Choose a folder for the result files."
        if self.target is None:
            return ""
        try:
            check_output_folder(Path(text).expanduser(), list(self.target.input_paths))
        except ExportError as exc:
            return str(exc)
        return ""

    def _say(self, text: str, style: str = "") -> None:
        self.status.setText(text)
        self.status.setStyleSheet(style)

    def _refresh_buttons(self, *_: Any) -> None:
        running = self.is_running()
        k = self.kinds()
        reason = ""
        if self.target is None:
            reason = self._disabled_reason
        elif not (k.sr or k.parametric_map or k.secondary_capture):
            reason = "Choose at least one object to export."
        elif self.folder_radio.isChecked():
            reason = self.folder_problem()
        elif self.current_peer() is None:
            reason = "Choose a PACS (or add one in Settings ▸ Network…)."
        for w in (self.sr_check, self.folder_radio, self.folder_edit, self.browse_btn, self.peer_combo):
            w.setEnabled(not running)
        for w in (self.pm_check, self.sc_check):
            w.setEnabled(not running and self._has_heatmaps)
        self.pacs_radio.setEnabled(not running and bool(self.net_settings.peers))
        self.export_btn.setEnabled(not running and not reason)
        self.export_btn.setToolTip(reason or "Export the AI result as DICOM")
        self.hint.setText("" if running else reason)
        self.hint.setStyleSheet(ERROR_STYLE if "input folder" in reason else "")

    # -- actions ---------------------------------------------------------------------------------
    def browse(self) -> None:
        start = self.folder_edit.text().strip() or self.remembered_folder() or str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Export AI results to folder", start)
        if folder:
            self.set_folder(folder)

    def start_export(self) -> bool:
        """Validate, then run the export in the worker thread; False (with the reason shown) if refused."""
        if self.is_running():
            return False
        self._refresh_buttons()
        if not self.export_btn.isEnabled():
            self._say(self.export_btn.toolTip(), ERROR_STYLE)
            return False
        target, kinds = self.target, self.kinds()
        if target is None:
            return False
        folder = settings = peer = None
        if self.folder_radio.isChecked():
            folder = str(Path(self.folder_edit.text().strip()).expanduser())
            if self.settings_store is not None and hasattr(self.settings_store, "set_value"):
                self.settings_store.set_value(EXPORT_DIR_KEY, folder)
            where = folder
        else:
            settings, peer = self.net_settings, self.current_peer()
            where = f"{peer.name}"
        self.last_outcome = None
        self.progress.setRange(0, 0)              # busy until the first real fraction arrives
        self._say(f"Exporting to {where}…")
        self._job = self.runner.submit(run_export, target, kinds, folder, settings, peer,
                                       on_result=self._done, on_error=self._failed, on_progress=self._on_progress)
        self._refresh_buttons()
        return True

    def _on_progress(self, fraction: float, text: str) -> None:
        if fraction > 0:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(min(1.0, fraction) * 1000))
        if text:
            self._say(text)

    def _finish(self, ok: bool, message: str) -> None:
        self._job = None
        self.progress.setRange(0, 1000)
        self.progress.setValue(1000 if ok else 0)
        self._say(message, OK_STYLE if ok else ERROR_STYLE)
        if self._pending is not None:
            target, reason = self._pending
            self._pending = None
            self.set_target(target, reason)
        self._refresh_buttons()
        log.info("AI result export %s", "succeeded" if ok else "failed")
        self.export_finished.emit(ok, message)

    def _done(self, outcome: ExportOutcome) -> None:
        self.last_outcome = outcome
        self._finish(outcome.ok, outcome.message)

    def _failed(self, exc: BaseException) -> None:
        self.last_outcome = ExportOutcome(False, error_text(exc), [], [], [])
        self._finish(False, self.last_outcome.message)

    def wait_done(self, msecs: int = 60000) -> bool:
        """Block until the worker is idle (tests); queued signals still need the event loop."""
        return self.runner.wait_done(msecs)
