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

    if not host.process_enabled():
        preload_model_runtime()
    try:
        return host.call(fn_name, series, *args, progress=progress, cancel=cancel)
    except AIHostError as e:
        from engine.ai.analysis import failed_result

        return failed_result(series, f"Analysis failed: {e}")


def model_infos() -> list:
    """ModelInfo for every registered model (trained or labelled 'untrained'), read in the AI
    process. Raises (AIHostError, ModelError) with a message the viewer shows."""
    from engine.ai import host

    if not host.process_enabled():
        preload_model_runtime()
    return host.call("model_infos")


def start_ai_host() -> None:
    """Start the AI process and load the models there now, without waiting, for a caller that knows
    an analysis will follow (the viewer needs none: auto-run's first analysis starts the process).
    No-op when the models run in this process (``CHESTVIEW_AI_PROCESS=0``)."""
    from engine.ai.host import start_ai_host as start

    start()


_TORCH_LIBS = ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libtorch_python.so")
# The CUDA component wheels ``import torch`` loads itself with ctypes.CDLL (torch/__init__.py
# ``_preload_cuda_deps``), in its order: libcublasLt before libcublas.
_CUDA_DEPS = (("cublas", "libcublasLt.so.*[0-9]"), ("cublas", "libcublas.so.*[0-9]"),
              ("cudnn", "libcudnn.so.*[0-9]"), ("cuda_nvrtc", "libnvrtc.so.*[0-9]"),
              ("cuda_nvrtc", "libnvrtc-builtins.so.*[0-9]"), ("cuda_runtime", "libcudart.so.*[0-9]"),
              ("cuda_cupti", "libcupti.so.*[0-9]"), ("cufft", "libcufft.so.*[0-9]"),
              ("curand", "libcurand.so.*[0-9]"), ("nvjitlink", "libnvJitLink.so.*[0-9]"),
              ("cusparse", "libcusparse.so.*[0-9]"), ("cusparselt", "libcusparseLt.so.*[0-9]"),
              ("cusolver", "libcusolver.so.*[0-9]"), ("nccl", "libnccl.so.*[0-9]"),
              ("nvshmem", "libnvshmem_host.so.*[0-9]"), ("cufile", "libcufile.so.*[0-9]"),
              ("nvtx", "libnvToolsExt.so.*[0-9]"))
# Native libraries of the packages the analysis imports next (torchvision.models imports
# torch._dynamo, which imports triton): the import system and torch.ops.load_library dlopen them
# with the GIL held (0.2-0.5 s each on a 2-core machine).
_EXTENSIONS = ("triton/_C/libtriton.so", "torchvision/_C_stable.so", "torchvision/_C.so",
               "torchvision/image_stable.so", "torchvision/image.so")
_preload_lock = __import__("threading").Lock()
_preloaded = False


def torch_preload_plan(torch_dir: str) -> list[tuple[str, bool, bool]]:
    """(library path, RTLD_GLOBAL, only with CUDA) in the order ``import torch`` loads them.

    First ``lib/libtorch_global_deps.so`` (global, as torch does), then the CUDA component wheels
    found beside torch (``nvidia/<name>/lib``, ``nvidia/cuXX/lib``: local, as torch's
    ``ctypes.CDLL``; torch loads them only when its global deps pulled in libcudart), then
    ``_TORCH_LIBS``, then ``_EXTENSIONS`` (local, as the import system). Missing files are left
    out; nothing is loaded here.
    """
    import glob
    import os

    libdir = os.path.join(torch_dir, "lib")
    site = os.path.dirname(torch_dir)
    plan = []
    deps = os.path.join(libdir, "libtorch_global_deps.so")
    if os.path.exists(deps):
        plan.append((deps, True, False))
    for folder, pattern in _CUDA_DEPS:
        found = (sorted(glob.glob(os.path.join(site, "nvidia", folder, "lib", pattern)))
                 + sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "lib", pattern)))
                 + sorted(glob.glob(os.path.join(site, folder, "lib", pattern))))
        if found:
            plan.append((found[0], False, True))
    plan += [(os.path.join(libdir, n), True, False) for n in _TORCH_LIBS if os.path.exists(os.path.join(libdir, n))]
    plan += [(os.path.join(site, n), False, False) for n in _EXTENSIONS if os.path.exists(os.path.join(site, n))]
    return plan


def preload_model_runtime() -> None:
    """Map torch's shared libraries into the process with the GIL released, before ``import torch``.

    ``import torch`` dlopens libtorch_global_deps, the CUDA component libraries (cuBLAS, cuDNN:
    hundreds of MB) and libtorch_cpu, and the model imports triton's and torchvision's native
    libraries, through ctypes.CDLL and the import system, which hold the GIL for each whole call: the viewer's GUI thread froze for 0.2-0.9 s at the first analysis
    (bench/bench_viewer_start.py). Calling libc's dlopen(3) through a ctypes *function* releases
    the GIL, so the same work happens while the GUI keeps running, in torch's order
    (:func:`torch_preload_plan`); the later import finds the libraries already loaded (dlopen is
    reference counted). Linux only, best effort, idempotent, thread-safe (a second caller waits,
    without the GIL, for the first).
    """
    global _preloaded
    import sys

    if _preloaded or "torch" in sys.modules or not sys.platform.startswith("linux"):
        return
    with _preload_lock:   # held until the libraries are mapped: a second caller waits for them
        if _preloaded:
            return
        try:
            import ctypes
            import importlib.util
            import os

            spec = importlib.util.find_spec("torch")
            if spec is None or not spec.origin:
                return
            libc = ctypes.CDLL(None)
            libc.dlopen.restype = ctypes.c_void_p
            libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
            cuda = None
            for path, is_global, needs_cuda in torch_preload_plan(os.path.dirname(spec.origin)):
                if needs_cuda:
                    if cuda is None:   # torch loads them only when its global deps pulled in libcudart
                        with open("/proc/self/maps") as fh:
                            cuda = "libcudart.so" in fh.read()
                    if not cuda:
                        continue
                libc.dlopen(path.encode(), os.RTLD_NOW | (os.RTLD_GLOBAL if is_global else os.RTLD_LOCAL))
        except Exception:  # noqa: BLE001 - an optimisation only: import torch loads them anyway
            pass
        finally:
            _preloaded = True
