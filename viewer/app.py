"""Start the ChestView viewer: ``run_viewer(paths)`` (used by ``main.py view`` / ``run-demo``)."""
from __future__ import annotations

import importlib.abc
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QApplication

_IMMORTAL = 1 << 40


def protect_singletons() -> bool:
    """Work around PySide6 6.12 on CPython < 3.12: its abi3 build returns ``Py_True``/``Py_None``
    without a new reference (it assumes PEP 683 immortal objects), so every ``Signal.emit()`` drops
    True's refcount by one and every void Qt call drops None's. After some thousands of emits
    CPython aborts with "bool_dealloc: deallocating True or False" (seen here after ~600 emits in
    a bare process). Giving True/False/None/Ellipsis/NotImplemented an effectively infinite
    refcount makes them immortal as on 3.12+. Idempotent; a no-op on 3.12+. Returns True if applied.
    """
    if sys.version_info >= (3, 12):
        return False
    import ctypes

    for obj in (True, False, None, Ellipsis, NotImplemented):
        ref = ctypes.c_ssize_t.from_address(id(obj))
        if ref.value < _IMMORTAL:
            ref.value += _IMMORTAL
    return True


protect_singletons()


class _HiddenModules(importlib.abc.MetaPathFinder):
    """A finder that makes ``import NAME`` (and its submodules) fail with ImportError."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported while the display stack loads")
        return None


@contextmanager
def imports_hidden(*names: str) -> Iterator[None]:
    """Within the block, optional packages that libraries merely probe for at import time look
    absent. Nothing is cached for them (a failed import leaves no sys.modules entry), so a later
    ``import`` elsewhere (torch in the AI worker) loads them normally."""
    finder = _HiddenModules(tuple(n for n in names if n not in sys.modules))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def preload_display_stack() -> None:
    """Import pyqtgraph and pydicom without the extras they probe for at import and never use here.

    pyqtgraph's ``widgets.RawImageWidget`` imports ``cuda.bindings.runtime`` (cuda-python, pulled in
    by torch's wheels) for an OpenGL widget the viewer does not use, and ``pydicom.data.download``
    imports ``requests`` (with urllib3 and charset_normalizer) for downloading pydicom's own test
    files, falling back to urllib without it. Together about 0.4 s and 60 MB before the first image
    on a 2-core machine (bench/bench_viewer_start.py). Idempotent; call before either is imported.
    """
    if "pyqtgraph" in sys.modules and "pydicom" in sys.modules:
        return
    with imports_hidden("cuda", "requests"):
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401
        import pyqtgraph  # noqa: F401


def create_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication (reused if one exists) with the dark theme applied."""
    from viewer.style import apply_dark_theme

    app = QApplication.instance()
    if app is None:
        QApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("ChestView")
    app.setOrganizationName("ChestView")
    apply_dark_theme(app)
    return app


def run_viewer(paths: list[str]) -> int:
    """Open the main window on ``paths`` (folders, DICOMDIRs, ZIPs or files); returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app()
    from viewer.main_window import MainWindow

    win = MainWindow()
    win.show()
    for i, p in enumerate(paths):
        QTimer.singleShot(0, lambda p=p, i=i: win.open_path(p, select=(i == 0)))
    QTimer.singleShot(0, lambda: _autostart_pacs(win))
    try:
        return int(app.exec())
    finally:
        try:
            from viewer.pacs_dialog import stop_storage_scp

            stop_storage_scp(win)
        except Exception:  # noqa: BLE001 - shutting down: nothing left to tell the user
            pass
        from viewer.qt_workers import wait_parked_pools

        wait_parked_pools()


def _autostart_pacs(win) -> None:
    """Start the DICOM storage listener when Settings > Network asks for it at start-up."""
    try:
        from viewer.pacs_dialog import autostart_storage_scp
    except ImportError:
        return
    autostart_storage_scp(win)
