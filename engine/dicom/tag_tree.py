"""A DICOM header as plain rows (tag, name, VR, value, nested items) for the tag browser.

Why plain data: the header is parsed in a sandboxed decode child (engine.dicom.safe_decode) and
the viewer receives these rows instead of a pydicom Dataset, so its process never imports pydicom
while a study is read (the import holds the GIL in chunks of ~30 ms: GUI stalls,
bench/bench_viewer_start.py). The rows follow PS3.5 7.1 (data elements in tag order, Sequence
of Items nesting, PS3.5 7.5) and PS3.10 7.1 (File Meta Information group 0002 last, as its own
branch). An element pydicom cannot convert becomes an ``unreadable`` row with the reason, and
the rows after it still appear: a damaged value must not hide the readable rest of the header.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_VALUE_CHARS = 240
MAX_DEPTH = 32   # sequence nesting shown; hostile files nest thousands deep (recursion limit)
BINARY_VRS = ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass
class TagRow:
    """One element (or one sequence item, whose ``tag`` is empty and ``name`` is "Item k")."""

    tag: str
    name: str
    vr: str = ""
    value: str = ""
    unreadable: bool = False
    children: list["TagRow"] = field(default_factory=list)


@dataclass
class HeaderTree:
    """The rows of one header; ``unreadable`` counts the elements shown as unreadable."""

    rows: list[TagRow] = field(default_factory=list)
    unreadable: int = 0


def value_text(elem: Any) -> str:
    """The Value column: sequences and binary values summarised, long values cut."""
    if elem.VR == "SQ":
        return f"<sequence, {len(elem.value)} item(s)>"
    if elem.tag in PIXEL_TAGS or elem.VR in BINARY_VRS:
        try:
            n = len(elem.value) if elem.value is not None else 0
        except TypeError:
            n = 0
        return f"<binary, {n} bytes>"
    try:
        s = str(elem.value)
    except Exception:  # noqa: BLE001 - a malformed value must not break the browser
        s = "<unreadable>"
    return s if len(s) <= MAX_VALUE_CHARS else s[:MAX_VALUE_CHARS] + " …"


def header_tree(ds: Any) -> HeaderTree:
    """Rows of a pydicom Dataset, its File Meta Information as a last branch."""
    tree = HeaderTree()
    tree.rows = _rows(ds, 0, tree)
    meta_ds = getattr(ds, "file_meta", None)
    if meta_ds is not None and len(meta_ds):
        tree.rows.append(TagRow("(0002,xxxx)", "File Meta Information", children=_rows(meta_ds, 0, tree)))
    return tree


def _unreadable(tree: HeaderTree, tag: str, text: str) -> TagRow:
    tree.unreadable += 1
    return TagRow(tag, "(unreadable element)", "", text, unreadable=True)


def _rows(ds: Any, depth: int, tree: HeaderTree) -> list[TagRow]:
    out: list[TagRow] = []
    try:
        tags = list(ds.keys())
    except Exception as exc:  # noqa: BLE001 - a dataset that cannot even list its tags
        return [_unreadable(tree, "", f"<element list unreadable: {type(exc).__name__}>")]
    for tag in tags:
        label = f"({tag.group:04X},{tag.element:04X})"
        try:
            elem = ds[tag]
            row = TagRow(label, elem.name, str(elem.VR), value_text(elem))
        except Exception as exc:  # noqa: BLE001 - shown, never raised
            out.append(_unreadable(tree, label, f"<unreadable: {type(exc).__name__}>"))
            continue
        out.append(row)
        if elem.VR != "SQ":
            continue
        if depth >= MAX_DEPTH:
            row.children.append(_unreadable(tree, "", f"<nested deeper than {MAX_DEPTH} levels; not shown>"))
            continue
        try:
            items = list(elem.value)
        except Exception as exc:  # noqa: BLE001
            row.children.append(_unreadable(tree, "", f"<sequence items unreadable: {type(exc).__name__}>"))
            continue
        for k, sub in enumerate(items):
            row.children.append(TagRow("", f"Item {k + 1}", children=_rows(sub, depth + 1, tree)))
    return out


def read_header_tree(path: str) -> HeaderTree:
    """The header of ``path`` as rows (runs in a decode child; LoadError when unreadable)."""
    from engine.dicom.pixels import read_header

    return header_tree(read_header(path))
