"""Dark theme for the reading room: a dark Fusion palette plus resources/style.qss.

Radiologists read in dim rooms; a bright UI around a dark image hurts perceived contrast
(the reason every PACS workstation is dark), so the whole window is dark and the image
background is pure black.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

QSS_PATH = Path(__file__).resolve().parents[1] / "resources" / "style.qss"
ICON_DIR = Path(__file__).resolve().parents[1] / "resources" / "icons"


def dark_palette() -> QPalette:
    """A neutral dark palette (Fusion style) so widgets without style-sheet rules stay dark."""
    pal = QPalette()
    base, window, text = QColor("#16181b"), QColor("#1b1d21"), QColor("#d6d6d6")
    pal.setColor(QPalette.ColorRole.Window, window)
    pal.setColor(QPalette.ColorRole.WindowText, text)
    pal.setColor(QPalette.ColorRole.Base, base)
    pal.setColor(QPalette.ColorRole.AlternateBase, QColor("#1c1f23"))
    pal.setColor(QPalette.ColorRole.Text, text)
    pal.setColor(QPalette.ColorRole.Button, QColor("#2a2d33"))
    pal.setColor(QPalette.ColorRole.ButtonText, text)
    pal.setColor(QPalette.ColorRole.ToolTipBase, QColor("#25282e"))
    pal.setColor(QPalette.ColorRole.ToolTipText, text)
    pal.setColor(QPalette.ColorRole.Highlight, QColor("#2f4f6f"))
    pal.setColor(QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.Link, QColor("#6fa8dc"))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6a6a6a"))
    return pal


def style_sheet() -> str:
    """The application style sheet (empty string if the resource is missing: still usable)."""
    try:
        return QSS_PATH.read_text(encoding="utf-8")
    except OSError:
        return ""


def apply_dark_theme(app: QApplication) -> None:
    """Fusion + dark palette + style sheet; safe to call more than once."""
    app.setStyle("Fusion")
    app.setPalette(dark_palette())
    app.setStyleSheet(style_sheet())
