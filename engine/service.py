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
