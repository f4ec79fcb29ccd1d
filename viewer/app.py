"""Start the ChestView viewer: ``run_viewer(paths)`` (used by ``main.py view`` / ``run-demo``)."""
from __future__ import annotations

import logging
import sys

from PySide6.QtCore import Qt, QTimer
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
    win.show()
    for i, p in enumerate(paths):
        QTimer.singleShot(0, lambda p=p, i=i: win.open_path(p, select=(i == 0)))
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
    """Start the DICOM storage listener when Settings > Network asks for it at start-up."""
    try:
        from viewer.pacs.pacs_dialog import autostart_storage_scp
    except ImportError:
        return
    autostart_storage_scp(win)
