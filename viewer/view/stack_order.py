"""The order a series is read in: one (path, frame, position) per image, sorted along the slice
normal like engine.dicom.volume (PS3.3 C.7.6.2 Image Plane: position along the cross product of the
orientation's row and column cosines), and the reading direction (head first for axial CT)."""
from __future__ import annotations

from engine.dicom.records import SeriesRecord


def series_items(series: SeriesRecord) -> tuple[list[tuple[str, int, float | None]], int]:
    """(path, frame, position) per image, sorted like engine.dicom.volume (position along the normal,
    ascending) when geometry is present; plus the reading step (-1 = head first for axial CT)."""
    import numpy as np

    insts = list(series.instances)
    if len(insts) == 1 and insts[0].frames > 1:
        return [(insts[0].path, f, None) for f in range(insts[0].frames)], 1
    items: list[tuple[str, int, float | None]] = []
    normal = None
    iop = next((i.image_orientation for i in insts if i.image_orientation), None)
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    if normal is not None and all(i.image_position for i in insts):
        pos = [float(np.dot(np.asarray(i.image_position, float), normal)) for i in insts]
        order = sorted(range(len(insts)), key=lambda k: pos[k])
        items = [(insts[k].path, 0, pos[k]) for k in order]
        step = -1 if (series.kind == "ct" and normal[2] > 0.5) else 1
        return items, step
    return [(i.path, 0, i.slice_location) for i in insts], 1
