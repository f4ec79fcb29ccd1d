"""CT slice-score strip: one bar per axial slice, click to jump (COVNet-style slice scores).

The strip paints each scored slice's probability as a bar over the whole stack in the viewer's
reading order (head on the left for axial CT, like the image numbers in the corner
annotation), marks the displayed slice and the model's operating threshold, and numbers the
most suspicious slices so the reader can go straight to them. Indices in and out are
engine.dicom.volume indices (0 = most inferior); only the drawing follows reading order.
"""
from __future__ import annotations

from typing import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QMouseEvent, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from engine.results import CTSliceScore


class SliceScoreStrip(QWidget):
    """Bars of per-slice probability; ``slice_requested(int)`` is emitted with a *volume* index."""

    slice_requested = Signal(int)

    def __init__(self, parent: QWidget | None = None, top_k: int = 5):
        super().__init__(parent)
        self.top_k = top_k
        self._scores: dict[int, CTSliceScore] = {}
        self._n_slices = 0
        self._threshold: float | None = None
        self._current: int | None = None
        self._greyed = False
        self._reversed = False      # True: volume index 0 (inferior) drawn on the right
        self.setMinimumHeight(54)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMouseTracking(True)
        self.setToolTip("Per-slice model probability over the stack in reading order. Click to show "
                        "a slice; numbers 1-5 mark the most suspicious slices.")

    def sizeHint(self) -> QSize:  # noqa: D102
        return QSize(260, 58)

    # -- data -------------------------------------------------------------------------------
    def set_scores(self, scores: Sequence[CTSliceScore], n_slices: int | None = None,
                   threshold: float | None = None, greyed: bool = False) -> None:
        self._scores = {s.slice_index: s for s in scores}
        top = max(self._scores) + 1 if self._scores else 0
        self._n_slices = max(int(n_slices or 0), top)
        self._threshold = threshold
        self._greyed = greyed
        self.update()

    def clear(self) -> None:
        self.set_scores([])

    def set_reading_order(self, head_first: bool) -> None:
        """Draw head first (reading order of axial CT in the viewer) instead of volume order."""
        self._reversed = bool(head_first)
        self.update()

    def reading_number(self, index: int) -> int:
        """1-based image number as the viewer's corner annotation shows it."""
        return (self._n_slices - index) if self._reversed else index + 1

    def set_current(self, index: int | None) -> None:
        self._current = index
        self.update()

    def top_slices(self, k: int | None = None) -> list[int]:
        """Volume indices of the k highest-probability slices, most suspicious first."""
        k = self.top_k if k is None else k
        ranked = sorted(self._scores.values(), key=lambda s: (-s.probability, s.slice_index))
        return [s.slice_index for s in ranked[:k]]

    def next_suspicious(self) -> int | None:
        """The next slice of the top-k list after the displayed one (wraps); emits slice_requested."""
        top = self.top_slices()
        if not top:
            return None
        i = top.index(self._current) + 1 if self._current in top else 0
        target = top[i % len(top)]
        self.slice_requested.emit(target)
        return target

    @property
    def n_slices(self) -> int:
        return self._n_slices

    # -- geometry ---------------------------------------------------------------------------
    def _plot_rect(self) -> QRectF:
        return QRectF(4, 4, max(1, self.width() - 8), max(1, self.height() - 18))

    def index_at(self, x: float) -> int | None:
        if self._n_slices <= 0:
            return None
        r = self._plot_rect()
        i = int((x - r.left()) / r.width() * self._n_slices)
        i = min(max(i, 0), self._n_slices - 1)
        return self._n_slices - 1 - i if self._reversed else i

    def x_of(self, index: int) -> float:
        r = self._plot_rect()
        pos = (self._n_slices - 1 - index) if self._reversed else index
        return r.left() + (pos + 0.5) / max(self._n_slices, 1) * r.width()

    # -- events -----------------------------------------------------------------------------
    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt API
        if event.button() != Qt.MouseButton.LeftButton:
            return super().mousePressEvent(event)
        i = self.index_at(event.position().x())
        if i is None:
            return
        if self._scores and i not in self._scores:   # snap to the nearest scored slice
            i = min(self._scores, key=lambda j: abs(j - i))
        self.slice_requested.emit(i)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt API
        i = self.index_at(event.position().x())
        s = self._scores.get(i) if i is not None else None
        if s is not None:
            self.setToolTip(f"image {self.reading_number(s.slice_index)}/{self._n_slices}  "
                            f"position {s.z_mm:.1f} mm  p = {s.probability:.2f}")
        super().mouseMoveEvent(event)

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        r = self._plot_rect()
        pal = self.palette()
        p.fillRect(r, pal.base().color().darker(108))
        if not self._scores:
            p.setPen(pal.placeholderText().color())
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "no slice scores")
            p.end()
            return
        n = self._n_slices
        bw = max(3.0, r.width() / n)
        for s in self._scores.values():
            x = self.x_of(s.slice_index) - bw / 2
            h = max(1.0, s.probability * r.height())
            above = self._threshold is not None and s.probability >= self._threshold
            if self._greyed:
                col = QColor(150, 150, 150)
            elif above:
                col = QColor(220, 70, 50)
            else:
                col = QColor(70, 140, 210)
            p.fillRect(QRectF(x, r.bottom() - h, bw, h), col)
        if self._threshold is not None:
            y = r.bottom() - self._threshold * r.height()
            pen = QPen(QColor(240, 200, 0), 1, Qt.PenStyle.DashLine)
            p.setPen(pen)
            p.drawLine(QPointF(r.left(), y), QPointF(r.right(), y))
        # Number the top-k slices (1 = most suspicious).
        f = p.font()
        f.setPointSizeF(max(6.5, f.pointSizeF() * 0.75))
        p.setFont(f)
        p.setPen(pal.text().color())
        taken: list[float] = []
        for rank, idx in enumerate(self.top_slices(), start=1):
            x = self.x_of(idx)
            p.drawLine(QPointF(x, r.bottom() + 1), QPointF(x, r.bottom() + 3))
            if all(abs(x - t) >= 12 for t in taken):     # label only where it does not overlap
                p.drawText(QRectF(x - 10, r.bottom() + 2, 20, 12), Qt.AlignmentFlag.AlignHCenter, str(rank))
                taken.append(x)
        if self._current is not None and 0 <= self._current < n:
            x = self.x_of(self._current)
            p.setPen(QPen(QColor(60, 220, 90), 2))
            p.drawLine(QPointF(x, r.top()), QPointF(x, r.bottom()))
        p.end()
