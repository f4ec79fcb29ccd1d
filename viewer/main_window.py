"""ChestView main window: study browser | image view (stack or MPR) | findings dock, menus,
shortcuts, drag and drop, recent studies, remembered layout and W/L.

Interface for the other viewer modules (documented here, used by viewer/ai/ai_controller.py): ``open_path(path)``,
``select_series(series_uid)``, signal ``series_opened(SeriesRecord)`` (emitted after the series is
displayed), ``image_view`` (``view_box``, ``image_item``, ``slice_changed``, ``current_slice()``,
``set_slice(i)``, ``current_frame_shape()``), ``current_series``, ``index`` and the right dock
``findings_dock``. CT slice indices are ``engine.dicom.volume.Volume`` indices (0 = most inferior).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QIcon, QKeySequence
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QDockWidget, QFileDialog, QLabel,
                               QMainWindow, QMessageBox, QProgressBar, QStackedWidget, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from engine.dicom.records import IndexResult, SeriesRecord
from engine.results import RESEARCH_USE
from engine.dicom.series_meta import SeriesMeta
from viewer.view.image_view import FrameSource, ImageView, NavigationKeys, VolumeSource
from viewer.view.layouts import HangingController, ViewportGrid
from viewer.view.mpr_view import MPRView
from viewer.view.stack_order import series_items
from viewer.qt_workers import TaskRunner
from viewer.settings_store import SettingsStore
from viewer.browse.study_browser import StudyBrowser
from viewer.style import ICON_DIR
from viewer.browse.tag_browser import TagBrowser
from viewer.browse.thumbnails import ThumbnailLoader
from viewer.ai.workers import install_gui_wait_hook, warm_up_decoder

log = logging.getLogger(__name__)

MOUSE_HELP = [
    ("Right drag", "Window / level (horizontal = width, vertical = level)"),
    ("Left drag", "Current tool: pan (default), W/L, distance, ellipse or rectangle ROI"),
    ("Middle drag", "Pan"),
    ("Wheel", "Next / previous image (zoom on single images)"),
    ("Ctrl + wheel", "Zoom"),
    ("Double click", "Fit to window"),
    ("Up/Down, Left/Right", "Previous / next image"),
    ("Page Up / Page Down", "Jump 10% of the stack"),
    ("Home / End", "First / last image"),
    ("Esc", "Cancel drawing, back to pan"),
]


def _icon(name: str) -> QIcon:
    p = ICON_DIR / f"{name}.svg"
    return QIcon(str(p)) if p.exists() else QIcon()


class MainWindow(QMainWindow):
    series_opened = Signal(object)       # SeriesRecord, after it is displayed
    series_selected = Signal(object)     # SeriesRecord, as soon as it is chosen (before decoding)
    index_loaded = Signal(object)        # IndexResult of one open_path call
    volume_loaded = Signal(object)       # engine Volume of the current CT series

    def __init__(self, settings: SettingsStore | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"ChestView  —  {RESEARCH_USE}")
        self.setAcceptDrops(True)
        self.setWindowIcon(_icon("app"))
        self.resize(1400, 900)
        self.settings = settings or SettingsStore()
        self.runner = TaskRunner(self, max_threads=2)
        install_gui_wait_hook()                       # sandboxed decodes keep the window answering
        self.runner.submit(warm_up_decoder, on_error=lambda e: log.info("decoder warm-up: %s", e))
        self.index = IndexResult()
        self.current_series: SeriesRecord | None = None
        self.current_meta = SeriesMeta()
        self.current_volume = None
        self.last_message = ""
        self._pending_opens = 0

        # central: stack view and MPR
        self.image_view = ImageView()
        self.mpr_view = MPRView()
        self.central = QStackedWidget()
        self.viewports = ViewportGrid(self.image_view, runner=self.runner)   # viewport 0 = image_view
        self.central.addWidget(self.viewports)
        self.central.addWidget(self.mpr_view)
        self.setCentralWidget(self.central)

        # docks
        self.browser = StudyBrowser()
        self.browser_dock = self._dock("Studies", "browser_dock", self.browser, Qt.DockWidgetArea.LeftDockWidgetArea)
        placeholder = QLabel("AI findings appear here")
        placeholder.setObjectName("placeholder")
        placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.findings_dock = self._dock("AI findings", "findings_dock", placeholder,
                                        Qt.DockWidgetArea.RightDockWidgetArea)
        self.tag_browser = TagBrowser()
        # its own dock along the bottom (wide enough for the Value column), never a tab of the AI panel
        self.tags_dock = self._dock("DICOM tags", "tags_dock", self.tag_browser, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.findings_dock.raise_()
        self.tags_dock.hide()
        self.tags_dock.visibilityChanged.connect(lambda vis: vis and self._update_tags())

        # status bar
        self.cursor_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setRange(0, 100)
        self.progress.hide()
        self.statusBar().addWidget(self.cursor_label, 1)
        self.statusBar().addPermanentWidget(self.progress)
        ru = QLabel(RESEARCH_USE)
        ru.setStyleSheet("color: #9a9a9a;")
        self.statusBar().addPermanentWidget(ru)

        # workers
        self.thumbs = ThumbnailLoader(self)
        self.thumbs.ready.connect(self.browser.set_thumbnail)
        self.browser.series_activated.connect(self.select_series)

        # wiring
        iv = self.image_view
        iv.cursor_info.connect(self.cursor_label.setText)
        iv.load_failed.connect(lambda msg: self.statusBar().showMessage(msg, 10000))
        iv.window_committed.connect(self._remember_window)
        iv.slice_changed.connect(self._on_slice_changed)
        self.mpr_view.position_changed.connect(self._on_mpr_position)
        self.mpr_view.window_changed.connect(lambda c, w: self._sync_window_from_mpr(c, w))
        self._tags_timer = QTimer(self)
        self._tags_timer.setSingleShot(True)
        self._tags_timer.setInterval(120)
        self._tags_timer.timeout.connect(self._update_tags)

        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self.hanging = HangingController(self)
        self._restore_layout()
        if self.tags_dock in self.tabifiedDockWidgets(self.findings_dock):   # a layout saved by 1.x
            self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.tags_dock)
        # slice keys reach the active image whatever side-panel widget was clicked last
        self._nav_keys = NavigationKeys(self, self._navigation_target)

        try:
            from viewer.ai.ai_controller import AIController
            self.ai = AIController(self)
            from viewer.ai.ct_quant_overlay import CTQuantOverlay   # CT opacity map on the stack and MPR views
            self.ct_quant_overlay = CTQuantOverlay(self.image_view, self.mpr_view, self.ai.panel, parent=self)
            from viewer.ai.zone_overlay import install_zone_grid   # X-ray Brixia zone grid, key Z
            self.zone_grid = install_zone_grid(self, self.ai.panel)
        except ImportError:
            self.ai = None
        except Exception as exc:  # noqa: BLE001 - the viewer must stay usable without the AI
            log.warning("AI panel disabled: %s", exc)
            self.ai = None
            self.show_message("AI panel disabled", f"The AI panel could not start: {exc}")
        from viewer.ai.trend_panel import TrendController   # the patient's AI results over time
        self.trend = TrendController(self) if self.ai is not None else None

    # ---------------------------------------------------------------------------------------
    # construction helpers
    def _dock(self, title: str, name: str, widget: QWidget, area) -> QDockWidget:
        d = QDockWidget(title, self)
        d.setObjectName(name)
        d.setWidget(widget)
        d.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable
                      | QDockWidget.DockWidgetFeature.DockWidgetClosable
                      | QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.addDockWidget(area, d)
        return d

    def _act(self, text: str, slot, shortcut=None, icon: str | None = None, checkable: bool = False,
             tip: str = "") -> QAction:
        a = QAction(text, self)
        if shortcut:
            a.setShortcut(QKeySequence(shortcut))
            a.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        if icon:
            a.setIcon(_icon(icon))
        a.setCheckable(checkable)
        if tip or shortcut:
            a.setToolTip(f"{tip or text.replace('&', '').rstrip('…')}"
                         + (f" ({QKeySequence(shortcut).toString()})" if shortcut else ""))
        a.triggered.connect(slot)
        self.addAction(a)
        return a

    def _build_actions(self) -> None:
        iv = self.viewports.active_proxy()      # view actions act on the active viewport
        A = self._act
        self.act_open = A("&Open folder…", self.open_folder_dialog, "Ctrl+O", "open")
        self.act_open_file = A("Open &DICOMDIR / ZIP / file…", self.open_file_dialog, "Ctrl+Shift+O", "open-file")
        self.act_qr = A("&Query/Retrieve…", self.open_query_retrieve, "Ctrl+Shift+Q", "pacs")
        # enabled by viewer.ai.ai_controller (update_export_state) when the displayed series has a result
        self.act_export_ai = A("&Export AI results…",
                               lambda: getattr(self, "ai", None) and self.ai.open_export_dialog(),
                               tip="Export the AI result of the displayed series as DICOM to a folder or PACS")
        self.act_export_ai.setEnabled(False)
        self.act_quit = A("&Quit", self.close, "Ctrl+Q")
        self.act_screenshot = A("Save &screenshot…", self.save_screenshot_dialog, "Ctrl+Shift+S")
        self.act_fit = A("&Fit to window", iv.fit, "F", "fit")
        self.act_one = A("&1:1 pixels", lambda: iv.set_zoom(1.0), "Ctrl+1", "one-to-one")
        self.act_zoom_in = A("Zoom &in", lambda: iv.zoom_by(1.25), "Ctrl+=")
        self.act_zoom_out = A("Zoom &out", lambda: iv.zoom_by(0.8), "Ctrl+-")
        self.act_invert = A("&Invert", iv.toggle_invert, "I", "invert")
        self.act_rot_r = A("Rotate &right 90°", lambda: iv.rotate(90), "R", "rotate")
        self.act_rot_l = A("Rotate &left 90°", lambda: iv.rotate(-90), "Shift+R")
        self.act_flip_h = A("Flip &horizontal", lambda: iv.set_flip(horizontal=not iv.flip_h), "H", "flip-h")
        self.act_flip_v = A("Flip &vertical", lambda: iv.set_flip(vertical=not iv.flip_v), "V")
        self.act_reset = A("R&eset view", iv.reset, "Ctrl+R", "reset")
        self.act_annot = A("Corner &annotations", self._toggle_annotations, "Ctrl+I", checkable=True)
        self.act_annot.setChecked(self.settings.annotations_visible())
        iv.set_annotations_visible(self.act_annot.isChecked())
        self.act_cine = A("&Cine play/pause", iv.toggle_cine, "C", "cine", checkable=True)
        self.act_smooth = A("&Smooth when magnified", lambda on: iv.set_smoothing(on), "S", checkable=True,
                            tip="Bilinear interpolation when zoomed in; off = nearest neighbour (pixel peeping)")
        self.act_smooth.setChecked(True)
        self.act_overlay_planes = A("DICOM &overlays", lambda on: iv.set_overlay_planes_visible(on), "O",
                                    checkable=True, tip="Show the image's DICOM overlay planes (60xx)")
        self.act_overlay_planes.setChecked(True)
        self.act_mpr = A("&MPR (axial / coronal / sagittal)", self._toggle_mpr, "M", "mpr", checkable=True)
        self.act_mpr.setEnabled(False)
        self.act_tags = A("DICOM &tags", self._toggle_tags, "Ctrl+T", "tags")
        self.act_browser = self.browser_dock.toggleViewAction()
        self.act_browser.setShortcut(QKeySequence("Ctrl+B"))
        self.act_findings = self.findings_dock.toggleViewAction()
        self.act_findings.setShortcut(QKeySequence("Ctrl+Shift+F"))
        self.act_next_series = A("Next series", lambda: self._step_series(1), "Ctrl+Down")
        self.act_prev_series = A("Previous series", lambda: self._step_series(-1), "Ctrl+Up")
        # tools
        self.tool_group = QActionGroup(self)
        self.tool_actions: dict[str, QAction] = {}
        for key, text, sc, icon in [("pan", "&Pan", "P", "pan"), ("wl", "&Window/level", "W", "wl"),
                                    ("distance", "&Distance", "D", "distance"), ("angle", "&Angle", "A", "angle"),
                                    ("ellipse", "&Ellipse ROI", "E", "ellipse"),
                                    ("rect", "Rectan&gle ROI", "Shift+E", "rect")]:
            a = A(text, lambda checked=False, k=key: self.set_tool(k), sc, icon, checkable=True)
            self.tool_group.addAction(a)
            self.tool_actions[key] = a
        self.tool_actions["pan"].setChecked(True)
        self.act_clear_meas = A("&Clear measurements", iv.measurements.clear, "Shift+Del")
        self.act_undo_meas = A("Remove &last measurement", iv.measurements.remove_last, "Del")
        self.act_batch = A("&Batch review…", self.open_worklist, "Ctrl+Shift+B", "batch")
        self.act_network = A("&Network…", self.open_network_settings)
        self.act_shortcuts = A("&Keyboard shortcuts", self.show_shortcuts, "F1")
        self.act_about = A("&About ChestView", self.show_about)
        # W/L presets on number keys
        self.preset_actions = []
        for n in range(10):
            a = A(f"Preset {n}", lambda checked=False, n=n: self.apply_preset(n), str(n))
            self.preset_actions.append(a)
        # fps
        self.fps_group = QActionGroup(self)
        self.fps_actions = {}
        for fps in (2, 5, 10, 15, 20, 30):
            a = A(f"{fps} fps", lambda checked=False, f=fps: self.set_fps(f), checkable=True)
            self.fps_group.addAction(a)
            self.fps_actions[fps] = a
        self.set_fps(self.settings.cine_fps())
        # optional modules (viewer/browse/worklist.py, viewer/pacs/pacs_dialog.py): their actions are disabled when absent
        for act, mod in ((self.act_batch, "viewer.browse.worklist"), (self.act_qr, "viewer.pacs.pacs_dialog"),
                         (self.act_network, "viewer.pacs.pacs_dialog")):
            try:
                ok = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                ok = False
            act.setEnabled(ok)
            if not ok:
                act.setToolTip(act.toolTip() + " — module not installed")

    def _build_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addActions([self.act_open, self.act_open_file])
        self.recent_menu = m.addMenu("Open &recent")
        self._refresh_recent_menu()
        m.addSeparator()
        m.addAction(self.act_qr)
        m.addAction(self.act_export_ai)
        m.addAction(self.act_screenshot)
        m.addSeparator()
        m.addAction(self.act_quit)
        m = mb.addMenu("&View")
        m.addActions([self.act_fit, self.act_one, self.act_zoom_in, self.act_zoom_out])
        m.addSeparator()
        m.addActions([self.act_invert, self.act_rot_r, self.act_rot_l, self.act_flip_h, self.act_flip_v,
                      self.act_reset])
        m.addSeparator()
        m.addActions([self.act_annot, self.act_mpr, self.act_smooth, self.act_overlay_planes])
        m.addSeparator()
        m.addActions([self.act_cine])
        fm = m.addMenu("Cine &speed")
        fm.addActions(list(self.fps_actions.values()))
        m.addSeparator()
        m.addActions([self.act_next_series, self.act_prev_series])
        m.addSeparator()
        m.addActions([self.act_browser, self.act_findings, self.act_tags])
        self.window_menu = mb.addMenu("&Window")
        self.window_menu.aboutToShow.connect(self._refresh_window_menu)
        self._refresh_window_menu()
        m = mb.addMenu("&Tools")
        m.addActions(list(self.tool_actions.values()))
        m.addSeparator()
        m.addActions([self.act_undo_meas, self.act_clear_meas])
        m.addSeparator()
        m.addAction(self.act_batch)
        m = mb.addMenu("&Settings")
        m.addAction(self.act_network)
        m = mb.addMenu("&Help")
        m.addActions([self.act_shortcuts, self.act_about])

    def _build_toolbar(self) -> None:
        tb = self.addToolBar("Main")
        tb.setObjectName("main_toolbar")
        tb.setIconSize(QSize(20, 20))
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonIconOnly)
        tb.addActions([self.act_open])
        tb.addSeparator()
        tb.addActions(list(self.tool_actions.values()))
        tb.addSeparator()
        tb.addActions([self.act_fit, self.act_one, self.act_invert, self.act_rot_r, self.act_flip_h,
                       self.act_reset])
        tb.addSeparator()
        tb.addActions([self.act_cine, self.act_mpr, self.act_tags])
        self.toolbar = tb

    def _refresh_window_menu(self) -> None:
        m = self.window_menu
        m.clear()
        for n, a in enumerate(self.preset_actions):
            if n == 0:
                a.setText("Default (header)")
            else:
                p = self.image_view.presets() if self.image_view.current_data() is not None else []
                if n - 1 < len(p):
                    name, c, w = p[n - 1]
                    a.setText(f"{name}  (L {c:g} / W {w:g})")
                else:
                    a.setText(f"Preset {n}")
                    continue       # stays enabled: the key is harmless when there is no preset
            m.addAction(a)

    def _refresh_recent_menu(self) -> None:
        self.recent_menu.clear()
        paths = self.settings.recent_paths()
        for p in paths:
            a = self.recent_menu.addAction(p)
            a.triggered.connect(lambda checked=False, p=p: self.open_path(p))
        if paths:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear list", lambda: (self.settings.clear_recent(),
                                                              self._refresh_recent_menu()))
        self.recent_menu.setEnabled(bool(paths))

    # ---------------------------------------------------------------------------------------
    # opening
    def open_folder_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open DICOM folder")
        if d:
            self.open_path(d)

    def open_file_dialog(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Open DICOMDIR, ZIP or DICOM file", "",
                                           "DICOM (DICOMDIR *.zip *.dcm *.DCM *);;All files (*)")
        if f:
            self.open_path(f)

    def open_path(self, path: str | os.PathLike, wait: bool = False, select: bool = True) -> None:
        """Index a folder/DICOMDIR/ZIP/file off the GUI thread, add it to the browser and show its
        first series. ``wait=True`` indexes synchronously (scripts, tests)."""
        from engine.service import open_path as index_path

        path = str(path)
        self.settings.add_recent(path)
        self._refresh_recent_menu()
        if wait:
            self._on_indexed(path, index_path(path), select)
            return
        self._pending_opens += 1
        self._busy(True, f"Reading {Path(path).name}…")
        self.runner.submit(index_path, path, on_result=lambda r: self._on_indexed(path, r, select),
                           on_error=lambda e: self._on_index_error(path, e))

    def _on_index_error(self, path: str, exc: BaseException) -> None:
        self._pending_opens -= 1
        self._busy(False)
        self.show_message("Could not open", f"{Path(path).name}: {getattr(exc, 'reason', exc)}")

    def _on_indexed(self, path: str, result: IndexResult, select: bool) -> None:
        self._pending_opens = max(0, self._pending_opens - 1)
        self._busy(False)
        self._merge_index(result)
        self.browser.set_index(self.index)
        # thumbnails decode in worker threads: started after the first image is painted, so they
        # do not compete with it for the GIL on a 2-core machine (bench/bench_viewer_start.py)
        later = QTimer(self)              # a child: never fires after the window is gone
        later.setSingleShot(True)
        later.timeout.connect(lambda: self.isVisible() and self.thumbs.request(self.index.all_series()))
        later.timeout.connect(later.deleteLater)
        later.start(250)
        n_series = len(result.all_series())
        msg = f"{Path(path).name}: {n_series} series from {result.files_seen} file(s)"
        if result.problems:
            msg += f"; {len(result.problems)} file(s) skipped (see the Studies panel)"
        self.statusBar().showMessage(msg, 10000)
        self.index_loaded.emit(result)
        if n_series == 0:
            reason = result.problems[0].reason if result.problems else "no DICOM images found"
            self.show_message("Nothing to show", f"No readable DICOM series in {Path(path).name}: {reason}")
            return
        if select:
            # the chest hanging (engine.reading.hanging): frontal radiograph / axial CT first, prior beside it
            self.hanging.hang(result)

    def _merge_index(self, new: IndexResult) -> None:
        """Add a new IndexResult to ``self.index`` (same patient/study/series merged, not duplicated)."""
        idx = self.index
        for p in new.patients:
            old_p = next((q for q in idx.patients if q.patient_id == p.patient_id
                          and q.patient_name == p.patient_name), None)
            if old_p is None:
                idx.patients.append(p)
                continue
            for st in p.studies:
                old_st = next((s for s in old_p.studies if s.study_uid == st.study_uid), None)
                if old_st is None:
                    old_p.studies.append(st)
                    continue
                by_uid = {s.series_uid: s for s in old_st.series}
                for se in st.series:
                    old_se = by_uid.get(se.series_uid)
                    if old_se is None:
                        old_st.series.append(se)
                        continue
                    # more instances of a known series (e.g. a PACS retrieve still arriving)
                    known = {i.sop_instance_uid for i in old_se.instances}
                    extra = [i for i in se.instances if i.sop_instance_uid not in known]
                    if extra:
                        old_se.instances.extend(extra)
                        old_se.instances.sort(key=lambda i: (i.instance_number is None,
                                                             i.instance_number or 0, i.path))
        known = {pr.path for pr in idx.problems}
        idx.problems.extend(pr for pr in new.problems if pr.path not in known)
        idx.files_seen += new.files_seen
        idx.seconds += new.seconds

    def wait_idle(self, msecs: int = 30000) -> None:
        """Block until background loading finished and its results were delivered (tests)."""
        from PySide6.QtCore import QCoreApplication, QElapsedTimer

        t = QElapsedTimer()
        t.start()
        while (self.runner.active() or self._pending_opens) and t.elapsed() < msecs:
            self.runner.wait_done(50)
            QCoreApplication.processEvents()
        QCoreApplication.processEvents()

    # ---------------------------------------------------------------------------------------
    # series display
    def select_series(self, series_uid: str) -> bool:
        """Display a series of ``index``; CT volumes load in the background (MPR when ready)."""
        series = self.index.find_series(series_uid)
        if series is None or not series.instances:
            self.show_message("Series not found", "That series is not in the opened studies.")
            return False
        self.current_series = series
        self.current_volume = None
        self.series_selected.emit(series)
        self.act_mpr.setEnabled(False)
        if self.central.currentWidget() is self.mpr_view:
            self.central.setCurrentWidget(self.viewports)
        self.browser.select(series_uid)
        meta = SeriesMeta(modality=series.modality, series_description=series.series_description,
                          series_number=str(series.series_number or ""))
        try:
            from engine.service import series_meta
            meta = series_meta(series.instances[0].path)
        except Exception as exc:  # noqa: BLE001 - annotations are optional, the image is not
            log.info("header unreadable for the annotations: %s", getattr(exc, "reason", exc))
        self.current_meta = meta
        items, step = series_items(series)
        geo = {i.path: (i.image_position, i.image_orientation) for i in series.instances}
        source = FrameSource(items, reading_step=step, geometry=[geo.get(p, (None, None)) for p, _, _ in items])
        start = len(items) - 1 if step < 0 else 0
        if series.kind == "ct" and len(items) > 1:
            start = len(items) // 2      # the middle of a chest CT shows lung at once
        first, error = None, None
        # the chosen image first, then its neighbours: one broken file must not hide a series
        order = sorted(range(len(items)), key=lambda k: (abs(k - start), k))[:8]
        for k in order:
            try:
                first = source.get(k)
                start = k
                break
            except Exception as exc:  # noqa: BLE001 - LoadError by contract; anything else is shown too
                error = error or exc
        if first is None:
            name = Path(str(getattr(error, "path", "") or items[start][0]).split("::")[-1]).name
            text = f"{name}: {getattr(error, 'reason', error)}"
            # inline in the image area and the status bar: a modal box would block navigation
            self.image_view.clear(f"Could not display this image.\n{text}")
            self.last_message = f"Could not display the image: {text}"
            self.statusBar().showMessage(self.last_message, 15000)
            return False
        if error is not None:
            self.statusBar().showMessage(f"Some images could not be read: {getattr(error, 'reason', error)}", 15000)
        # each series opens at its own default window (or the one chosen on it earlier): a preset
        # pressed on one patient never carries over to the next (viewer.view.image_view.set_stack)
        self.image_view.set_stack(source, meta, index=start)
        self.image_view.setFocus()
        self.setWindowTitle(f"ChestView — {meta.patient_name or series.patient_id} — "
                            f"{series.modality} {meta.series_description or series.series_description}  "
                            f"({RESEARCH_USE})")
        self._tags_timer.start()
        if series.kind == "ct" and len(items) > 2:
            self._load_volume(series)
        self.series_opened.emit(series)
        return True

    def _load_volume(self, series: SeriesRecord) -> None:
        from engine.service import load_volume

        uid = series.series_uid
        self._busy(True, "Loading CT volume…")
        self.runner.submit(load_volume, series, on_result=lambda v: self._on_volume(uid, v),
                           on_error=lambda e: self._on_volume_error(uid, e),
                           on_progress=lambda f, t: self.progress.setValue(int(f * 100)))

    def _on_volume(self, uid: str, volume) -> None:
        self._busy(False)
        if self.current_series is None or self.current_series.series_uid != uid:
            return
        self.current_volume = volume
        iv = self.image_view
        old = iv.current_data()
        pos = old.position if old is not None else None
        template = old
        src = VolumeSource(volume, template)
        if volume.windows:
            src.template.windows = [tuple(w) for w in volume.windows]
        if getattr(volume, "slice_thickness", None) and not self.current_meta.slice_thickness:
            self.current_meta.slice_thickness = volume.slice_thickness
        index = iv.current_slice()
        if pos is not None and len(volume.positions):
            import numpy as np
            index = int(np.argmin(np.abs(np.asarray(volume.positions) - pos)))
        iv.replace_source(src)
        iv.set_slice(index)
        self.act_mpr.setEnabled(True)
        if volume.warnings:
            self.statusBar().showMessage("CT volume: " + "; ".join(volume.warnings[:3]), 15000)
        self.volume_loaded.emit(volume)
        if self.settings.layout_mode() == "mpr":
            self.set_layout("mpr")

    def _on_volume_error(self, uid: str, exc: BaseException) -> None:
        self._busy(False)
        if self.current_series is not None and self.current_series.series_uid == uid:
            self.statusBar().showMessage(f"CT volume not available (MPR off): {getattr(exc, 'reason', exc)}", 15000)

    def _step_series(self, step: int) -> None:
        uids = self.browser.series_uids()
        if not uids:
            return
        cur = self.current_series.series_uid if self.current_series else uids[0]
        i = uids.index(cur) if cur in uids else 0
        self.select_series(uids[(i + step) % len(uids)])

    # ---------------------------------------------------------------------------------------
    # view state
    def set_layout(self, mode: str) -> None:
        """'stack' (single view) or 'mpr' (needs a loaded CT volume)."""
        if mode == "mpr" and self.current_volume is not None:
            vol = self.current_volume
            z = self.image_view.current_slice()
            _, ny, nx = vol.hu.shape
            self.mpr_view.set_volume(vol, (z, ny // 2, nx // 2), self.image_view.window())
            self.central.setCurrentWidget(self.mpr_view)
            self.mpr_view.setFocus()
            self.act_mpr.setChecked(True)
        else:
            mode = "stack"
            self.central.setCurrentWidget(self.viewports)
            self.image_view.setFocus()
            self.act_mpr.setChecked(False)
        self.settings.set_layout_mode(mode)

    def _navigation_target(self):
        """The view that slice keys move: the MPR when shown, else the active viewport."""
        if self.central.currentWidget() is self.mpr_view:
            return self.mpr_view
        vp = getattr(self, "viewports", None)
        return vp.active_view() if vp is not None else self.image_view

    def layout_mode(self) -> str:
        return "mpr" if self.central.currentWidget() is self.mpr_view else "stack"

    def _toggle_mpr(self) -> None:
        self.set_layout("stack" if self.layout_mode() == "mpr" else "mpr")

    def _on_mpr_position(self, z: int, y: int, x: int) -> None:
        if self.image_view.current_slice() != z:
            self.image_view.set_slice(z)

    def _sync_window_from_mpr(self, c: float, w: float) -> None:
        if self.image_view.window() != (c, w):
            self.image_view.set_window(c, w)

    def _on_slice_changed(self, i: int) -> None:
        if self.tags_dock.isVisible():
            self._tags_timer.start()

    def apply_preset(self, n: int) -> None:
        if self.layout_mode() == "mpr":
            if self.image_view.apply_preset(n):
                self.mpr_view.set_window(*self.image_view.window())
        else:
            self.viewports.active_view().apply_preset(n)

    def _remember_window(self, c: float, w: float) -> None:
        mod = self.image_view.modality()
        if mod:
            self.settings.set_last_window(mod, c, w)

    def set_tool(self, tool: str) -> None:
        self.viewports.set_tool(tool)
        a = self.tool_actions.get(tool)
        if a is not None and not a.isChecked():
            a.setChecked(True)
        self.statusBar().showMessage({"angle": "Angle: click first arm end, vertex, second arm end",
                                      "distance": "Distance: drag from start to end",
                                      "ellipse": "Ellipse ROI: drag a box", "rect": "Rectangle ROI: drag a box",
                                      "wl": "Window/level: drag (right drag works with every tool)",
                                      "pan": "Pan: drag"}.get(tool, ""), 6000)

    def set_fps(self, fps: float) -> None:
        self.image_view.set_fps(fps)
        self.settings.set_cine_fps(fps)
        a = self.fps_actions.get(int(round(fps)))
        if a is not None:
            a.setChecked(True)

    def _toggle_annotations(self) -> None:
        on = self.act_annot.isChecked()
        self.image_view.set_annotations_visible(on)
        self.settings.set_annotations_visible(on)

    def _toggle_tags(self) -> None:
        if self.tags_dock.isVisible():
            self.tags_dock.hide()
        else:
            self.tags_dock.show()             # visibilityChanged reads the header (_update_tags)
            self.tags_dock.raise_()
            self.tag_browser.search.setFocus()

    def _update_tags(self) -> None:
        if not self.tags_dock.isVisible():
            return            # read when the dock is shown (visibilityChanged), not on every slice
        d = self.image_view.current_data()
        if d is None or self.current_series is None:
            return
        path = d.path
        if not path and self.current_volume is not None:
            i = self.image_view.current_slice()
            paths = self.current_volume.instance_paths
            path = paths[i] if i < len(paths) else ""
        if not path:
            return
        try:
            from engine.service import header_tree
            tree = header_tree(path)
        except Exception as exc:  # noqa: BLE001 - shown, never raised
            self.tag_browser.set_tree(None, f"Cannot read header: {getattr(exc, 'reason', exc)}")
            return
        self.tag_browser.set_tree(tree, Path(path.split("::")[-1]).name, key=path)

    # ---------------------------------------------------------------------------------------
    # optional modules, imported lazily (see the actions in _build_actions)
    def _call_optional(self, module: str, func: str) -> None:
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            self.show_message("Not available", f"This feature is not installed ({module}.{func}): {exc}")
            return
        fn(self)

    def open_worklist(self) -> None:
        self._call_optional("viewer.browse.worklist", "open_worklist")

    def open_query_retrieve(self) -> None:
        self._call_optional("viewer.pacs.pacs_dialog", "open_query_retrieve")

    def open_network_settings(self) -> None:
        self._call_optional("viewer.pacs.pacs_dialog", "open_network_settings")

    # ---------------------------------------------------------------------------------------
    # dialogs and messages
    def show_message(self, title: str, text: str) -> None:
        """Non-blocking message box (also kept in ``last_message`` for tests)."""
        self.last_message = f"{title}: {text}"
        self.statusBar().showMessage(self.last_message, 15000)
        if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
            return
        box = QMessageBox(QMessageBox.Icon.Information, title, text, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.setWindowModality(Qt.WindowModality.NonModal)   # open() would be window-modal: reading goes on
        box.show()

    def shortcut_rows(self) -> list[tuple[str, str]]:
        rows = []
        for a in self.actions():
            sc = a.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
            if sc:
                rows.append((sc, a.text().replace("&", "")))
        rows += [(k, v) for k, v in MOUSE_HELP]
        return rows

    def show_shortcuts(self) -> QDialog:
        dlg = QDialog(self)
        dlg.setWindowTitle("Keyboard and mouse shortcuts")
        rows = self.shortcut_rows()
        table = QTableWidget(len(rows), 2)
        table.setHorizontalHeaderLabels(["Key", "Action"])
        for r, (k, v) in enumerate(rows):
            table.setItem(r, 0, QTableWidgetItem(k))
            table.setItem(r, 1, QTableWidgetItem(v))
        table.resizeColumnsToContents()
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()
        bb = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        bb.rejected.connect(dlg.reject)
        lay = QVBoxLayout(dlg)
        lay.addWidget(table)
        lay.addWidget(bb)
        dlg.resize(560, 640)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dlg.open()
        self.shortcuts_dialog = dlg
        return dlg

    def show_about(self) -> None:
        from engine import __version__
        self.show_message("About ChestView", f"ChestView {__version__}\nDICOM chest X-ray and CT viewer with "
                          f"AI assistance.\n{RESEARCH_USE}.")

    def save_screenshot_dialog(self) -> None:
        f, _ = QFileDialog.getSaveFileName(self, "Save screenshot", "chestview.png", "PNG (*.png)")
        if f:
            self.central.currentWidget().grab().save(f)

    def _busy(self, on: bool, text: str = "") -> None:
        if on:
            self.progress.setRange(0, 0)
            self.progress.show()
            if text:
                self.statusBar().showMessage(text)
        else:
            self.progress.setRange(0, 100)
            self.progress.hide()
            self.statusBar().clearMessage()

    # ---------------------------------------------------------------------------------------
    # drag and drop, layout persistence
    def dragEnterEvent(self, ev):  # noqa: N802
        if ev.mimeData().hasUrls() and any(u.isLocalFile() for u in ev.mimeData().urls()):
            ev.acceptProposedAction()

    def dropEvent(self, ev):  # noqa: N802
        paths = [u.toLocalFile() for u in ev.mimeData().urls() if u.isLocalFile()]
        for i, p in enumerate(paths):
            self.open_path(p, select=(i == 0))
        ev.acceptProposedAction()

    def _restore_layout(self) -> None:
        g, s = self.settings.window_state()
        if g is not None:
            self.restoreGeometry(g)
        if s is not None:
            self.restoreState(s)

    def closeEvent(self, ev):  # noqa: N802
        self.settings.save_window_state(self.saveGeometry(), self.saveState())
        self.settings.sync()
        self.image_view.stop_cine()
        self.thumbs.cancel()
        self.runner.cancel_all()
        if getattr(self, "trend", None) is not None:
            self.trend.shutdown()
        self._drain_workers()
        super().closeEvent(ev)

    def _drain_workers(self, msecs: int = 10000) -> None:
        """Stop every worker pool of this window so its deletion never waits with the GIL held
        (viewer.qt_workers.drain_pools)."""
        from viewer.qt_workers import drain_pools

        if getattr(self, "ai", None) is not None:
            self.ai.shutdown()
        drain_pools(self, msecs)
