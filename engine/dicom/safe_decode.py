"""Decode untrusted DICOM in a child process with a time limit and a memory bound (DESIGN.md 5).

Why: pydicom allocates whatever a header declares (4 GiB for 65535x65535), a small deflated file
inflates to hundreds of MiB, and crafted JPEG 2000 can hang a decoder. The loaders in
engine.dicom already refuse oversized headers, but a batch over a whole archive must also survive
what no check foresaw. So each decode runs in a separate process that

* has ``RLIMIT_AS`` set (an allocation beyond it fails with MemoryError instead of swapping the
  workstation to death), single-threaded native libraries and few malloc arenas;
* is killed (SIGKILL) and replaced when one task exceeds its time limit;
* is replaced when it dies (segfault, abort, OOM kill) — the task is reported, never fatal.

Children are started with the ``forkserver`` context on Linux (a clean single-threaded server
with pydicom and the codecs pre-imported forks each one in milliseconds) and ``spawn`` elsewhere:
the parent may hold torch threads, and forking a multi-threaded process is unsafe. Decoded arrays
come back through ``/dev/shm`` files mapped by the parent (pickle protocol 5 out-of-band
buffers), so a normal study is not copied through the pipe (bench/bench_decode_boundary.py).

The process-wide boundary (:func:`bounded_load_frame`, :func:`bounded_load_volume`,
:func:`bounded_read_header`, :func:`bounded_thumbnail`) is what the viewer (through
engine.service), the analysis and PACS import use: untrusted pixel data is never decoded in the
viewer's or the batch parent's own process.

Public pieces (reused by the Ray engine, whose CPU tasks call :func:`decode_series` inside
:func:`run_limited` or in their own memory-bounded workers):

* :class:`Decoded` — what the decode stage hands to inference and the report (thumbnails only;
  full pixels stay in the child unless asked for).
* :func:`decode_series` — the decode stage itself (runs in whatever process calls it).
* :class:`LimitedPool` — N persistent children, per-task time limit, ``submit() -> Future``.
* :func:`run_limited` — one call in a one-shot limited child.
* :func:`reuse_decoded` — lets ``engine.ai.analysis`` read the child's Frame/Volume (this thread
  only) instead of decoding the untrusted file again, unbounded, in the parent.

Frozen (PyInstaller) builds: spawned children need ``multiprocessing.freeze_support()``, which
the packaging runtime hook (packaging/rthooks/pyi_rth_chestview.py) calls.
"""
from __future__ import annotations

import functools
import mmap
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from engine.errors import AnalysisCancelled, LoadError

THUMB_SIDE = 256           # X-ray / other thumbnails: longer side in pixels
CT_THUMB_SIDE = 192        # CT slice thumbnails (one per slice, so smaller)
DEFAULT_TIMEOUT_S = 60.0   # per series, plus TIMEOUT_PER_EXTRA_FILE_S per further file
TIMEOUT_PER_EXTRA_FILE_S = 2.0
DEFAULT_MEMORY_MB = 3072   # address-space bound of one decode child
MAX_RETURNED_PIXEL_BYTES = 160 * 2**20  # decoded pixels larger than this stay in the child


def default_memory_mb() -> int:
    """3 GiB, or half the machine's RAM per child when that is smaller.

    The RAM size comes from sysconf(3) where it exists: importing psutil for it took 40 ms of the
    viewer's start-up, before Qt (main.py start_decoder_early)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        try:
            import psutil

            total = psutil.virtual_memory().total
        except Exception:
            return DEFAULT_MEMORY_MB
    half = int(total / 2 / 2**20)
    return max(1024, min(DEFAULT_MEMORY_MB, half))


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
    """HU -> [0,1] in the lung window (center -600, width 1500), as engine.ai.preprocess.ct does."""
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
        multiframe = len(series.instances) == 1 and int(getattr(series.instances[0], "frames", 1) or 1) > 1
        if series.kind == "ct" and (len(series.instances) > 1 or multiframe):
            from engine.dicom.volume import load_volume

            vol = load_volume(series)
            hu = vol.hu
            dec.image_shape = (int(hu.shape[1]), int(hu.shape[2]))
            dec.thumbs = [_to_thumb(_lung_window01(hu[z]), CT_THUMB_SIDE) for z in range(hu.shape[0])]
            dec.warnings = [str(w) for w in getattr(vol, "warnings", [])]
            if keep_pixels and int(hu.nbytes) <= max_pixel_bytes:
                dec.pixels = ("volume", series.series_uid, vol)
        else:
            from engine.dicom.display import display_gray01
            from engine.dicom.pixels import load_frame

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
    engine.ai.analysis imports both inside its functions, so it sees the wrappers.
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
# Returning decoded pixels through shared memory
# ----------------------------------------------------------------------------------------------
SHM_DIR = "/dev/shm"
SHM_MIN_BYTES = 4 * 2**20    # smaller buffers travel inside the pickle: creating, mapping and
                             # unlinking a file costs more than piping a 512x512 slice (bench)


def _shm_usable() -> bool:
    return os.name == "posix" and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


SHM_WRITE_CHUNK = 8 << 20


def _write_chunks(fd: int, raw: memoryview) -> None:
    """Write ``raw`` at offset 0 in 8 MiB ``pwrite`` calls, each of which releases the GIL: a
    single memoryview copy into a mapping holds it for the whole buffer (36 ms for a 60 MB CT
    volume, 80 ms for 160 MB on a 2-core machine), long enough to stall the viewer's GUI thread
    when a worker sends a volume to the AI process (engine.ai.host)."""
    view = raw.cast("B") if raw.format != "B" else raw
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:done + SHM_WRITE_CHUNK], done)


def _dumps(obj: Any, prefix: str | None) -> bytes:
    """Pickle ``obj`` (protocol 5); with ``prefix``, large contiguous buffers (numpy arrays) are
    written to ``/dev/shm/<prefix>N`` instead of the pipe and only their names travel.

    Why: a 512x512x120 CT volume is 60 MiB; through a pipe it is copied four times (pickle,
    write, read, unpickle). Written once into a tmpfs file that the parent maps, it is copied
    once. ``posix_fallocate`` reserves the pages first, so a full /dev/shm is an OSError here
    (the buffer then goes in-band) rather than a SIGBUS on first touch.
    """
    import pickle

    names: list[tuple[str, int]] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if prefix is None or raw.nbytes < SHM_MIN_BYTES:
            return True
        name = f"{prefix}{len(names)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return True
        try:
            os.posix_fallocate(fd, 0, raw.nbytes)
            _write_chunks(fd, raw)
        except OSError:
            os.close(fd)
            os.unlink(path)
            return True
        os.close(fd)
        names.append((name, raw.nbytes))
        return False

    body = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    return pickle.dumps((names, body), protocol=5)


def _loads(data: bytes) -> Any:
    """Inverse of :func:`_dumps`: map each shared buffer, unlink its name, unpickle onto it.

    The arrays keep their mapping alive; the tmpfs pages go when the last array does.
    """
    import pickle

    names, body = pickle.loads(data)
    buffers = []
    try:
        for name, size in names:
            path = os.path.join(SHM_DIR, name)
            fd = os.open(path, os.O_RDWR)
            try:
                buffers.append(mmap.mmap(fd, size))
            finally:
                os.close(fd)
                os.unlink(path)
    except OSError as e:
        raise LoadError(None, f"the decoded pixels could not be mapped back ({e.strerror})") from None
    return pickle.loads(body, buffers=buffers)


def _unlink_orphans() -> None:
    """Remove buffers left by a process that was killed before it mapped them (kill -9 of a
    batch): their names carry the dead parent's pid."""
    if not _shm_usable():
        return
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith("chestview-")]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _unlink_prefix(prefix: str) -> None:
    """Remove buffers a child wrote but nobody mapped (it died or its answer was not read)."""
    if not _shm_usable():
        return
    try:
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except OSError:
                    pass
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Child process
# ----------------------------------------------------------------------------------------------
_PRELOAD = ["engine.dicom.pixels", "engine.dicom.volume", "pydicom", "numpy",
            "pydicom.pixels.decoders.pylibjpeg", "pydicom.pixels.decoders.gdcm", "PIL.Image"]
_ctx_lock = threading.Lock()
_ctx_cache: dict[str, Any] = {}
_SLACK_BYTES = 512 * 2**20       # decoder tables, thread stacks, numpy temporaries
_NEED_FACTOR = 3                 # declared bytes -> address space: decoder buffers + our copies


def default_context() -> str:
    """'forkserver' on Linux (a clean, single-threaded server with pydicom and the codecs already
    imported forks each child in milliseconds, so a discarded child costs little), else 'spawn'.
    Frozen builds keep 'spawn' (their runtime hook, packaging/rthooks, handles it)."""
    import sys

    if sys.platform.startswith("linux") and not getattr(sys, "frozen", False):
        return "forkserver"
    return "spawn"


def _get_context(name: str) -> Any:
    import multiprocessing as mp

    with _ctx_lock:
        ctx = _ctx_cache.get(name)
        if ctx is None:
            ctx = mp.get_context(name)
            if name == "forkserver":
                ctx.set_forkserver_preload([m for m in _PRELOAD if _importable(m)])
            _ctx_cache[name] = ctx
        return ctx


def _importable(module: str) -> bool:
    """Whether ``module`` can be found, without importing it or its parent packages.

    ``importlib.util.find_spec("pydicom.pixels.decoders.gdcm")`` imports ``pydicom`` and
    ``pydicom.pixels`` (0.3 s here) just to answer; the viewer calls this before Qt is imported
    (:func:`start_boundary`), so the submodules are looked up in their parent's folders instead.
    """
    import importlib.machinery
    import importlib.util

    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            locations = getattr(spec, "submodule_search_locations", None)
            if not locations:
                return False
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), list(locations))
        return spec is not None
    except (ImportError, ValueError):
        return False


def _vm_bytes() -> int:
    """This process's address-space size (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_soft_limit(soft: int | None, hard: int | None) -> None:
    try:
        import resource

        if hard:
            resource.setrlimit(resource.RLIMIT_AS, (int(soft or hard), int(hard)))
    except (ImportError, ValueError, OSError):
        pass


def _limit_child(mem_bytes: int | None) -> None:
    """First thing a child does: cap address space, single-thread native libs, few malloc arenas.

    ``mem_bytes`` is the hard cap; before each decode the soft limit is lowered further to what
    the file declares (engine.dicom.pixels.set_memory_guard), and raised back afterwards.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = "1"
    try:  # glibc: each thread arena reserves 64 MiB of address space; keep RLIMIT_AS meaningful
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = 2
    except Exception:
        pass
    _set_soft_limit(mem_bytes, mem_bytes)
    if mem_bytes:
        try:
            from engine.dicom import pixels

            def guard(need: int, hard: int = int(mem_bytes)) -> None:
                base = _vm_bytes()
                if base:
                    _set_soft_limit(min(hard, base + _NEED_FACTOR * max(0, need) + _SLACK_BYTES), hard)

            pixels.set_memory_guard(guard)
        except Exception:
            pass


def _silence_native_stderr() -> None:
    """Codec libraries write to file descriptor 2 directly (GDCM prints file names and element
    values): in a decode child it goes to /dev/null; the parent reports a reason instead.
    ``CHESTVIEW_DECODE_STDERR=1`` keeps it, for debugging a decoder on a file you own."""
    if os.environ.get("CHESTVIEW_DECODE_STDERR") == "1":
        return
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass


class _ChildProgress:
    """Picklable-free progress callback for a child: sends ('progress', f, text) to the parent."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.last = 0.0

    def __call__(self, fraction: float, text: str = "") -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and fraction < 1.0:
            return
        self.last = now
        try:
            self.conn.send_bytes(_dumps(("progress", float(fraction), str(text)[:200]), None))
        except Exception:
            pass


def _child_main(conn: Any, mem_bytes: int | None) -> None:
    """Serve (fn, args) tasks until told to stop; every outcome is a small tuple.

    ('ok', value) | ('err', reason) | ('fatal', reason): 'fatal' (the memory limit was hit, or a
    BaseException from a native extension) tells the parent to discard this process, whose heap
    may now be fragmented or its codec state damaged, instead of giving it the next file.
    """
    _limit_child(mem_bytes)
    from engine.logscrub import install as install_scrub

    install_scrub()
    _silence_native_stderr()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args, kwargs, prefix, with_progress = msg
        if with_progress:
            kwargs = dict(kwargs, progress=_ChildProgress(conn))
        try:
            out: tuple = ("ok", fn(*args, **kwargs))
        except LoadError as e:
            out = ("err", e.reason)
        except MemoryError:
            out = ("fatal", "decoding needs more memory than this file's header and codestream "
                            "declare (or the per-file bound allows); the file is probably corrupt")
        except (KeyboardInterrupt, SystemExit):
            return
        except Exception as e:  # noqa: BLE001 - the boundary: anything becomes a reason
            out = ("err", f"could not decode: {type(e).__name__}: {e}".strip()[:500])
        except BaseException as e:  # noqa: BLE001 - e.g. pyo3 PanicException from a Rust codec
            out = ("fatal", f"the decoder failed on corrupt data ({type(e).__name__})")
        finally:
            _set_soft_limit(mem_bytes, mem_bytes)
        try:
            conn.send_bytes(_dumps(out, prefix if _shm_usable() else None))
        except Exception as e:  # result not picklable or too large for the bound
            try:
                conn.send_bytes(_dumps(("fatal", f"could not return the decoded data: {type(e).__name__}"), None))
            except Exception:
                return


def signal_name(signum: int) -> str:
    """'SIGKILL' for 9; 'signal N' for a number with no name (a child's exit code is ``-signum``)."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _death_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the decoder process stopped unexpectedly"
    if exitcode < 0:
        name = signal_name(-exitcode)
        if name == "SIGKILL":
            return "the decoder process was killed (out of memory?)"
        if name == "SIGABRT":
            return "the decoder crashed (SIGABRT: a decoder library aborted on this file); the file is corrupt"
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

    def call(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float, prefix: str = "",
             progress: Callable[[float, str], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> tuple[str, Any]:
        """('ok', value) | ('err', reason) | ('fatal', reason) | ('dead', reason) | ('timeout', reason)
        | ('cancelled', '')."""
        try:
            self.parent.send((fn, args, kwargs, prefix, progress is not None))
        except (OSError, EOFError, BrokenPipeError):
            self.proc.join(1.0)
            return "dead", _death_reason(self.proc.exitcode)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", f"decoding took longer than {timeout_s:.0f} s (stopped; raise --timeout if genuine)"
            if cancel is not None and cancel():
                return "cancelled", ""
            try:
                if self.parent.poll(min(left, 0.05 if cancel is not None else 0.5)):
                    msg = _loads(self.parent.recv_bytes())
                    if msg[0] == "progress":
                        if progress is not None:
                            try:
                                progress(msg[1], msg[2])
                            except Exception:
                                pass
                        continue
                    return msg
            except (EOFError, OSError):
                self.proc.join(1.0)
                return "dead", _death_reason(self.proc.exitcode)
            except LoadError as e:
                return "fatal", e.reason
            if not self.proc.is_alive():
                try:  # it may have sent its answer just before exiting
                    if self.parent.poll(0):
                        return _loads(self.parent.recv_bytes())
                except (EOFError, OSError, LoadError):
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
    with LoadError; a child that dies is replaced likewise; a child that hit its memory limit or
    raised a BaseException is retired (stopped and replaced), never given another file. Futures
    never hang and never raise anything but LoadError (or AnalysisCancelled when the ``cancel``
    of :meth:`submit_call` returned True). ``fn`` must be importable (module-level).
    """

    _seq = 0
    _seq_lock = threading.Lock()

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int | None = None, context: str | None = None):
        self.workers = max(1, int(workers))
        self.timeout_s = float(timeout_s)
        mb = default_memory_mb() if memory_mb is None else int(memory_mb)
        self.mem_bytes = mb * 2**20 if mb > 0 else None
        self._ctx = _get_context(context or default_context())
        self._tasks: queue.Queue = queue.Queue()
        self._closed = False
        with LimitedPool._seq_lock:
            LimitedPool._seq += 1
            self._prefix = f"chestview-{os.getpid()}-{LimitedPool._seq}-"
            if LimitedPool._seq == 1:
                _unlink_orphans()
        self._threads = [threading.Thread(target=self._slot, args=(i,), name=f"decode-slot-{i}", daemon=True)
                         for i in range(self.workers)]
        self.replaced = 0  # children killed or died and restarted (for tests and the bench)
        self.retired = 0   # children stopped after hitting their memory limit or a native panic
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Future:
        return self.submit_call(fn, args, kwargs, timeout_s=timeout_s)

    def submit_call(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
                    timeout_s: float | None = None, progress: Callable[[float, str], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> Future:
        """Like :meth:`submit`; ``progress`` receives the child's ``progress=`` calls (``fn`` must
        accept that keyword), ``cancel`` is polled while waiting and stops the child when True."""
        if self._closed:
            raise RuntimeError("pool is closed")
        fut: Future = Future()
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        self._tasks.put((fut, fn, tuple(args), dict(kwargs or {}), limit, progress, cancel))
        return fut

    def _slot(self, slot: int) -> None:
        worker: _Worker | None = None
        n = 0
        try:
            while True:
                item = self._tasks.get()
                if item is None:
                    return
                fut, fn, args, kwargs, limit, progress, cancel = item
                if not fut.set_running_or_notify_cancel():
                    continue
                if worker is None or not worker.proc.is_alive():
                    try:
                        worker = _Worker(self._ctx, self.mem_bytes)
                    except Exception as e:  # cannot start a child at all: report, keep going
                        fut.set_exception(LoadError(None, f"could not start a decoder process: {e}"))
                        worker = None
                        continue
                n += 1
                prefix = f"{self._prefix}{slot}-{n}-"
                try:
                    status, value = worker.call(fn, args, kwargs, limit, prefix, progress, cancel)
                except Exception as e:  # noqa: BLE001 - a slot thread must never die
                    status, value = "dead", f"the decoder connection failed ({type(e).__name__})"
                if status != "ok":
                    _unlink_prefix(prefix)
                if status == "ok":
                    fut.set_result(value)
                    continue
                if status in ("timeout", "dead", "cancelled"):
                    worker.kill()
                    worker = None
                    self.replaced += status != "cancelled"
                elif status == "fatal":
                    worker.stop()
                    worker = None
                    self.retired += 1
                if status == "cancelled":
                    fut.set_exception(AnalysisCancelled())
                else:
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


# ----------------------------------------------------------------------------------------------
# The process-wide boundary: every untrusted decode of this process goes through here
# ----------------------------------------------------------------------------------------------
FRAME_TIMEOUT_S = 30.0     # one frame or one header (a 3000x3000 JPEG 2000 decodes in ~2 s here)
HEADER_TIMEOUT_S = 15.0
_lanes: dict[str, LimitedPool] = {}
_lanes_lock = threading.Lock()
_wait_hook: tuple[int, Callable[[], None]] | None = None
WAIT_HOOK_S = 0.01   # a GUI thread waiting on a decode serves its timers and paints this often


def _lane() -> str:
    """The GUI (main) thread gets its own child so that the image the user is waiting for never
    queues behind thumbnails, a CT volume or an analysis running in the background lane."""
    return "interactive" if threading.current_thread() is threading.main_thread() else "background"


def boundary_pool(lane: str | None = None) -> LimitedPool:
    """The persistent pool of one lane, started on first use and stopped at exit."""
    lane = lane or _lane()
    with _lanes_lock:
        pool = _lanes.get(lane)
        if pool is None or pool._closed:
            workers = 1 if lane == "interactive" else 2
            pool = LimitedPool(workers, timeout_s=FRAME_TIMEOUT_S)
            _lanes[lane] = pool
            if len(_lanes) == 1:
                import atexit

                atexit.register(shutdown_boundary)
        return pool


def start_boundary(lanes: tuple[str, ...] = ("interactive",)) -> list[Future]:
    """Start the decode server and the children of ``lanes`` now, without waiting for them.

    Why: the forkserver imports pydicom, numpy and the codecs (``_PRELOAD``) in a process of its
    own, which takes as long as the viewer's own imports on a 2-core machine. Called first thing
    by ``main.py view``, before Qt is imported, it boots on the other core while the window is
    built, and the first image finds its child ready (bench/bench_viewer_start.py). The server
    is spawned from this thread (fork+exec, milliseconds); the children start in the pools' slot
    threads, which wait on the server without the GIL. Returns the warm-up futures (tests).
    """
    ctx = _get_context(default_context())
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return [boundary_pool(lane).submit(len, "") for lane in lanes]


def shutdown_boundary() -> None:
    """Stop the boundary's children (at exit; tests)."""
    with _lanes_lock:
        pools = list(_lanes.values())
        _lanes.clear()
    for p in pools:
        p.close(wait=False)


def set_wait_hook(fn: Callable[[], None] | None) -> None:
    """``fn`` is called every ~WAIT_HOOK_S while *this* thread waits on the boundary (a GUI passes one
    that processes timers and paint events, so the window keeps answering while a slow or hostile
    file is decoded; the decode itself never runs in this process)."""
    global _wait_hook
    _wait_hook = (threading.get_ident(), fn) if fn is not None else None


def _wait(fut: Future) -> Any:
    hook = _wait_hook
    if hook is not None and hook[0] == threading.get_ident():
        from concurrent.futures import TimeoutError as FutTimeout

        while True:
            try:
                return fut.result(timeout=WAIT_HOOK_S)
            except FutTimeout:
                try:
                    hook[1]()
                except Exception:
                    pass
    return fut.result()


def _reused_frame(path: Any, frame: int) -> Any:
    return (getattr(_reuse, "frames", None) or {}).get((str(path), int(frame)))


def _reused_volume(series: Any) -> Any:
    return (getattr(_reuse, "volumes", None) or {}).get(getattr(series, "series_uid", None))


def bounded_load_frame(path: Any, frame: int = 0) -> Any:
    """engine.dicom.pixels.load_frame in a sandboxed child; same result, same LoadError contract."""
    hit = _reused_frame(path, frame)
    if hit is not None:
        return hit
    from engine.dicom import pixels

    return _bounded(pixels.load_frame, path, int(frame), timeout_s=FRAME_TIMEOUT_S)


def _bounded(fn: Callable, path: Any, *args: Any, timeout_s: float) -> Any:
    """``fn(str(path), *args)`` in a child of this thread's lane; its LoadError names ``path``
    as the caller gave it (a ZIP member path stays one)."""
    try:
        return _wait(boundary_pool().submit(fn, str(path), *args, timeout_s=timeout_s))
    except LoadError as e:
        raise LoadError(path, e.reason) from None


def bounded_read_header(path: Any) -> Any:
    """engine.dicom.pixels.read_header in a sandboxed child (deep nesting, deflate bombs, hangs)."""
    from engine.dicom import pixels

    return _bounded(pixels.read_header, path, timeout_s=HEADER_TIMEOUT_S)


def bounded_header_tree(path: Any) -> Any:
    """engine.dicom.tag_tree.read_header_tree in a sandboxed child: the tag browser gets plain
    rows, so the viewer's process needs no pydicom to show a header. LoadError only."""
    from engine.dicom.tag_tree import read_header_tree

    return _bounded(read_header_tree, path, timeout_s=HEADER_TIMEOUT_S)


def bounded_overlay_planes(path: Any, frame: int = 0) -> Any:
    """engine.dicom.overlays.load_overlays (60xx planes, header only) in a sandboxed child; never
    raises for bad input (a child that died or timed out is reported in ``problems``)."""
    from engine.dicom.overlays import OverlaySet, load_overlays

    try:
        return _bounded(load_overlays, path, int(frame), timeout_s=HEADER_TIMEOUT_S)
    except LoadError as e:
        return OverlaySet(problems=[f"overlays not read: {e.reason}"])


def header_meta(path: Any) -> Any:
    """engine.dicom.series_meta.SeriesMeta of one file's header (runs inside a child)."""
    from engine.dicom.pixels import read_header
    from engine.dicom.series_meta import meta_from_dataset

    return meta_from_dataset(read_header(str(path)))


def bounded_series_meta(path: Any) -> Any:
    """:func:`header_meta` in a sandboxed child: the viewer gets plain data (no pydicom Dataset to
    unpickle, so it needs no pydicom before its first image). LoadError only."""
    return _bounded(header_meta, path, timeout_s=HEADER_TIMEOUT_S)


INDEX_TIMEOUT_S = 3600.0   # a whole folder's headers; the per-file work is bounded by the index itself


def _index_child(path: str, progress: Callable[[float, str], None] | None = None) -> Any:
    from engine.dicom.index import index_path

    return index_path(path, progress=progress)


_prefetched: dict[str, Future] = {}
_prefetched_lock = threading.Lock()


def prefetch_index(path: Any) -> None:
    """Start indexing ``path`` in a background decode child now; the next
    :func:`bounded_index_path` of the same path takes this result instead of starting again.

    Why: ``main.py view FOLDER`` calls this before Qt is imported, so the folder's headers are read
    on the other core while the viewer imports and builds its window (bench/bench_viewer_start.py).
    """
    key = os.path.abspath(os.fspath(path))
    fut = boundary_pool("background").submit_call(_index_child, (key,), timeout_s=INDEX_TIMEOUT_S)
    with _prefetched_lock:
        _prefetched[key] = fut


def bounded_index_path(path: Any, progress: Callable[[float, str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> Any:
    """engine.dicom.index.index_path in a decode child (its pydicom is imported already, and a
    header that crashes a parser takes down the child, not the caller). Raises LoadError when the
    child failed (the caller may then index in-process), AnalysisCancelled on ``cancel()``."""
    key = os.path.abspath(os.fspath(path))
    with _prefetched_lock:
        fut = _prefetched.pop(key, None)
    if fut is None:
        fut = boundary_pool().submit_call(_index_child, (key,), timeout_s=INDEX_TIMEOUT_S,
                                          progress=progress, cancel=cancel)
    return _wait(fut)


def _load_volume_child(series: Any, progress: Callable[[float, str], None] | None = None) -> Any:
    from engine.dicom.volume import load_volume

    return load_volume(series, progress=progress)


def bounded_load_volume(series: Any, progress: Callable[[float, str], None] | None = None,
                        cancel: Callable[[], bool] | None = None) -> Any:
    """engine.dicom.volume.load_volume in a sandboxed child; progress is relayed, ``cancel`` stops
    the child (AnalysisCancelled). Raises LoadError with the series as ``path``."""
    hit = _reused_volume(series)
    if hit is not None:
        return hit
    limit = series_timeout(DEFAULT_TIMEOUT_S, len(getattr(series, "instances", []) or []))
    fut = boundary_pool().submit_call(_load_volume_child, (series,), timeout_s=limit,
                                      progress=progress, cancel=cancel)
    try:
        return _wait(fut)
    except LoadError as e:
        raise LoadError(getattr(series, "series_uid", None), e.reason) from None


def series_thumbnail(series: Any, size: int = 96) -> Any:
    """uint8 thumbnail of the series' middle image at default VOI (runs inside a child)."""
    from engine.dicom.display import render_display
    from engine.dicom.pixels import load_frame

    inst = series.instances[len(series.instances) // 2]
    frame_idx = (inst.frames // 2) if len(series.instances) == 1 and inst.frames > 1 else 0
    img = render_display(load_frame(inst.path, frame_idx))
    return box_downscale(img, size)


def box_downscale(img: Any, size: int) -> Any:
    """Box-filter downscale so the longer side is about ``size`` pixels (no aliasing speckle)."""
    import numpy as np

    h, w = img.shape[:2]
    f = max(1, int(np.ceil(max(h, w) / size)))
    h2, w2 = h // f * f, w // f * f
    x = img[:h2, :w2].astype(np.float32)
    if x.ndim == 2:
        x = x.reshape(h2 // f, f, w2 // f, f).mean(axis=(1, 3))
    else:
        x = x.reshape(h2 // f, f, w2 // f, f, x.shape[2]).mean(axis=(1, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def bounded_thumbnail(series: Any, size: int = 96) -> Any:
    """:func:`series_thumbnail` in a sandboxed child; LoadError names the file."""
    try:
        return _wait(boundary_pool().submit(series_thumbnail, series, int(size), timeout_s=FRAME_TIMEOUT_S))
    except LoadError as e:
        insts = getattr(series, "instances", []) or []
        raise LoadError(insts[len(insts) // 2].path if insts else None, e.reason) from None
