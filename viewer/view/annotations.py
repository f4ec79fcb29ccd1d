"""Corner annotations and orientation markers drawn over the image (not burned into pixels).

The text is computed by pure functions (testable without Qt); ``CornerOverlay`` is a transparent
widget laid over the image view so the text stays put while the image zooms, pans and rotates.
Orientation letters follow PS3.3 C.7.6.1.1.1 (Patient Orientation: R/L, A/P, H/F).
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QLabel, QWidget

from engine.dicom.series_meta import SeriesMeta

RESEARCH_LINE = "Research use only - not for diagnostic use"


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
