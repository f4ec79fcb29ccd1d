"""Where ChestView keeps its own files (never inside an input folder)."""
from __future__ import annotations

import os
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
    return Path(env) if env else REPO_ROOT / "resources" / "models"
