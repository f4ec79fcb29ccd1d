"""Decode untrusted DICOM in a child process with a time limit and a memory bound (DESIGN.md 5).

Why: pydicom allocates whatever a header declares (4 GiB for 65535x65535), a small deflated file
inflates to hundreds of MiB, and crafted JPEG 2000 can hang a decoder. The loaders in
engine.dicom already refuse oversized headers, but a batch over a whole archive must also survive
what no check foresaw. So each decode runs in a separate process that

* has ``RLIMIT_AS`` set (an allocation beyond it fails with MemoryError instead of swapping the
  workstation to death), single-threaded native libraries and few malloc arenas;
* is killed (SIGKILL) and replaced when one task exceeds its time limit;
* is replaced when it dies (segfault, abort, OOM kill) — the task is reported, never fatal.

Children are started with the ``spawn`` context: the parent may hold torch threads, and forking
a multi-threaded process is unsafe (frozen builds need ``multiprocessing.freeze_support()``).

Public pieces (reused by the Ray engine, whose CPU tasks call :func:`decode_series` inside
:func:`run_limited` or in their own memory-bounded workers):

* :class:`Decoded` — what the decode stage hands to inference and the report (thumbnails only;
  full pixels stay in the child unless asked for).
* :func:`decode_series` — the decode stage itself (runs in whatever process calls it).
* :class:`LimitedPool` — N persistent children, per-task time limit, ``submit() -> Future``.
* :func:`run_limited` — one call in a one-shot limited child.
* :func:`reuse_decoded` — lets ``engine.analysis`` read the child's Frame/Volume (this thread
  only) instead of decoding the untrusted file again, unbounded, in the parent.

Frozen (PyInstaller) builds: spawned children need ``multiprocessing.freeze_support()``, which
the packaging runtime hook (packaging/rthooks/pyi_rth_chestview.py) calls.
"""
from __future__ import annotations

import functools
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from engine.errors import LoadError

THUMB_SIDE = 256           # X-ray / other thumbnails: longer side in pixels
CT_THUMB_SIDE = 192        # CT slice thumbnails (one per slice, so smaller)
DEFAULT_TIMEOUT_S = 60.0   # per series, plus TIMEOUT_PER_EXTRA_FILE_S per further file
TIMEOUT_PER_EXTRA_FILE_S = 2.0
DEFAULT_MEMORY_MB = 3072   # address-space bound of one decode child
MAX_RETURNED_PIXEL_BYTES = 160 * 2**20  # decoded pixels larger than this stay in the child


def default_memory_mb() -> int:
    """3 GiB, or half the machine's RAM per child when that is smaller."""
    try:
        import psutil

        half = int(psutil.virtual_memory().total / 2 / 2**20)
        return max(1024, min(DEFAULT_MEMORY_MB, half))
    except Exception:
        return DEFAULT_MEMORY_MB


def series_timeout(base_s: float, n_files: int) -> float:
    """Time limit of one series: ``base_s`` plus a little per extra file (a CT has hundreds)."""
    return float(base_s) + TIMEOUT_PER_EXTRA_FILE_S * max(0, int(n_files) - 1)


@dataclass
class Decoded:
    """Decode-stage output for one series: enough for the report, small enough to pickle.

    ``thumbs`` are uint8 grayscale arrays: one for X-ray/other (the displayed frame, default VOI,
    MONOCHROME1 inverted), one per slice for CT (lung window, in Volume order so a heatmap's
    ``slice_index`` addresses it). ``image_shape`` is the full-resolution (rows, cols) that
    heatmaps are expressed in.
    """

    series_uid: str
    kind: str
    thumbs: list = field(default_factory=list)
    image_shape: tuple[int, int] = (0, 0)
    n_images: int = 0
    decode_ms: float = 0.0
    warnings: list[str] = field(default_factory=list)
    pixels: Any = None         # keep_pixels: ("frame", path, index, Frame) or ("volume", series_uid, Volume)


# ----------------------------------------------------------------------------------------------
# The decode stage (runs inside a child)
# ----------------------------------------------------------------------------------------------
def _to_thumb(gray01: Any, side: int) -> Any:
    """float [0,1] (rows, cols[,3]) -> uint8 thumbnail whose longer side is ``side``."""
    import numpy as np
    from PIL import Image

    a = np.asarray(gray01, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2)
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    u8 = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rows, cols = u8.shape
    scale = side / max(rows, cols)
    if scale < 1.0:
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        u8 = np.asarray(Image.fromarray(u8).resize(size, Image.Resampling.BOX))
    return u8


def _lung_window01(hu: Any) -> Any:
    """HU -> [0,1] in the lung window (center -600, width 1500), as engine.preprocess.ct does."""
    import numpy as np

    center, width = -600.0, 1500.0
    return np.clip((np.asarray(hu, dtype=np.float32) - (center - width / 2.0)) / width, 0.0, 1.0)


def decode_series(series: Any, keep_pixels: bool = False,
                  max_pixel_bytes: int = MAX_RETURNED_PIXEL_BYTES) -> Decoded:
    """Decode one SeriesRecord the way the viewer displays it; raises LoadError on failure.

    X-ray and other modalities: the first instance through engine.dicom.pixels
    (``load_frame`` + ``display_gray01``). CT: ``engine.dicom.volume.load_volume`` in lung window.
    With ``keep_pixels`` the decoded Frame / Volume comes back too (when at most
    ``max_pixel_bytes``) so that :func:`reuse_decoded` can hand it to the analysis.
    """
    t0 = time.perf_counter()
    if not series.instances:
        raise LoadError(None, "the series has no readable images")
    dec = Decoded(series_uid=series.series_uid, kind=series.kind, n_images=len(series.instances))
    try:
        if series.kind == "ct" and len(series.instances) > 1:
            from engine.dicom.volume import load_volume

            vol = load_volume(series)
            hu = vol.hu
            dec.image_shape = (int(hu.shape[1]), int(hu.shape[2]))
            dec.thumbs = [_to_thumb(_lung_window01(hu[z]), CT_THUMB_SIDE) for z in range(hu.shape[0])]
            dec.warnings = [str(w) for w in getattr(vol, "warnings", [])]
            if keep_pixels and int(hu.nbytes) <= max_pixel_bytes:
                dec.pixels = ("volume", series.series_uid, vol)
        else:
            from engine.dicom.pixels import display_gray01, load_frame

            path = series.instances[0].path
            frame = load_frame(path)
            gray = display_gray01(frame)
            dec.image_shape = (int(gray.shape[0]), int(gray.shape[1]))
            dec.thumbs = [_to_thumb(gray, THUMB_SIDE)]
            size = sum(int(getattr(getattr(frame, a, None), "nbytes", 0)) for a in ("values", "stored"))
            if keep_pixels and size <= max_pixel_bytes:
                dec.pixels = ("frame", str(path), 0, frame)
    except LoadError:
        raise
    except MemoryError:
        raise LoadError(None, "decoding needs more memory than the per-file bound allows "
                              "(raise --max-memory-mb if the file is genuine)")
    except Exception as exc:  # the loaders should not let these out; bound them anyway
        raise LoadError(None, f"could not decode: {type(exc).__name__}: {exc}")
    dec.decode_ms = (time.perf_counter() - t0) * 1000.0
    return dec


# ----------------------------------------------------------------------------------------------
# Reusing the child's pixels in the parent
# ----------------------------------------------------------------------------------------------
_reuse = threading.local()
_hooks_lock = threading.Lock()
_hooks_installed = False


def _install_reuse_hooks() -> None:
    """Wrap engine.dicom.pixels.load_frame and engine.dicom.volume.load_volume (once).

    The wrappers return a Frame/Volume registered by :func:`reuse_decoded` *in the calling thread*
    and otherwise call the original, so every other caller (viewer threads, tests) is unaffected.
    engine.analysis imports both inside its functions, so it sees the wrappers.
    """
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        import engine.dicom.pixels as px
        import engine.dicom.volume as vm

        orig_frame, orig_volume = px.load_frame, vm.load_volume

        @functools.wraps(orig_frame)
        def load_frame(path: Any, frame: int = 0, *args: Any, **kwargs: Any) -> Any:
            hit = (getattr(_reuse, "frames", None) or {}).get((str(path), int(frame)))
            return hit if hit is not None else orig_frame(path, frame, *args, **kwargs)

        @functools.wraps(orig_volume)
        def load_volume(series: Any, *args: Any, **kwargs: Any) -> Any:
            hit = (getattr(_reuse, "volumes", None) or {}).get(getattr(series, "series_uid", None))
            return hit if hit is not None else orig_volume(series, *args, **kwargs)

        px.load_frame, vm.load_volume = load_frame, load_volume
        _hooks_installed = True


@contextmanager
def reuse_decoded(decoded: Iterable[Any]) -> Iterator[None]:
    """Within the block, this thread's load_frame/load_volume return what the child decoded.

    Why: the analysis then reads exactly the pixels the memory- and time-bounded child produced
    (same loader, same file) instead of decoding untrusted data a second time, unbounded, in the
    parent. Series whose pixels stayed in the child (too large) are decoded by the analysis as usual.
    """
    frames: dict[tuple[str, int], Any] = {}
    volumes: dict[str, Any] = {}
    for d in decoded:
        px = getattr(d, "pixels", None)
        if isinstance(px, tuple) and len(px) == 4 and px[0] == "frame":
            frames[(px[1], int(px[2]))] = px[3]
        elif isinstance(px, tuple) and len(px) == 3 and px[0] == "volume":
            volumes[px[1]] = px[2]
    if not frames and not volumes:
        yield
        return
    _install_reuse_hooks()
    old = getattr(_reuse, "frames", None), getattr(_reuse, "volumes", None)
    _reuse.frames, _reuse.volumes = frames, volumes
    try:
        yield
    finally:
        _reuse.frames, _reuse.volumes = old


# ----------------------------------------------------------------------------------------------
# Child process
# ----------------------------------------------------------------------------------------------
def _limit_child(mem_bytes: int | None) -> None:
    """First thing a child does: cap address space, single-thread native libs, few malloc arenas."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = "1"
    try:  # glibc: each thread arena reserves 64 MiB of address space; keep RLIMIT_AS meaningful
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = 2
    except Exception:
        pass
    if mem_bytes:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (int(mem_bytes), int(mem_bytes)))
        except (ImportError, ValueError, OSError):
            pass  # non-POSIX: the loaders' own size budget still applies


def _child_main(conn: Any, mem_bytes: int | None) -> None:
    """Serve (fn, args) tasks until told to stop; every outcome is a small picklable tuple."""
    _limit_child(mem_bytes)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args, kwargs = msg
        try:
            out: tuple = ("ok", fn(*args, **kwargs))
        except LoadError as e:
            out = ("err", e.reason)
        except MemoryError:
            out = ("err", "decoding needs more memory than the per-file bound allows")
        except BaseException as e:  # noqa: BLE001 - the boundary: anything becomes a reason
            out = ("err", f"{type(e).__name__}: {e}".strip()[:500])
        try:
            conn.send(out)
        except Exception as e:  # result not picklable or too large for the bound
            try:
                conn.send(("err", f"could not return the decoded data: {type(e).__name__}"))
            except Exception:
                return


def _death_reason(exitcode: int | None) -> str:
    import signal

    if exitcode is None:
        return "the decoder process stopped unexpectedly"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL":
            return "the decoder process was killed (out of memory?)"
        return f"the decoder crashed ({name}) on this file"
    return f"the decoder process exited with status {exitcode}"


class _Worker:
    """One child process and its pipe."""

    def __init__(self, ctx: Any, mem_bytes: int | None):
        self.parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child_main, args=(child, mem_bytes), daemon=True,
                                name="chestview-decode")
        self.proc.start()
        child.close()

    def call(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float) -> tuple[str, Any]:
        """('ok', value) | ('err', reason) | ('dead', reason) | ('timeout', reason)."""
        try:
            self.parent.send((fn, args, kwargs))
        except (OSError, EOFError, BrokenPipeError):
            self.proc.join(1.0)
            return "dead", _death_reason(self.proc.exitcode)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", f"decoding took longer than {timeout_s:.0f} s (stopped; raise --timeout if genuine)"
            try:
                if self.parent.poll(min(left, 0.5)):
                    return self.parent.recv()
            except (EOFError, OSError):
                self.proc.join(1.0)
                return "dead", _death_reason(self.proc.exitcode)
            if not self.proc.is_alive():
                try:  # it may have sent its answer just before exiting
                    if self.parent.poll(0):
                        return self.parent.recv()
                except (EOFError, OSError):
                    pass
                return "dead", _death_reason(self.proc.exitcode)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:
            pass
        self.proc.join(5.0)
        self.parent.close()

    def stop(self) -> None:
        try:
            self.parent.send(None)
        except Exception:
            pass
        self.proc.join(2.0)
        if self.proc.is_alive():
            self.kill()
        else:
            self.parent.close()


class LimitedPool:
    """N persistent decode children; ``submit(fn, *args, timeout_s=...) -> Future``.

    A task that overruns its limit gets its child killed and replaced and its future resolved
    with LoadError; a child that dies is replaced likewise. Futures never hang and never raise
    anything but LoadError. ``fn`` must be importable (module-level) for the spawn context.
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int | None = None, context: str = "spawn"):
        import multiprocessing as mp

        self.workers = max(1, int(workers))
        self.timeout_s = float(timeout_s)
        mb = default_memory_mb() if memory_mb is None else int(memory_mb)
        self.mem_bytes = mb * 2**20 if mb > 0 else None
        self._ctx = mp.get_context(context)
        self._tasks: queue.Queue = queue.Queue()
        self._closed = False
        self._threads = [threading.Thread(target=self._slot, name=f"decode-slot-{i}", daemon=True)
                         for i in range(self.workers)]
        self.replaced = 0  # children killed or died and restarted (for tests and the bench)
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("pool is closed")
        fut: Future = Future()
        self._tasks.put((fut, fn, args, kwargs, self.timeout_s if timeout_s is None else float(timeout_s)))
        return fut

    def _slot(self) -> None:
        worker: _Worker | None = None
        try:
            while True:
                item = self._tasks.get()
                if item is None:
                    return
                fut, fn, args, kwargs, limit = item
                if not fut.set_running_or_notify_cancel():
                    continue
                if worker is None or not worker.proc.is_alive():
                    try:
                        worker = _Worker(self._ctx, self.mem_bytes)
                    except Exception as e:  # cannot start a child at all: report, keep going
                        fut.set_exception(LoadError(None, f"could not start a decoder process: {e}"))
                        worker = None
                        continue
                status, value = worker.call(fn, args, kwargs, limit)
                if status == "ok":
                    fut.set_result(value)
                    continue
                if status in ("timeout", "dead"):
                    worker.kill()
                    worker = None
                    self.replaced += 1
                fut.set_exception(LoadError(None, str(value)))
        finally:
            if worker is not None:
                worker.stop()

    def close(self, wait: bool = True) -> None:
        """Stop the children; queued tasks not yet started are cancelled."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for t in self._threads:
                t.join(10.0)

    def __enter__(self) -> "LimitedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_limited(fn: Callable, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args)`` once in a fresh limited child; return its value or raise LoadError."""
    with LimitedPool(1, timeout_s=timeout_s, memory_mb=memory_mb) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def safe_decode_series(series: Any, timeout_s: float = DEFAULT_TIMEOUT_S,
                       memory_mb: int | None = None) -> Decoded | LoadError:
    """One-shot convenience: a Decoded, or the LoadError (with the first file's path) saying why."""
    path = series.instances[0].path if series.instances else None
    try:
        return run_limited(decode_series, series, timeout_s=series_timeout(timeout_s, len(series.instances)),
                           memory_mb=memory_mb)
    except LoadError as e:
        return LoadError(path, e.reason)
