"""Corner annotations and orientation markers drawn over the image (not burned into pixels).

The text is computed by pure functions (testable without Qt); ``CornerOverlay`` is a transparent
widget laid over the image view so the text stays put while the image zooms, pans and rotates.
Orientation letters follow PS3.3 C.7.6.1.1.1 (Patient Orientation: R/L, A/P, H/F).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QLabel, QWidget

RESEARCH_LINE = "Research use only - not for diagnostic use"


@dataclass
class SeriesMeta:
    """Header facts the annotations need (read once per series from the first instance)."""

    patient_name: str = ""
    patient_id: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    institution: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    slice_thickness: float | None = None
    kvp: str = ""
    row_dir: tuple[float, float, float] | None = None   # patient-space direction of increasing column
    col_dir: tuple[float, float, float] | None = None   # patient-space direction of increasing row
    patient_orientation: tuple[str, str] | None = None  # (0020,0020) for projection images
    series_uid: str = ""
    frame_time_ms: float | None = None      # (0018,1063) Frame Time, or the mean Frame Time Vector
    cine_rate: float | None = None          # (0008,2144) Recommended Display Frame Rate / (0018,0040)
    pixel_padding: tuple[float, float | None] | None = None   # (0028,0120) and (0028,0121), stored units
    extra: dict = field(default_factory=dict)


def _fmt_date(d: str) -> str:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


def _fmt_name(n: str) -> str:
    """PN 'Family^Given^Middle^Prefix^Suffix' -> 'FAMILY, Given Middle' (PS3.5 6.2.1). Only the
    first (alphabetic) of the '='-separated component groups is shown."""
    text = str(n or "").split("=")[0]
    parts = [p.strip() for p in text.split("^")]
    if not parts or not parts[0]:
        rest = " ".join(p for p in parts[1:3] if p)
        return rest or text
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{parts[0].upper()}, {rest}" if rest else parts[0].upper()


def display_text(value: object) -> str:
    """A header string for display: '^'-separated components (PN-style, used by some vendors in LO
    values such as Study Description 'Thorax^AThoraxRoutine': body region ^ protocol) shown as
    'Thorax · AThoraxRoutine', empty components dropped, multi-values joined with ' / '."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " / ".join(t for t in (display_text(v) for v in value) if t)
    text = str(value).strip()
    if "^" not in text:
        return text
    return " · ".join(p.strip() for p in text.split("^") if p.strip())


def _frame_time_ms(ds) -> float | None:
    """Frame Time (0018,1063) in ms, else the mean of the non-zero Frame Time Vector (0018,1065)
    entries (its first entry is 0 by definition, PS3.3 C.7.6.5.1.2)."""
    try:
        ft = getattr(ds, "FrameTime", None)
        if ft not in (None, "") and float(ft) > 0:
            return float(ft)
        vec = getattr(ds, "FrameTimeVector", None)
        if vec not in (None, ""):
            seq = list(vec) if isinstance(vec, (list, tuple)) or type(vec).__name__ == "MultiValue" else [vec]
            vals = [float(v) for v in seq if float(v) > 0]
            if vals:
                return float(sum(vals) / len(vals))
    except (TypeError, ValueError):
        pass
    return None


def _cine_rate(ds) -> float | None:
    for kw in ("RecommendedDisplayFrameRate", "CineRate"):
        try:
            v = getattr(ds, kw, None)
            if v not in (None, "") and float(v) > 0:
                return float(v)
        except (TypeError, ValueError):
            continue
    return None


def _padding(ds) -> tuple[float, float | None] | None:
    try:
        v = getattr(ds, "PixelPaddingValue", None)
        if v in (None, ""):
            return None
        lim = getattr(ds, "PixelPaddingRangeLimit", None)
        return float(v), (float(lim) if lim not in (None, "") else None)
    except (TypeError, ValueError):
        return None


def meta_from_dataset(ds) -> SeriesMeta:
    """Build SeriesMeta from a pydicom Dataset (missing tags become empty strings)."""
    def g(kw, default=""):
        v = getattr(ds, kw, default)
        return default if v is None else v

    m = SeriesMeta(
        patient_name=_fmt_name(str(g("PatientName"))), patient_id=str(g("PatientID")),
        patient_sex=str(g("PatientSex")), patient_age=str(g("PatientAge")),
        study_date=_fmt_date(str(g("StudyDate"))), study_time=str(g("StudyTime"))[:6],
        study_description=display_text(g("StudyDescription")), institution=display_text(g("InstitutionName")),
        modality=str(g("Modality")), series_number=str(g("SeriesNumber")),
        series_description=display_text(g("SeriesDescription")), kvp=str(g("KVP")),
        series_uid=str(g("SeriesInstanceUID")), frame_time_ms=_frame_time_ms(ds), cine_rate=_cine_rate(ds),
        pixel_padding=_padding(ds),
    )
    try:
        st = g("SliceThickness", None)
        m.slice_thickness = float(st) if st not in (None, "") else None
    except (TypeError, ValueError):
        m.slice_thickness = None
    iop = g("ImageOrientationPatient", None)
    try:
        if iop is not None and len(iop) == 6:
            m.row_dir = tuple(float(x) for x in iop[:3])  # type: ignore[assignment]
            m.col_dir = tuple(float(x) for x in iop[3:])  # type: ignore[assignment]
    except (TypeError, ValueError):
        pass
    po = g("PatientOrientation", None)
    try:
        if po is not None and len(po) == 2 and all(str(x) for x in po):
            m.patient_orientation = (str(po[0]), str(po[1]))
    except TypeError:
        pass
    return m


def direction_letters(v) -> str:
    """Patient-space vector -> letters (largest component first), e.g. (1,0,0) -> 'L' (LPS axes)."""
    v = np.asarray(v, dtype=float)
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    out = []
    for ax in np.argsort(-np.abs(v)):
        if abs(v[ax]) < 0.25:  # ignore small obliquities
            continue
        out.append(names[ax][0] if v[ax] > 0 else names[ax][1])
    return "".join(out[:2])


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def opposite(letters: str) -> str:
    return "".join(_OPPOSITE.get(c, c) for c in letters)


def edge_letters(meta: SeriesMeta, rotation: int = 0, flip_h: bool = False,
                 flip_v: bool = False) -> dict[str, str]:
    """Letters for the left/right/top/bottom screen edges after rotation (deg, clockwise) and flips.

    The screen +x direction is the image row direction (increasing column) and +y is the column
    direction, then the display transform is applied.
    """
    if meta.row_dir is not None and meta.col_dir is not None:
        right, down = direction_letters(meta.row_dir), direction_letters(meta.col_dir)
    elif meta.patient_orientation is not None:
        right, down = meta.patient_orientation
    else:
        return {}
    # screen vectors as letter pairs: (right, down) for each transform step
    r, d = right, down
    for _ in range((rotation // 90) % 4):   # rotate content 90 deg clockwise
        r, d = opposite(d), r
    if flip_h:                              # flips act on the screen, after the rotation
        r = opposite(r)                     # (viewer.view.image_view.ImageView._apply_transform)
    if flip_v:
        d = opposite(d)
    return {"right": r, "left": opposite(r), "bottom": d, "top": opposite(d)}


def corner_texts(meta: SeriesMeta, *, slice_index: int, n_slices: int, position: float | None,
                 center: float | None, width: float | None, zoom: float | None,
                 rows: int = 0, cols: int = 0, spacing: tuple[float, float] | None = None,
                 is_volume_ct: bool = False, inverted: bool = False, voi_lut: bool = False,
                 fps: float | None = None, cine_running: bool = False) -> dict[str, str]:
    """The four corner strings (top_left, top_right, bottom_left, bottom_right); ``fps`` is the
    cine rate (shown for multi-frame series, marked while playing)."""
    tl = [meta.patient_name, f"ID: {meta.patient_id}" if meta.patient_id else "",
          "  ".join(x for x in (f"Sex {meta.patient_sex}" if meta.patient_sex else "",
                                f"Age {meta.patient_age}" if meta.patient_age else "") if x)]
    tr = [meta.institution, f"{meta.study_date} {meta.study_time[:2]}:{meta.study_time[2:4]}".strip(" :")
          if meta.study_time else meta.study_date, meta.study_description,
          f"{meta.modality}" + (f"  {meta.kvp} kV" if meta.kvp else "")]
    bl = [f"Se: {meta.series_number}  {meta.series_description}".strip()]
    if n_slices > 1 or is_volume_ct:
        bl.append(f"Im: {slice_index + 1}/{n_slices}")
    if position is not None:
        bl.append(f"Pos: {position:.1f} mm")
    if meta.slice_thickness:
        bl.append(f"Thk: {meta.slice_thickness:g} mm")
    if rows and cols:
        bl.append(f"{cols}x{rows}" + (f"  {spacing[1]:.3g}x{spacing[0]:.3g} mm" if spacing else "  (no spacing)"))
    br = []
    if voi_lut:
        br.append("VOI LUT (header)" + ("  INV" if inverted else ""))
    elif center is not None and width is not None:
        br.append(f"W: {width:.0f} L: {center:.0f}" + ("  INV" if inverted else ""))
    if zoom is not None:
        br.append(f"Zoom: {zoom * 100:.0f}%")
    if fps is not None:
        br.append(f"{'▶ ' if cine_running else ''}Cine {fps:.3g} fps")
    return {"top_left": "\n".join(x for x in tl if x), "top_right": "\n".join(x for x in tr if x),
            "bottom_left": "\n".join(x for x in bl if x), "bottom_right": "\n".join(x for x in br if x)}


class CornerOverlay(QWidget):
    """Transparent overlay with four corner labels, four edge orientation markers and the
    research-use line; passes all mouse events through to the image below."""

    def __init__(self, parent: QWidget):
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents, True)
        self.setAttribute(Qt.WidgetAttribute.WA_TranslucentBackground, True)
        self.setStyleSheet("background: transparent;")
        lay = QGridLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        self.labels: dict[str, QLabel] = {}
        spots = {"top_left": (0, 0, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop),
                 "top": (0, 1, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop),
                 "top_right": (0, 2, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop),
                 "left": (1, 0, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter),
                 "right": (1, 2, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter),
                 "bottom_left": (2, 0, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom),
                 "bottom": (2, 1, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignBottom),
                 "bottom_right": (2, 2, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignBottom)}
        for key, (r, c, align) in spots.items():
            lab = QLabel("", self)
            lab.setObjectName("orientMarker" if key in ("top", "left", "right", "bottom") else "cornerText")
            # a translucent dark box keeps the text readable over bright radiographs
            lab.setStyleSheet("background: rgba(0, 0, 0, 150); color: #f0d060; font-weight: bold; "
                              "font-size: 11pt; padding: 0px 3px; border-radius: 2px;"
                              if lab.objectName() == "orientMarker" else
                              "background: rgba(0, 0, 0, 150); color: #e6e6c8; font-family: monospace; "
                              "font-size: 9pt; padding: 1px 3px; border-radius: 2px;")
            lab.hide()
            lab.setAlignment(align)
            lay.addWidget(lab, r, c, align)
            self.labels[key] = lab
        self.message = QLabel("", self)
        self.message.setObjectName("imageMessage")
        self.message.setWordWrap(True)
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message.setStyleSheet("background: rgba(90, 20, 20, 200); color: #ffffff; font-size: 10pt; "
                                   "padding: 8px; border-radius: 4px;")
        self.message.hide()
        lay.addWidget(self.message, 1, 1, Qt.AlignmentFlag.AlignCenter)
        self.research = QLabel(RESEARCH_LINE, self)
        self.research.setStyleSheet("background: rgba(0, 0, 0, 150); color: #a0a0a0; font-size: 8pt; padding: 0px 3px;")
        lay.addWidget(self.research, 3, 0, 1, 3, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignBottom)
        lay.setRowStretch(1, 1)
        lay.setColumnStretch(1, 1)

    def _set(self, key: str, text: str) -> None:
        lab = self.labels[key]
        if lab.text() != text:
            shrinks = len(text) < len(lab.text()) or text.count("\n") < lab.text().count("\n")
            lab.setText(text)
            if shrinks:
                # The box is the label's background: give it its new, smaller size now and repaint
                # the whole overlay, or the old box stays behind the shorter text (the overlay is
                # translucent and the image view below does not know that area changed).
                lab.adjustSize()
                self.layout().activate()
                self.update()
        lab.setVisible(bool(text))

    def set_message(self, text: str) -> None:
        """Centre message (e.g. why the image could not be decoded); empty hides it."""
        self.message.setText(text)
        self.message.setMaximumWidth(max(240, int(self.width() * 0.7)))
        self.message.setVisible(bool(text))

    def set_texts(self, texts: dict[str, str]) -> None:
        for key in ("top_left", "top_right", "bottom_left", "bottom_right"):
            self._set(key, texts.get(key, ""))

    def set_edges(self, edges: dict[str, str]) -> None:
        for key in ("top", "left", "right", "bottom"):
            self._set(key, edges.get(key, ""))

    def text(self, key: str) -> str:
        return self.labels[key].text()

    def all_text(self) -> str:
        return "\n".join(l.text() for l in self.labels.values() if l.text())
