"""Viewport layouts: 1x1, 1x2, 2x1 and 2x2 grids of ``ImageView``s with an active viewport,
series dropped from the study browser, and linked scroll / zoom / window.

Linking. Two viewports are linked when sync is on and either their series share a Frame of
Reference UID (PS3.3 C.7.4.1: same patient coordinate system, so positions compare directly) or
the hanging protocol linked them (a prior beside the current study, engine.reading.hanging). Scrolling is
linked by anatomical position: the slice whose position along the normal (Image Position
(Patient), PS3.3 C.7.6.2.1.1) is nearest, never the same index. Studies on different days have
different table positions, so each viewport keeps an offset in mm; a link made between different
Frames of Reference aligns the slices shown at that moment, and scrolling with Shift held moves one
viewport alone and re-aligns the link there (as OsiriX/Horos do). Zoom is linked in screen pixels
per millimetre; window/level between viewports of the same modality.

Viewport 0 is the main window's ``image_view``: the current series, the AI overlay and the
study browser's selection stay there. Other viewports load in worker threads (decode never runs
on the GUI thread) through ``prepare_stack``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QFrame, QGridLayout, QLabel, QVBoxLayout, QWidget

from engine.dicom.records import SeriesRecord
from engine.reading.hanging import nearest_position_index
from engine.dicom.series_meta import SeriesMeta, format_date
from viewer.view.image_view import FrameSource, ImageView, SliceSource, VolumeSource, slice_from_frame

SERIES_MIME = "application/x-chestview-series-uid"   # a series dragged from the study browser onto a viewport

log = logging.getLogger(__name__)

LAYOUTS: dict[str, tuple[int, int]] = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
ACTIVE_BORDER = "#e0a030"
IDLE_BORDER = "#303030"


# --------------------------------------------------------------------------------------------
# loading a series for a viewport (worker thread)
@dataclass
class PreparedStack:
    """Everything a viewport needs, built off the GUI thread."""

    series: SeriesRecord
    source: SliceSource
    meta: SeriesMeta
    index: int
    frame_of_reference: str = ""


def prepare_stack(series: SeriesRecord) -> PreparedStack:
    """Read the header, decode the first image to show and, for a CT series, the whole volume
    (engine.service, the main window's own CT path) so that linked scrolling never decodes on
    the GUI thread. Worker thread only; raises LoadError for unreadable series."""
    from engine.service import load_frame, load_volume, series_meta
    from viewer.view.stack_order import series_items

    # every read goes through the sandboxed decoder, as the main window's own (engine.service)
    meta = series_meta(series.instances[0].path)
    for_uid = meta.frame_of_reference_uid
    items, step = series_items(series)
    if series.kind == "ct" and len(items) > 2:
        volume = load_volume(series)
        template = slice_from_frame(load_frame(items[len(items) // 2][0], items[len(items) // 2][1]))
        src = VolumeSource(volume, template)
        if volume.windows:
            src.template.windows = [tuple(w) for w in volume.windows]
        index = len(src) // 2
        src.get(index)
        return PreparedStack(series, src, meta, index, for_uid)
    source = FrameSource(items, reading_step=step)
    start = len(items) - 1 if step < 0 else 0
    source.get(start)          # decoded here, cached for the GUI thread
    return PreparedStack(series, source, meta, start, for_uid)


# --------------------------------------------------------------------------------------------
class Viewport(QFrame):
    """One grid cell: a caption and an ImageView inside a border that marks the active viewport."""

    def __init__(self, view: ImageView, index: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.view = view
        self.index = index
        self.series: SeriesRecord | None = None
        self.frame_of_reference = ""
        self.z_offset = 0.0              # mm subtracted from positions to get the link's common z
        self.caption = QLabel("")
        self.caption.setObjectName("viewportCaption")
        self.caption.setStyleSheet("QLabel#viewportCaption { color: #d0d0d0; background: #1c1c1c; "
                                   "padding: 1px 4px; }")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(0)
        lay.addWidget(self.caption)
        lay.addWidget(view, 1)
        self.set_active(False)

    def set_active(self, on: bool) -> None:
        self.active = bool(on)
        self.setStyleSheet(f"Viewport {{ border: 2px solid {ACTIVE_BORDER if on else IDLE_BORDER}; "
                           "background: black; }")

    def set_caption(self, text: str) -> None:
        self.caption.setText(text)
        self.caption.setToolTip(text)

    def positions(self) -> list[float | None]:
        src = self.view.source
        if src is None:
            return []
        cached = getattr(self, "_positions", None)
        if cached is not None and cached[0] is src:
            return cached[1]
        pos = [src.position(k) for k in range(len(src))]
        self._positions = (src, pos)
        return pos

    def current_position(self) -> float | None:
        d = self.view.current_data()
        return None if d is None else d.position


class ActiveView:
    """Stands for "the active viewport's ImageView" where the main window binds its actions once:
    methods are looked up at call time, so Fit, Invert, Rotate, Del etc. act on the viewport the
    user last clicked. Plain values (flags, numbers) are read from the active view at once."""

    _PLAIN = (bool, int, float, str, bytes, tuple, list, dict, type(None))

    def __init__(self, resolve: Callable[[], Any], path: tuple[str, ...] = ()):
        object.__setattr__(self, "_resolve", resolve)
        object.__setattr__(self, "_path", path)

    def _target(self) -> Any:
        obj = self._resolve()
        for name in self._path:
            obj = getattr(obj, name)
        return obj

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target(), name)
        if isinstance(value, self._PLAIN):
            return value
        path = self._path + (name,)
        if callable(value):
            resolve = self._resolve

            def call(*args, **kwargs):
                obj = resolve()
                for n in path:
                    obj = getattr(obj, n)
                return obj(*args, **kwargs)
            return call
        return ActiveView(self._resolve, path)


class ViewportGrid(QWidget):
    """Up to four viewports in a grid; ``views[0]`` is the primary view passed in."""

    active_changed = Signal(int)
    series_dropped = Signal(int, str)      # viewport index, series UID
    layout_changed = Signal(str)           # "1x1" | "1x2" | "2x1" | "2x2"
    sync_changed = Signal(bool)

    def __init__(self, primary: ImageView, runner=None, parent: QWidget | None = None):
        super().__init__(parent)
        self.runner = runner
        self.viewports: list[Viewport] = []
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setSpacing(2)
        self._active = 0
        self._shape = (1, 1)
        self.sync_enabled = True
        self._explicit_links: set[int] = set()
        self._syncing = False
        self._pending: dict[int, int] = {}         # viewport -> request number (newest wins)
        self._requests = 0
        self.last_error = ""
        self._add_viewport(primary)
        self.set_layout("1x1")

    # -- construction --------------------------------------------------------------------
    def _add_viewport(self, view: ImageView | None = None) -> Viewport:
        k = len(self.viewports)
        if view is None:
            view = ImageView()
            primary = self.viewports[0].view
            view.set_annotations_visible(primary.annotations_visible())
            view.set_tool(primary.tool)
        vp = Viewport(view, k)
        self.viewports.append(vp)
        for w in (view, view.graphics, view.graphics.viewport()):
            w.installEventFilter(self)
        view.graphics.setAcceptDrops(True)
        view.graphics.viewport().setAcceptDrops(True)
        view.slice_changed.connect(lambda i, k=k: self._on_slice(k))
        view.view_changed.connect(lambda k=k: self._on_view(k))
        view.window_changed.connect(lambda c, w, k=k: self._on_window(k, c, w))
        return vp

    def _ensure(self, n: int) -> None:
        while len(self.viewports) < n:
            self._add_viewport()

    # -- layout --------------------------------------------------------------------------
    def set_layout(self, name: str) -> None:
        """'1x1' | '1x2' | '2x1' | '2x2' (rows x columns)."""
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}")
        rows, cols = LAYOUTS[name]
        self._ensure(rows * cols)
        for vp in self.viewports:
            self._grid.removeWidget(vp)
        for k, vp in enumerate(self.viewports):
            if k < rows * cols:
                self._grid.addWidget(vp, k // cols, k % cols)
                vp.show()
            else:
                vp.hide()
        for r in range(2):
            self._grid.setRowStretch(r, 1 if r < rows else 0)
        for c in range(2):
            self._grid.setColumnStretch(c, 1 if c < cols else 0)
        self._shape = (rows, cols)
        if self._active >= rows * cols:
            self.set_active(0)
        for vp in self.visible_viewports():
            vp.caption.setVisible(rows * cols > 1)
        self.layout_changed.emit(name)

    def layout_name(self) -> str:
        return f"{self._shape[0]}x{self._shape[1]}"

    def visible_viewports(self) -> list[Viewport]:
        n = self._shape[0] * self._shape[1]
        return self.viewports[:n]

    # -- active viewport -----------------------------------------------------------------
    def set_active(self, k: int) -> None:
        k = int(min(max(k, 0), len(self.viewports) - 1))
        changed = k != self._active
        self._active = k
        for vp in self.viewports:
            vp.set_active(vp.index == k and len(self.visible_viewports()) > 1)
        if changed:
            self.active_changed.emit(k)

    def active_index(self) -> int:
        return self._active

    def active_view(self) -> ImageView:
        return self.viewports[self._active].view

    def active_proxy(self) -> ActiveView:
        return ActiveView(self.active_view)

    def views(self) -> list[ImageView]:
        return [vp.view for vp in self.viewports]

    def set_tool(self, tool: str) -> None:
        for vp in self.viewports:
            vp.view.set_tool(tool)

    def set_annotations_visible(self, on: bool) -> None:
        for vp in self.viewports:
            vp.view.set_annotations_visible(on)

    # -- series per viewport -------------------------------------------------------------
    def set_viewport_series(self, k: int, series: SeriesRecord | None, caption: str = "",
                            frame_of_reference: str = "") -> None:
        """Record what viewport ``k`` shows (the primary is filled by the main window)."""
        vp = self.viewports[k]
        vp.series = series
        vp.frame_of_reference = frame_of_reference
        vp.z_offset = 0.0
        vp._positions = None
        vp.set_caption(caption)
        if k in self._explicit_links:
            self._align(k)

    def load_series(self, k: int, series: SeriesRecord, caption: str = "",
                    on_done: Callable[[bool], None] | None = None) -> None:
        """Show ``series`` in viewport ``k`` (> 0), prepared in a worker; a newer request for the
        same viewport supersedes an older one still loading."""
        if k <= 0:
            raise ValueError("viewport 0 shows the main window's current series (select_series)")
        self._ensure(k + 1)
        self._requests += 1
        req = self._pending[k] = self._requests
        self.viewports[k].set_caption(f"Loading {series.modality} {series.series_description}…")

        def done(prep: PreparedStack) -> None:
            if self._pending.get(k) != req:
                return
            self._pending.pop(k, None)
            self._show_prepared(k, prep, caption)
            if on_done:
                on_done(True)

        def failed(exc: BaseException) -> None:
            if self._pending.get(k) != req:
                return
            self._pending.pop(k, None)
            self.last_error = f"{getattr(exc, 'reason', exc)}"
            self.viewports[k].set_caption(f"Could not load this series: {self.last_error}")
            if on_done:
                on_done(False)

        if self.runner is None:
            try:
                done(prepare_stack(series))
            except Exception as exc:  # noqa: BLE001 - LoadError by contract; shown in the caption
                failed(exc)
            return
        self.runner.submit(prepare_stack, series, on_result=done, on_error=failed)

    def loading(self) -> bool:
        return bool(self._pending)

    def _show_prepared(self, k: int, prep: PreparedStack, caption: str) -> None:
        vp = self.viewports[k]
        window = None
        ref = self._link_reference(k)
        if ref is not None and ref.view.modality() == (prep.meta.modality or "") and ref.view.current_data():
            window = ref.view.window()
        vp.view.set_stack(prep.source, prep.meta, index=prep.index, window=window)
        self.set_viewport_series(k, prep.series, caption or _caption(prep.series, prep.meta),
                                 prep.frame_of_reference)
        if ref is not None:
            self._follow(ref, vp)

    # -- linking -------------------------------------------------------------------------
    def set_sync(self, on: bool) -> None:
        self.sync_enabled = bool(on)
        self.sync_changed.emit(self.sync_enabled)

    def link(self, indices: list[int]) -> None:
        """Link these viewports regardless of Frame of Reference (the hanging's prior link)."""
        self._explicit_links = set(indices)
        for k in indices:
            if k < len(self.viewports) and self.viewports[k].series is not None:
                self._align(k)

    def unlink(self) -> None:
        self._explicit_links = set()

    def linked(self, a: int, b: int) -> bool:
        """True when scroll/zoom/window of viewport ``a`` move viewport ``b`` (both on screen)."""
        if not self.sync_enabled or a == b or max(a, b) >= self._count():
            return False
        va, vb = self.viewports[a], self.viewports[b]
        if va.series is None or vb.series is None:
            return False
        if a in self._explicit_links and b in self._explicit_links:
            return True
        return bool(va.frame_of_reference) and va.frame_of_reference == vb.frame_of_reference

    def _count(self) -> int:
        return self._shape[0] * self._shape[1]

    def _partners(self, k: int) -> list[Viewport]:
        return [vp for vp in self.visible_viewports() if self.linked(k, vp.index)]

    def _link_reference(self, k: int) -> Viewport | None:
        parts = self._partners(k)
        return parts[0] if parts else None

    def _align(self, k: int, keep_current: bool = False) -> None:
        """Set viewport k's link offset. Same Frame of Reference: none. Otherwise (a prior) patient
        z is kept as it is when the two scan ranges overlap by at least half of the shorter one
        (same scanner habits, like OsiriX's absolute-position sync); else the ranges' centres are
        aligned. ``keep_current`` (Shift+scroll) aligns the slices shown now instead."""
        vp = self.viewports[k]
        ref = self._link_reference(k)
        pos, rpos = vp.current_position(), (ref.current_position() if ref else None)
        if ref is None or pos is None or rpos is None:
            return
        if bool(vp.frame_of_reference) and vp.frame_of_reference == ref.frame_of_reference:
            vp.z_offset = ref.z_offset
            return
        if keep_current:
            vp.z_offset = pos - (rpos - ref.z_offset)
            return
        a = [p for p in vp.positions() if p is not None]
        b = [p - ref.z_offset for p in ref.positions() if p is not None]
        if not a or not b:
            vp.z_offset = pos - (rpos - ref.z_offset)
            return
        overlap = min(max(a), max(b)) - max(min(a), min(b))
        shorter = min(max(a) - min(a), max(b) - min(b))
        if shorter > 0 and overlap >= 0.5 * shorter:
            vp.z_offset = 0.0
        else:
            vp.z_offset = (max(a) + min(a)) / 2 - (max(b) + min(b)) / 2

    def _follow(self, src: Viewport, dst: Viewport) -> None:
        """Move ``dst`` to the slice nearest ``src``'s position (through the link offsets)."""
        pos = src.current_position()
        if pos is None or dst.view.n_slices() <= 1:
            return
        k = nearest_position_index(dst.positions(), pos - src.z_offset + dst.z_offset)
        if k is not None and k != dst.view.current_slice():
            dst.view.set_slice(k)

    def _on_slice(self, k: int) -> None:
        if self._syncing or k >= len(self.viewports):
            return
        if QApplication.keyboardModifiers() & Qt.KeyboardModifier.ShiftModifier:
            self._align(k, keep_current=True)   # Shift: moves alone; the link keeps the new offset
            return
        self._syncing = True
        try:
            src = self.viewports[k]
            for dst in self._partners(k):
                self._follow(src, dst)
        finally:
            self._syncing = False

    def _on_view(self, k: int) -> None:
        if self._syncing or k >= len(self.viewports):
            return
        src = self.viewports[k].view
        z = src.zoom()
        if not z:
            return
        sp = src.pixel_spacing()
        self._syncing = True
        try:
            for dst in self._partners(k):
                dsp = dst.view.pixel_spacing()
                target = z * (dsp[0] / sp[0]) if sp and dsp and sp[0] > 0 else z
                cur = dst.view.zoom()
                if cur and abs(cur - target) / target > 0.01:
                    dst.view.set_zoom(target)
        finally:
            self._syncing = False

    def _on_window(self, k: int, c: float, w: float) -> None:
        if self._syncing or k >= len(self.viewports):
            return
        src = self.viewports[k].view
        self._syncing = True
        try:
            for dst in self._partners(k):
                d = dst.view.current_data()
                if d is not None and not d.is_color and dst.view.modality() == src.modality() \
                        and dst.view.window() != (c, w):
                    dst.view.set_window(c, w)
        finally:
            self._syncing = False

    # -- events: activation and drops ----------------------------------------------------
    def _viewport_of(self, obj: QObject) -> Viewport | None:
        for vp in self.viewports:
            v = vp.view
            if obj is v or obj is v.graphics or obj is v.graphics.viewport():
                return vp
        return None

    def eventFilter(self, obj: QObject, ev: QEvent) -> bool:  # noqa: N802 - Qt API
        t = ev.type()
        if t in (QEvent.Type.MouseButtonPress, QEvent.Type.FocusIn):
            vp = self._viewport_of(obj)
            if vp is not None and vp.index != self._active:
                self.set_active(vp.index)
        elif t in (QEvent.Type.DragEnter, QEvent.Type.DragMove):
            if isinstance(ev, (QDragEnterEvent,)) or t == QEvent.Type.DragMove:
                if ev.mimeData().hasFormat(SERIES_MIME):
                    ev.acceptProposedAction()
                    return True
        elif t == QEvent.Type.Drop and isinstance(ev, QDropEvent):
            vp = self._viewport_of(obj)
            md = ev.mimeData()
            if vp is not None and md.hasFormat(SERIES_MIME):
                uid = bytes(md.data(SERIES_MIME).data()).decode("utf-8")
                ev.acceptProposedAction()
                self.set_active(vp.index)
                self.series_dropped.emit(vp.index, uid)
                return True
        return super().eventFilter(obj, ev)


def _caption(series: SeriesRecord, meta: SeriesMeta) -> str:
    date = format_date(meta.study_date) if meta.study_date else ""
    return "  ·  ".join(x for x in (date, f"{series.modality} {series.series_description}".strip()) if x)


# --------------------------------------------------------------------------------------------
class HangingController(QObject):
    """Layout actions, drops from the study browser and the default chest hanging of one
    MainWindow (which owns the ``viewports`` grid; viewport 0 is its ``image_view``)."""

    def __init__(self, main_window: Any):
        super().__init__(main_window)
        self.mw = main_window
        self.grid: ViewportGrid = main_window.viewports
        self.plan = None
        self._store_checked: set[str] = set()
        self._build_actions()
        main_window.series_opened.connect(self._on_primary_opened)
        self.grid.series_dropped.connect(self.drop_series)
        self.grid.layout_changed.connect(self._sync_actions)
        if hasattr(main_window, "act_annot"):
            main_window.act_annot.toggled.connect(self.grid.set_annotations_visible)

    # -- actions -------------------------------------------------------------------------
    def _build_actions(self) -> None:
        from PySide6.QtGui import QActionGroup

        mw = self.mw
        group = QActionGroup(mw)
        self.layout_actions = {}
        for name, key in (("1x1", "Alt+1"), ("1x2", "Alt+2"), ("2x1", "Alt+3"), ("2x2", "Alt+4")):
            r, c = LAYOUTS[name]
            a = mw._act(f"Layout {r}×{c}", lambda checked=False, n=name: self.grid.set_layout(n), key,
                        f"layout-{name}", checkable=True,
                        tip=f"{r} row{'s' if r > 1 else ''} × {c} column{'s' if c > 1 else ''} of viewports")
            group.addAction(a)
            self.layout_actions[name] = a
        self.layout_actions["1x1"].setChecked(True)
        self.act_sync = mw._act("&Link viewports (scroll by position, zoom, W/L)",
                                lambda checked=False: self.grid.set_sync(self.act_sync.isChecked()), "L",
                                "link", checkable=True,
                                tip="Link viewports of the same frame of reference and a hung prior; "
                                    "Shift+scroll moves one alone")
        self.act_sync.setChecked(self.grid.sync_enabled)
        menu = next((a.menu() for a in mw.menuBar().actions() if a.text().replace("&", "") == "View"), None)
        if menu is not None:
            sub = menu.addMenu("&Layout")
            sub.addActions(list(self.layout_actions.values()))
            sub.addSeparator()
            sub.addAction(self.act_sync)
        tb = getattr(mw, "toolbar", None)
        if tb is not None:
            tb.addSeparator()
            tb.addActions(list(self.layout_actions.values()) + [self.act_sync])

    def _sync_actions(self, name: str) -> None:
        a = self.layout_actions.get(name)
        if a is not None and not a.isChecked():
            a.setChecked(True)

    # -- drops and the primary viewport --------------------------------------------------
    def drop_series(self, k: int, series_uid: str) -> bool:
        """A series dropped on viewport ``k``: 0 becomes the current series (AI, browser), other
        viewports load it beside."""
        series = self.mw.index.find_series(series_uid)
        if series is None:
            self.mw.show_message("Series not found", "That series is not in the opened studies.")
            return False
        if k == 0:
            return bool(self.mw.select_series(series_uid))
        self.grid.load_series(k, series, caption=self._caption(series, k))
        return True

    def _caption(self, series: SeriesRecord, k: int) -> str:
        from engine.reading.hanging import study_datetime_key

        study = self.mw.index.study_of(series)
        date = format_date(study.study_date) if study is not None else ""
        what = f"{series.modality} {series.series_description}".strip()
        role = ""
        cur = self.grid.viewports[0].series
        if cur is not None and study is not None and k > 0:
            cst = self.mw.index.study_of(cur)
            if cst is not None and cst.study_uid != study.study_uid:
                role = "PRIOR" if study_datetime_key(study) < study_datetime_key(cst) else "LATER"
        elif k == 0 and len(self.grid.visible_viewports()) > 1:
            role = "CURRENT"
        return "  ·  ".join(x for x in (role, date, what) if x)

    def _on_primary_opened(self, series: SeriesRecord) -> None:
        grid = self.grid
        # another patient's images never stay beside the current one
        for vp in grid.viewports[1:]:
            if vp.series is not None and vp.series.patient_id != series.patient_id:
                vp.view.clear()
                grid.set_viewport_series(vp.index, None, "")
        grid.set_viewport_series(0, series, self._caption(series, 0))
        uid = series.series_uid

        def got_for(for_uid: str) -> None:
            vp0 = grid.viewports[0]
            if vp0.series is not None and vp0.series.series_uid == uid:
                vp0.frame_of_reference = for_uid
                for k in grid._explicit_links - {0}:
                    grid._align(k)

        runner = getattr(self.mw, "runner", None)
        if runner is not None and series.instances:
            runner.submit(_frame_of_reference, series.instances[0].path, on_result=got_for,
                          on_error=lambda e: None)

    # -- the default hanging -------------------------------------------------------------
    def hang(self, result) -> bool:
        """Hang the newest study of ``result`` (an IndexResult just opened): its best series first,
        the patient's most recent prior of the same modality beside it (engine.reading.hanging)."""
        from engine.reading.hanging import default_hanging, rank_series, series_class, study_datetime_key

        index = self.mw.index
        # the merged index's record: it holds series of this study opened earlier too
        studies = [_find_study(index, st.study_uid) or st for p in result.patients for st in p.studies]
        studies.sort(key=study_datetime_key, reverse=True)
        for st in studies:
            plan = default_hanging(index, st)
            order = list(plan.series_uids[:1]) + [se.series_uid for se in rank_series(st.series)
                                                  if series_class(se) < 5 and se.series_uid not in plan.series_uids[:1]]
            for uid in order[:3]:
                if self.mw.select_series(uid):
                    self._apply(plan, uid, st)
                    return True
        return False

    def _apply(self, plan, shown_uid: str, study) -> None:
        self.plan = plan
        first = bool(plan.series_uids) and shown_uid == plan.series_uids[0]
        if first and plan.window is not None:
            self.mw.image_view.set_window(*plan.window)
        if first and len(plan.series_uids) > 1:
            self.show_prior(plan)
            return
        for vp in self.grid.viewports[1:]:
            vp.view.clear()
            self.grid.set_viewport_series(vp.index, None, "")
        self.grid.unlink()
        self.grid.set_layout("1x1")
        self._look_in_store(study)

    def show_prior(self, plan) -> None:
        series = self.mw.index.find_series(plan.series_uids[1])
        if series is None:
            return
        self.grid.set_layout(f"{plan.rows}x{plan.cols}" if f"{plan.rows}x{plan.cols}" in LAYOUTS else "1x2")
        if plan.link_position:
            self.grid.link([0, 1])
        else:
            self.grid.unlink()
        self.grid.set_viewport_series(0, self.grid.viewports[0].series,
                                      self._caption(self.grid.viewports[0].series, 0))

        def loaded(ok: bool) -> None:
            if ok and plan.window is not None and plan.link_position:
                self.grid.viewports[1].view.set_window(*plan.window)
            self.mw.statusBar().showMessage(f"Hanging: {plan.reason}", 8000)

        self.grid.load_series(1, series, caption=self._caption(series, 1), on_done=loaded)

    def _look_in_store(self, study) -> None:
        """No prior among the opened studies: index the local store (PACS retrievals) in a worker
        and hang the patient's most recent prior from there."""
        from engine.paths import store_dir

        pid = study.patient_id
        runner = getattr(self.mw, "runner", None)
        if runner is None or not pid or pid.startswith("(no") or pid in self._store_checked:
            return
        self._store_checked.add(pid)
        try:
            store = store_dir()
        except OSError:
            return
        if not any(store.iterdir()):
            return

        def got(res) -> None:
            from engine.dicom.records import IndexResult
            from engine.reading.hanging import default_hanging

            res.patients = [p for p in res.patients if p.patient_id == pid]
            if not res.patients:
                return
            self.mw._merge_index(IndexResult(patients=res.patients))
            self.mw.browser.set_index(self.mw.index)
            cur = self.grid.viewports[0].series
            st = _find_study(self.mw.index, study.study_uid)
            if cur is None or st is None or cur.study_uid != study.study_uid:
                return
            plan = default_hanging(self.mw.index, st)
            if len(plan.series_uids) > 1 and plan.series_uids[0] == cur.series_uid:
                self.plan = plan
                self.show_prior(plan)

        from engine.service import open_path
        runner.submit(open_path, str(store), on_result=got, on_error=lambda e: None)


def _find_study(index, study_uid: str):
    for p in index.patients:
        for st in p.studies:
            if st.study_uid == study_uid:
                return st
    return None


def _frame_of_reference(path: str) -> str:
    """Frame of Reference UID (0020,0052) of one file (worker thread; sandboxed read)."""
    from engine.service import series_meta

    return series_meta(path).frame_of_reference_uid
