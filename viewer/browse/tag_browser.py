"""Searchable DICOM tag browser for the current image (header only, sequences nested).

Search matches the tag number ("0028,0030" or "00280030"), the keyword/name or the value,
case-insensitively; parents of matching sequence items stay visible so the context is clear.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QHeaderView, QLabel, QLineEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout,
                               QWidget)

MAX_VALUE_CHARS = 240
MAX_DEPTH = 32   # sequence nesting shown; hostile files nest thousands deep (recursion limit)


def _value_text(elem) -> str:
    if elem.VR == "SQ":
        return f"<sequence, {len(elem.value)} item(s)>"
    if elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
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


class TagBrowser(QWidget):
    """Tree of (tag, name, VR, value) with a search field."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.title = QLabel("No image")
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search tag, name or value (e.g. 0028,0030 or spacing)")
        self.search.setClearButtonEnabled(True)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Tag", "Name", "VR", "Value"])
        self.tree.setAlternatingRowColors(True)
        self.tree.setUniformRowHeights(True)
        # Tag, Name and VR sized to their content's usual width, Value takes the rest: with fixed
        # widths summing past the dock's width, the Value column started off-screen
        hdr = self.tree.header()
        hdr.setStretchLastSection(True)
        hdr.setMinimumSectionSize(30)
        hdr.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        hdr.setSectionResizeMode(1, QHeaderView.ResizeMode.Interactive)
        hdr.setSectionResizeMode(2, QHeaderView.ResizeMode.Interactive)
        self.tree.setColumnWidth(0, 92)
        self.tree.setColumnWidth(1, 170)
        self.tree.setColumnWidth(2, 30)
        self.tree.setTextElideMode(Qt.TextElideMode.ElideRight)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.title)
        lay.addWidget(self.search)
        lay.addWidget(self.tree)
        self.search.textChanged.connect(self.apply_filter)
        self._key = None
        self.unreadable = 0

    def set_dataset(self, ds, title: str = "", key=None) -> None:
        """Show ``ds`` (pydicom Dataset); ``key`` skips rebuilding when the same file is shown again."""
        if key is not None and key == self._key:
            return
        self._key = key
        self.tree.clear()
        self.unreadable = 0
        if ds is not None:
            self._add(self.tree.invisibleRootItem(), ds)
            meta_ds = getattr(ds, "file_meta", None)
            if meta_ds is not None and len(meta_ds):
                meta = QTreeWidgetItem(["(0002,xxxx)", "File Meta Information", "", ""])
                self.tree.addTopLevelItem(meta)
                self._add(meta, meta_ds)
        self.title.setText(title + (f"  — {self.unreadable} element(s) unreadable (marked red)"
                                    if self.unreadable else ""))
        self.apply_filter(self.search.text())

    def _add(self, parent: QTreeWidgetItem, ds, depth: int = 0) -> None:
        """One row per element; an element pydicom cannot convert is shown as unreadable (red)
        with the reason, and the rows after it still appear (a damaged value must not hide the
        readable rest of the header)."""
        try:
            tags = list(ds.keys())
        except Exception as exc:  # noqa: BLE001 - a dataset that cannot even list its tags
            self._unreadable(parent, "", f"<element list unreadable: {type(exc).__name__}>")
            return
        for tag in tags:
            label = f"({tag.group:04X},{tag.element:04X})"
            try:
                elem = ds[tag]
                item = QTreeWidgetItem([label, elem.name, str(elem.VR), _value_text(elem)])
            except Exception as exc:  # noqa: BLE001 - shown, never raised
                self._unreadable(parent, label, f"<unreadable: {type(exc).__name__}>")
                continue
            item.setToolTip(3, item.text(3))
            parent.addChild(item)
            if elem.VR == "SQ":
                if depth >= MAX_DEPTH:
                    self._unreadable(item, "", f"<nested deeper than {MAX_DEPTH} levels; not shown>")
                    continue
                try:
                    items = list(elem.value)
                except Exception as exc:  # noqa: BLE001
                    self._unreadable(item, "", f"<sequence items unreadable: {type(exc).__name__}>")
                    continue
                for k, sub in enumerate(items):
                    it = QTreeWidgetItem(["", f"Item {k + 1}", "", ""])
                    item.addChild(it)
                    self._add(it, sub, depth + 1)

    def _unreadable(self, parent: QTreeWidgetItem, tag: str, text: str) -> None:
        item = QTreeWidgetItem([tag, "(unreadable element)", "", text])
        item.setForeground(1, QBrush(QColor("#c0392b")))
        item.setForeground(3, QBrush(QColor("#c0392b")))
        item.setToolTip(3, "pydicom could not convert this element's value; the file is damaged here")
        parent.addChild(item)
        self.unreadable += 1

    def apply_filter(self, text: str) -> None:
        q = text.strip().lower()
        qn = q.replace("(", "").replace(")", "").replace(",", "").replace(" ", "")

        def visit(item: QTreeWidgetItem) -> bool:
            hit = not q or any(q in item.text(c).lower() for c in (1, 3)) or (
                qn and qn in item.text(0).lower().replace("(", "").replace(")", "").replace(",", ""))
            child_hit = False
            for i in range(item.childCount()):
                child_hit = visit(item.child(i)) or child_hit
            item.setHidden(not (hit or child_hit))
            if q and child_hit:
                item.setExpanded(True)
            return bool(hit or child_hit)

        root = self.tree.invisibleRootItem()
        for i in range(root.childCount()):
            visit(root.child(i))

    def visible_rows(self) -> list[tuple[str, str, str]]:
        """(tag, name, value) of every visible row (tests, copy)."""
        out = []

        def walk(item):
            for i in range(item.childCount()):
                ch = item.child(i)
                if not ch.isHidden():
                    out.append((ch.text(0), ch.text(1), ch.text(3)))
                    walk(ch)
        walk(self.tree.invisibleRootItem())
        return out
