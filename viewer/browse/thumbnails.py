"""Series thumbnails, rendered off the GUI thread (the middle image, default VOI, MONOCHROME1 inverted).

``thumbnail_array`` runs in a worker thread and decodes in the engine's sandboxed child; ``ThumbnailLoader`` queues it on a one-thread
pool so thumbnails never compete with the image the user is waiting for, and converts the result
to a QImage on the GUI thread.
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QImage

from viewer.qt_workers import TaskRunner


def thumbnail_array(series, size: int = 96) -> np.ndarray:
    """uint8 (h, w) or (h, w, 3) thumbnail of the series' middle image. Raises LoadError.

    Made in engine.service's sandboxed decode process: a hostile file in a folder must not abort,
    hang or bloat the viewer while its browser fills (DESIGN.md 5); only the small thumbnail
    comes back.
    """
    from engine.service import thumbnail

    return thumbnail(series, size)


def to_qimage(arr: np.ndarray) -> QImage:
    """numpy uint8 grey/RGB -> an owning QImage."""
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    if arr.ndim == 2:
        return QImage(arr.data, w, h, arr.strides[0], QImage.Format.Format_Grayscale8).copy()
    return QImage(arr.data, w, h, arr.strides[0], QImage.Format.Format_RGB888).copy()


class ThumbnailLoader(QObject):
    """Emits ``ready(series_uid, QImage)`` per series; failures emit ``failed(series_uid, reason)``."""

    ready = Signal(str, QImage)
    failed = Signal(str, str)

    def __init__(self, parent: QObject | None = None, size: int = 96):
        super().__init__(parent)
        self.size = size
        self.runner = TaskRunner(self, max_threads=1)
        self.cache: dict[str, QImage] = {}
        self._pending: set[str] = set()

    def request(self, series_list) -> None:
        for s in series_list:
            uid = s.series_uid
            if uid in self.cache:
                self.ready.emit(uid, self.cache[uid])
                continue
            if uid in self._pending or not s.instances:
                continue
            self._pending.add(uid)
            self.runner.submit(thumbnail_array, s, self.size,
                               on_result=lambda a, uid=uid: self._done(uid, a),
                               on_error=lambda e, uid=uid: self._fail(uid, e))

    def _alive(self) -> bool:
        """False once Qt has deleted this object (window closed while a thumbnail was being made)."""
        from shiboken6 import isValid

        return isValid(self)

    def _done(self, uid: str, arr: np.ndarray) -> None:
        if not self._alive():
            return
        self._pending.discard(uid)
        img = to_qimage(arr)
        self.cache[uid] = img
        self.ready.emit(uid, img)

    def _fail(self, uid: str, exc: BaseException) -> None:
        if not self._alive():
            return
        self._pending.discard(uid)
        self.failed.emit(uid, str(getattr(exc, "reason", exc)))

    def pending(self) -> int:
        return len(self._pending)

    def cancel(self) -> None:
        self.runner.pool.clear()
        self._pending.clear()
