"""Where ChestView keeps its own files (never inside an input folder)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def user_data_dir() -> Path:
    """``$CHESTVIEW_HOME`` or ``$XDG_DATA_HOME/chestview`` (default ``~/.local/share/chestview``)."""
    env = os.environ.get("CHESTVIEW_HOME")
    if env:
        p = Path(env)
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        p = Path(base) / "chestview"
    p.mkdir(parents=True, exist_ok=True)
    return p


def demo_root() -> Path:
    return user_data_dir() / "demo"


def store_dir() -> Path:
    """Local DICOM store for studies received from PACS."""
    p = user_data_dir() / "store"
    p.mkdir(parents=True, exist_ok=True)
    return p


def models_dir() -> Path:
    """Shipped model weights and cards; ``$CHESTVIEW_MODELS`` overrides (tests, deployments)."""
    env = os.environ.get("CHESTVIEW_MODELS")
    if not env and is_frozen():
        return resources_dir() / "models"
    return Path(env) if env else REPO_ROOT / "resources" / "models"


def is_frozen() -> bool:
    """True inside the PyInstaller build (installer.spec), where sys._MEIPASS holds the bundle."""
    return bool(getattr(sys, "frozen", False)) and hasattr(sys, "_MEIPASS")


def bundle_root() -> Path:
    """Folder holding ``resources/``: the one-folder app's ``_internal`` when frozen, else the repository."""
    return Path(getattr(sys, "_MEIPASS")) if is_frozen() else REPO_ROOT


def resources_dir() -> Path:
    """Shipped read-only resources (models, icons, style sheet); see installer.spec ``datas``."""
    return bundle_root() / "resources"
