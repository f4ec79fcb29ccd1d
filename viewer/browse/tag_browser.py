"""Searchable DICOM tag browser for the current image (header only, sequences nested).

Search matches the tag number ("0028,0030" or "00280030"), the keyword/name or the value,
case-insensitively; parents of matching sequence items stay visible so the context is clear.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QHeaderView, QLabel, QLineEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout,
                               QWidget)

from engine.dicom.tag_tree import HeaderTree, TagRow


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

    def set_tree(self, tree: HeaderTree | None, title: str = "", key=None) -> None:
        """Show ``tree`` (engine.dicom.tag_tree rows, e.g. from ``engine.service.header_tree``);
        ``key`` skips rebuilding when the same file is shown again."""
        if key is not None and key == self._key:
            return
        self._key = key
        self.tree.clear()
        self.unreadable = tree.unreadable if tree is not None else 0
        if tree is not None:
            self._add(self.tree.invisibleRootItem(), tree.rows)
        self.title.setText(title + (f"  — {self.unreadable} element(s) unreadable (marked red)"
                                    if self.unreadable else ""))
        self.apply_filter(self.search.text())

    def _add(self, parent: QTreeWidgetItem, rows: list[TagRow]) -> None:
        for row in rows:
            item = QTreeWidgetItem([row.tag, row.name, row.vr, row.value])
            if row.unreadable:
                item.setForeground(1, QBrush(QColor("#c0392b")))
                item.setForeground(3, QBrush(QColor("#c0392b")))
                item.setToolTip(3, "pydicom could not convert this element's value; the file is damaged here")
            elif row.tag:
                item.setToolTip(3, row.value)
            parent.addChild(item)
            if row.children:
                self._add(item, row.children)

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
