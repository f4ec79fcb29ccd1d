"""The central 2-D image view: one series as a stack of slices, displayed through the DICOM
VOI pipeline (PS3.3 C.11.2: Modality LUT -> VOI LUT -> Presentation (MONOCHROME1 inverts)).

Display speed: the float32/int16 slice values go to pyqtgraph with ``levels`` equal to the DICOM
LINEAR window limits (c - 0.5 -/+ (w - 1)/2, PS3.3 C.11.2.1.2.1) and a 256-entry grey LUT
(reversed for MONOCHROME1 / invert), so changing W/L or slice never builds an intermediate array;
SIGMOID VOI functions go through ``engine.dicom.display.apply_voi`` instead.

Geometry: the image item and the measurements live in ``content`` (a child group of the ViewBox)
in image pixel coordinates (x = column, y = row). ``content``'s transform applies the pixel aspect
ratio (non-square pixels), flips and 90-degree rotations. Overlays have two options:
``add_overlay(item)`` puts an item in image pixel coordinates inside ``content`` (it then follows
everything by itself); items added with plain ``view_box.addItem`` live in view coordinates and can
map with ``image_item.itemTransform(view_box.childGroup)``, re-read whenever
``image_item.sigImageChanged`` fires (it is also emitted after every rotate/flip/aspect change).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PySide6.QtCore import QEvent, QObject, QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QPainter, QTransform
from PySide6.QtWidgets import (QAbstractItemView, QAbstractSpinBox, QApplication, QComboBox, QLineEdit,
                               QPlainTextEdit, QStackedLayout, QTextEdit, QWidget)

from viewer.qt_startup import preload_display_stack, protect_singletons

protect_singletons()   # PySide6 6.12 / CPython 3.11 refcount bug, see viewer.app
preload_display_stack()   # pyqtgraph without its CUDA probe (start-up time, see viewer.app)

import pyqtgraph as pg  # noqa: E402 - after preload_display_stack

from engine.dicom.series_meta import SeriesMeta  # noqa: E402
from viewer.view.annotations import CornerOverlay, corner_texts, edge_letters  # noqa: E402
from viewer.view.measurements import MeasurementLayer  # noqa: E402
from viewer.view.heatmap_overlay import OverlayPlaneLayer  # noqa: E402

pg.setConfigOptions(imageAxisOrder="row-major", antialias=True)

CT_PRESETS: list[tuple[str, float, float]] = [
    ("Lung", -600.0, 1500.0), ("Mediastinum", 40.0, 400.0), ("Bone", 400.0, 1800.0)]
GRAY_LUT = np.arange(256, dtype=np.uint8)
INVERSE_LUT = GRAY_LUT[::-1].copy()


# --------------------------------------------------------------------------------------------
# slice data and sources
@dataclass
class SliceData:
    """One displayable 2-D image and the header facts needed to show and measure it."""

    values: np.ndarray                      # float32/int16 (rows, cols) after Modality LUT, or uint8 RGB
    stored: np.ndarray | None = None        # raw stored values (readout); None -> derived from rescale
    is_color: bool = False
    monochrome1: bool = False
    window: tuple[float, float] | None = None
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    voi_function: str = "LINEAR"
    pixel_spacing: tuple[float, float] | None = None   # (row_mm, col_mm)
    spacing_source: str = ""
    modality: str = ""
    position: float | None = None           # mm along the slice normal (CT)
    rescale: tuple[float, float] = (1.0, 0.0)
    path: str = ""
    frame: object | None = None             # the engine Frame when loaded from a file
    voi_lut: tuple[float, np.ndarray] | None = None   # VOI LUT Sequence (first value, LUT in [0,1])
    voi_lut_default: bool = False           # the header's default VOI is that LUT (PS3.3 C.11.2.1.1)
    window_from_header: bool = True         # False: the engine computed ``window`` (no header VOI)
    frame_index: int = 0                    # frame of the file (multi-frame files; overlay planes)
    source_file: str = ""                   # file of a volume slice (``path`` is empty for those)
    image_position: tuple[float, float, float] | None = None       # (0020,0032) of this slice
    image_orientation: tuple[float, ...] | None = None             # (0020,0037) row then column cosines

    def raw_at(self, r: int, c: int) -> float:
        if self.stored is not None and self.stored.ndim == 2:
            return float(self.stored[r, c])
        slope, icpt = self.rescale
        return (float(self.values[r, c]) - icpt) / (slope or 1.0)


def slice_from_frame(frame, position: float | None = None, path: str = "") -> SliceData:
    """Adapt an ``engine.dicom.display.Frame`` to SliceData."""
    return SliceData(
        values=frame.values, stored=getattr(frame, "stored", None), is_color=bool(frame.is_color),
        monochrome1=bool(getattr(frame, "monochrome1", False)), window=tuple(frame.window) if frame.window else None,
        windows=[tuple(w) for w in (getattr(frame, "windows", None) or [])],
        voi_function=str(getattr(frame, "voi_function", "LINEAR") or "LINEAR"),
        pixel_spacing=tuple(frame.pixel_spacing) if getattr(frame, "pixel_spacing", None) else None,
        spacing_source=str(getattr(frame, "spacing_source", "") or ""), modality=str(frame.modality or ""),
        position=position, rescale=(float(getattr(frame, "rescale_slope", 1.0) or 1.0),
                                    float(getattr(frame, "rescale_intercept", 0.0) or 0.0)),
        path=path, frame=frame, voi_lut=getattr(frame, "voi_lut", None),
        voi_lut_default=getattr(frame, "window_source", "") == "voi_lut" and getattr(frame, "voi_lut", None) is not None,
        window_from_header=getattr(frame, "window_source", "header") != "computed",
        frame_index=int(getattr(frame, "frame_index", 0) or 0))


def field_of_view_mask(values: np.ndarray, padding: tuple[float, float | None] | None = None) -> np.ndarray:
    """Pixels that belong to the image proper, not to the padding around the field of view.

    PS3.3 C.7.5.1.1.2: Pixel Padding Value (0028,0120), and with Pixel Padding Range Limit
    (0028,0121) the closed range between both, mark pixels outside the reconstructed region;
    ``padding`` is that value (and limit) in the units of ``values`` (after the Modality LUT).
    Without the attribute, CT scanners still fill the corners outside the circular reconstruction
    field of view with one constant (often -2000, -3024 or the type's minimum): when all four
    corner pixels hold the image minimum, pixels at that minimum are treated as padding.
    """
    v = np.asarray(values)
    mask = np.ones(v.shape[:2], bool)
    if v.ndim != 2 or v.size == 0:
        return mask
    if padding is not None and padding[0] is not None:
        a = float(padding[0])
        b = float(padding[1]) if padding[1] is not None else a
        lo, hi = min(a, b), max(a, b)
        mask &= ~((v >= lo) & (v <= hi))
    vmin = v.min()
    corners = (v[0, 0], v[0, -1], v[-1, 0], v[-1, -1])
    if all(c == vmin for c in corners):
        mask &= v != vmin
    return mask


def default_window(values: np.ndarray, padding: tuple[float, float | None] | None = None) -> tuple[float, float]:
    """A window when the header has none: 1st..99th percentile of the pixels inside the field of
    view (``field_of_view_mask``; subsampled for speed). Counting the padding around a CT's
    circular field of view (a quarter of the pixels at -2000 HU or below) stretched the window to
    W3560/L-1244, washing the image out."""
    v = np.asarray(values)[::4, ::4]
    if v.ndim == 2 and v.size:
        inside = v[field_of_view_mask(v, padding)]
        v = inside if inside.size >= 16 else v.ravel()
    lo, hi = np.percentile(v, [1, 99]) if v.size else (0.0, 1.0)
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def patient_point(position, orientation, spacing, col: float, row: float) -> tuple[float, float, float]:
    """Patient coordinates (mm, LPS) of pixel (row, col) centre, PS3.3 C.7.6.2.1.1:
    P = S + X_xyz * delta_col * col + Y_xyz * delta_row * row, with S = Image Position (Patient),
    X/Y the row and column direction cosines of Image Orientation (Patient), and Pixel Spacing
    (delta_row, delta_col)."""
    s = np.asarray(position, float)
    x, y = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    p = s + x * float(spacing[1]) * col + y * float(spacing[0]) * row
    return float(p[0]), float(p[1]), float(p[2])


class SliceSource:
    """A stack of slices; subclasses load lazily. ``reading_step`` is the index step of 'next image'."""

    kind = "array"
    reading_step = 1

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> SliceData:
        raise NotImplementedError

    def position(self, i: int) -> float | None:
        return None


class ArraySource(SliceSource):
    """Slices from an in-memory (z, y, x) array (tests, benchmarks, generated data)."""

    def __init__(self, stack: np.ndarray, template: SliceData | None = None, positions=None):
        self.stack = stack if stack.ndim == 3 else stack[None]
        self.template = template or SliceData(values=self.stack[0])
        self.positions = list(positions) if positions is not None else None

    def __len__(self) -> int:
        return int(self.stack.shape[0])

    def get(self, i: int) -> SliceData:
        t = self.template
        return SliceData(**{**t.__dict__, "values": self.stack[i], "stored": None,
                            "position": self.position(i)})

    def position(self, i: int) -> float | None:
        return self.positions[i] if self.positions else None


class FrameSource(SliceSource):
    """Slices read file by file through ``engine.dicom.pixels.load_frame`` with an LRU cache.

    ``items`` are (path, frame_index, position). Loading errors become ``LoadError`` for the caller.
    """

    kind = "files"

    def __init__(self, items: list[tuple[str, int, float | None]], cache_bytes: int = 512 * 2**20,
                 loader: Callable | None = None, reading_step: int = 1,
                 geometry: list[tuple[tuple[float, ...] | None, tuple[float, ...] | None]] | None = None):
        self.items = items
        # (Image Position, Image Orientation) per item, for patient coordinates under the cursor
        self.geometry = geometry
        self.cache: OrderedDict[int, SliceData] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._bytes = 0
        self.reading_step = reading_step
        if loader is None:  # decoded in the engine's sandboxed child (DESIGN.md 5)
            from engine.service import load_frame
            loader = load_frame
        self.loader = loader

    def __len__(self) -> int:
        return len(self.items)

    def position(self, i: int) -> float | None:
        return self.items[i][2]

    def get(self, i: int) -> SliceData:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        path, fi, pos = self.items[i]
        sd = slice_from_frame(self.loader(path, fi), pos, path)
        sd.frame_index = fi
        if self.geometry is not None and i < len(self.geometry):
            ipp, iop = self.geometry[i]
            sd.image_position = tuple(ipp) if ipp else None  # type: ignore[assignment]
            sd.image_orientation = tuple(iop) if iop else None
        nbytes = sd.values.nbytes + (sd.stored.nbytes if sd.stored is not None else 0)
        self.cache[i] = sd
        self._bytes += nbytes
        while self._bytes > self.cache_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self._bytes -= old.values.nbytes + (old.stored.nbytes if old.stored is not None else 0)
        return sd


def volume_reading_step(volume) -> int:
    """Index step of 'next image' in a Volume: -1 (head first) when the slice normal points to the
    head, as radiologists read axial CT; shared by the stack view and the MPR numbering."""
    d = getattr(volume, "direction", None) or ()
    normal = np.asarray(d, float)[6:9] if len(d) >= 9 else np.array([0, 0, 1.0])
    return -1 if normal[2] > 0.5 else 1


class VolumeSource(SliceSource):
    """Axial slices of an ``engine.dicom.volume.Volume`` (index = Volume index, 0 = most inferior)."""

    kind = "volume"

    def __init__(self, volume, template: SliceData | None = None):
        self.volume = volume
        sp = tuple(float(s) for s in volume.spacing)
        t = template or SliceData(values=volume.hu[0], modality="CT")
        self.template = SliceData(**{**t.__dict__, "pixel_spacing": (sp[1], sp[2]),
                                     "spacing_source": t.spacing_source or "PixelSpacing",
                                     "stored": None, "frame": None, "path": ""})
        if volume.window:
            self.template.window = tuple(volume.window)
        # reading order head -> feet: 'next image' goes down the patient when the normal points to the head
        self.reading_step = volume_reading_step(volume)
        self.cache_slices = 96
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.volume.hu.shape[0])

    def position(self, i: int) -> float | None:
        p = self.volume.positions
        return float(p[i]) if p is not None and len(p) > i else None

    def get(self, i: int) -> SliceData:
        """float32 slice: pyqtgraph's fast levels+LUT path takes float32 (int16 falls back to a
        generic ARGB path about 3x slower; bench/bench_viewer.py measures both)."""
        v = self._cache.get(i)
        if v is None:
            hu = self.volume.hu[i]
            v = hu if hu.dtype == np.float32 else hu.astype(np.float32)
            self._cache[i] = v
            while len(self._cache) > self.cache_slices:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        t = self.template
        return SliceData(**{**t.__dict__, "values": v, "position": self.position(i),
                            "image_position": self.patient_origin(i),
                            "image_orientation": tuple(float(x) for x in self.volume.direction[:6]),
                            **self._file_of(i)})

    def patient_origin(self, i: int) -> tuple[float, float, float] | None:
        """Patient position of voxel (i, 0, 0): the volume origin moved i slices along the normal."""
        vol = self.volume
        try:
            o = np.asarray(vol.origin, float)
            n = np.asarray(vol.direction, float)[6:9]
            p = o + n * float(vol.spacing[0]) * i
        except (TypeError, ValueError, IndexError):
            return None
        return float(p[0]), float(p[1]), float(p[2])

    def _file_of(self, i: int) -> dict:
        """The file and frame slice ``i`` came from (overlay planes are read from it)."""
        paths = list(getattr(self.volume, "instance_paths", []) or [])
        if i >= len(paths):
            return {}
        one_file = len(set(paths)) == 1
        return {"frame_index": i if one_file else 0, "source_file": paths[i]}


# --------------------------------------------------------------------------------------------
# graphics
class SmoothImageItem(pg.ImageItem):
    """ImageItem drawn with bilinear filtering while magnified, nearest neighbour otherwise.

    Radiology workstations (Weasis, Horos, RadiAnt, OHIF) interpolate a magnified image by
    default: nearest neighbour turns each pixel into a visible block at 4x or on a 2x high-DPI
    screen. At 1:1 (and smaller) nearest neighbour is exact, and ``smoothing = False`` keeps it at
    every zoom for pixel peeping. The decision is made per paint from the painter's transform, so
    it follows zoom, rotation and the screen's device pixel ratio.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.smoothing = True
        self.last_smoothed: bool | None = None      # what the last paint did (tests, diagnostics)

    @staticmethod
    def device_scale(painter: QPainter) -> float:
        """Device pixels per image pixel for the painter's current transform."""
        t = painter.deviceTransform()
        sx = math.hypot(t.m11(), t.m12())
        sy = math.hypot(t.m21(), t.m22())
        return min(sx, sy)

    def paint(self, painter, *args):  # noqa: D102 - Qt API
        smooth = bool(self.smoothing) and self.device_scale(painter) > 1.01
        self.last_smoothed = smooth
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, smooth)
        super().paint(painter, *args)


def _is_text_or_list_widget(w: QWidget | None) -> bool:
    """Widgets whose arrow/Page/Home/End keys do their own job (typing, moving in a list)."""
    return isinstance(w, (QLineEdit, QTextEdit, QPlainTextEdit, QAbstractSpinBox, QAbstractItemView)) or (
        isinstance(w, QComboBox) and (w.isEditable() or w.view().isVisible()))


class NavigationKeys(QObject):
    """Slice keys (arrows, Page Up/Down, Home/End) reach the image whatever has focus in the window.

    Clicking a button, slider or check box in a side panel moves keyboard focus there, and the
    image view stopped receiving the keys until it was clicked again. This application-level filter
    sends those keys to ``target()`` (the active image view or MPR) while the focus is anywhere in
    ``window``, except in widgets that use them themselves (text fields, spin boxes, lists and
    trees). ``target()`` must have ``handle_navigation_key(event) -> bool``.
    """

    KEYS = {Qt.Key.Key_Up, Qt.Key.Key_Down, Qt.Key.Key_Left, Qt.Key.Key_Right, Qt.Key.Key_PageUp,
            Qt.Key.Key_PageDown, Qt.Key.Key_Home, Qt.Key.Key_End}

    def __init__(self, window: QWidget, target: Callable[[], object]):
        super().__init__(window)
        self.window, self.target = window, target
        app = QApplication.instance()
        if app is not None:
            # once the event loop runs: the window's construction alone sends some 10,000
            # events through every application filter (start-up time)
            QTimer.singleShot(0, self, lambda: app.installEventFilter(self))

    def eventFilter(self, obj, ev):  # noqa: N802 - Qt API
        if ev.type() != QEvent.Type.KeyPress or ev.key() not in self.KEYS:
            return False
        fw = QApplication.focusWidget()
        if fw is None or obj is not fw or _is_text_or_list_widget(fw):
            return False
        try:
            if fw.window() is not self.window:
                return False
            view = self.target()
        except RuntimeError:      # a deleted widget during shutdown
            return False
        if view is None or fw is view or (isinstance(view, QWidget) and view.isAncestorOf(fw)):
            return False          # the view has focus: its own key handling runs
        handler = getattr(view, "handle_navigation_key", None)
        return bool(handler is not None and handler(ev))


class ChestViewBox(pg.ViewBox):
    """ViewBox with radiology mouse bindings: right-drag W/L, left = current tool (pan by
    default), middle-drag pan, wheel = slices (zoom with Ctrl or on single images)."""

    def __init__(self, view: "ImageView"):
        super().__init__(lockAspect=True, invertY=True, enableMenu=False, defaultPadding=0.0)
        self.iv = view
        self._wheel_accum = 0.0
        self._wl_start: tuple[float, float] | None = None

    def wheelEvent(self, ev, axis=None):  # noqa: N802
        zoom = bool(ev.modifiers() & Qt.KeyboardModifier.ControlModifier) or self.iv.n_slices() <= 1
        if zoom:
            super().wheelEvent(ev, axis)
            self.iv._view_changed()
            return
        self._wheel_accum += ev.delta()
        steps = int(self._wheel_accum / 120)
        if steps:
            self._wheel_accum -= steps * 120
            self.iv.step_slices(-steps)  # wheel towards the user (negative delta) = next image
        ev.accept()

    def mouseDragEvent(self, ev, axis=None):  # noqa: N802
        btn = ev.button()
        tool = self.iv.tool
        if btn == Qt.MouseButton.RightButton or (btn == Qt.MouseButton.LeftButton and tool == "wl"):
            ev.accept()
            if ev.isStart():
                self._wl_start = (self.iv.center, self.iv.width)
            if self._wl_start is None:
                return
            d = ev.screenPos() - ev.buttonDownScreenPos(btn)
            c0, w0 = self._wl_start
            k = max(w0, 1.0) / 300.0
            self.iv.set_window(c0 - d.y() * k, max(1.0, w0 + d.x() * k))
            if ev.isFinish():
                self._wl_start = None
                self.iv.window_committed.emit(self.iv.center, self.iv.width)
            return
        if btn == Qt.MouseButton.LeftButton and tool in ("distance", "ellipse", "rect"):
            ev.accept()
            p = self.iv.image_item.mapFromScene(ev.scenePos())
            pt = (p.x(), p.y())
            if ev.isStart():
                p0 = self.iv.image_item.mapFromScene(ev.buttonDownScenePos(btn))
                self.iv.measurements.begin(tool, (p0.x(), p0.y()))
            elif ev.isFinish():
                self.iv.measurements.finish(pt)
            else:
                self.iv.measurements.update(pt)
            return
        super().mouseDragEvent(ev, axis)
        self.iv._view_changed()

    def mouseClickEvent(self, ev):  # noqa: N802
        if ev.button() == Qt.MouseButton.LeftButton and self.iv.tool == "angle":
            ev.accept()
            p = self.iv.image_item.mapFromScene(ev.scenePos())
            self.iv.measurements.click_angle_point((p.x(), p.y()))
            return
        if ev.button() == Qt.MouseButton.LeftButton and ev.double():
            ev.accept()
            self.iv.fit()
            return
        ev.ignore()


class ImageView(QWidget):
    """Stack viewer: W/L, presets, zoom/pan/rotate/flip/invert, slices, cine, annotations,
    pixel readout and measurements. See the module docstring for the coordinate contract."""

    slice_changed = Signal(int)
    window_changed = Signal(float, float)
    window_committed = Signal(float, float)   # end of a W/L drag or a preset (remember per modality)
    cursor_info = Signal(str)
    view_changed = Signal()
    stack_changed = Signal()
    load_failed = Signal(str)                 # a slice could not be decoded (message for the user)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.graphics = pg.GraphicsView(background="k")
        self.graphics.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.view_box = ChestViewBox(self)
        self.graphics.setCentralItem(self.view_box)
        self.content = pg.ItemGroup()
        self.view_box.addItem(self.content, ignoreBounds=True)
        self.image_item = SmoothImageItem(axisOrder="row-major")
        self.view_box.addItem(self.image_item)
        self.image_item.setParentItem(self.content)
        self.overlay_planes = OverlayPlaneLayer(self)      # DICOM 60xx overlays (PS3.3 C.9.2)
        self.overlay = CornerOverlay(self)
        lay = QStackedLayout(self)
        lay.setStackingMode(QStackedLayout.StackingMode.StackAll)
        lay.addWidget(self.overlay)
        lay.addWidget(self.graphics)
        self.overlay.raise_()
        self.measurements = MeasurementLayer(self)
        self.slice_changed.connect(self.measurements.on_slice_changed)

        self.source: SliceSource | None = None
        self.meta = SeriesMeta()
        self._index = 0
        self._data: SliceData | None = None
        self.center, self.width = 0.0, 1.0
        self.use_voi_lut = False          # showing the header's VOI LUT Sequence instead of a window
        self.inverted = False
        self.rotation, self.flip_h, self.flip_v = 0, False, False
        self.tool = "pan"
        self._shape: tuple[int, int] | None = None
        self._annotations = True
        self.fps = 10.0
        self.user_fps = 10.0              # the user's choice, used when a series has no frame time
        self.cine = QTimer(self)
        self.cine.setTimerType(Qt.TimerType.PreciseTimer)
        self.cine.timeout.connect(lambda: self.step_slices(1, wrap=True))
        self._last_cursor: tuple[float, float] | None = None
        self._series_windows: dict[str, tuple[float, float]] = {}   # window chosen per series
        self.message = ""                 # inline error shown in the image area (no modal box)
        self.window_committed.connect(self._remember_series_window)
        self.graphics.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.view_box.sigRangeChanged.connect(lambda *_: self._view_changed())
        self.graphics.installEventFilter(self)

    # -- data ----------------------------------------------------------------------------
    def set_stack(self, source: SliceSource, meta: SeriesMeta | None = None, index: int | None = None,
                  window: tuple[float, float] | None = None, keep_view: bool = False) -> None:
        """Show a new stack; ``index`` defaults to the first image in reading order."""
        self.stop_cine()
        self.measurements.clear()
        self.set_message("")
        self.source = source
        self.meta = meta or SeriesMeta()
        n = len(source)
        if index is None:
            index = n - 1 if source.reading_step < 0 else 0
        self._index = int(min(max(index, 0), n - 1))
        self._data = source.get(self._index)
        if window is None:
            # a window chosen on this series earlier in the session, else the series' own default
            # (never another series' preset: a bone window must not follow the user to the next patient)
            window = self._series_windows.get(self.meta.series_uid) if self.meta.series_uid else None
        if window is None:
            window = self.default_window()
        self.center, self.width = float(window[0]), float(max(window[1], 1.0))
        self.use_voi_lut = self._data.voi_lut_default and window == self._data.window
        self.fps = self.series_fps() or self.user_fps
        self._last_cursor = None
        self.cursor_info.emit("")
        if not keep_view:
            self.inverted, self.rotation, self.flip_h, self.flip_v = False, 0, False, False
        self._shape = None
        self._render()
        self._apply_transform()
        if not keep_view:
            self.fit()
        self._update_annotations()
        self.overlay_planes.refresh()
        self.stack_changed.emit()
        self.slice_changed.emit(self._index)

    def replace_source(self, source: SliceSource) -> None:
        """Swap the source (same slices, e.g. files -> loaded volume) keeping slice, view and W/L."""
        self.source = source
        self._index = min(self._index, len(source) - 1)
        self._data = source.get(self._index)
        self._render()
        self._update_annotations()
        self.overlay_planes.refresh()
        self.stack_changed.emit()

    def clear(self, message: str = "") -> None:
        """No image; ``message`` (e.g. why the series could not be decoded) is shown in its place."""
        self.stop_cine()
        self.measurements.clear()
        self.source, self._data, self._shape = None, None, None
        self.image_item.clear()
        self.overlay_planes.refresh()
        self.overlay.set_texts({})
        self.overlay.set_edges({})
        self._edges_key = None
        self._last_cursor = None
        self.cursor_info.emit("")
        self.set_message(message)

    def set_message(self, text: str) -> None:
        """Inline message in the image area (decode errors): never a modal box that blocks reading."""
        self.message = text
        self.overlay.set_message(text)

    def n_slices(self) -> int:
        return len(self.source) if self.source is not None else 0

    def current_slice(self) -> int:
        return self._index

    def current_data(self) -> SliceData | None:
        return self._data

    def current_values(self) -> np.ndarray | None:
        return None if self._data is None else self._data.values

    def current_frame_shape(self) -> tuple[int, int] | None:
        if self._data is None:
            return None
        return tuple(self._data.values.shape[:2])  # type: ignore[return-value]

    def pixel_spacing(self) -> tuple[float, float] | None:
        return None if self._data is None else self._data.pixel_spacing

    def spacing_note(self) -> str:
        src = self._data.spacing_source if self._data else ""
        return "(detector)" if src.lower().startswith("imager") else ""

    def modality(self) -> str:
        return (self._data.modality if self._data else "") or self.meta.modality

    def set_slice(self, i: int) -> None:
        if self.source is None:
            return
        i = int(min(max(i, 0), len(self.source) - 1))
        if i == self._index and self._data is not None:
            return
        try:
            data = self.source.get(i)
        except Exception as exc:  # noqa: BLE001 - one unreadable slice must not end the session
            self.load_failed.emit(f"Image {i + 1} could not be read: {getattr(exc, 'reason', exc)}")
            return
        self._index = i
        self._data = data
        self._render()
        self._update_annotations()
        self.overlay_planes.refresh()
        self._refresh_readout()
        self.slice_changed.emit(i)

    def step_slices(self, steps: int, wrap: bool = False) -> None:
        """Move ``steps`` images in reading order (positive = next image)."""
        n = self.n_slices()
        if n <= 1:
            return
        step = self.source.reading_step if self.source else 1
        i = self._index + steps * step
        if wrap:
            i %= n
        self.set_slice(i)

    # -- display -------------------------------------------------------------------------
    def _levels(self) -> tuple[float, float]:
        c, w = self.center, self.width
        return (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2) if w > 1 else (c - 0.5, c + 0.5)

    def _lut(self) -> np.ndarray | None:
        """Reversed grey table for MONOCHROME1 xor invert; None (identity, the Grayscale8 fast path,
        no per-frame colour table) otherwise."""
        inv = (self._data.monochrome1 if self._data else False) != self.inverted
        return INVERSE_LUT if inv else None

    def _render(self) -> None:
        d = self._data
        if d is None:
            return
        if d.is_color:
            img = d.values if not self.inverted else 255 - d.values
            self.image_item.setImage(img, autoLevels=False, levels=(0, 255), lut=None)
        elif self.use_voi_lut and d.voi_lut is not None:
            from engine.dicom.display import apply_voi_lut_table
            self.image_item.setImage(apply_voi_lut_table(d.values, *d.voi_lut).astype(np.float32),
                                     autoLevels=False, levels=(0.0, 1.0), lut=self._lut())
        elif d.voi_function.upper() == "SIGMOID":
            from engine.dicom.display import apply_voi
            self.image_item.setImage(apply_voi(d.values, self.center, self.width, d.voi_function),
                                     autoLevels=False, levels=(0.0, 1.0), lut=self._lut())
        else:
            self.image_item.setImage(d.values, autoLevels=False, levels=self._levels(), lut=self._lut())
        shape = tuple(d.values.shape[:2])
        if shape != self._shape:
            self._shape = shape  # type: ignore[assignment]
            self._apply_transform()

    def set_window(self, center: float, width: float, voi_lut: bool = False) -> None:
        """Linear (or SIGMOID, per the header) window; ``voi_lut`` shows the header VOI LUT instead."""
        self.center, self.width = float(center), float(max(width, 1.0))
        d = self._data
        was_lut, self.use_voi_lut = self.use_voi_lut, bool(voi_lut and d is not None and d.voi_lut is not None)
        if d is not None and not d.is_color:
            if d.voi_function.upper() == "SIGMOID" or was_lut or self.use_voi_lut:
                self._render()
            else:
                self.image_item.setLevels(self._levels())
        self._update_annotations()
        self.window_changed.emit(self.center, self.width)

    def window(self) -> tuple[float, float]:
        return self.center, self.width

    def presets(self) -> list[tuple[str, float, float]]:
        """Number-key presets: CT lung/mediastinum/bone then header VOIs (X-ray: header VOIs)."""
        d = self._data
        out: list[tuple[str, float, float]] = []
        if self.modality() == "CT":
            out += CT_PRESETS
        for name, c, w in (d.windows if d else []):
            out.append((name or "Header", float(c), float(w)))
        return out

    def default_window(self) -> tuple[float, float]:
        """The header's window (or VOI LUT); without one, computed from the pixels inside the field
        of view (``default_window``), since the engine's fallback counts the padding."""
        d = self._data
        if d is None:
            return self.center, self.width
        if d.window and (d.window_from_header or d.is_color):
            return tuple(d.window)  # type: ignore[return-value]
        return default_window(d.values, self._padding(d))

    def _padding(self, d: SliceData) -> tuple[float, float | None] | None:
        """Pixel Padding Value / Range Limit of the series in displayed units (Modality LUT applied)."""
        pad = self.meta.pixel_padding
        if pad is None:
            return None
        slope, icpt = d.rescale
        conv = (lambda x: None if x is None else float(x) * slope + icpt)
        return conv(pad[0]), conv(pad[1])

    def _remember_series_window(self, c: float, w: float) -> None:
        if self.meta.series_uid:
            self._series_windows[self.meta.series_uid] = (float(c), float(w))

    def apply_preset(self, number: int) -> bool:
        """0 = the header default (or computed) window; 1..9 = presets()[number-1]."""
        if number == 0:
            d = self._data
            self.set_window(*self.default_window(), voi_lut=bool(d is not None and d.voi_lut_default))
        else:
            p = self.presets()
            if number - 1 >= len(p):
                return False
            self.set_window(p[number - 1][1], p[number - 1][2])
        self.window_committed.emit(self.center, self.width)
        return True

    def set_inverted(self, on: bool) -> None:
        self.inverted = bool(on)
        self._render()
        self._update_annotations()

    def toggle_invert(self) -> None:
        self.set_inverted(not self.inverted)

    # -- geometry ------------------------------------------------------------------------
    def _apply_transform(self) -> None:
        """content transform: centre image at 0, apply pixel aspect, flips, rotation (clockwise)."""
        if self._data is None:
            return
        rows, cols = self._data.values.shape[:2]
        sp = self._data.pixel_spacing
        aspect = (sp[0] / sp[1]) if sp and sp[1] > 0 else 1.0
        # QTransform composes right to left: a point is centred, aspect-corrected, rotated, then
        # flipped. Flips act on the screen (H mirrors left-right whatever the rotation), as in
        # every workstation; before, a flip applied first became a vertical flip after R.
        t = QTransform()
        t.scale(-1.0 if self.flip_h else 1.0, -1.0 if self.flip_v else 1.0)
        t.rotate(self.rotation)
        t.scale(1.0, aspect)
        t.translate(-cols / 2.0, -rows / 2.0)
        self.content.setTransform(t)
        self.view_box.updateAutoRange()
        self.image_item.sigImageChanged.emit()   # overlays in view coordinates re-sync
        self._update_annotations()

    def rotate(self, degrees: int) -> None:
        """Rotate what is on screen clockwise by ``degrees``. With one flip active the image turns
        the other way under the flip (flip . rot(a) = rot(-a) . flip), so the stored rotation
        changes by ``-degrees``."""
        if self.flip_h != self.flip_v:
            degrees = -degrees
        self.rotation = (self.rotation + degrees) % 360
        self._apply_transform()
        self.fit()

    def set_flip(self, horizontal: bool | None = None, vertical: bool | None = None) -> None:
        if horizontal is not None:
            self.flip_h = horizontal
        if vertical is not None:
            self.flip_v = vertical
        self._apply_transform()

    def fit(self) -> None:
        if self._data is None:
            return
        rect = self.view_box.mapFromItemToView(self.image_item, self.image_item.boundingRect()).boundingRect()
        self.view_box.setRange(rect, padding=0.0)
        self._view_changed()

    def zoom(self) -> float | None:
        """Screen pixels per image pixel (along the image rows)."""
        try:
            px = self.view_box.viewPixelSize()[0]
        except Exception:  # noqa: BLE001 - before the first layout
            return None
        return (1.0 / px) if px else None

    def set_zoom(self, factor: float) -> None:
        """Zoom about the view centre; 1.0 = one screen pixel per image pixel."""
        r = self.view_box.viewRect()
        w, h = self.view_box.width() / factor, self.view_box.height() / factor
        c = r.center()
        self.view_box.setRange(QRectF(c.x() - w / 2, c.y() - h / 2, w, h), padding=0.0)
        self._view_changed()

    def zoom_by(self, factor: float) -> None:
        self.view_box.scaleBy((1.0 / factor, 1.0 / factor))
        self._view_changed()

    def reset(self) -> None:
        self.inverted, self.rotation, self.flip_h, self.flip_v = False, 0, False, False
        d = self._data
        self.set_window(*self.default_window(), voi_lut=bool(d is not None and d.voi_lut_default))
        self._render()
        self._apply_transform()
        self.fit()

    def add_overlay(self, item, ignore_bounds: bool = True) -> None:
        """Add a graphics item in image pixel coordinates (follows zoom/pan/rotate/flip)."""
        self.view_box.addItem(item, ignoreBounds=ignore_bounds)
        item.setParentItem(self.content)

    # -- cine ----------------------------------------------------------------------------
    def series_fps(self) -> float | None:
        """Frame rate of the acquisition: Frame Time (0018,1063) or the mean of Frame Time Vector
        (0018,1065), else Recommended Display Frame Rate (0008,2144) or Cine Rate (0018,0040)
        (PS3.3 C.7.6.5 Cine Module); None when the header has none."""
        ms = self.meta.frame_time_ms
        if ms and ms > 0:
            return float(max(0.5, min(1000.0 / ms, 120.0)))
        return float(self.meta.cine_rate) if self.meta.cine_rate and self.meta.cine_rate > 0 else None

    def set_fps(self, fps: float) -> None:
        """The user's cine speed: applies now and to series without a frame time in the header."""
        self.user_fps = self.fps = float(max(0.5, min(fps, 120.0)))
        if self.cine.isActive():
            self.cine.start(self._cine_interval_ms())
        self._update_annotations()

    def _cine_interval_ms(self) -> int:
        return max(1, int(round(1000.0 / self.fps)))

    def start_cine(self, fps: float | None = None) -> None:
        if fps:
            self.set_fps(fps)
        if self.n_slices() > 1:
            self.cine.start(self._cine_interval_ms())
            self._update_annotations()

    def stop_cine(self) -> None:
        if self.cine.isActive():
            self.cine.stop()
            self._update_annotations()

    def toggle_cine(self) -> None:
        self.stop_cine() if self.cine.isActive() else self.start_cine()

    # -- display options -------------------------------------------------------------------
    def set_smoothing(self, on: bool) -> None:
        """Bilinear filtering while magnified (default) or nearest neighbour (pixel peeping)."""
        self.image_item.smoothing = bool(on)
        self.image_item.update()

    def smoothing(self) -> bool:
        return bool(self.image_item.smoothing)

    def set_overlay_planes_visible(self, on: bool) -> None:
        self.overlay_planes.set_visible(on)

    # -- tools ---------------------------------------------------------------------------
    def set_tool(self, tool: str) -> None:
        """'pan' | 'wl' | 'distance' | 'angle' | 'ellipse' | 'rect'."""
        self.measurements.cancel_draft()
        self.measurements.set_editable(tool not in MeasurementLayer.TOOLS)
        self.tool = tool
        cursor = Qt.CursorShape.OpenHandCursor if tool == "pan" else Qt.CursorShape.CrossCursor
        self.graphics.viewport().setCursor(cursor)

    # -- annotations ---------------------------------------------------------------------
    def set_annotations_visible(self, on: bool) -> None:
        self._annotations = bool(on)
        self.overlay.setVisible(self._annotations)

    def annotations_visible(self) -> bool:
        return self._annotations

    def annotation_texts(self) -> dict[str, str]:
        d = self._data
        if d is None:
            return {}
        rows, cols = d.values.shape[:2]
        fps = self.fps if (self.cine.isActive() or self.series_fps()) and self.n_slices() > 1 else None
        return corner_texts(self.meta, slice_index=self._reading_number(), n_slices=self.n_slices(),
                            position=d.position, center=None if d.is_color else self.center,
                            width=None if d.is_color else self.width, zoom=self.zoom(), rows=rows,
                            cols=cols, spacing=d.pixel_spacing, is_volume_ct=self.modality() == "CT",
                            inverted=self.inverted, voi_lut=self.use_voi_lut, fps=fps,
                            cine_running=self.cine.isActive())

    def _reading_number(self) -> int:
        """0-based image number in reading order (head first for axial CT)."""
        if self.source is not None and self.source.reading_step < 0:
            return self.n_slices() - 1 - self._index
        return self._index

    def _update_annotations(self) -> None:
        if self._data is None:
            return
        self.overlay.set_texts(self.annotation_texts())
        key = (id(self.meta), self.rotation, self.flip_h, self.flip_v)
        if key != getattr(self, "_edges_key", None):
            self._edges_key = key
            self.overlay.set_edges(edge_letters(self.meta, self.rotation, self.flip_h, self.flip_v))

    def _view_changed(self) -> None:
        if self._data is not None:
            self.overlay.set_texts(self.annotation_texts())
        self.view_changed.emit()

    # -- pixel readout -------------------------------------------------------------------
    def readout_at(self, x: float, y: float) -> str:
        """Status text for image pixel coordinates (x=col, y=row): raw stored value and HU (CT)."""
        d = self._data
        if d is None:
            return ""
        rows, cols = d.values.shape[:2]
        c, r = int(math.floor(x)), int(math.floor(y))
        if not (0 <= r < rows and 0 <= c < cols):
            return ""
        if d.is_color:
            rgb = d.values[r, c]
            return f"x {c}  y {r}   RGB {int(rgb[0])},{int(rgb[1])},{int(rgb[2])}"
        raw = d.raw_at(r, c)
        txt = f"x {c}  y {r}   raw {raw:.0f}"
        if self.modality() == "CT":
            txt += f"   HU {float(d.values[r, c]):.0f}"
        elif d.rescale != (1.0, 0.0):
            txt += f"   value {float(d.values[r, c]):.1f}"
        pp = self.patient_position_at(c, r)
        if pp is not None:
            txt += f"   patient ({pp[0]:.1f}, {pp[1]:.1f}, {pp[2]:.1f}) mm"
        return txt

    def patient_position_at(self, col: float, row: float) -> tuple[float, float, float] | None:
        """Patient coordinates (LPS mm) of a pixel of the displayed slice; None without geometry
        (projection radiographs have no Image Position/Orientation (Patient))."""
        d = self._data
        if d is None or d.image_position is None or d.image_orientation is None or not d.pixel_spacing \
                or len(d.image_orientation) < 6:
            return None
        return patient_point(d.image_position, d.image_orientation, d.pixel_spacing, col, row)

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        if self._data is None:
            return
        p = self.image_item.mapFromScene(scene_pos)
        self._last_cursor = (p.x(), p.y())
        self.cursor_info.emit(self.readout_at(p.x(), p.y()))

    def _refresh_readout(self) -> None:
        """The readout belongs to the displayed image: recomputed when the slice changes under a
        still cursor, so the status bar never shows the previous image's value."""
        if self._last_cursor is not None and self._data is not None:
            self.cursor_info.emit(self.readout_at(*self._last_cursor))

    # -- keyboard ------------------------------------------------------------------------
    def eventFilter(self, obj, ev):  # noqa: N802
        if ev.type() == QEvent.Type.KeyPress and self._handle_key(ev):
            return True
        return super().eventFilter(obj, ev)

    def keyPressEvent(self, ev):  # noqa: N802
        if not self._handle_key(ev):
            super().keyPressEvent(ev)

    def handle_navigation_key(self, ev) -> bool:
        """Slice keys delivered by ``NavigationKeys`` while another widget has focus."""
        return self._handle_key(ev)

    def _handle_key(self, ev) -> bool:
        k = ev.key()
        page = max(1, self.n_slices() // 10)
        moves = {Qt.Key.Key_Down: 1, Qt.Key.Key_Right: 1, Qt.Key.Key_Up: -1, Qt.Key.Key_Left: -1,
                 Qt.Key.Key_PageDown: page, Qt.Key.Key_PageUp: -page}
        if k in moves and not (ev.modifiers() & Qt.KeyboardModifier.ControlModifier):
            self.step_slices(moves[k])
            return True
        if k in (Qt.Key.Key_Home, Qt.Key.Key_End) and self.n_slices():
            first = self.n_slices() - 1 if (self.source and self.source.reading_step < 0) else 0
            last = self.n_slices() - 1 - first
            self.set_slice(first if k == Qt.Key.Key_Home else last)
            return True
        if k == Qt.Key.Key_Escape:
            self.measurements.cancel_draft()
            self.set_tool("pan")
            return True
        return False

    # -- output --------------------------------------------------------------------------
    def rendered_image(self) -> np.ndarray | None:
        """The displayed 8-bit image (rows, cols) or (rows, cols, 3) before geometry (tests)."""
        if self.image_item.image is None:
            return None
        if self.image_item.qimage is None or getattr(self.image_item, "_renderRequired", False):
            self.image_item.render()
        q = self.image_item.qimage
        if q is None:
            return None
        from PySide6.QtGui import QImage
        if q.format() == QImage.Format.Format_Indexed8:   # LUT kept as a colour table
            q = q.convertToFormat(QImage.Format.Format_RGB32)
        arr = pg.functions.ndarray_from_qimage(q).copy()
        if arr.ndim == 3 and arr.shape[2] == 4:  # BGRA
            b, g, r = arr[..., 0], arr[..., 1], arr[..., 2]
            if np.array_equal(b, g) and np.array_equal(g, r):
                return r.copy()
            return np.stack([r, g, b], axis=-1)
        return arr
