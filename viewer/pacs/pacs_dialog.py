"""PACS query/retrieve dialog and DICOM network settings dialog (research use only).

Network work runs in a TaskRunner thread (viewer.qt_workers), never in the GUI thread. Retrieved
studies are filed into ``engine.paths.store_dir()`` (by our storage SCP for C-MOVE, or by the
C-GET association) and then shown via ``main_window.open_path(store_dir())``.
Patient names/IDs appear in the table only; nothing here logs them.
"""
from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import QDate, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDateEdit, QDialog,
                               QDialogButtonBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout,
                               QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPlainTextEdit,
                               QProgressBar, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from engine import paths
from engine.interop import network as net
from engine.interop.netconfig import NetworkSettings, Peer, TLSSettings, load_settings, save_settings
from engine.interop.received import StoredInstance
from engine.interop.storage_scp import StorageSCP
from engine.results import RESEARCH_USE
from viewer.qt_workers import TaskRunner

log = logging.getLogger(__name__)
UID_ROLE = Qt.ItemDataRole.UserRole + 1
MODALITIES = ["", "CR", "DX", "CT", "MR", "SR", "OT", "PT", "US"]


# --------------------------------------------------------------------------------------------
# the app-wide storage SCP (one per main window) and the browser refresh it triggers
# --------------------------------------------------------------------------------------------
class StoreRefresher(QObject):
    """Re-opens ``store_dir()`` in the browser shortly after instances stop arriving.

    ``notify`` may be called from any thread (the SCP's); the signal is queued to the GUI thread
    and a single-shot timer debounces a burst of C-STOREs into one ``open_path``."""

    _arrived = Signal(str)

    def __init__(self, main_window, delay_ms: int = 1500):
        super().__init__(main_window if isinstance(main_window, QObject) else None)
        self.main_window = main_window
        self.series_uids: list[str] = []
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(delay_ms)
        self.timer.timeout.connect(lambda: self.refresh())
        self._arrived.connect(self._on_arrived)

    def notify(self, rec: StoredInstance) -> None:
        self._arrived.emit(rec.series_uid)

    def _on_arrived(self, series_uid: str) -> None:
        if series_uid not in self.series_uids:
            self.series_uids.append(series_uid)
        self.timer.start()

    def refresh(self, show_series: list[str] | None = None) -> None:
        """Open the store now; afterwards display the first of ``show_series`` (if any)."""
        self.timer.stop()
        self.series_uids.clear()
        mw = self.main_window
        if mw is None or not hasattr(mw, "open_path"):
            return
        want = [u for u in (show_series or []) if u]
        if want and hasattr(mw, "index_loaded") and hasattr(mw, "select_series"):
            def _select(_result, mw=mw, want=want) -> None:
                try:
                    mw.index_loaded.disconnect(_select)
                except (RuntimeError, TypeError):
                    pass
                for uid in want:
                    if mw.index.find_series(uid) is not None:
                        mw.select_series(uid)
                        break
            mw.index_loaded.connect(_select)
        try:
            mw.open_path(paths.store_dir(), select=False)
        except TypeError:                # a host whose open_path has no 'select' keyword
            mw.open_path(paths.store_dir())


def store_refresher(main_window) -> StoreRefresher:
    r = getattr(main_window, "pacs_refresher", None)
    if r is None:
        r = StoreRefresher(main_window)
        main_window.pacs_refresher = r
    return r


def ensure_storage_scp(main_window, settings: NetworkSettings) -> StorageSCP:
    """Start (or reuse) the storage SCP that receives C-MOVE results; kept on the main window.

    Restarted when the settings changed (AE title, port, allow-list, TLS). Instances pushed by
    any allowed sender refresh the browser (debounced)."""
    scp: StorageSCP | None = getattr(main_window, "pacs_scp", None)
    if scp is not None and scp.running and scp.settings == settings:
        return scp
    if scp is not None:
        scp.stop()
    scp = StorageSCP(settings, on_stored=store_refresher(main_window).notify)
    scp.start()
    main_window.pacs_scp = scp
    if hasattr(main_window, "destroyed"):
        main_window.destroyed.connect(lambda *_: scp.stop())
    return scp


def stop_storage_scp(main_window) -> None:
    scp = getattr(main_window, "pacs_scp", None)
    if scp is not None:
        scp.stop()
        main_window.pacs_scp = None


def _yyyymmdd(edit: QDateEdit, enabled: QCheckBox) -> str:
    return edit.date().toString("yyyyMMdd") if enabled.isChecked() else ""


def _fmt_date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


def _fmt_name(pn: str) -> str:
    parts = [p for p in pn.split("^") if p]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "") if parts else ""


# --------------------------------------------------------------------------------------------
# Query/Retrieve
# --------------------------------------------------------------------------------------------
class QueryRetrieveDialog(QDialog):
    """Search a PACS by name, ID, date range and modality; retrieve studies or series."""

    search_done = Signal(int)             # number of studies found (tests, status)
    retrieve_done = Signal(object)        # net.RetrieveResult

    STUDY_COLS = ["Patient name", "Patient ID", "Birth date", "Study date", "Modalities",
                  "Description", "Accession", "Series", "Images"]
    SERIES_COLS = ["#", "Modality", "Description", "Images"]

    def __init__(self, main_window=None, settings: NetworkSettings | None = None, parent: QWidget | None = None):
        super().__init__(parent if parent is not None else main_window)
        self.setWindowTitle(f"Query / Retrieve  —  {RESEARCH_USE}")
        self.setObjectName("pacs_query_retrieve")
        self.main_window = main_window
        self.runner = TaskRunner(self, max_threads=2)
        self._job = None
        self._scp_mark = None
        self.studies: list[net.StudyMatch] = []
        self.series: list[net.SeriesMatch] = []
        self.last_result: net.RetrieveResult | None = None
        self.resize(1050, 640)
        self._build()
        self.reload_settings(settings)

    # -- layout ----------------------------------------------------------------------------------
    def _build(self) -> None:
        top = QHBoxLayout()
        self.peer_combo = QComboBox()
        self.peer_combo.setMinimumWidth(220)
        self.echo_btn = QPushButton("Test connection")
        self.echo_btn.clicked.connect(self.echo)
        self.settings_btn = QPushButton("Network settings…")
        self.settings_btn.clicked.connect(self._open_settings)
        top.addWidget(QLabel("PACS:"))
        top.addWidget(self.peer_combo, 1)
        top.addWidget(self.echo_btn)
        top.addWidget(self.settings_btn)

        form = QGridLayout()
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("part of the name, e.g. smith (* and ? allowed)")
        self.id_edit = QLineEdit()
        self.id_edit.setPlaceholderText("exact patient ID")
        self.acc_edit = QLineEdit()
        self.acc_edit.setPlaceholderText("accession number")
        self.modality_combo = QComboBox()
        self.modality_combo.addItems([m or "any" for m in MODALITIES])
        self.from_check, self.to_check = QCheckBox("from"), QCheckBox("to")
        self.from_date, self.to_date = QDateEdit(), QDateEdit()
        for chk, ed, d in ((self.from_check, self.from_date, QDate.currentDate().addYears(-1)),
                           (self.to_check, self.to_date, QDate.currentDate())):
            ed.setCalendarPopup(True)
            ed.setDisplayFormat("yyyy-MM-dd")
            ed.setDate(d)
            ed.setEnabled(False)
            chk.toggled.connect(ed.setEnabled)
        for e in (self.name_edit, self.id_edit, self.acc_edit):
            e.returnPressed.connect(self.search)
        self.search_btn = QPushButton("Search")
        self.search_btn.setDefault(True)
        self.search_btn.clicked.connect(self.search)
        form.addWidget(QLabel("Patient name"), 0, 0)
        form.addWidget(self.name_edit, 0, 1)
        form.addWidget(QLabel("Patient ID"), 0, 2)
        form.addWidget(self.id_edit, 0, 3)
        form.addWidget(QLabel("Accession"), 0, 4)
        form.addWidget(self.acc_edit, 0, 5)
        form.addWidget(QLabel("Study date"), 1, 0)
        dates = QHBoxLayout()
        for w in (self.from_check, self.from_date, self.to_check, self.to_date):
            dates.addWidget(w)
        dates.addStretch(1)
        form.addLayout(dates, 1, 1, 1, 3)
        form.addWidget(QLabel("Modality"), 1, 4)
        form.addWidget(self.modality_combo, 1, 5)
        form.addWidget(self.search_btn, 0, 6, 2, 1)

        self.study_table = self._table(self.STUDY_COLS)
        self.study_table.itemSelectionChanged.connect(self._study_selected)
        self.study_table.itemDoubleClicked.connect(lambda *_: self.retrieve())
        self.series_table = self._table(self.SERIES_COLS)
        self.series_table.setMaximumHeight(170)

        bottom = QHBoxLayout()
        self.status = QLabel("Choose a PACS and search.")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setMaximumWidth(220)
        self.retrieve_btn = QPushButton("Retrieve")
        self.retrieve_btn.setEnabled(False)
        self.retrieve_btn.clicked.connect(self.retrieve)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        bottom.addWidget(self.status, 1)
        bottom.addWidget(self.progress)
        bottom.addWidget(self.retrieve_btn)
        bottom.addWidget(self.cancel_btn)
        bottom.addWidget(close)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(form)
        lay.addWidget(self.study_table, 3)
        lay.addWidget(QLabel("Series of the selected study (select some to retrieve only those):"))
        lay.addWidget(self.series_table, 1)
        lay.addLayout(bottom)

    @staticmethod
    def _table(cols: list[str]) -> QTableWidget:
        t = QTableWidget(0, len(cols))
        t.setHorizontalHeaderLabels(cols)
        t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        t.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        t.setSortingEnabled(True)
        t.verticalHeader().setVisible(False)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        t.horizontalHeader().setStretchLastSection(True)
        return t

    # -- settings --------------------------------------------------------------------------------
    def reload_settings(self, settings: NetworkSettings | None = None) -> None:
        try:
            self.settings = settings or load_settings()
        except ValueError as exc:
            self.settings = NetworkSettings()
            self._say(str(exc), error=True)
        self.peer_combo.clear()
        for p in self.settings.peers:
            self.peer_combo.addItem(f"{p.name}  ({p.ae_title}@{p.host}:{p.port})", p.name)
        has = bool(self.settings.peers)
        for w in (self.echo_btn, self.search_btn):
            w.setEnabled(has)
        if not has:
            self._say("No PACS configured: add one in Network settings.")

    def _open_settings(self) -> None:
        dlg = NetworkSettingsDialog(self.settings, self)
        dlg.saved.connect(lambda s: self.reload_settings(s))
        dlg.open()

    def current_peer(self) -> Peer | None:
        name = self.peer_combo.currentData()
        try:
            return self.settings.peer(name) if name else None
        except KeyError:
            return None

    # -- helpers ---------------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #d9534f;" if error else "")

    def _busy(self, busy: bool, cancellable: bool = False) -> None:
        self.search_btn.setEnabled(not busy and bool(self.settings.peers))
        self.echo_btn.setEnabled(not busy and bool(self.settings.peers))
        self.retrieve_btn.setEnabled(not busy and bool(self.study_table.selectedItems()))
        self.cancel_btn.setEnabled(busy and cancellable)

    def _failed(self, exc: BaseException) -> None:
        self._busy(False)
        self._job = None
        msg = str(exc) if isinstance(exc, (net.NetworkError, ValueError)) else \
            f"Unexpected error ({type(exc).__name__}): {exc}"
        self._say(msg, error=True)

    def query(self) -> net.StudyQuery:
        return net.StudyQuery(
            patient_name=self.name_edit.text(), patient_id=self.id_edit.text(),
            accession_number=self.acc_edit.text(),
            date_from=_yyyymmdd(self.from_date, self.from_check), date_to=_yyyymmdd(self.to_date, self.to_check),
            modality=MODALITIES[self.modality_combo.currentIndex()])

    # -- actions ---------------------------------------------------------------------------------
    def echo(self) -> None:
        peer = self.current_peer()
        if peer is None:
            return
        self._busy(True)
        self._say(f"Testing connection to {peer.name}…")
        self.runner.submit(net.echo, self.settings, peer,
                           on_result=lambda dt: (self._busy(False), self._say(
                               f"{peer.name} answered C-ECHO in {dt * 1000:.0f} ms.")),
                           on_error=self._failed)

    def search(self) -> None:
        peer = self.current_peer()
        if peer is None:
            self._say("No PACS selected: add one in Network settings.", error=True)
            return
        q = self.query()
        self._busy(True)
        self._say(f"Searching {peer.name}…")
        self.progress.setRange(0, 0)
        self.runner.submit(net.find_studies, self.settings, peer, q,
                           on_result=self._show_studies, on_error=self._search_failed)

    def _search_failed(self, exc: BaseException) -> None:
        self.progress.setRange(0, 100)
        self._failed(exc)

    def _show_studies(self, studies: list) -> None:
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.studies = list(studies)
        t = self.study_table
        t.clearSelection()               # so selecting row 0 below always signals (series list)
        t.setSortingEnabled(False)
        t.setRowCount(len(self.studies))
        for r, s in enumerate(self.studies):
            vals = [_fmt_name(s.patient_name), s.patient_id, _fmt_date(s.birth_date), _fmt_date(s.study_date),
                    "/".join(s.modalities), s.description, s.accession_number,
                    "" if s.n_series is None else str(s.n_series),
                    "" if s.n_instances is None else str(s.n_instances)]
            for c, v in enumerate(vals):
                it = QTableWidgetItem(v)
                it.setData(UID_ROLE, s.study_uid)
                t.setItem(r, c, it)
        t.setSortingEnabled(True)
        self.series_table.setRowCount(0)
        self._busy(False)
        n = len(self.studies)
        self._say(f"{n} stud{'y' if n == 1 else 'ies'} found." if n else "No matching studies.")
        if n:
            t.selectRow(0)
        self.search_done.emit(n)

    def selected_study_uids(self) -> list[str]:
        rows = sorted({i.row() for i in self.study_table.selectedItems()})
        return [str(self.study_table.item(r, 0).data(UID_ROLE)) for r in rows]

    def _study_selected(self) -> None:
        uids = self.selected_study_uids()
        self.retrieve_btn.setEnabled(bool(uids) and not self.cancel_btn.isEnabled())
        self.series_table.setRowCount(0)
        peer = self.current_peer()
        if len(uids) != 1 or peer is None:
            return
        uid = uids[0]
        self.runner.submit(net.find_series, self.settings, peer, uid,
                           on_result=lambda s, uid=uid: self._show_series(uid, s),
                           on_error=lambda e: self._say(f"Could not list the series: {e}", error=True))

    def _show_series(self, study_uid: str, series: list) -> None:
        if self.selected_study_uids() != [study_uid]:
            return                       # the user moved on
        self.series = list(series)
        t = self.series_table
        t.setSortingEnabled(False)
        t.setRowCount(len(self.series))
        for r, s in enumerate(self.series):
            for c, v in enumerate(["" if s.series_number is None else str(s.series_number), s.modality,
                                   s.description, "" if s.n_instances is None else str(s.n_instances)]):
                it = QTableWidgetItem(v)
                it.setData(UID_ROLE, s.series_uid)
                t.setItem(r, c, it)
        t.setSortingEnabled(True)

    def selected_series_uids(self) -> list[str]:
        rows = sorted({i.row() for i in self.series_table.selectedItems()})
        return [str(self.series_table.item(r, 0).data(UID_ROLE)) for r in rows]

    def retrieve(self) -> None:
        """Retrieve the selected studies (or only the selected series of one study)."""
        peer = self.current_peer()
        studies = self.selected_study_uids()
        if peer is None or not studies:
            return
        series = self.selected_series_uids() if len(studies) == 1 else []
        targets = [(studies[0], s) for s in series] if series else [(s, None) for s in studies]
        host = self.main_window if self.main_window is not None else self
        self._scp_mark = None
        if peer.retrieve == "C-MOVE":
            try:
                scp = ensure_storage_scp(host, self.settings)
            except (net.NetworkError, ValueError) as exc:
                self._say(f"Cannot receive images: {exc}", error=True)
                return
            self._scp_mark = (scp, len(scp.stored))
        self._busy(True, cancellable=True)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self._say(f"Retrieving {len(targets)} item(s) from {peer.name} with {peer.retrieve}…")
        self._job = self.runner.submit(self._retrieve_all, self.settings, peer, targets,
                                       on_result=self._retrieved, on_error=self._failed,
                                       on_progress=self._on_progress, with_cancel=True)

    @staticmethod
    def _retrieve_all(settings: NetworkSettings, peer: Peer, targets: list[tuple[str, str | None]],
                      progress=None, cancel=None) -> net.RetrieveResult:
        """Worker thread: one C-MOVE/C-GET per target, progress spread over all of them."""
        total = net.RetrieveResult()
        n = len(targets)
        for i, (study, series) in enumerate(targets):
            def sub(f: float, msg: str, i=i) -> None:
                if progress is not None:
                    progress((i + f) / n, f"{'study' if series is None else 'series'} {i + 1}/{n}: {msg}")
            fn = net.move if peer.retrieve == "C-MOVE" else net.get
            r = fn(settings, peer, study, series, progress=sub, cancel=cancel)
            total.completed += r.completed
            total.failed += r.failed
            total.warning += r.warning
            total.stored += r.stored
            if r.cancelled:
                total.cancelled = True
                break
        return total

    def _on_progress(self, fraction: float, text: str) -> None:
        self.progress.setValue(int(round(100 * fraction)))
        self._say(text)

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._say("Cancelling…")

    def _retrieved(self, res: net.RetrieveResult) -> None:
        self._job = None
        self.last_result = res
        self._busy(False)
        self.progress.setValue(100 if not res.cancelled else self.progress.value())
        if res.cancelled:
            self._say(f"Cancelled after {res.completed} image(s).")
        else:
            extra = f", {res.failed} failed" if res.failed else ""
            self._say(f"Retrieved {res.completed} image(s){extra}. They are in the Studies panel.",
                      error=bool(res.failed))
        received = list(res.stored)
        if self._scp_mark is not None:
            scp, start = self._scp_mark
            received += scp.stored[start:]
        if res.completed and self.main_window is not None and hasattr(self.main_window, "open_path"):
            seen: list[str] = []
            for rec in received:
                if rec.series_uid not in seen:
                    seen.append(rec.series_uid)
            store_refresher(self.main_window).refresh(show_series=seen)
        self.retrieve_done.emit(res)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.runner.cancel_all()
        super().closeEvent(event)


# --------------------------------------------------------------------------------------------
# Network settings
# --------------------------------------------------------------------------------------------
class _FileField(QWidget):
    def __init__(self, caption: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.edit = QLineEdit()
        btn = QPushButton("Browse…")
        btn.clicked.connect(lambda: self._browse(caption))
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.edit, 1)
        lay.addWidget(btn)

    def _browse(self, caption: str) -> None:
        f, _ = QFileDialog.getOpenFileName(self, caption, str(Path(self.edit.text()).parent),
                                           "PEM files (*.pem *.crt *.key);;All files (*)")
        if f:
            self.edit.setText(f)


class NetworkSettingsDialog(QDialog):
    """Our AE title/port, PACS peers, calling-AE allow-list and TLS files (engine.interop.netconfig)."""

    saved = Signal(object)      # NetworkSettings
    PEER_COLS = ["Name", "AE title", "Host", "Port", "TLS", "Retrieve"]

    def __init__(self, settings: NetworkSettings | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Network settings")
        self.setObjectName("pacs_network_settings")
        self.runner = TaskRunner(self, max_threads=1)
        if settings is None:
            try:
                settings = load_settings()
            except ValueError as exc:
                settings = NetworkSettings()
                self._initial_error = str(exc)
        self._build()
        self.set_settings(settings)
        if getattr(self, "_initial_error", ""):
            self._say(self._initial_error, error=True)

    def _build(self) -> None:
        local = QGroupBox("This workstation (storage SCP)")
        f = QFormLayout(local)
        self.ae_edit = QLineEdit()
        self.ae_edit.setMaxLength(16)
        self.port_spin = QSpinBox()
        self.port_spin.setRange(0, 65535)
        self.port_spin.setSpecialValueText("any free port")
        self.bind_edit = QLineEdit()
        self.timeout_spin = QDoubleSpinBox()
        self.timeout_spin.setRange(1, 600)
        self.timeout_spin.setSuffix(" s")
        self.start_scp_check = QCheckBox("Start the storage SCP when ChestView starts")
        f.addRow("Our AE title", self.ae_edit)
        f.addRow("Port", self.port_spin)
        f.addRow("Listen on", self.bind_edit)
        f.addRow("Timeout", self.timeout_spin)
        f.addRow("", self.start_scp_check)

        peers = QGroupBox("PACS peers")
        pv = QVBoxLayout(peers)
        self.peer_table = QTableWidget(0, len(self.PEER_COLS))
        self.peer_table.setHorizontalHeaderLabels(self.PEER_COLS)
        hh = self.peer_table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.peer_table.verticalHeader().setVisible(False)
        pb = QHBoxLayout()
        add, rem, echo = QPushButton("Add"), QPushButton("Remove"), QPushButton("Test connection")
        add.clicked.connect(lambda: self._add_peer_row(Peer("New PACS", "PACS", "127.0.0.1", 104)))
        rem.clicked.connect(self._remove_peer)
        echo.clicked.connect(self.echo_selected)
        self.echo_btn = echo
        for b in (add, rem, echo):
            pb.addWidget(b)
        pb.addStretch(1)
        pv.addWidget(self.peer_table)
        pv.addLayout(pb)

        allow = QGroupBox("Who may send to us (calling AE titles)")
        av = QVBoxLayout(allow)
        self.allow_edit = QPlainTextEdit()
        self.allow_edit.setPlaceholderText("one AE title per line, e.g. CT_SCANNER1")
        self.allow_edit.setMaximumHeight(70)
        self.allow_peers_check = QCheckBox("Also allow every configured PACS peer")
        av.addWidget(self.allow_edit)
        av.addWidget(self.allow_peers_check)

        tls = QGroupBox("TLS (DICOM secure transport, PS3.15 B.9)")
        tf = QFormLayout(tls)
        self.tls_check = QCheckBox("Our storage SCP accepts TLS only (peers: tick TLS in their row)")
        self.cert_field = _FileField("Certificate (PEM)")
        self.key_field = _FileField("Private key (PEM)")
        self.ca_field = _FileField("Trusted CA / peer certificates (PEM)")
        self.verify_check = QCheckBox("Verify peer certificates")
        tf.addRow("", self.tls_check)
        tf.addRow("Certificate", self.cert_field)
        tf.addRow("Private key", self.key_field)
        tf.addRow("Trusted CAs", self.ca_field)
        tf.addRow("", self.verify_check)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        self.buttons = buttons

        grid = QGridLayout(self)
        grid.setColumnStretch(0, 2)
        grid.setColumnStretch(1, 3)
        grid.addWidget(local, 0, 0)
        grid.addWidget(allow, 1, 0)
        grid.addWidget(peers, 0, 1)
        grid.addWidget(tls, 1, 1)
        grid.addWidget(self.status, 2, 0, 1, 2)
        grid.addWidget(buttons, 3, 0, 1, 2)
        self.resize(1100, 560)

    # -- model <-> widgets ------------------------------------------------------------------------
    def set_settings(self, s: NetworkSettings) -> None:
        self.ae_edit.setText(s.ae_title)
        self.port_spin.setValue(int(s.port))
        self.bind_edit.setText(s.bind_address)
        self.timeout_spin.setValue(float(s.timeout_s))
        self.start_scp_check.setChecked(s.start_scp)
        self.peer_table.setRowCount(0)
        for p in s.peers:
            self._add_peer_row(p)
        self.allow_edit.setPlainText("\n".join(s.allowed_calling_aets))
        self.allow_peers_check.setChecked(s.allow_peers)
        self.tls_check.setChecked(s.tls.enabled)
        self.cert_field.edit.setText(s.tls.cert_file)
        self.key_field.edit.setText(s.tls.key_file)
        self.ca_field.edit.setText(s.tls.ca_file)
        self.verify_check.setChecked(s.tls.verify_peer)

    def _add_peer_row(self, p: Peer) -> None:
        t = self.peer_table
        r = t.rowCount()
        t.insertRow(r)
        for c, v in enumerate([p.name, p.ae_title, p.host]):
            t.setItem(r, c, QTableWidgetItem(v))
        port = QSpinBox()
        port.setRange(1, 65535)
        port.setValue(int(p.port))
        t.setCellWidget(r, 3, port)
        tls = QCheckBox()
        tls.setChecked(p.tls)
        t.setCellWidget(r, 4, tls)
        method = QComboBox()
        method.addItems(["C-MOVE", "C-GET"])
        method.setCurrentText(p.retrieve)
        t.setCellWidget(r, 5, method)

    def _remove_peer(self) -> None:
        for r in sorted({i.row() for i in self.peer_table.selectedIndexes()}, reverse=True):
            self.peer_table.removeRow(r)

    def peers(self) -> list[Peer]:
        t = self.peer_table
        out = []
        for r in range(t.rowCount()):
            txt = [(t.item(r, c).text() if t.item(r, c) else "").strip() for c in range(3)]
            out.append(Peer(name=txt[0], ae_title=txt[1], host=txt[2], port=t.cellWidget(r, 3).value(),
                            tls=t.cellWidget(r, 4).isChecked(), retrieve=t.cellWidget(r, 5).currentText()))
        return out

    def settings(self) -> NetworkSettings:
        """The settings as entered (not validated)."""
        return NetworkSettings(
            ae_title=self.ae_edit.text().strip(), port=self.port_spin.value(),
            bind_address=self.bind_edit.text().strip() or "0.0.0.0", peers=self.peers(),
            allowed_calling_aets=[ln.strip() for ln in self.allow_edit.toPlainText().splitlines() if ln.strip()],
            allow_peers=self.allow_peers_check.isChecked(), start_scp=self.start_scp_check.isChecked(),
            timeout_s=self.timeout_spin.value(),
            tls=TLSSettings(enabled=self.tls_check.isChecked(), cert_file=self.cert_field.edit.text().strip(),
                            key_file=self.key_field.edit.text().strip(), ca_file=self.ca_field.edit.text().strip(),
                            verify_peer=self.verify_check.isChecked()))

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #d9534f;" if error else "")

    def save(self) -> bool:
        s = self.settings()
        try:
            save_settings(s)
        except (ValueError, OSError) as exc:
            self._say(str(exc), error=True)
            return False
        self._say("Saved.")
        self.saved.emit(s)
        self.accept()
        return True

    def echo_selected(self) -> None:
        rows = sorted({i.row() for i in self.peer_table.selectedIndexes()}) or [0]
        peers = self.peers()
        if not peers or rows[0] >= len(peers):
            self._say("Add a PACS peer first.", error=True)
            return
        s, p = self.settings(), peers[rows[0]]
        try:
            p.validate()
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        self._say(f"Testing {p.name}…")
        self.runner.submit(net.echo, s, p,
                           on_result=lambda dt: self._say(f"{p.name} answered C-ECHO in {dt * 1000:.0f} ms."),
                           on_error=lambda e: self._say(str(e), error=True))


# --------------------------------------------------------------------------------------------
# entry points used by viewer.main_window's menu actions
# --------------------------------------------------------------------------------------------
def autostart_storage_scp(main_window) -> StorageSCP | None:
    """Start the storage SCP at viewer start-up when the settings ask for it (``start_scp``).

    Never raises: a problem (port in use, empty allow-list, bad TLS files) is shown through
    ``main_window.show_message`` when available and None is returned."""
    try:
        s = load_settings()
        return ensure_storage_scp(main_window, s) if s.start_scp else None
    except (net.NetworkError, ValueError) as exc:
        if hasattr(main_window, "show_message"):
            main_window.show_message("Storage SCP not started", str(exc))
        return None


def open_query_retrieve(main_window) -> QueryRetrieveDialog:
    """Show the (single, non-modal) query/retrieve dialog of this main window."""
    dlg = getattr(main_window, "_pacs_qr_dialog", None)
    if dlg is None:
        dlg = QueryRetrieveDialog(main_window)
        main_window._pacs_qr_dialog = dlg
    else:
        dlg.reload_settings()
    dlg.show()
    dlg.raise_()
    dlg.activateWindow()
    return dlg


def open_network_settings(main_window) -> NetworkSettingsDialog:
    """Show the network settings dialog; on save, a running storage SCP is restarted."""
    dlg = NetworkSettingsDialog(parent=main_window)
    dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

    def _saved(s: NetworkSettings) -> None:
        scp = getattr(main_window, "pacs_scp", None)
        if scp is not None and scp.running:
            try:
                ensure_storage_scp(main_window, s)
            except (net.NetworkError, ValueError) as exc:
                if hasattr(main_window, "show_message"):
                    main_window.show_message("Storage SCP", str(exc))
        qr = getattr(main_window, "_pacs_qr_dialog", None)
        if qr is not None:
            qr.reload_settings(s)

    dlg.saved.connect(_saved)
    dlg.open()
    return dlg
