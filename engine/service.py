"""The small API the viewer calls (DESIGN.md: viewer never imports torch).

Everything here is importable without torch. Decoding runs in the sandboxed children of
engine.dicom.safe_decode and model work in the AI process of engine.ai.host; the viewer calls both
from worker threads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.dicom.records import IndexResult, SeriesRecord
from engine.results import StudyResult

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


def _scrub_logs() -> None:
    """No identifiers in stderr or logs from any import of the engine by the viewer (DESIGN.md 5)."""
    from engine.logscrub import install

    install()


_scrub_logs()


def load_frame(path: str | Path, frame: int = 0):
    """One decoded Frame (engine.dicom.display.Frame) of an untrusted file, decoded in a sandboxed
    child process (engine.dicom.safe_decode): a hostile file becomes a LoadError, never a crash, hang or
    memory blow-up of the caller. Raises LoadError only."""
    from engine.dicom.safe_decode import bounded_load_frame

    return bounded_load_frame(path, frame)


def load_volume(series: SeriesRecord, progress: ProgressFn | None = None, cancel: CancelFn | None = None):
    """A CT series as engine.dicom.volume.Volume, decoded in a sandboxed child. LoadError only
    (AnalysisCancelled when ``cancel()`` turns True)."""
    from engine.dicom.safe_decode import bounded_load_volume

    return bounded_load_volume(series, progress=progress, cancel=cancel)


def read_header(path: str | Path):
    """The dataset without pixel data, parsed in a sandboxed child. LoadError only."""
    from engine.dicom.safe_decode import bounded_read_header

    return bounded_read_header(path)


def series_meta(path: str | Path):
    """engine.dicom.series_meta.SeriesMeta (what the viewer's annotations show) of one file's
    header, read in a sandboxed child. LoadError only."""
    from engine.dicom.safe_decode import bounded_series_meta

    return bounded_series_meta(path)


def header_tree(path: str | Path):
    """engine.dicom.tag_tree.HeaderTree (the tag browser's rows) of one file's header, parsed in
    a sandboxed child: plain data, so the viewer shows headers without importing pydicom.
    LoadError only."""
    from engine.dicom.safe_decode import bounded_header_tree

    return bounded_header_tree(path)


def overlay_planes(path: str | Path, frame: int = 0):
    """The DICOM overlay planes (60xx) of one frame as engine.dicom.overlays.OverlaySet (header
    only, size-checked before unpacking), read in a sandboxed child of the caller's lane (a
    worker thread: the background lane, never the one the GUI thread waits on). Never raises."""
    from engine.dicom.safe_decode import bounded_overlay_planes

    return bounded_overlay_planes(path, frame)


def thumbnail(series: SeriesRecord, size: int = 96):
    """uint8 thumbnail of the series' middle image, made in a sandboxed child. LoadError only."""
    from engine.dicom.safe_decode import bounded_thumbnail

    return bounded_thumbnail(series, size)


def set_wait_hook(fn: Callable[[], None] | None) -> None:
    """Called every ~10 ms while the calling thread waits on a sandboxed decode (the GUI passes
    one that serves timers and paint events). See engine.dicom.safe_decode.set_wait_hook."""
    from engine.dicom.safe_decode import set_wait_hook as _set

    _set(fn)


def warm_up() -> None:
    """Start the sandboxed decode processes now (call from a worker thread at startup) so the
    first image does not wait for them."""
    from engine.dicom.safe_decode import boundary_pool

    boundary_pool("interactive").submit(len, "").result()
    boundary_pool("background").submit(len, "").result()


def open_path(path: str | Path) -> IndexResult:
    """Index a folder, DICOMDIR or ZIP (headers only); problems are listed, never raised.

    The headers are read in a decode child (engine.dicom.safe_decode.bounded_index_path), whose
    pydicom is imported already: the viewer shows its first image without importing pydicom
    (0.3 s of its start-up). If that child cannot do it (it died on a header), the folder is
    indexed here instead, where each file's problem is reported on its own."""
    from engine.dicom.safe_decode import bounded_index_path
    from engine.errors import LoadError

    try:
        return bounded_index_path(path)
    except LoadError as exc:
        import logging

        logging.getLogger(__name__).info("indexing in the decoder failed (%s); indexing here", exc.reason)
    from engine.dicom.index import index_path

    return index_path(path)


def analyze_series(series: SeriesRecord, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> StudyResult:
    """Run the AI pipeline on one series (engine.ai.analysis.analyze) in the AI process
    (engine.ai.host), so this process never imports torch. Worker thread only. Never raises for bad
    input: failures, a stopped AI process included, are in ``StudyResult.error``; raises
    AnalysisCancelled when ``cancel()`` is True."""
    return _analysis("analyze_series", series, progress=progress, cancel=cancel)


def analyze_volume(series: SeriesRecord, volume, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> StudyResult:
    """CT analysis on a Volume the viewer already loaded (engine.dicom.volume.load_volume), so the
    series is not read twice (engine.ai.analysis.analyze_volume; its ``hu`` reaches the AI process
    through shared memory). Same contract as ``analyze_series``. Worker thread only."""
    return _analysis("analyze_volume", series, volume, progress=progress, cancel=cancel)


def _analysis(fn_name: str, series: SeriesRecord, *args, progress: ProgressFn | None,
              cancel: CancelFn | None) -> StudyResult:
    from engine.ai import host
    from engine.errors import AIHostError

    try:
        return host.call(fn_name, series, *args, progress=progress, cancel=cancel)
    except AIHostError as e:
        from engine.ai.analysis import failed_result

        return failed_result(series, f"Analysis failed: {e}")


def model_infos() -> list:
    """ModelInfo for every registered model (trained or labelled 'untrained'), read in the AI
    process. Raises (AIHostError, ModelError) with a message the viewer shows."""
    from engine.ai import host

    return host.call("model_infos")


def start_ai_host() -> None:
    """Start the AI process and load the models there now, without waiting, for a caller that knows
    an analysis will follow (the viewer needs none: auto-run's first analysis starts the process).
    No-op when the models run in this process (``CHESTVIEW_AI_PROCESS=0``)."""
    from engine.ai.host import start_ai_host as start

    start()
