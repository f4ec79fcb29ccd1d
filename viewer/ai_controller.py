"""Wires the AI into the main window: worker, findings panel, heatmap overlay, slice strip.

The main window knows nothing about AI; at the end of its ``__init__`` it creates
``AIController(self)``, which hooks in through the documented interface (BRIEF "Viewer wiring"):
``series_opened(SeriesRecord)``, ``image_view.view_box`` / ``image_item`` / ``slice_changed`` /
``current_slice()`` / ``set_slice(i)``, and the right dock ``findings_dock``.
Model code never runs on the GUI thread: analysis is in viewer.workers (engine.service is
imported there, lazily), so this module never imports torch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (QAbstractSpinBox, QApplication, QComboBox, QDockWidget, QLineEdit,
                               QPlainTextEdit, QTextEdit)

from engine.results import Heatmap, StudyResult
from viewer.findings_panel import FindingsPanel
from viewer.overlays import HeatmapOverlay
from viewer.workers import AnalysisRunner, AnalyzeFn, ModelInfoLoader

# Held to hide the heatmap (blink compare). The main window's single-key shortcuts are P W D A E
# (tools), F (fit), I (invert), R (rotate), H/V (flip), C (cine), M (MPR); Ctrl+B toggles the
# browser; plain B is free.
BLINK_KEY = Qt.Key.Key_B
AUTO_RUN_KEY = "ai/auto_run"
CACHE_SIZE = 8
SUPPORTED_KINDS = ("xray", "ct")


def leave_a_core_for_the_gui() -> None:
    """Ask the engine for one torch thread less than the physical cores (read once, at its first
    analysis; engine.models.devices ``CHESTVIEW_THREADS``): on a 2-core machine the GUI thread
    otherwise competes with both intra-op threads and the event loop stalls for 100+ ms
    (bench/bench_gui_stall.py). An explicit CHESTVIEW_THREADS or OMP_NUM_THREADS wins."""
    if os.environ.get("CHESTVIEW_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 2
    except Exception:  # noqa: BLE001
        cores = os.cpu_count() or 2
    os.environ["CHESTVIEW_THREADS"] = str(max(1, int(cores) - 1))


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
        self.runner.started.connect(lambda _uid: self.panel.show_status("Analysing…"))
        self.runner.progress.connect(self.panel.set_progress)
        self.runner.result.connect(self._on_result)
        self.runner.error.connect(self._on_error)
        self.runner.cancelled.connect(lambda _uid: self.panel.show_cancelled())
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
        app = QApplication.instance()
        if app is not None:
            app.installEventFilter(self)
            app.aboutToQuit.connect(self.shutdown)
        if hasattr(main_window, "destroyed"):
            main_window.destroyed.connect(lambda *_: self.runner.shutdown())
        self.info_loader = ModelInfoLoader(parent=self)
        self.info_loader.loaded.connect(self._on_model_infos)
        if load_model_infos:
            self.info_loader.start()

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
    def on_series_opened(self, series: Any) -> None:
        """A series is displayed: show its cached result, or queue analysis when auto-run is on."""
        self.current_series = series
        self.current_result = None
        self._set_overlay_heatmaps([])
        kind = getattr(series, "kind", "other")
        desc = getattr(series, "series_description", "") or ""
        self.panel.set_series_text(f"{getattr(series, 'modality', '?')} series "
                                   f"{getattr(series, 'series_number', '') or ''} {desc}".strip())
        uid = getattr(series, "series_uid", "")
        if uid in self.results:
            self.show_result(self.results[uid])
            return
        self.panel.clear()
        if kind not in SUPPORTED_KINDS:
            if self.runner.is_busy():
                self.runner.cancel()
            self.panel.show_status("Not analysed: the AI reads chest X-ray (CR/DX) and CT series only.")
            self.panel.run_button.setEnabled(False)
            return
        self.panel.run_button.setEnabled(True)
        if self.auto_run:
            self.run_current()
        else:
            if self.runner.is_busy():
                self.runner.cancel()
            self.panel.show_status("Press Run AI to analyse this series (automatic analysis is off).")

    def run_current(self) -> int | None:
        """(Re)analyse the displayed series; a running analysis of another series is superseded."""
        series = self.current_series
        if series is None or getattr(series, "kind", "other") not in SUPPORTED_KINDS:
            return None
        self.results.pop(getattr(series, "series_uid", ""), None)
        self.panel.clear()
        self.panel.set_running(True, "Queued…")
        return self.runner.submit(series)

    def cancel(self) -> None:
        self.runner.cancel()

    def shutdown(self) -> None:
        """Stop the worker before the window goes away (never leave a thread on dead widgets)."""
        self.runner.shutdown()
        self.info_loader.wait(5000)

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
        self.panel.show_error(message)

    def _on_model_infos(self, infos: Any, error: Any) -> None:
        if self.current_result is not None and self.current_result.models:
            return
        self.panel.set_models(infos, error)

    def show_result(self, result: StudyResult) -> None:
        """Render a result (from the worker, the cache, or a caller such as the batch worklist)."""
        self.current_result = result
        n = self.image_view.n_slices() if hasattr(self.image_view, "n_slices") else None
        self.panel.show_result(result, n_slices=n)   # emits target_selected -> overlay
        self._sync_strip_current()

    # -- heatmap overlay ----------------------------------------------------------------------
    def _on_target(self, target: str | None) -> None:
        r = self.current_result
        hms = [h for h in r.heatmaps if h.target == target] if (r is not None and target) else []
        self._set_overlay_heatmaps(hms)
        self.panel.heatmap_source.setText(self._heatmap_source_text(hms))
        slices = sorted(h.slice_index for h in hms if h.slice_index is not None)
        note = self.panel.blink_hint
        if slices:
            note = (f"Heatmaps exist on slices {', '.join(str(s + 1) for s in slices)} "
                    f"(click the strip). {note}")
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
        self.overlay.set_heatmaps(heatmaps)
        self.overlay.set_slice(self._current_volume_slice())

    # -- slices: view index <-> volume index ---------------------------------------------------
    def _current_view_slice(self) -> int | None:
        iv = self.image_view
        if iv is None or not hasattr(iv, "current_slice"):
            return None
        try:
            return int(iv.current_slice())
        except Exception:  # noqa: BLE001 - no image yet
            return None

    def view_to_volume(self, i: int | None) -> int | None:
        """Image-view slice index -> engine Volume index (both sorted inferior to superior)."""
        return i

    def volume_to_view(self, i: int) -> int:
        return i

    def _current_volume_slice(self) -> int | None:
        return self.view_to_volume(self._current_view_slice())

    def _on_slice_changed(self, i: int) -> None:
        vi = self.view_to_volume(i)
        if self.overlay is not None:
            self.overlay.set_slice(vi)
        self.panel.strip.set_current(vi)

    def _sync_strip_current(self) -> None:
        self.panel.strip.set_current(self._current_volume_slice())

    def go_to_volume_slice(self, vol_index: int) -> None:
        iv = self.image_view
        if iv is not None and hasattr(iv, "set_slice"):
            iv.set_slice(self.volume_to_view(vol_index))

    # -- blink compare ------------------------------------------------------------------------
    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        et = event.type()
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
