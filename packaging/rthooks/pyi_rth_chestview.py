"""PyInstaller runtime hook for ChestView: runs in the frozen app before main.py.

Why it exists (and why it lives in packaging/, not in the app code):
- the `cpu` build variant ships without the cuDNN engine libraries, so it hides GPUs from torch
  (CUDA_VISIBLE_DEVICES="") instead of failing on the first convolution on a GPU machine;
- child processes started with the `spawn`/`forkserver` method (Windows, macOS) re-run the executable:
  `multiprocessing.freeze_support()` turns them into workers;
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


def _cpu_variant() -> bool:
    base = getattr(sys, "_MEIPASS", "")
    return bool(base) and os.path.exists(os.path.join(base, "chestview-variant-cpu.txt"))


def _install_smoke_exit(t0: float) -> None:
    """Wrap QApplication.exec so the event loop quits after the first paint of a main window."""
    timeout = float(os.environ.get("CHESTVIEW_SMOKE_TIMEOUT", "300"))
    from PySide6 import QtCore, QtWidgets

    original_exec = QtWidgets.QApplication.exec

    class _FirstPaint(QtCore.QObject):
        def __init__(self) -> None:
            super().__init__()
            self.window = None

        def eventFilter(self, obj, event):  # noqa: N802 (Qt naming)
            if (event.type() == QtCore.QEvent.Type.Paint and self.window is not None
                    and isinstance(obj, QtWidgets.QWidget) and obj.window() is self.window):
                QtCore.QTimer.singleShot(0, self.finish)
                self.window = None
            return False

        def finish(self) -> None:
            app = QtWidgets.QApplication.instance()
            wins = [w for w in app.topLevelWidgets() if isinstance(w, QtWidgets.QMainWindow) and w.isVisible()]
            w = wins[0] if wins else None
            size = f"{w.width()}x{w.height()}" if w is not None else "?"
            title = w.windowTitle() if w is not None else "?"
            print(f"[chestview-smoke] first window painted after {time.time() - t0:.2f} s "
                  f"(title {title!r}, {size}, platform {app.platformName()})", flush=True)
            app.exit(0)

    watcher = _FirstPaint()

    def poll() -> None:
        app = QtWidgets.QApplication.instance()
        wins = [w for w in app.topLevelWidgets() if isinstance(w, QtWidgets.QMainWindow) and w.isVisible()]
        if wins and watcher.window is None:
            watcher.window = wins[0]
            app.installEventFilter(watcher)
            wins[0].update()  # schedule a paint in case the first one already happened
            QtCore.QTimer.singleShot(5000, watcher.finish)  # fallback: platform without paint events
        elif time.time() - t0 > timeout:
            print(f"[chestview-smoke] no main window after {timeout:.0f} s", flush=True)
            app.exit(3)
        elif not wins:
            QtCore.QTimer.singleShot(50, poll)

    def exec_(*_args, **_kwargs):
        QtCore.QTimer.singleShot(0, poll)
        return original_exec()

    QtWidgets.QApplication.exec = exec_


def _main() -> None:
    t0 = _process_start_time()
    if "--multiprocessing-fork" in sys.argv:
        import multiprocessing

        multiprocessing.freeze_support()
    if _cpu_variant():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("CHESTVIEW_BUILD_VARIANT", "cpu")
    else:
        os.environ.setdefault("CHESTVIEW_BUILD_VARIANT", "gpu")
    if os.environ.get("CHESTVIEW_SMOKE_EXIT"):
        _install_smoke_exit(t0)


_main()
