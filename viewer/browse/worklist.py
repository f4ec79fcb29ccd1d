"""GUI worklist: the batch review (engine.review.batch) of a folder, as a sortable triage table.

Why here and not a second implementation: the dialog runs exactly ``engine.review.batch.run_batch`` (the
same analyze call, journal and report as ``python main.py batch``) in a worker thread, and fills
the table from the per-study records as they are committed. Results live in
``user_data_dir()/worklists/<hash of folder>/`` so reopening the same folder resumes and shows
what was already reviewed. Double-click opens the study in the main window with its overlay.

Importing this module never imports torch (engine.review.batch loads models lazily in the worker).
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QUrl, Signal
from PySide6.QtGui import QBrush, QColor, QDesktopServices
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QDialog, QFileDialog, QHBoxLayout, QHeaderView,
                               QLabel, QLineEdit, QProgressBar, QPushButton, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from engine.results import RESEARCH_USE

COLUMNS = ("Patient", "Study date", "Modality", "Series", "Status", "Validity", "Score", "Top finding",
           "Extent 0-8", "Opacity 0-6", "Models", "Error")
COL_SCORE, COL_SEVERITY, COL_VALIDITY = 6, 8, 5
UID_ROLE = Qt.ItemDataRole.UserRole + 1
SORT_ROLE = Qt.ItemDataRole.UserRole + 2


def worklist_out_dir(folder: str | Path) -> Path:
    """Where the worklist of ``folder`` keeps its journal and report (never in the input)."""
    from engine.paths import user_data_dir

    key = hashlib.sha256(str(Path(folder).resolve()).encode("utf-8")).hexdigest()[:16]
    return user_data_dir() / "worklists" / key


class _SortItem(QTableWidgetItem):
    """Sorts numerically by SORT_ROLE (empty cells last when sorting descending)."""

    def __lt__(self, other: QTableWidgetItem) -> bool:  # type: ignore[override]
        a, b = self.data(SORT_ROLE), other.data(SORT_ROLE)
        if a is None or b is None:  # text columns (QTableWidgetItem.__lt__ would recurse in PySide6)
            return self.text().lower() < other.text().lower()
        return a < b


class _Bridge(QObject):
    """Emitted from the worker thread; Qt queues the signals into the GUI thread."""

    study = Signal(object)
    progress = Signal(int, int, float, float)
    problem = Signal(str, str)
    finished = Signal(object)
    failed = Signal(str)


class BatchRunner:
    """Runs engine.review.batch.run_batch in a daemon thread; ``cancel()`` stops after the current series."""

    def __init__(self, folder: Path, out: Path, deidentify: bool = False, workers: int | None = None):
        self.folder, self.out, self.deidentify, self.workers = Path(folder), Path(out), deidentify, workers
        self.signals = _Bridge()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chestview-worklist", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from engine.review.batch import run_batch
        from engine.review.stages import BatchOptions, default_workers

        sig = self.signals
        try:
            opts = BatchOptions(self.folder, self.out, deidentify=self.deidentify,
                                workers=self.workers or default_workers())
            summary = run_batch(opts, progress=lambda d, t, r, e: sig.progress.emit(d, t, r, e),
                                on_problem=lambda p, r: sig.problem.emit(p, r),
                                on_study=lambda rec: sig.study.emit(rec), cancel=self._cancel.is_set)
        except Exception as e:  # shown in the dialog; the journal keeps what was finished
            sig.failed.emit(f"{type(e).__name__}: {e}")
            return
        sig.finished.emit(summary)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class WorklistDialog(QDialog):
    """Folder chooser, progress/cancel, and the triage table (sortable by score, severity, validity)."""

    def __init__(self, main_window: Any = None, folder: str | Path | None = None):
        super().__init__(main_window if isinstance(main_window, QWidget) else None)
        self.main_window = main_window
        self.setWindowTitle("Worklist — batch review (research use only)")
        self.resize(1100, 560)
        self.runner: BatchRunner | None = None
        self.folder: Path | None = None
        self.summary: Any = None
        self._rows: dict[str, int] = {}

        self.path_edit = QLineEdit(str(folder) if folder else "")
        self.path_edit.setPlaceholderText("folder, DICOMDIR or ZIP with many studies")
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._browse)
        self.deid_box = QCheckBox("De-identify report")
        self.start_btn = QPushButton("Review")
        self.start_btn.clicked.connect(lambda: self.start(self.path_edit.text().strip()))
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.report_btn = QPushButton("Open report")
        self.report_btn.setEnabled(False)
        self.report_btn.clicked.connect(self._open_report)
        top = QHBoxLayout()
        for w in (QLabel("Input:"), self.path_edit, browse, self.deid_box, self.start_btn, self.cancel_btn,
                  self.report_btn):
            top.addWidget(w)

        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m studies")
        self.status = QLabel("Choose a folder and press Review.")
        self.problems = QLabel("")
        self.problems.setWordWrap(True)
        self.problems.setStyleSheet("color: #b00020")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.horizontalHeader().setSortIndicator(COL_SCORE, Qt.SortOrder.DescendingOrder)
        self.table.setSortingEnabled(True)  # highest score first until the user clicks a header
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellDoubleClicked.connect(self._double_clicked)
        ruo = QLabel(f"<b>{RESEARCH_USE}.</b> Greyed scores failed the validity gate or come from an "
                     "untrained model: they are not findings. Double-click a row to open it.")
        ruo.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.problems)
        lay.addWidget(ruo)
        self._problem_lines: list[str] = []

    # -- actions -------------------------------------------------------------------------------
    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of studies to review")
        if d:
            self.path_edit.setText(d)

    def start(self, folder: str | Path, out: str | Path | None = None, workers: int | None = None) -> bool:
        """Start (or resume) the review of ``folder``; False with a message when it cannot."""
        if self.runner is not None and self.runner.is_running():
            return False
        if not folder or not Path(folder).exists():
            self.status.setText("That folder does not exist: choose a folder, DICOMDIR or ZIP file.")
            return False
        self.folder = Path(folder)
        self.path_edit.setText(str(folder))
        self.table.setRowCount(0)
        self._rows.clear()
        self._problem_lines.clear()
        self.problems.setText("")
        self.summary = None
        out_dir = Path(out) if out else worklist_out_dir(folder)
        self.runner = BatchRunner(self.folder, out_dir, self.deid_box.isChecked(), workers)
        s = self.runner.signals
        s.study.connect(self._add_study)
        s.progress.connect(self._progress)
        s.problem.connect(self._problem)
        s.finished.connect(self._finished)
        s.failed.connect(self._failed)
        self.start_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.report_btn.setEnabled(False)
        self.status.setText("Indexing…")
        self.runner.start()
        return True

    def cancel(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            self.status.setText("Cancelling after the current series… (finished studies are kept)")

    def is_running(self) -> bool:
        return self.runner is not None and self.runner.is_running()

    def _open_report(self) -> None:
        if self.summary is not None and self.summary.report_html:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.summary.report_html)))

    # -- worker signals --------------------------------------------------------------------------
    def _progress(self, done: int, total: int, rate: float, eta: float) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)
        eta_txt = "" if eta != eta else f", about {int(eta // 60)} min {int(eta % 60)} s left"
        self.status.setText(f"{done} of {total} studies reviewed ({rate:.1f}/min{eta_txt})")

    def _problem(self, path: str, reason: str) -> None:
        self._problem_lines.append(f"{path}: {reason}")
        shown = self._problem_lines[-4:]
        more = len(self._problem_lines) - len(shown)
        self.problems.setText(f"{len(self._problem_lines)} problem(s)" + (f" (+{more} more in the report)" if more else "")
                              + ":\n" + "\n".join(shown))

    def _finished(self, summary: Any) -> None:
        self.summary = summary
        self.start_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.report_btn.setEnabled(summary.report_html is not None)
        self.progress.setMaximum(max(summary.studies_total, 1))
        self.progress.setValue(summary.studies_done + summary.studies_skipped)
        state = "Cancelled" if summary.cancelled else "Done"
        self.status.setText(f"{state}: {summary.studies_done + summary.studies_skipped} of {summary.studies_total} "
                            f"studies, {summary.series_failed} series failed, {summary.problem_files} files skipped. "
                            f"Report: {summary.report_html}")

    def _failed(self, msg: str) -> None:
        self.start_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.status.setText(f"The review stopped: {msg}")

    def _add_study(self, record: dict) -> None:
        self.table.setSortingEnabled(False)
        for r in record.get("rows", []):
            uid = r["series_uid"]
            row = self._rows.get(uid)
            if row is None:
                row = self.table.rowCount()
                self.table.insertRow(row)
                self._rows[uid] = row
            self._fill_row(row, r)
        self.table.setSortingEnabled(True)  # re-sorts by the current header indicator
        self._reindex()

    def _reindex(self) -> None:
        self._rows = {self.table.item(i, 0).data(UID_ROLE): i for i in range(self.table.rowCount())
                      if self.table.item(i, 0) is not None}

    def _fill_row(self, row: int, r: dict) -> None:
        valid = r.get("valid")
        validity = "" if valid is None else ("passed" if valid else "failed: " + "; ".join(r.get("validity_reasons") or []))
        vals: list[tuple[str, Any]] = [
            (r.get("patient_id") or "", None), (r.get("study_date") or "", None),
            (f"{r.get('modality', '')} ({r.get('kind', '')})", None),
            (r.get("series_description") or "", None), (r.get("status") or "", None),
            (validity, None if valid is None else (1.0 if valid else 0.0)),
            ("" if r.get("score") is None else f"{r['score']:.3f}", _num(r.get("score"))),
            (r.get("top_label") or "", None),
            ("" if r.get("severity_extent") is None else f"{r['severity_extent']:.2f}", _num(r.get("severity_extent"))),
            ("" if r.get("severity_opacity") is None else f"{r['severity_opacity']:.2f}", _num(r.get("severity_opacity"))),
            ("; ".join(r.get("models") or []), None), (r.get("error") or "", None),
        ]
        grey = r.get("status") in ("invalid", "unsupported") or any("untrained" in m for m in r.get("models") or [])
        for col, (text, key) in enumerate(vals):
            item = _SortItem(str(text))
            item.setToolTip(str(text))
            if key is not None:
                item.setData(SORT_ROLE, key)
            elif col in (COL_SCORE, COL_SEVERITY, COL_SEVERITY + 1):
                item.setData(SORT_ROLE, -1.0)  # empty scores sort below every real score
            if col == 0:
                item.setData(UID_ROLE, r["series_uid"])
            if grey and col in (COL_SCORE, COL_SEVERITY, COL_SEVERITY + 1, 7):
                item.setForeground(QBrush(QColor("#999999")))
            if r.get("status") == "failed":
                item.setBackground(QBrush(QColor("#fff0f0")))
            self.table.setItem(row, col, item)

    # -- navigation ------------------------------------------------------------------------------
    def series_uid_at(self, row: int) -> str | None:
        item = self.table.item(row, 0)
        return item.data(UID_ROLE) if item is not None else None

    def _double_clicked(self, row: int, _col: int) -> None:
        uid = self.series_uid_at(row)
        if uid is None or self.folder is None or self.main_window is None:
            return
        self.open_in_viewer(uid)

    def open_in_viewer(self, series_uid: str) -> None:
        """main_window.open_path(folder) then select_series(uid) once the folder is indexed.

        open_path indexes in the background; when the main window has ``index_loaded`` the
        selection waits for it, and a folder already open is not indexed again.
        """
        mw = self.main_window
        idx = getattr(mw, "index", None)
        finder = getattr(idx, "find_series", None)
        if finder is not None and finder(series_uid) is not None:
            mw.select_series(series_uid)
            return
        sig = getattr(mw, "index_loaded", None)
        if sig is None:
            mw.open_path(str(self.folder))
            mw.select_series(series_uid)
            return

        def _loaded(_result: Any) -> None:
            try:
                sig.disconnect(_loaded)
            except (RuntimeError, TypeError):
                pass
            mw.select_series(series_uid)

        sig.connect(_loaded)
        try:
            mw.open_path(str(self.folder), select=False)
        except TypeError:
            mw.open_path(str(self.folder))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt name
        if self.runner is not None and self.runner.is_running():
            self.runner.cancel()
        super().closeEvent(event)


def open_worklist(main_window: Any) -> WorklistDialog:
    """Show the (single) worklist dialog of ``main_window`` (menu action of the viewer)."""
    dlg = getattr(main_window, "_chestview_worklist", None)
    if not isinstance(dlg, WorklistDialog):
        dlg = WorklistDialog(main_window)
        try:
            main_window._chestview_worklist = dlg
        except AttributeError:
            pass
    dlg.show()
    dlg.raise_()
    dlg.activateWindow()
    return dlg
