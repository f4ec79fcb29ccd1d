"""AI results over time for the displayed patient: a small plot of severity and finding
probabilities by study date in the findings panel; a point (or table row) opens that study beside
the current one.

The numbers come from ``engine.reading.priors`` (pure); this module only renders them. Earlier studies
without a result are analysed one at a time in a worker thread through ``engine.service``
(never on the GUI thread, never while the current series' own analysis runs), when the AI panel's
auto-analyse is on, else on a button press. Studies come from everything opened (folders, the
local store the hanging protocol looks in, PACS retrievals filed there).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from engine.reading.hanging import modality_group_of, primary_series, same_patient_studies
from engine.reading.priors import SEVERITY_SCALES, TrendPoint, metric_series, patient_trend, series_to_analyse
from viewer.qt_workers import TaskRunner

log = logging.getLogger(__name__)

COLOURS = ("#4e9be0", "#e8603c", "#59c36a", "#b07ce0", "#f0b429", "#c0846a", "#36c2cf", "#9a9a9a")
STUDY_ROLE = Qt.ItemDataRole.UserRole + 7


class TrendPanel(QGroupBox):
    """Plot (y = fraction of each metric's own scale, x = study date) and a table of the values."""

    study_requested = Signal(str)          # Study Instance UID of a clicked point or row
    analyse_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Over time (this patient)", parent)
        self.setToolTip("AI results of this patient's studies by study date; click a point or a row "
                        "to open that study beside the current one")
        self.points: list[TrendPoint] = []
        self.current_study = ""
        self._plot: pg.PlotWidget | None = None     # built on first use (start-up time)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.setMaximumHeight(160)
        self.table.setWordWrap(True)
        self.table.cellDoubleClicked.connect(self._on_row)
        self.table.cellClicked.connect(self._on_row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.pacs_label = QLabel("")
        self.pacs_label.setObjectName("pacsPriors")
        self.pacs_label.setWordWrap(True)
        self.pacs_label.hide()
        self.analyse_button = QPushButton("Analyse earlier studies")
        self.analyse_button.clicked.connect(self.analyse_requested)
        row = QHBoxLayout()
        row.addWidget(self.status, 1)
        row.addWidget(self.analyse_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.legend)
        lay.addWidget(self.table)
        lay.addLayout(row)
        lay.addWidget(self.pacs_label)
        self.scatters: list[pg.ScatterPlotItem] = []
        self.hide()

    @property
    def plot(self) -> pg.PlotWidget:
        """The trend plot, made when first needed: a PlotWidget with its axes and menus takes
        0.1 s to build, and most patients opened have no earlier study to plot."""
        if self._plot is None:
            plot = pg.PlotWidget(background="#202020")
            plot.setMinimumHeight(180)
            plot.setMaximumHeight(230)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            plot.setMenuEnabled(False)
            pi = plot.getPlotItem()
            pi.showGrid(x=False, y=True, alpha=0.25)
            pi.setYRange(0.0, 1.0, padding=0.06)
            # probabilities on 0-1; each severity scale drawn as a fraction of its maximum (legend, table)
            pi.getAxis("left").setTicks([[(0.0, "0"), (0.5, "½"), (1.0, "1")]])
            pi.getAxis("left").setWidth(24)
            self.layout().insertWidget(0, plot)
            self._plot = plot
        return self._plot

    # -- rendering -------------------------------------------------------------------------
    def set_points(self, points: Sequence[TrendPoint], current_study: str, n_studies: int,
                   missing: int = 0, running: bool = False) -> None:
        self.points = list(points)
        self.current_study = current_study
        pi = self.plot.getPlotItem()
        pi.clear()
        self.scatters = []
        series = metric_series(self.points)
        xs = np.array([p.when.timestamp() for p in self.points], float)   # type: ignore[union-attr]
        html = []
        for n, (key, label, mx, vals) in enumerate(series):
            col = COLOURS[n % len(COLOURS)]
            ok = [(x, v / mx) for x, v in zip(xs, vals) if v is not None]
            style = Qt.PenStyle.DashLine if key.startswith("p:") else Qt.PenStyle.SolidLine
            if len(ok) > 1:
                pi.addItem(pg.PlotDataItem([a for a, _ in ok], [b for _, b in ok],
                                           pen=pg.mkPen(col, width=2, style=style)))
            spots = [{"pos": (x, v / mx), "data": p.study_uid, "size": 11 if p.study_uid == current_study else 8,
                      "brush": pg.mkBrush(col), "pen": pg.mkPen("w" if p.study_uid == current_study else col)}
                     for x, v, p in zip(xs, vals, self.points) if v is not None]
            sc = pg.ScatterPlotItem(spots=spots, hoverable=True, tip=None)
            sc.setToolTip(label)
            sc.sigClicked.connect(self._on_scatter)
            pi.addItem(sc)
            self.scatters.append(sc)
            dash = "┄" if key.startswith("p:") else "━"
            html.append(f"<span style='color:{col}'>{dash}●</span>&nbsp;{label}")
        cur = next((p for p in self.points if p.study_uid == current_study), None)
        if cur is not None:
            pi.addItem(pg.InfiniteLine(cur.when.timestamp(), angle=90,   # type: ignore[union-attr]
                                       pen=pg.mkPen("#e0a030", width=1, style=Qt.PenStyle.DotLine)))
        if len(xs):
            span = max(float(xs.max() - xs.min()), 86400.0)
            pi.setXRange(float(xs.min()) - 0.08 * span, float(xs.max()) + 0.08 * span, padding=0)
            pi.getAxis("bottom").setTicks([_date_ticks(self.points)])
        pi.setYRange(0.0, 1.0, padding=0.06)
        self.legend.setText("&nbsp;&nbsp; ".join(html) if html else
                            "<i>no AI result for this patient's studies yet</i>")
        self._fill_table(series)
        parts = [f"{len(self.points)} of {n_studies} studies analysed"]
        if running:
            parts.append("analysing an earlier study…")
        elif missing:
            parts.append(f"{missing} not analysed yet")
        self.status.setText("; ".join(parts) + ". Click a point to open that study beside this one.")
        self.analyse_button.setVisible(bool(missing) and not running)

    def set_remote(self, found: Sequence[tuple[str, Any]], problems: Sequence[str] = ()) -> None:
        """Earlier studies a PACS holds that are not opened here (read-only C-FIND results)."""
        if not found and not problems:
            self.pacs_label.hide()
            return
        parts = []
        if found:
            items = ", ".join(f"{_dash_date(m.study_date)} {'/'.join(m.modalities) or '?'}" for _, m in found[:6])
            peers = ", ".join(dict.fromkeys(name for name, _ in found))
            parts.append(f"On {peers}: {len(found)} earlier stud{'y' if len(found) == 1 else 'ies'} not opened "
                         f"here ({items}{', …' if len(found) > 6 else ''}). File ▸ Query/Retrieve fetches "
                         "them; they join this trend once retrieved.")
        if problems:
            parts.append("PACS not reachable: " + "; ".join(problems[:2]))
        self.pacs_label.setText(" ".join(parts))
        self.pacs_label.show()

    def _fill_table(self, series) -> None:
        cols = ["Date"] + [_short(label) for _, label, _, _ in series]
        self.table.clear()
        self.table.setColumnCount(len(cols))
        self.table.setRowCount(len(self.points))
        self.table.setHorizontalHeaderLabels(cols)
        for r, p in enumerate(reversed(self.points)):          # newest first
            k = len(self.points) - 1 - r
            date = p.when.strftime("%Y-%m-%d")   # type: ignore[union-attr]
            it = QTableWidgetItem(("▶ " if p.study_uid == self.current_study else "") + date)
            it.setData(STUDY_ROLE, p.study_uid)
            if p.valid is False:
                it.setToolTip("image check failed: values are not findings")
            self.table.setItem(r, 0, it)
            for c, (key, _, mx, vals) in enumerate(series, start=1):
                v = vals[k]
                txt = "" if v is None else (f"{v:.2f}" if mx <= 1.0 else f"{v:.1f}")
                cell = QTableWidgetItem(txt)
                cell.setData(STUDY_ROLE, p.study_uid)
                cell.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if p.valid is False:
                    cell.setForeground(Qt.GlobalColor.gray)
                self.table.setItem(r, c, cell)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)

    # -- clicks ----------------------------------------------------------------------------
    def _on_scatter(self, _item, spots, *_ev) -> None:
        if len(spots):
            self.study_requested.emit(str(spots[0].data()))

    def _on_row(self, row: int, _col: int) -> None:
        it = self.table.item(row, 0)
        if it is not None:
            self.study_requested.emit(str(it.data(STUDY_ROLE)))

    def spot_scene_pos(self, study_uid: str):
        """Scene position of the study's first marker (tests; also where a tooltip would go)."""
        for sc in self.scatters:
            for s in sc.points():
                if s.data() == study_uid:
                    return sc.mapToScene(s.pos())
        return None


def _short(label: str) -> str:
    """Column header: scale dropped (it is in the legend), words on two lines to stay narrow."""
    if label.startswith("P(") and label.endswith(")"):
        label = label[2:-1]
    for full, short in (("Extent 0–8", "Extent"), ("Opacity 0–6", "Opacity"), ("Brixia 0–18", "Brixia"),
                        ("CT score 0–25", "CT score"), ("CT opacity %", "CT opac. %")):
        label = label.replace(full, short)
    return label.replace(" ", "\n", 1)


def _dash_date(d: str) -> str:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) >= 8 and d[:8].isdigit() else d


def _date_ticks(points: Sequence[TrendPoint]) -> list[tuple[float, str]]:
    """One tick per study date: MM-DD within one year, else YYYY-MM (the table has full dates)."""
    whens = [p.when for p in points if p.when is not None]
    if not whens:
        return []
    fmt = "%m-%d" if (max(whens) - min(whens)).days <= 366 else "%Y-%m"
    return [(w.timestamp(), w.strftime(fmt)) for w in whens]


# --------------------------------------------------------------------------------------------
class TrendController(QObject):
    """Keeps the trend of the displayed patient filled: results of the AI panel, plus earlier
    studies analysed in a worker (one at a time, after the current series' analysis)."""

    def __init__(self, main_window: Any, analyze: Callable[..., Any] | None = None):
        super().__init__(main_window)
        self.mw = main_window
        self.ai = getattr(main_window, "ai", None)
        if analyze is None:
            from engine.service import analyze_series as analyze
        self.analyze = analyze
        self.panel = TrendPanel()
        self.results: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self.runner = TaskRunner(self, max_threads=1)
        self.queue: list[Any] = []
        self.running: str | None = None
        self._patient = ""
        self.remote: list[tuple[str, Any]] = []
        self._pacs_asked: set[str] = set()
        if self.ai is not None:
            self.ai.panel.add_section(self.panel)
            self.ai.runner.result.connect(self._on_panel_result)
            if hasattr(self.ai.runner, "busy_changed"):
                self.ai.runner.busy_changed.connect(lambda busy: busy or self._next())
        main_window.series_opened.connect(lambda _s: self.refresh())
        main_window.index_loaded.connect(lambda _r: self.refresh())
        self.panel.study_requested.connect(self.open_beside)
        self.panel.analyse_requested.connect(self.analyse_missing)

    # -- state -----------------------------------------------------------------------------
    def _context(self):
        cur = getattr(self.mw, "current_series", None)
        if cur is None or cur.kind not in ("xray", "ct"):
            return None
        group = modality_group_of(cur.modality)
        studies = [st for st in same_patient_studies(self.mw.index, cur.patient_id)
                   if primary_series(st, group) is not None]
        return cur, group, studies

    def all_results(self) -> dict[str, Any]:
        out = dict(self.results)
        if self.ai is not None:
            out.update(getattr(self.ai, "results", {}) or {})
        return out

    def refresh(self) -> None:
        ctx = self._context()
        if ctx is not None and ctx[0].patient_id != self._patient:
            self._patient = ctx[0].patient_id
            self.queue = []                  # another patient's priors are no longer wanted
            self.remote = []
            self.panel.set_remote([])
            self.query_pacs()
        if ctx is None or (len(ctx[2]) < 2 and not self.remote):
            self.panel.hide()
            return
        cur, group, studies = ctx
        results = self.all_results()
        points = patient_trend(studies, results, group)
        missing = [se for se in series_to_analyse(studies, results, group)
                   if se.series_uid != cur.series_uid and se.series_uid not in self.failed]
        self.panel.set_points(points, cur.study_uid, len(studies), len(missing), self.running is not None)
        self.panel.show()
        if missing and self._auto():
            self._enqueue(missing)

    def query_pacs(self, settings: Any = None) -> bool:
        """Ask the configured PACS peers (read-only C-FIND by Patient ID) for earlier studies of the
        displayed patient, once per patient, in a worker thread."""
        ctx = self._context()
        if ctx is None:
            return False
        cur = ctx[0]
        study = self.mw.index.study_of(cur)
        if settings is None:
            try:
                from engine.interop.netconfig import load_settings
                settings = load_settings()
            except Exception as exc:  # noqa: BLE001 - a broken settings file must not stop the viewer
                log.info("network settings unreadable: %s", type(exc).__name__)
                return False
        if study is None or not settings.peers or cur.patient_id in self._pacs_asked:
            return False
        self._pacs_asked.add(cur.patient_id)
        local = {st.study_uid for st in same_patient_studies(self.mw.index, cur.patient_id)}
        from engine.reading.priors import query_pacs_priors
        pid = cur.patient_id

        def done(res) -> None:
            if pid != self._patient:
                return
            found, problems = res
            self.remote = list(found)
            self.panel.set_remote(found, problems)
            self.refresh()

        runner = getattr(self.mw, "runner", None) or self.runner     # not behind a queued analysis
        runner.submit(query_pacs_priors, settings, study, local, with_cancel=True, on_result=done,
                           on_error=lambda e: self.panel.set_remote([], [str(getattr(e, "reason", e))]))
        return True

    def _auto(self) -> bool:
        if self.ai is None:
            return False
        on = getattr(self.ai, "auto_run", False)       # a property of viewer.ai.ai_controller
        return bool(on() if callable(on) else on)

    def analyse_missing(self) -> None:
        ctx = self._context()
        if ctx is None:
            return
        cur, group, studies = ctx
        self._enqueue([se for se in series_to_analyse(studies, self.all_results(), group)
                       if se.series_uid != cur.series_uid])

    def _enqueue(self, series: Sequence[Any]) -> None:
        known = {se.series_uid for se in self.queue} | ({self.running} if self.running else set())
        self.queue += [se for se in series if se.series_uid not in known]
        self._next()

    def _next(self) -> None:
        if self.running or not self.queue:
            return
        if self.ai is not None and self.ai.is_busy():
            return                            # the current series first; busy_changed restarts us
        se = self.queue.pop(0)
        self.running = se.series_uid
        self.runner.submit(self.analyze, se, with_cancel=True,
                           on_result=lambda r, uid=se.series_uid: self._on_own_result(uid, r),
                           on_error=lambda e, uid=se.series_uid: self._on_own_error(uid, e))
        self.refresh()

    def _on_own_result(self, uid: str, result: Any) -> None:
        self.running = None
        self.results[uid] = result
        self.refresh()
        self._next()

    def _on_own_error(self, uid: str, exc: BaseException) -> None:
        self.running = None
        self.failed[uid] = str(getattr(exc, "reason", exc))
        log.info("trend: an earlier study could not be analysed: %s", type(exc).__name__)
        self.refresh()
        self._next()

    def _on_panel_result(self, result: Any) -> None:
        self.results[getattr(result, "series_uid", "")] = result
        self.refresh()

    def wait_idle(self, msecs: int = 120000) -> None:
        """Block until queued analyses finished and were delivered (tests)."""
        from PySide6.QtCore import QCoreApplication, QElapsedTimer

        t = QElapsedTimer()
        t.start()
        while (self.running or self.queue or self.runner.active()) and t.elapsed() < msecs:
            self.runner.wait_done(50)
            QCoreApplication.processEvents()
            if not self.running and self.queue:
                self._next()
        QCoreApplication.processEvents()

    def shutdown(self) -> None:
        self.queue = []
        self.runner.cancel_all()

    # -- side by side ------------------------------------------------------------------------
    def open_beside(self, study_uid: str) -> bool:
        """Show ``study_uid``'s best series (same modality group) in viewport 2, linked by
        position for CT (viewer.view.layouts)."""
        ctx = self._context()
        if ctx is None:
            return False
        cur, group, studies = ctx
        study = next((st for st in studies if st.study_uid == study_uid), None)
        if study is None or study.study_uid == cur.study_uid:
            return False
        se = primary_series(study, group)
        grid = getattr(self.mw, "viewports", None)
        if se is None or grid is None:
            return False
        if grid.layout_name() == "1x1":
            grid.set_layout("1x2")
        if group == "CT":
            grid.link([0, 1])
        else:
            grid.unlink()
        hanging = getattr(self.mw, "hanging", None)
        caption = hanging._caption(se, 1) if hanging is not None else ""
        grid.load_series(1, se, caption=caption)
        return True


__all__ = ["TrendPanel", "TrendController", "SEVERITY_SCALES"]
