"""Start the ChestView viewer: ``run_viewer(paths)`` (used by ``main.py view`` / ``run-demo``)."""
from __future__ import annotations

import gc
import logging
import sys

import viewer.qt_startup  # noqa: F401 - first: PySide6 set-up every later import relies on
from PySide6.QtCore import QEventLoop, Qt, QTimer
from PySide6.QtWidgets import QApplication


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
    # everything imported and built so far lives as long as the window: out of the garbage
    # collector's full passes (each would walk ~10^6 objects, ~30 ms on the GUI thread)
    gc.freeze()
    # indexing runs in a worker thread (open_path) while the window is shown and painted; its
    # result, and the first series with it, arrives through the event loop (bench_viewer_start.py)
    for i, p in enumerate(paths):
        win.open_path(p, select=(i == 0))
    # building the window posts ~1,500 polish, layout, menu and settings events (and PySide6
    # creates ~70 enum types on their first delivery): ~80 ms of work that Qt would otherwise run
    # in the same event-loop turn as the window's first paint, one stall the user sees. Run now,
    # before there is a window to be unresponsive (bench/bench_viewer_start.py, gap at start).
    app.processEvents(QEventLoop.ProcessEventsFlag.ExcludeUserInputEvents)
    win.show()
    QTimer.singleShot(0, lambda: _autostart_pacs(win))
    try:
        return int(app.exec())
    finally:
        try:
            from viewer.pacs.pacs_dialog import stop_storage_scp

            stop_storage_scp(win)
        except Exception:  # noqa: BLE001 - shutting down: nothing left to tell the user
            pass
        from viewer.qt_workers import wait_for_all_pools

        wait_for_all_pools()


def _autostart_pacs(win) -> None:
    """Start the DICOM storage listener when Settings > Network asks for it at start-up.

    The setting is read first: when it is off (the default) the network dialog's module and
    pynetdicom (0.15 s of imports on the GUI thread, before the first image) are not loaded."""
    try:
        from engine.interop.netconfig import load_settings

        if not load_settings().start_scp:
            return
    except Exception:  # noqa: BLE001 - an unreadable file is reported by autostart_storage_scp
        pass
    try:
        from viewer.pacs.pacs_dialog import autostart_storage_scp
    except ImportError:
        return
    autostart_storage_scp(win)
