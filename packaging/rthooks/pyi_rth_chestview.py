"""PyInstaller runtime hook for ChestView: runs in the frozen app before main.py.

Why it exists (and why it lives in packaging/, not in the app code):
- the `cpu` build variant ships without the cuDNN engine libraries, so it hides GPUs from torch
  (CUDA_VISIBLE_DEVICES="") instead of failing on the first convolution on a GPU machine;
- child processes started with the `spawn`/`forkserver` method (engine.dicom.safe_decode's decoder
  processes on every OS) re-run the executable: `_multiprocessing_child()` turns them into workers;
- `CHESTVIEW_SMOKE_EXIT=1` makes the viewer quit right after its main window has been painted and
  print how long that took (start-up time to first window, measured by the smoke test).
Research use only, not for diagnostic use.
"""
from __future__ import annotations

import os
import sys
import time


def _process_start_time() -> float:
    """Wall-clock time the process started (Linux: /proc), else now."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return time.time()


_MP_HELPERS = ("from multiprocessing.resource_tracker import", "from multiprocessing.forkserver import")


def _multiprocessing_child() -> None:
    """If the parent started this executable as a multiprocessing child, become that child and exit.

    ``spawn``/``forkserver`` children of a frozen app re-run the executable with
    ``--multiprocessing-fork key=value...`` (workers, e.g. engine.dicom.safe_decode's decoder processes) or
    with interpreter flags + ``-c "from multiprocessing.resource_tracker import ..."`` (helpers).
    Without this, main.py's argparse rejects those arguments and every decoder child exits with 2.
    Custom runtime hooks run *before* PyInstaller's own multiprocessing hook (whose patched
    ``freeze_support`` main.py would otherwise have to call), so this does the same work here.
    The child never re-imports the main script (it is not a file in the bundle): the functions it
    runs are module-level functions of importable modules.
    """
    argv = sys.argv
    if "-c" in argv:
        i = argv.index("-c")
        if (i + 1 < len(argv) and all(a.startswith("-") for a in argv[1:i])
                and argv[i + 1].startswith(_MP_HELPERS)):
            exec(argv[i + 1], {"__name__": "__mp_helper__"})  # noqa: S102 (only multiprocessing's own two commands)
            sys.exit(0)
    if len(argv) >= 2 and argv[1] == "--multiprocessing-fork":
        import multiprocessing.spawn as spawn

        kwds: dict[str, int | None] = {}
        for arg in argv[2:]:
            name, _, value = arg.partition("=")
            kwds[name] = None if value == "None" else int(value)
        spawn._fixup_main_from_path = lambda *_a, **_k: None  # type: ignore[attr-defined]
        spawn._fixup_main_from_name = lambda *_a, **_k: None  # type: ignore[attr-defined]
        spawn.spawn_main(**kwds)
        sys.exit(0)


def _cpu_variant() -> bool:
    base = getattr(sys, "_MEIPASS", "")
    return bool(base) and os.path.exists(os.path.join(base, "chestview-variant-cpu.txt"))


def _install_smoke_exit(t0: float) -> None:
    """Wrap QApplication.exec: report the first paint of the main window and the first displayed series
    (MainWindow.series_opened, when the window has it), then quit the event loop."""
    timeout = float(os.environ.get("CHESTVIEW_SMOKE_TIMEOUT", "300"))
    from PySide6 import QtCore, QtWidgets

    original_exec = QtWidgets.QApplication.exec

    def main_windows() -> list:
        app = QtWidgets.QApplication.instance()
        return [w for w in app.topLevelWidgets() if isinstance(w, QtWidgets.QMainWindow) and w.isVisible()]

    class _Watcher(QtCore.QObject):
        def __init__(self) -> None:
            super().__init__()
            self.window = None
            self.painted = False
            self.wants_series = False
            self.series_seen = False
            self.done = False

        def eventFilter(self, obj, event):  # noqa: N802 (Qt naming)
            if (not self.painted and event.type() == QtCore.QEvent.Type.Paint and self.window is not None
                    and isinstance(obj, QtWidgets.QWidget) and obj.window() is self.window):
                QtCore.QTimer.singleShot(0, self.on_paint)
            return False

        def on_paint(self) -> None:
            if self.painted:
                return
            self.painted = True
            w, app = self.window, QtWidgets.QApplication.instance()
            print(f"[chestview-smoke] first window painted after {time.time() - t0:.2f} s "
                  f"(title {w.windowTitle()!r}, {w.width()}x{w.height()}, platform {app.platformName()})",
                  flush=True)
            if not self.wants_series or self.series_seen:
                self.finish(0)

        def on_series(self, *_args) -> None:
            if self.series_seen:
                return
            self.series_seen = True
            print(f"[chestview-smoke] first series displayed after {time.time() - t0:.2f} s", flush=True)
            if self.painted:
                self.finish(0)

        def finish(self, code: int) -> None:
            if self.done:
                return
            self.done = True
            QtWidgets.QApplication.instance().exit(code)
            # Watchdog: worker threads or a busy GUI thread must not keep the smoke run alive.
            import threading

            def _force() -> None:
                print("[chestview-smoke] forced exit 20 s after the event loop was told to quit", flush=True)
                os._exit(code)

            t = threading.Timer(20.0, _force)
            t.daemon = True
            t.start()

    watcher = _Watcher()

    def poll() -> None:
        wins = main_windows()
        if wins and watcher.window is None:
            w = watcher.window = wins[0]
            signal = getattr(w, "series_opened", None)
            if signal is not None and hasattr(signal, "connect"):
                watcher.wants_series = True
                signal.connect(watcher.on_series)
                # the viewer dispatches its start-up events before the window is shown
                # (viewer.app.run_viewer): the first series may be on screen already
                view = getattr(w, "image_view", None)
                if view is not None and hasattr(view, "current_data") and view.current_data() is not None:
                    QtCore.QTimer.singleShot(0, watcher.on_series)
            QtWidgets.QApplication.instance().installEventFilter(watcher)
            w.update()  # schedule a paint in case the first one already happened
            QtCore.QTimer.singleShot(5000, watcher.on_paint)  # fallback: a platform without paint events
        if time.time() - t0 > timeout and not watcher.done:
            what = "main window" if watcher.window is None else "displayed series"
            print(f"[chestview-smoke] no {what} after {timeout:.0f} s", flush=True)
            watcher.finish(3)
        elif not watcher.done:
            QtCore.QTimer.singleShot(100, poll)

    def exec_(*_args, **_kwargs):
        QtCore.QTimer.singleShot(0, poll)
        return original_exec()

    QtWidgets.QApplication.exec = exec_


def _main() -> None:
    if _cpu_variant():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("CHESTVIEW_BUILD_VARIANT", "cpu")
    else:
        os.environ.setdefault("CHESTVIEW_BUILD_VARIANT", "gpu")
    _multiprocessing_child()
    if os.environ.get("CHESTVIEW_SMOKE_EXIT"):
        _install_smoke_exit(_process_start_time())


_main()
