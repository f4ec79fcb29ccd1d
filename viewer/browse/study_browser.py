"""Patients -> studies -> series tree with thumbnails, plus the files that were skipped and why."""
from __future__ import annotations

from PySide6.QtCore import QMimeData, QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QLabel, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from engine.dicom.records import IndexResult, SeriesRecord
from engine.dicom.series_meta import display_text, format_date, format_person_name
from viewer.view.layouts import SERIES_MIME

UID_ROLE = Qt.ItemDataRole.UserRole + 1


class SeriesTree(QTreeWidget):
    """The browser tree; a series row can be dragged onto a viewport (viewer.view.layouts)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setDragEnabled(True)
        self.setDragDropMode(QTreeWidget.DragDropMode.DragOnly)

    def mimeTypes(self) -> list[str]:  # noqa: N802 - Qt API
        return [SERIES_MIME]

    def mimeData(self, items) -> QMimeData:  # noqa: N802 - Qt API
        md = QMimeData()
        uids = [str(it.data(0, UID_ROLE)) for it in items if it.data(0, UID_ROLE)]
        if uids:
            md.setData(SERIES_MIME, uids[0].encode("utf-8"))
            md.setText(uids[0])
        return md


def series_label(s: SeriesRecord) -> str:
    n = s.count
    frames = sum(max(1, i.frames) for i in s.instances)
    count = f"{n} image{'s' if n != 1 else ''}" if frames == n else f"{frames} frames"
    num = f"Se {s.series_number}  " if s.series_number is not None else ""
    return f"{num}{s.modality}  {display_text(s.series_description)}\n{count}".replace("  \n", "\n")


class StudyBrowser(QWidget):
    """Emits ``series_activated(series_uid)`` when the user picks a series."""

    series_activated = Signal(str)

    def __init__(self, parent: QWidget | None = None, icon_size: int = 64):
        super().__init__(parent)
        self.tree = SeriesTree()
        self.tree.setHeaderHidden(True)
        self.tree.setIconSize(QSize(icon_size, icon_size))
        self.tree.setIndentation(12)
        self.tree.setUniformRowHeights(False)
        self.summary = QLabel("Open a folder, DICOMDIR or ZIP (Ctrl+O) or drop it here.")
        self.summary.setWordWrap(True)
        self.summary.setObjectName("placeholder")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.summary)
        lay.addWidget(self.tree)
        self._series_items: dict[str, QTreeWidgetItem] = {}
        self.tree.itemClicked.connect(self._on_item)
        self.tree.itemActivated.connect(self._on_item)

    def set_index(self, index: IndexResult) -> None:
        self.tree.clear()
        self._series_items.clear()
        for p in index.patients:
            pname = format_person_name(p.patient_name) or "(no name)"
            pit = QTreeWidgetItem([f"{pname}  [{p.patient_id}]" + (f"  {p.sex}" if p.sex else "")])
            pit.setFlags(pit.flags() & ~Qt.ItemFlag.ItemIsDragEnabled)
            f = pit.font(0)
            f.setBold(True)
            pit.setFont(0, f)
            self.tree.addTopLevelItem(pit)
            for st in p.studies:
                sit = QTreeWidgetItem([f"{format_date(st.study_date)}  {display_text(st.study_description) or '(no description)'}"])
                sit.setToolTip(0, f"Accession {st.accession_number}" if st.accession_number else "")
                sit.setFlags(sit.flags() & ~Qt.ItemFlag.ItemIsDragEnabled)
                pit.addChild(sit)
                for se in st.series:
                    it = QTreeWidgetItem([series_label(se)])
                    it.setData(0, UID_ROLE, se.series_uid)
                    it.setToolTip(0, f"{se.modality} {se.body_part} {se.view_position}".strip())
                    sit.addChild(it)
                    self._series_items[se.series_uid] = it
            pit.setExpanded(True)
            for i in range(pit.childCount()):
                pit.child(i).setExpanded(True)
        n_series = len(self._series_items)
        txt = f"{len(index.patients)} patient(s), {n_series} series, {index.files_seen} file(s) read"
        if index.problems:
            txt += f"; {len(index.problems)} skipped"
            bad = QTreeWidgetItem([f"⚠ {len(index.problems)} file(s) skipped"])
            for pr in index.problems[:500]:
                ch = QTreeWidgetItem([f"{pr.path.rsplit('/', 1)[-1]}: {pr.reason}"])
                ch.setToolTip(0, f"{pr.path}\n{pr.reason}")
                bad.addChild(ch)
            self.tree.addTopLevelItem(bad)
        self.summary.setText(txt)

    def set_thumbnail(self, series_uid: str, image: QImage) -> None:
        it = self._series_items.get(series_uid)
        if it is not None:
            it.setIcon(0, QIcon(QPixmap.fromImage(image)))

    def has_thumbnail(self, series_uid: str) -> bool:
        it = self._series_items.get(series_uid)
        return it is not None and not it.icon(0).isNull()

    def select(self, series_uid: str) -> None:
        it = self._series_items.get(series_uid)
        if it is not None:
            self.tree.blockSignals(True)
            self.tree.setCurrentItem(it)
            self.tree.blockSignals(False)

    def series_uids(self) -> list[str]:
        return list(self._series_items)

    def _on_item(self, item: QTreeWidgetItem, _col: int = 0) -> None:
        uid = item.data(0, UID_ROLE)
        if uid:
            self.series_activated.emit(str(uid))
