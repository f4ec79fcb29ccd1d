"""Shared fixtures: headless Qt, the demo study set (built once per session), ../shared/data (skip if absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHESTVIEW_SHARED_DATA", REPO.parent / "shared" / "data"))
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo study set, built once per test session into a temp folder."""
    from engine.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder for screenshots and reports the tests save for humans to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
