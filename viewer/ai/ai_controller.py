"""Wires the AI into the main window: worker, findings panel, heatmap overlay, slice strip.

The main window knows nothing about AI; at the end of its ``__init__`` it creates
``AIController(self)``, which hooks in through the interface documented in viewer/main_window.py:
``series_opened(SeriesRecord)``, ``image_view.view_box`` / ``image_item`` / ``slice_changed`` /
``current_slice()`` / ``set_slice(i)``, and the right dock ``findings_dock``.
Model code never runs on the GUI thread: analysis is in viewer.ai.workers (engine.service is
imported there, lazily), so this module never imports torch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (QAbstractSpinBox, QApplication, QComboBox, QDockWidget, QLineEdit,
                               QPlainTextEdit, QTextEdit, QWidget)

from engine.results import Heatmap, StudyResult
from engine.dicom.series_meta import display_text
from viewer.ai.findings_panel import FindingsPanel
from viewer.view.heatmap_overlay import HeatmapOverlay
from viewer.ai.workers import AnalysisRunner, AnalyzeFn, ModelInfoLoader

# Held to hide the heatmap (blink compare). The main window's single-key shortcuts are P W D A E
# (tools), F (fit), I (invert), R (rotate), H/V (flip), C (cine), M (MPR); Ctrl+B toggles the
# browser; plain B and N are free.
BLINK_KEY = Qt.Key.Key_B
NEXT_SUSPICIOUS_KEY = QKeySequence("N")    # CT: jump through the most suspicious slices
AUTO_RUN_KEY = "ai/auto_run"
CACHE_SIZE = 8
VOLUME_WAIT_MS = 45_000      # then the engine reads the CT itself
SUPPORTED_KINDS = ("xray", "ct")


def leave_a_core_for_the_gui() -> None:
    """Ask the engine for one torch thread less than the physical cores (read once, at its first
    analysis; engine.ai.models.devices ``CHESTVIEW_THREADS``): on a 2-core machine the GUI thread
    otherwise competes with both intra-op threads and the event loop stalls for 100+ ms
    (bench/bench_gui_stall.py). An explicit CHESTVIEW_THREADS or OMP_NUM_THREADS wins."""
    if os.environ.get("CHESTVIEW_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return
    from engine.cpu import physical_cores

    os.environ["CHESTVIEW_THREADS"] = str(max(1, physical_cores() - 1))


class AIController(QObject):
    """Owns the AI side of one MainWindow. ``analyze`` may be injected (tests, benchmarks)."""

    def __init__(self, main_window: Any, analyze: AnalyzeFn | None = None,
                 auto_run: bool | None = None, load_model_infos: bool = True):
        super().__init__(main_window)
        self.main_window = main_window
        leave_a_core_for_the_gui()
        self.runner = AnalysisRunner(analyze, parent=self)
        self.panel = FindingsPanel(blink_key_name=QKeySequence(BLINK_KEY).toString())
        self.results: OrderedDict[str, StudyResult] = OrderedDict()
        self.current_series: Any = None
        self.current_result: StudyResult | None = None
        self._settings = self._find_settings()
        if auto_run is None:
            auto_run = self._setting_bool(AUTO_RUN_KEY, True)
        self.panel.auto_run.setChecked(bool(auto_run))

        dock = getattr(main_window, "findings_dock", None)
        if isinstance(dock, QDockWidget):
            dock.setWidget(self.panel)
        self.image_view = getattr(main_window, "image_view", None)
        self.overlay: HeatmapOverlay | None = None
        if self.image_view is not None and getattr(self.image_view, "view_box", None) is not None:
            self.overlay = HeatmapOverlay(self.image_view.view_box,
                                          getattr(self.image_view, "image_item", None), parent=self,
                                          container=getattr(self.image_view, "content", None))
            if hasattr(self.image_view, "slice_changed"):
                self.image_view.slice_changed.connect(self._on_slice_changed)

        # Panel <-> worker.
        self.panel.run_requested.connect(self.run_current)
        self.panel.cancel_requested.connect(self.cancel)
        self.panel.auto_run_toggled.connect(self._on_auto_run)
        self.runner.started.connect(self._on_started)
        self.runner.progress.connect(self._on_progress)
        self.runner.result.connect(self._on_result)
        self.runner.error.connect(self._on_error)
        self.runner.cancelled.connect(self._on_cancelled)
        self._awaiting_volume: str | None = None
        self._volume_timer = QTimer(self)
        self._volume_timer.setSingleShot(True)
        self._volume_timer.setInterval(VOLUME_WAIT_MS)
        self._volume_timer.timeout.connect(self._volume_wait_over)
        if hasattr(main_window, "volume_loaded"):
            main_window.volume_loaded.connect(self._on_volume_loaded)
        # Panel -> overlay.
        self.panel.target_selected.connect(self._on_target)
        self.panel.strip.slice_requested.connect(self.go_to_volume_slice)
        if self.overlay is not None:
            self.panel.overlay_toggled.connect(self.overlay.set_enabled)
            self.panel.opacity_changed.connect(self.overlay.set_opacity)
            self.panel.threshold_changed.connect(self.overlay.set_threshold)
            self.panel.colormap_changed.connect(self.overlay.set_colormap)
            self.panel.outline_toggled.connect(self.overlay.set_outline)
            self.overlay.set_opacity(self.panel.opacity_slider.value() / 100.0)
            self.overlay.set_threshold(self.panel.threshold_slider.value() / 100.0)

        if hasattr(main_window, "series_opened"):
            main_window.series_opened.connect(self.on_series_opened)
        if hasattr(main_window, "series_selected"):
            main_window.series_selected.connect(self.on_series_selected)
        if isinstance(main_window, QWidget):
            sc = QShortcut(NEXT_SUSPICIOUS_KEY, main_window)
            sc.setContext(Qt.ShortcutContext.WindowShortcut)
            sc.activated.connect(self.panel.strip.next_suspicious)
            self.panel.next_button.setToolTip(self.panel.next_button.toolTip() +
                                              f" ({NEXT_SUSPICIOUS_KEY.toString()})")
        app = QApplication.instance()
        if app is not None:
            # installed once the event loop runs: an application filter sees every event, and
            # the window's construction alone sends some 10,000 (start-up time)
            QTimer.singleShot(0, self, lambda: app.installEventFilter(self))
            app.aboutToQuit.connect(self.shutdown)
        # The model cards are read by the registry, which imports torch: not at start-up (idle
        # memory, start time, a GUI stall) but with the first analysis, whose result names its
        # models anyway (bench/bench_viewer_start.py).
        self.info_loader = ModelInfoLoader(parent=self)
        self.info_loader.loaded.connect(self._on_model_infos)
        self._load_model_infos = bool(load_model_infos)
        self._infos_requested = False
        self.panel.model_label.setText("Models: named when the first analysis starts")
        # Export of the shown result as DICOM (viewer.pacs.export_dialog): panel button + File menu action.
        self.export_dialog: Any = None
        self.panel.export_requested.connect(self.open_export_dialog)
        self.panel.result_changed.connect(lambda _r: self.update_export_state())
        self.update_export_state()

    # -- settings ---------------------------------------------------------------------------
    def _find_settings(self) -> Any:
        s = getattr(self.main_window, "settings", None)
        if s is not None and hasattr(s, "value") and hasattr(s, "set_value"):
            return s
        try:
            from viewer.settings_store import SettingsStore

            return SettingsStore()
        except Exception:  # noqa: BLE001 - settings are a convenience, never a failure
            return None

    def _setting_bool(self, key: str, default: bool) -> bool:
        if self._settings is None:
            return default
        v = self._settings.value(key, default)
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")

    def _on_auto_run(self, on: bool) -> None:
        if self._settings is not None:
            self._settings.set_value(AUTO_RUN_KEY, bool(on))

    @property
    def auto_run(self) -> bool:
        return self.panel.auto_run.isChecked()

    # -- series and runs --------------------------------------------------------------------
    def on_series_selected(self, series: Any) -> None:
        """A new series was chosen (before it is decoded): nothing of the previous series stays on
        screen, even when this one then fails to display (it never reaches ``on_series_opened``)."""
        if self.current_series is series:
            return
        self.current_series = series
        self.current_result = None
        self._awaiting_volume = None
        self._volume_timer.stop()
        self._set_overlay_heatmaps([])
        self.panel.clear()
        self.panel.set_running(False)
        self.panel.progress.setValue(0)
        self.panel.set_series_text(self._series_text(series))
        self.panel.show_status("Opening the series…")
        self.update_export_state()

    @staticmethod
    def _series_text(series: Any) -> str:
        desc = display_text(getattr(series, "series_description", "") or "")
        return (f"{getattr(series, 'modality', '?')} series "
                f"{getattr(series, 'series_number', '') or ''} {desc}").strip()

    def on_series_opened(self, series: Any) -> None:
        """A series is displayed: show its cached result, or queue analysis when auto-run is on.

        An analysis still running for the previous series goes on (its result is cached) unless
        a new analysis supersedes it.
        """
        self.current_series = series
        self.current_result = None
        self._awaiting_volume = None
        self._volume_timer.stop()
        self._set_overlay_heatmaps([])
        kind = getattr(series, "kind", "other")
        self.panel.set_series_text(self._series_text(series))
        uid = getattr(series, "series_uid", "")
        if uid in self.results:
            self.show_result(self.results[uid])
            return
        self.panel.clear()
        self.panel.set_running(False)
        self.panel.progress.setValue(0)
        if kind not in SUPPORTED_KINDS:
            self.panel.show_status("Not analysed: the AI reads chest X-ray (CR/DX) and CT series only.")
            self.panel.run_button.setEnabled(False)
            return
        if self.auto_run:
            self.run_current()
        else:
            self.panel.show_status("Press Run AI to analyse this series (automatic analysis is off).")

    def is_busy(self) -> bool:
        """Analysing, or waiting for the viewer's CT volume to start analysing."""
        return self.runner.is_busy() or self._awaiting_volume is not None

    def run_current(self) -> int | None:
        """(Re)analyse the displayed series; a running analysis of another series is superseded.

        A CT waits for the volume the viewer is loading anyway (no second read, half the memory);
        if it does not come within VOLUME_WAIT_MS the engine reads the series itself.
        """
        series = self.current_series
        if series is None or getattr(series, "kind", "other") not in SUPPORTED_KINDS:
            return None
        uid = getattr(series, "series_uid", "")
        self.results.pop(uid, None)
        self.panel.clear()
        if getattr(series, "kind", "") == "ct":
            vol = self._loaded_volume(uid)
            if vol is None and self._volume_coming(series):
                if self.runner.is_busy():
                    self.runner.cancel()            # supersede now, start when the volume is there
                self._awaiting_volume = uid
                self._volume_timer.start()
                self.panel.set_running(True, "Waiting for the CT volume to load…")
                return None
            return self._submit(series, vol)
        return self._submit(series, None)

    def _submit(self, series: Any, volume: Any) -> int:
        if self._load_model_infos and not self._infos_requested:
            self._infos_requested = True
            self.panel.model_label.setText("Models: loading model cards…")
            self.info_loader.start()
        self._awaiting_volume = None
        self._volume_timer.stop()
        self.panel.set_running(True, "Queued…")
        return self.runner.submit(series, volume=volume)

    def _loaded_volume(self, uid: str) -> Any:
        vol = getattr(self.main_window, "current_volume", None)
        return vol if vol is not None and getattr(vol, "series_uid", None) == uid else None

    def _volume_coming(self, series: Any) -> bool:
        """The main window loads a CT volume for multi-slice CT series it displays."""
        return hasattr(self.main_window, "volume_loaded") and getattr(series, "count", 0) > 2

    def _on_volume_loaded(self, volume: Any) -> None:
        uid = getattr(volume, "series_uid", None)
        if self._awaiting_volume is not None and uid == self._awaiting_volume and self.current_series is not None \
                and getattr(self.current_series, "series_uid", None) == uid:
            self._submit(self.current_series, volume)

    def _volume_wait_over(self) -> None:
        """No volume from the viewer in time (slow disk, load error): the engine reads it itself."""
        if self._awaiting_volume is not None and self.current_series is not None \
                and getattr(self.current_series, "series_uid", None) == self._awaiting_volume:
            self._submit(self.current_series, None)

    def cancel(self) -> None:
        if self._awaiting_volume is not None:
            self._awaiting_volume = None
            self._volume_timer.stop()
            self.panel.show_cancelled()
        self.runner.cancel()

    def shutdown(self) -> None:
        """Stop the worker before the window goes away (never leave a thread on dead widgets)."""
        self._volume_timer.stop()
        self.runner.shutdown()
        self.info_loader.wait(5000)
        if self.export_dialog is not None:
            self.export_dialog.wait_done(10000)

    def _is_current_run(self, series_uid: str | None = None) -> bool:
        cur = self.current_series
        if cur is None:
            return False
        if series_uid is None:
            req = self.runner.current
            series_uid = req.series_uid if req is not None else None
        return series_uid == getattr(cur, "series_uid", None)

    def _on_started(self, series_uid: str) -> None:
        if self._is_current_run(series_uid):
            self.panel.show_status("Analysing…")

    def _on_progress(self, fraction: float, message: str) -> None:
        if self._is_current_run():
            self.panel.set_progress(fraction, message)

    def _on_cancelled(self, series_uid: str) -> None:
        if self._is_current_run(series_uid) and self._awaiting_volume is None:
            self.panel.show_cancelled()

    def _on_result(self, result: StudyResult) -> None:
        uid = getattr(result, "series_uid", "")
        self.results[uid] = result
        self.results.move_to_end(uid)
        while len(self.results) > CACHE_SIZE:
            self.results.popitem(last=False)
        if self.current_series is not None and uid != getattr(self.current_series, "series_uid", uid):
            return      # finished for a series the user already left: cached, not shown
        self.show_result(result)

    def _on_error(self, message: str) -> None:
        if self._is_current_run(self.runner.last_series_uid):
            self.panel.show_error(message)

    def _on_model_infos(self, infos: Any, error: Any) -> None:
        if self.current_result is not None and self.current_result.models:
            return
        self.panel.set_models(infos, error)

    def show_result(self, result: StudyResult) -> None:
        """Render a result (from the worker, the cache, or a caller such as the batch worklist)."""
        self.current_result = result
        n = self.image_view.n_slices() if hasattr(self.image_view, "n_slices") else None
        src = getattr(self.image_view, "source", None)
        self.panel.strip.set_reading_order(getattr(src, "reading_step", 1) < 0)
        self.panel.show_result(result, n_slices=n)   # emits target_selected -> overlay
        self._sync_strip_current()

    # -- export as DICOM (SR / Parametric Map / Secondary Capture, folder or PACS) -------------
    def export_state(self) -> tuple[bool, str]:
        """(exportable, reason): only the result shown for the displayed series, without an error."""
        r, s = self.current_result, self.current_series
        if r is None or s is None or self.panel.result is not r or r.series_uid != getattr(s, "series_uid", None):
            return False, "No AI result for the displayed series: run the AI first."
        if r.error:
            return False, f"The analysis failed ({r.error}): there is nothing to export. Re-run the analysis."
        if r.kind not in SUPPORTED_KINDS:
            return False, "Only chest X-ray and CT results can be exported."
        return True, "Export the AI result of the displayed series as DICOM (SR report, heatmaps) to a folder or PACS"

    def export_target(self) -> Any:
        """The shown result with its source images in analysis order (None when not exportable).

        X-ray: the image the engine analysed (the series' first instance, whose displayed frame the
        heatmaps are in). CT: ``Volume.instance_paths`` of the viewer's volume; without one, the
        worker loads the series in engine order (the order analysis used) before exporting.
        """
        ok, _ = self.export_state()
        if not ok:
            return None
        from viewer.pacs.export_dialog import ExportTarget

        series, result = self.current_series, self.current_result
        insts = [i.path for i in getattr(series, "instances", [])]
        desc = (f"{getattr(series, 'modality', '?')} series {getattr(series, 'series_number', '') or ''} "
                f"{getattr(series, 'series_description', '') or ''}").split()
        target = ExportTarget(result=result, source_paths=None, input_paths=insts, description=" ".join(desc))
        if result.kind == "ct":
            vol = self._loaded_volume(result.series_uid)
            if vol is not None:
                target.source_paths = list(vol.instance_paths)
            else:
                def resolve(series=series) -> list[str]:
                    from engine.service import load_volume  # sandboxed decode (DESIGN.md 5)

                    return list(load_volume(series).instance_paths)
                target.resolve_sources = resolve
        else:
            target.source_paths = insts[:1]
        return target

    def update_export_state(self) -> None:
        """Enable/disable the panel button and the main window's File menu action; refresh an open dialog."""
        ok, reason = self.export_state()
        self.panel.export_button.setEnabled(ok)
        self.panel.export_button.setToolTip(f"Export AI results… — {reason}")
        act = getattr(self.main_window, "act_export_ai", None)
        if act is not None:
            act.setEnabled(ok)
            act.setToolTip(reason)
            act.setStatusTip(reason)
        if self.export_dialog is not None:
            self.export_dialog.set_target(self.export_target() if ok else None, reason)

    def open_export_dialog(self) -> Any:
        """Show the (single, non-modal) export dialog for the displayed series' result."""
        ok, reason = self.export_state()
        if not ok:
            if hasattr(self.main_window, "show_message"):
                self.main_window.show_message("Nothing to export", reason)
            return None
        from viewer.pacs.export_dialog import ExportDialog

        if self.export_dialog is None:
            parent = self.main_window if isinstance(self.main_window, QWidget) else None
            self.export_dialog = ExportDialog(parent, settings_store=self._settings)
            self.export_dialog.export_finished.connect(self._on_export_finished)
        else:
            self.export_dialog.reload_network()
        self.export_dialog.set_target(self.export_target(), reason)
        self.export_dialog.show()
        self.export_dialog.raise_()
        self.export_dialog.activateWindow()
        return self.export_dialog

    def _on_export_finished(self, ok: bool, message: str) -> None:
        """The outcome also goes to the status bar; as a message box if the dialog was closed meanwhile."""
        mw = self.main_window
        dlg = self.export_dialog
        if dlg is not None and not dlg.isVisible() and hasattr(mw, "show_message"):
            mw.show_message("AI results exported" if ok else "AI results not exported", message)
        elif hasattr(mw, "statusBar"):
            mw.statusBar().showMessage(message, 15000)

    # -- heatmap overlay ----------------------------------------------------------------------
    def _on_target(self, target: str | None) -> None:
        r = self.current_result
        hms = [h for h in r.heatmaps if h.target == target] if (r is not None and target) else []
        self._set_overlay_heatmaps(hms)
        self.panel.heatmap_source.setText(self._heatmap_source_text(hms))
        slices = sorted(h.slice_index for h in hms if h.slice_index is not None)
        note = self.panel.blink_hint
        if slices:
            nums = ", ".join(str(self.panel.strip.reading_number(s)) for s in slices)
            note = f"Heatmaps exist on images {nums} (click the strip). {note}"
        self.panel.heatmap_note.setText(note)

    def _heatmap_source_text(self, hms: list[Heatmap]) -> str:
        """Which model made the shown heatmap; an untrained model's map is said to be no finding."""
        if not hms or self.current_result is None:
            return ""
        h = hms[0]
        info = next((m for m in self.current_result.models
                     if (m.name, m.version) == (h.model_name, h.model_version)), None)
        src = f"Grad-CAM of {h.model_name} {h.model_version} for '{h.target}'"
        if info is None or not info.trained:
            return src + ": <b>UNTRAINED model — not a finding</b>"
        if not self.current_result.validity.passed:
            return src + ": image check failed — do not interpret"
        return src

    def _set_overlay_heatmaps(self, heatmaps: list[Heatmap]) -> None:
        if self.overlay is None:
            return
        n = self.image_view.n_slices() if hasattr(self.image_view, "n_slices") else 1
        if n > 1:   # an X-ray series/multi-frame: the engine analysed the first image only
            heatmaps = [replace(h, slice_index=0) if h.slice_index is None else h for h in heatmaps]
        self.overlay.set_heatmaps(heatmaps)
        self.overlay.set_slice(self._current_slice())

    # -- slices (the main window's CT slice indices are engine Volume indices) -------------------
    def _current_slice(self) -> int | None:
        iv = self.image_view
        if iv is None or not hasattr(iv, "current_slice"):
            return None
        try:
            return int(iv.current_slice())
        except Exception:  # noqa: BLE001 - no image yet
            return None

    def _on_slice_changed(self, i: int) -> None:
        if self.overlay is not None:
            self.overlay.set_slice(i)
        self.panel.strip.set_current(i)

    def _sync_strip_current(self) -> None:
        self.panel.strip.set_current(self._current_slice())

    def go_to_volume_slice(self, vol_index: int) -> None:
        iv = self.image_view
        if iv is not None and hasattr(iv, "set_slice"):
            iv.set_slice(vol_index)

    # -- blink compare ------------------------------------------------------------------------
    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        et = event.type()
        if et == QEvent.Type.Close and obj is self.main_window:
            self._volume_timer.stop()
            self.runner.cancel()          # the engine stops at its next poll; exit waits for it
            return False
        if et in (QEvent.Type.KeyPress, QEvent.Type.KeyRelease) and self.overlay is not None:
            if event.key() == BLINK_KEY and not event.isAutoRepeat() and self._window_active():
                self.overlay.set_blink_hidden(et == QEvent.Type.KeyPress)
                return True
        return False

    def _window_active(self) -> bool:
        """Blink only in the viewer window and never while the user types in a text field."""
        fw = QApplication.focusWidget()
        if isinstance(fw, (QLineEdit, QTextEdit, QPlainTextEdit, QAbstractSpinBox)) or (
                isinstance(fw, QComboBox) and fw.isEditable()):
            return False
        mw = self.main_window
        try:
            return bool(mw.isActiveWindow()) or QApplication.activeWindow() is None
        except Exception:  # noqa: BLE001
            return True
