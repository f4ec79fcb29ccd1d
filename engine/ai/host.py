"""The AI host: the viewer's model work in one persistent child process (docs/ARCHITECTURE.md,
"The AI process": the viewer never imports torch).

Why: ``import torch`` holds the GIL for 200-270 ms while it loads its native libraries, and the models
add about a gigabyte to the process that runs them. Run in the viewer's worker threads, both froze the
GUI thread at the first analysis and kept the window's memory high for the rest of the session
(bench/bench_viewer_start.py). Here every model call of the parent goes to one child process that
imports torch once, keeps the models loaded, and is reused for every analysis.

* The child is started lazily by the first :func:`call` (in the viewer: the first analysis, which
  auto-run submits once the first image is shown) or, without waiting, by :func:`start_ai_host`; it
  is stopped at exit and by :func:`shutdown_ai_host`. It comes from the decode sandbox's multiprocessing context
  (engine.dicom.safe_decode: forkserver on Linux, spawn in frozen builds): the parent may hold Qt and
  other threads, and forking a multi-threaded process is unsafe (POSIX fork(2), "async-signal-safe").
* The child lowers its priority (``nice +10``: on a 2-core machine the GUI must win the CPU),
  scrubs its logs (engine.logscrub) and sends native libraries' stderr to /dev/null.
* Only the functions of :data:`FUNCTIONS` can be run, by name; arguments and results larger than a
  few MiB (a CT Volume's ``hu``) travel through /dev/shm files (safe_decode ``_dumps``/``_loads``),
  not through the pipe.
* Protocol (pickled tuples): the parent sends ``(job_id, fn_name, payload, result_prefix)`` with
  ``payload = _dumps((args, kwargs))``, ``('cancel', job_id)`` or ``None`` (stop); the child answers
  ``('progress', job_id, fraction, text)`` (at most ~10 per second), ``('ok', job_id, value)``,
  ``('err', job_id, "Type: message")`` or ``('cancelled', job_id)``.
* Cancel is cooperative: a reader thread in the child sets the running call's cancel flag, which
  engine.ai.analysis polls between stages. The child is killed only if it has not answered
  :data:`CANCEL_GRACE_S` after a cancel, or when it died; the next call starts a new one (a new child
  needs seconds to import torch and load the models, and the viewer cancels at every series change).
* ``CHESTVIEW_AI_PROCESS=0`` runs every call in the calling process (debugging); so does a process
  that cannot start a child at all (after one warning).
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

from engine.dicom.safe_decode import (_dumps, _get_context, _loads, _shm_usable, _silence_native_stderr,
                                      _unlink_prefix, default_context, signal_name)
from engine.errors import AIHostError, AnalysisCancelled, LoadError, ModelError

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

ENV_SWITCH = "CHESTVIEW_AI_PROCESS"   # "0": run the model work in this process
CANCEL_GRACE_S = 15.0                 # a cancelled call not answered by then gets its child killed
POLL_S = 0.05                         # the waiting thread polls ``cancel()`` at least this often
PROGRESS_INTERVAL_S = 0.1             # the child sends at most ~10 progress messages per second
CHILD_NICE = 10
STOP_JOIN_S = 1.0                     # a stopping child that is still busy (importing torch) is killed then


# ----------------------------------------------------------------------------------------------
# What the child may run (and what runs in-process when the host is off)
# ----------------------------------------------------------------------------------------------
def _analyze_series(series: Any, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Any:
    from engine.ai.analysis import analyze

    return analyze(series, progress=progress, cancel=cancel)


def _analyze_volume(series: Any, volume: Any, *, progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None) -> Any:
    from engine.ai.analysis import analyze_volume

    return analyze_volume(series, volume, progress=progress, cancel=cancel)


def _model_infos(*, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> list:
    from engine.ai.models.registry import list_model_infos

    return list_model_infos()


def _warm(*, progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> None:
    """Import torch and the analysis and load the X-ray models (classifier, lung segmentation), so
    that the first analysis pays for none of them (the CT model loads at the first CT)."""
    from engine.ai.analysis import default_analyzer
    from engine.ai.models.registry import XRAY_MODEL
    from engine.ai.preprocess.xray_lungs import load_lungseg

    default_analyzer().model(XRAY_MODEL)
    try:
        load_lungseg()
    except ModelError:   # the analysis reports a missing model in its result
        pass


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "analyze_series": _analyze_series,
    "analyze_volume": _analyze_volume,
    "model_infos": _model_infos,
    "warm": _warm,
}


def run_here(fn_name: str, *args: Any, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
             **kwargs: Any) -> Any:
    """``fn_name`` of :data:`FUNCTIONS` in the calling process and thread (torch's libraries mapped
    first without the GIL: engine.ai.runtime_preload)."""
    from engine.ai.runtime_preload import preload_model_runtime

    preload_model_runtime()
    return FUNCTIONS[fn_name](*args, progress=progress, cancel=cancel, **kwargs)


# ----------------------------------------------------------------------------------------------
# Child process
# ----------------------------------------------------------------------------------------------
class _ChildProgress:
    """The ``progress=`` of a call in the child: ('progress', job, f, text), rate-limited."""

    def __init__(self, conn: Any, lock: threading.Lock, job: int):
        self.conn, self.lock, self.job = conn, lock, job
        self.last = 0.0

    def __call__(self, fraction: float, text: str = "") -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        self.last = now
        try:
            data = _dumps(("progress", self.job, float(fraction), str(text)[:200]), None)
            with self.lock:
                self.conn.send_bytes(data)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass


class _ChildState:
    """What the reader thread shares with the main thread: the running job and its cancel flag."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job: int | None = None
        self.flag = threading.Event()
        self.cancelled: set[int] = set()   # cancels that arrived before their job started
        self.jobs: queue.Queue = queue.Queue()   # requests for the main thread; None: stop

    def start(self, job: int) -> threading.Event:
        with self.lock:
            self.job, self.flag = job, threading.Event()
            if job in self.cancelled:
                self.flag.set()
            self.cancelled = {j for j in self.cancelled if j > job}   # job ids only grow
            return self.flag

    def finish(self) -> None:
        with self.lock:
            self.job = None

    def cancel(self, job: int | None) -> None:
        with self.lock:
            if job is None or job == self.job:
                self.flag.set()
            else:
                self.cancelled.add(job)


def _child_reader(conn: Any, state: _ChildState) -> None:
    """Read the pipe while the main thread runs a call: requests are queued for it, a cancel sets
    the running call's flag at once. When the parent is gone (EOF) or says stop, the running call is
    cancelled; a call that ignores that is ended with the process after the grace period."""
    while True:
        try:
            msg = _loads(conn.recv_bytes())
        except (EOFError, OSError, LoadError):
            msg = None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "cancel":
            state.cancel(msg[1])
            continue
        if msg is None:
            state.cancel(None)
            state.jobs.put(None)
            time.sleep(CANCEL_GRACE_S)
            os._exit(0)
        state.jobs.put(msg)


def _child_stderr() -> None:
    """Native libraries (codecs, CUDA) write to file descriptor 2 directly: it goes to /dev/null
    (safe_decode ``_silence_native_stderr``). Python's own output -- warnings and WARNING log
    records, both scrubbed by engine.logscrub -- keeps the original stderr."""
    try:
        saved = os.dup(2)
        sys.stderr = open(saved, "w", buffering=1, errors="backslashreplace", closefd=True)
    except OSError:
        pass
    _silence_native_stderr()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s (AI process): %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def _run_job(conn: Any, send_lock: threading.Lock, state: _ChildState, msg: tuple) -> None:
    job, fn_name, payload, result_prefix = msg
    flag = state.start(job)
    try:
        args, kwargs = _loads(payload)
        fn = FUNCTIONS[fn_name]
        out: tuple = ("ok", job, fn(*args, progress=_ChildProgress(conn, send_lock, job),
                                    cancel=flag.is_set, **kwargs))
    except AnalysisCancelled:
        out = ("cancelled", job)
    except LoadError as e:
        out = ("err", job, f"LoadError: {e.reason}")
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as text
        log.debug("AI call %s failed", fn_name, exc_info=True)
        out = ("err", job, f"{type(e).__name__}: {e}"[:1000])
    finally:
        state.finish()
    try:
        data = _dumps(out, result_prefix if _shm_usable() else None)
    except Exception as e:  # noqa: BLE001 - e.g. a value that cannot be pickled
        _unlink_prefix(result_prefix)
        data = _dumps(("err", job, f"could not return the result ({type(e).__name__})"), None)
    with send_lock:
        conn.send_bytes(data)


def _host_main(conn: Any, env: dict[str, str]) -> None:
    """The child: serve calls one at a time until told to stop or the parent is gone."""
    os.environ.clear()
    os.environ.update(env)     # the parent's, not the forkserver's (started earlier, maybe elsewhere)
    try:
        os.nice(CHILD_NICE)
    except (AttributeError, OSError):
        pass
    from engine.logscrub import install as install_scrub

    install_scrub()
    _child_stderr()
    from engine.dicom.safe_decode import shutdown_boundary, start_boundary

    try:   # the analysis decodes in the sandbox's children: boot them while torch is imported
        start_boundary()
    except Exception:  # noqa: BLE001 - the first decode starts them otherwise
        pass
    state = _ChildState()
    send_lock = threading.Lock()
    threading.Thread(target=_child_reader, args=(conn, state), name="ai-host-reader", daemon=True).start()
    try:
        while True:
            msg = state.jobs.get()
            if msg is None:
                return
            try:
                _run_job(conn, send_lock, state, msg)
            except (EOFError, OSError):
                return
    finally:
        shutdown_boundary()


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------
SETTINGS_PREFIXES = ("CHESTVIEW_", "OMP_", "MKL_", "CUDA_")


def _settings() -> dict[str, str]:
    """The environment variables that change what the models do (which weights, threads, device);
    the child copies the whole environment when it starts."""
    return {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIXES)}


class _CannotStart(Exception):
    """No child process could be started at all (the caller falls back to in-process)."""


def _stop_reason(exitcode: int | None) -> str:
    """Why the child ended, for the user (safe_decode ``_death_reason`` words it for a decoder)."""
    if exitcode is None:
        return "stopped unexpectedly"
    if exitcode < 0:
        name = signal_name(-exitcode)
        return "SIGKILL: out of memory?" if name == "SIGKILL" else f"{name}: crashed"
    return f"exit status {exitcode}"


def _remote_error(text: str) -> Exception:
    """The exception a caller sees for ('err', job, "Type: message"): the engine's own types where
    the message alone rebuilds them, else AIHostError with the text."""
    kind, _, message = str(text).partition(": ")
    if kind == "ModelError":
        return ModelError(message)
    if kind == "MemoryError":
        return MemoryError(message)
    return AIHostError(f"the AI process could not run the call ({text})")


class AIHost:
    """One persistent child for this process's model work; :meth:`call` is thread-safe.

    One call runs in the child at a time; callers of other threads wait their turn in arrival order
    (without holding the GIL), each still polling its own ``cancel``.
    """

    _seq = itertools.count(1)

    def __init__(self, grace_s: float = CANCEL_GRACE_S):
        self.grace_s = float(grace_s)
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._busy = False
        self._send_lock = threading.Lock()
        self._lifecycle = threading.Lock()   # a child is started or stopped by one thread at a time
        self._closed = False                 # set at exit: no new child
        self._proc: Any = None
        self._conn: Any = None
        self._settings: dict[str, str] = {}   # _settings() when the child started
        self._jobs = itertools.count(1)
        self._prefix = f"chestview-{os.getpid()}-ai{next(AIHost._seq)}-"
        self.started = 0       # children started (tests: a cancel must not start a new one)

    @property
    def pid(self) -> int | None:
        """The running child's pid (None when there is none)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    # -------------------------------------------------------------- turn taking
    def _take_turn(self, cancel: CancelFn | None) -> None:
        token = object()
        with self._cond:
            self._waiting.append(token)
            try:
                while self._busy or self._waiting[0] is not token:
                    if _cancelled(cancel):
                        raise AnalysisCancelled("analysis cancelled by the user")
                    self._cond.wait(POLL_S)
            except BaseException:
                self._waiting.remove(token)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._busy = True

    def _release_turn(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    # -------------------------------------------------------------- the child
    def _ensure_child(self) -> tuple[Any, Any]:
        """The running child, or a new one. A child started under other settings (the
        ``CHESTVIEW_*`` variables: model folder, threads, device) is replaced, so that the models
        run as they would in this process now."""
        with self._lifecycle:
            if self._closed:
                raise AIHostError("the AI process has been stopped (the program is closing)")
            proc, conn = self._proc, self._conn
            if proc is not None and proc.is_alive() and self._settings == _settings():
                return proc, conn
            if proc is not None:
                self._discard(proc, conn)
            return self._start_child()

    def _start_child(self) -> tuple[Any, Any]:
        try:
            ctx = _get_context(default_context())
            conn, child = ctx.Pipe(duplex=True)
            # not a daemon: a daemonic process may not start children, and the analysis decodes
            # in the sandbox's own child processes; stopped at exit (get_host registers it)
            proc = ctx.Process(target=_host_main, args=(child, dict(os.environ)), name="chestview-ai")
            proc.start()
            child.close()
        except Exception as e:  # noqa: BLE001 - reported once by the caller, which runs in-process
            raise _CannotStart(f"{type(e).__name__}: {e}") from e
        self._proc, self._conn = proc, conn
        self._settings = _settings()
        self.started += 1
        return proc, conn

    def _discard(self, proc: Any, conn: Any) -> None:
        """Kill ``proc`` (if still running), close its pipe, forget it if it is the current child."""
        try:
            proc.kill()
        except Exception:  # noqa: BLE001
            pass
        try:
            proc.join(5.0)
        except Exception:  # noqa: BLE001
            pass
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        if self._proc is proc:
            self._proc = self._conn = None

    def _send(self, conn: Any, msg: Any) -> None:
        data = _dumps(msg, None)
        with self._send_lock:
            conn.send_bytes(data)

    # -------------------------------------------------------------- calls
    def call(self, fn_name: str, *args: Any, progress: ProgressFn | None = None,
             cancel: CancelFn | None = None, **kwargs: Any) -> Any:
        """``FUNCTIONS[fn_name](*args, **kwargs)`` in the child; its value, or the exception: raises
        AnalysisCancelled when ``cancel()`` turned True, AIHostError when the child stopped (it
        restarts on the next call), _CannotStart when no child could be started."""
        if fn_name not in FUNCTIONS:
            raise ValueError(f"not an AI host function: {fn_name!r}")
        self._take_turn(cancel)
        try:
            return self._call(fn_name, args, kwargs, progress, cancel)
        finally:
            self._release_turn()

    def _call(self, fn_name: str, args: tuple, kwargs: dict, progress: ProgressFn | None,
              cancel: CancelFn | None) -> Any:
        if _cancelled(cancel):
            raise AnalysisCancelled("analysis cancelled by the user")
        proc, conn = self._ensure_child()
        job = next(self._jobs)
        arg_prefix, result_prefix = f"{self._prefix}{job}-a-", f"{self._prefix}{job}-r-"
        shm = _shm_usable()
        try:
            payload = _dumps((args, kwargs), arg_prefix if shm else None)
            try:
                self._send(conn, (job, fn_name, payload, result_prefix))
            except (OSError, EOFError):
                status, value = self._dead(proc, conn, None)
            else:
                status, value = self._wait(proc, conn, job, progress, cancel)
        except BaseException:
            _unlink_prefix(arg_prefix)
            _unlink_prefix(result_prefix)
            raise
        if status != "ok":
            _unlink_prefix(arg_prefix)    # the child died before it mapped them
            _unlink_prefix(result_prefix)
        if status == "ok":
            return value
        if status == "cancelled":
            raise AnalysisCancelled("analysis cancelled by the user")
        if status == "err":
            raise _remote_error(value)
        raise AIHostError(f"the AI process stopped ({value}); it restarts on the next analysis")

    def _wait(self, proc: Any, conn: Any, job: int, progress: ProgressFn | None,
              cancel: CancelFn | None) -> tuple[str, Any]:
        """('ok', value) | ('err', text) | ('cancelled', None) | ('dead', reason). Blocks in
        ``poll`` (the GIL released), at most POLL_S at a time."""
        cancelled_at: float | None = None
        while True:
            if cancelled_at is None and _cancelled(cancel):
                cancelled_at = time.monotonic()
                try:
                    self._send(conn, ("cancel", job))
                except Exception:  # noqa: BLE001 - a dead child is seen below
                    pass
            elif cancelled_at is not None and time.monotonic() - cancelled_at > self.grace_s:
                log.warning("the AI process did not stop within %.0f s of a cancel; restarting it", self.grace_s)
                self._discard(proc, conn)
                return "cancelled", None
            try:
                ready = conn.poll(POLL_S)
                msg = _loads(conn.recv_bytes()) if ready else None
            except LoadError as e:   # a result's shared buffers could not be mapped
                return "err", f"LoadError: {e.reason}"
            except Exception:  # noqa: BLE001 - EOF, a closed pipe: the child is gone
                return self._dead(proc, conn, cancelled_at)
            if msg is None:
                if not proc.is_alive():
                    return self._dead(proc, conn, cancelled_at)
                continue
            if not isinstance(msg, tuple) or len(msg) < 2 or msg[1] != job:
                continue
            if msg[0] == "progress":
                if progress is not None:
                    try:
                        progress(msg[2], msg[3])
                    except Exception:  # noqa: BLE001 - a broken callback must not break the call
                        log.debug("progress callback failed", exc_info=True)
                continue
            if msg[0] == "ok":
                return "ok", msg[2]
            if msg[0] == "cancelled":
                return "cancelled", None
            if msg[0] == "err":
                return "err", msg[2]

    def _dead(self, proc: Any, conn: Any, cancelled_at: float | None) -> tuple[str, Any]:
        try:
            proc.join(1.0)
        except Exception:  # noqa: BLE001
            pass
        reason = _stop_reason(proc.exitcode)
        self._discard(proc, conn)
        return ("cancelled", None) if cancelled_at is not None else ("dead", reason)

    def shutdown(self, final: bool = False) -> None:
        """Stop the child (the running call, if any, gets AIHostError); the next call starts a new
        one, unless ``final`` (at exit: a warm-up thread must not start one after this)."""
        with self._lifecycle, self._cond:   # waits for a child being started
            self._closed = self._closed or final
            proc, conn, busy = self._proc, self._conn, self._busy
            self._proc = self._conn = None
        if proc is None:
            return
        try:
            self._send(conn, None)
        except Exception:  # noqa: BLE001
            pass
        proc.join(STOP_JOIN_S)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        if not busy:   # a running call owns the pipe until it has seen the child go
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass


def _cancelled(cancel: CancelFn | None) -> bool:
    if cancel is None:
        return False
    try:
        return bool(cancel())
    except Exception:  # noqa: BLE001 - a broken cancel callback does not cancel
        return False


# ----------------------------------------------------------------------------------------------
# The process-wide host
# ----------------------------------------------------------------------------------------------
_host: AIHost | None = None
_host_lock = threading.Lock()
_fallback = False          # set when no child could be started: in-process from then on
_warming = threading.Event()


def process_enabled() -> bool:
    """Whether model work goes to the child (``CHESTVIEW_AI_PROCESS`` is not "0" and a child could
    be started)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0" and not _fallback


def get_host() -> AIHost:
    """The process-wide host (its child starts at the first call); stopped at exit."""
    global _host
    with _host_lock:
        if _host is None:
            import atexit
            import multiprocessing.util  # noqa: F401 - registers its exit handler first (below)

            _host = AIHost()
            # atexit runs handlers last-in first-out: this one stops the child before
            # multiprocessing's own handler joins every non-daemon child (which would wait forever)
            atexit.register(_host.shutdown, final=True)
        return _host


def call(fn_name: str, *args: Any, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
         **kwargs: Any) -> Any:
    """Run ``fn_name`` of :data:`FUNCTIONS` in the AI process (or here, see the module docstring).

    Raises what the function raises when it runs here; from the child AnalysisCancelled, ModelError,
    MemoryError, or AIHostError (the process stopped, or another error, with its text)."""
    global _fallback
    if not process_enabled():
        return run_here(fn_name, *args, progress=progress, cancel=cancel, **kwargs)
    try:
        return get_host().call(fn_name, *args, progress=progress, cancel=cancel, **kwargs)
    except _CannotStart as e:
        if not _fallback:
            log.warning("could not start the AI process (%s); running the models in this process", e)
        _fallback = True
        return run_here(fn_name, *args, progress=progress, cancel=cancel, **kwargs)


def start_ai_host() -> None:
    """Start the AI process and load torch and the X-ray model there now, without waiting (the
    viewer calls it once the first image is shown). No-op when the models run in-process or a
    warm-up is already under way."""
    if not process_enabled() or _warming.is_set():
        return
    _warming.set()

    def warm() -> None:
        try:
            call("warm")
        except Exception:  # noqa: BLE001 - the first analysis reports any real problem
            log.debug("AI process warm-up failed", exc_info=True)
        finally:
            _warming.clear()

    threading.Thread(target=warm, name="ai-host-warm", daemon=True).start()


def shutdown_ai_host() -> None:
    """Stop the AI process (at exit; tests). A later call starts a new one."""
    with _host_lock:
        host = _host
    if host is not None:
        host.shutdown()
