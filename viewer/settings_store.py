"""Persistent viewer settings (recent studies, layout, last window/level per modality).

Stored with QSettings in an INI file so the location is explicit: ``$CHESTVIEW_SETTINGS`` if set,
a per-process temp file under pytest (tests must never touch a user's settings), otherwise
``user_data_dir()/viewer.ini``. No patient identifiers are stored: recent entries are paths.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

MAX_RECENT = 10


def default_settings_path() -> Path:
    env = os.environ.get("CHESTVIEW_SETTINGS")
    if env:
        return Path(env)
    if "PYTEST_CURRENT_TEST" in os.environ or "pytest" in os.environ.get("_", ""):
        return Path(tempfile.gettempdir()) / f"chestview-test-settings-{os.getpid()}.ini"
    from engine.paths import user_data_dir

    return user_data_dir() / "viewer.ini"


class SettingsStore:
    """Small typed wrapper over QSettings(INI) for what the viewer remembers."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_settings_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._qs = QSettings(str(self.path), QSettings.Format.IniFormat)

    # -- generic ---------------------------------------------------------------------------
    def value(self, key: str, default=None):
        v = self._qs.value(key, default)
        return default if v is None else v

    def set_value(self, key: str, value) -> None:
        self._qs.setValue(key, value)

    def sync(self) -> None:
        self._qs.sync()

    # -- recent studies --------------------------------------------------------------------
    def recent_paths(self) -> list[str]:
        v = self._qs.value("recent/paths", [])
        if isinstance(v, str):
            v = [v] if v else []
        return [str(p) for p in (v or [])]

    def add_recent(self, path: str | Path) -> list[str]:
        p = str(path)
        items = [x for x in self.recent_paths() if x != p]
        items.insert(0, p)
        items = items[:MAX_RECENT]
        self._qs.setValue("recent/paths", items)
        return items

    def clear_recent(self) -> None:
        self._qs.setValue("recent/paths", [])

    # -- window/level per modality ---------------------------------------------------------
    def last_window(self, modality: str) -> tuple[float, float] | None:
        v = self._qs.value(f"window/{modality.upper() or 'OT'}")
        try:
            if v is None:
                return None
            c, w = (float(x) for x in (v if isinstance(v, (list, tuple)) else str(v).split(",")))
            return (c, w) if w > 0 else None
        except (TypeError, ValueError):
            return None

    def set_last_window(self, modality: str, center: float, width: float) -> None:
        self._qs.setValue(f"window/{modality.upper() or 'OT'}", f"{center:g},{width:g}")

    # -- layout ----------------------------------------------------------------------------
    def layout_mode(self) -> str:
        return str(self._qs.value("layout/mode", "stack"))

    def set_layout_mode(self, mode: str) -> None:
        self._qs.setValue("layout/mode", mode)

    def annotations_visible(self) -> bool:
        return str(self._qs.value("view/annotations", "true")).lower() in ("true", "1")

    def set_annotations_visible(self, on: bool) -> None:
        self._qs.setValue("view/annotations", "true" if on else "false")

    def cine_fps(self) -> float:
        try:
            return float(self._qs.value("view/cine_fps", 10))
        except (TypeError, ValueError):
            return 10.0

    def set_cine_fps(self, fps: float) -> None:
        self._qs.setValue("view/cine_fps", float(fps))

    def save_window_state(self, geometry: QByteArray, state: QByteArray) -> None:
        self._qs.setValue("layout/geometry", geometry)
        self._qs.setValue("layout/state", state)

    def window_state(self) -> tuple[QByteArray | None, QByteArray | None]:
        g, s = self._qs.value("layout/geometry"), self._qs.value("layout/state")
        return (g if isinstance(g, QByteArray) else None, s if isinstance(s, QByteArray) else None)
