"""Tolerant reads of header attributes shared by the engine.dicom modules (PS3.3 C.7.6.16).

Hostile or damaged headers hold values pydicom cannot convert; every reader here returns the
default instead of raising, so a bad optional attribute never stops a frame from loading.
"""
from __future__ import annotations

from typing import Any


def _num(ds, keyword: str, default: Any = None):
    """The value of ``keyword``, or ``default`` when it is absent, empty or cannot be read."""
    try:
        v = ds.get(keyword, None)
        if v is None or v == "":
            return default
        return v
    except Exception:
        return default


def _int(ds, keyword: str, default: int = 0) -> int:
    """``_num`` as an int; ``default`` when the value is not a number (e.g. a malformed IS)."""
    v = _num(ds, keyword, default)
    try:
        return int(v)
    except Exception:
        return default


def _seq_item(ds, *path: str):
    """First item down a chain of sequences, e.g. SharedFunctionalGroups -> PixelMeasures."""
    cur = ds
    for kw in path:
        try:
            seq = cur.get(kw)
        except Exception:
            return None
        if not seq:
            return None
        cur = seq[0]
    return cur


def _functional_item(ds, frame: int, macro: str):
    """Per-frame item of a functional-group macro (PS3.3 C.7.6.16), falling back to shared."""
    try:
        pf = ds.get("PerFrameFunctionalGroupsSequence")
        if pf and frame < len(pf):
            seq = pf[frame].get(macro)
            if seq:
                return seq[0]
    except Exception:
        pass
    return _seq_item(ds, "SharedFunctionalGroupsSequence", macro)
