"""The small API the viewer calls (DESIGN.md: viewer never imports torch).

Everything here is importable without torch; model code is imported lazily inside the calls
that need it, which the viewer runs in worker threads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.dicom.records import IndexResult, SeriesRecord
from engine.results import StudyResult

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


def open_path(path: str | Path) -> IndexResult:
    """Index a folder, DICOMDIR or ZIP (headers only); problems are listed, never raised."""
    from engine.dicom.index import index_path

    return index_path(path)


def analyze_series(series: SeriesRecord, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> StudyResult:
    """Run the AI pipeline on one series (call from a worker thread, never the GUI thread)."""
    from engine.analysis import analyze

    return analyze(series, progress=progress, cancel=cancel)


def model_infos() -> list:
    """ModelInfo for every registered model (trained or labelled 'untrained')."""
    from engine.models.registry import list_model_infos

    return list_model_infos()


def analyze_volume(series: SeriesRecord, volume, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> StudyResult:
    """CT analysis on a Volume the viewer already loaded (engine.dicom.volume.load_volume), so the
    series is not read and held in memory twice. Same contract as ``analyze_series``: never raises
    for bad input (any unexpected failure falls back to the full ``analyze_series`` path and its
    error handling); raises AnalysisCancelled when ``cancel()`` is True. Worker thread only.
    (Added by the AI-viewer engineer.)"""
    import logging
    import time

    from engine.analysis import default_analyzer
    from engine.errors import AnalysisCancelled

    t0 = time.perf_counter()
    try:
        res = default_analyzer().analyze_volume(series, volume, progress=progress, cancel=cancel)
    except AnalysisCancelled:
        raise
    except Exception:  # noqa: BLE001 - the full path reports errors as StudyResult.error
        logging.getLogger(__name__).debug("analyze_volume failed; re-reading the series", exc_info=True)
        return analyze_series(series, progress=progress, cancel=cancel)
    res.timings_ms["total"] = (time.perf_counter() - t0) * 1000.0
    res.timings_ms.setdefault("load", 0.0)
    if progress is not None:
        progress(1.0, "done")
    return res
