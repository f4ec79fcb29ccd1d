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
    from engine.demo.studies import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder for screenshots and reports the tests save for humans to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# PySide6 6.12's abi3 wheel on CPython 3.11 returns Py_True/Py_None
# without a new reference (it assumes PEP 683 immortal objects, 3.12+): every Signal.emit() drops
# True's refcount by one and void Qt calls drop None's, until CPython aborts with "bool_dealloc:
# deallocating True or False". Make them immortal as on 3.12 for the whole test session (the app
# does the same in viewer.qt_startup.protect_singletons).
def _protect_singletons() -> None:
    import ctypes
    import sys

    if sys.version_info >= (3, 12):
        return
    for obj in (True, False, None, Ellipsis, NotImplemented):
        ref = ctypes.c_ssize_t.from_address(id(obj))
        if ref.value < (1 << 40):
            ref.value += 1 << 40


_protect_singletons()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: faster than two on a shared 2-core CI machine for
    the small batches of the model tests (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    from engine.ai.models.devices import configure_threads

    configure_threads()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
