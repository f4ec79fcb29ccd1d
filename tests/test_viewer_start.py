"""Start-up order of ``main.py view`` and the GIL-free preparation of the model runtime
(bench/bench_viewer_start.py measures the times; these tests check the behaviour only)."""
from __future__ import annotations

import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

import engine.service as service
from engine.dicom import safe_decode as sd

REPO = Path(__file__).resolve().parents[1]


def test_view_starts_the_decoder_before_the_viewer_is_imported(monkeypatch):
    """The decode server boots while Qt and the window load, not after the window is shown."""
    import main

    calls: list[str] = []
    monkeypatch.setattr(sd, "start_boundary", lambda *a, **k: calls.append("decoder") or [])
    fake_app = types.ModuleType("viewer.app")
    fake_app.run_viewer = lambda paths: calls.append(f"viewer {paths}") or 0
    monkeypatch.setitem(sys.modules, "viewer.app", fake_app)
    assert main.main(["view", "some/folder"]) == 0
    assert calls == ["decoder", "viewer ['some/folder']"]


def test_start_boundary_starts_the_interactive_child_without_waiting():
    sd.shutdown_boundary()
    try:
        futures = sd.start_boundary()
        assert "interactive" in sd._lanes
        assert [f.result(timeout=120) for f in futures] == [0]     # len("") in the child
    finally:
        sd.shutdown_boundary()


def test_importable_does_not_import_the_parent_packages():
    """The forkserver preload check runs before Qt is imported: it must not import pydicom."""
    code = ("import sys; from engine.dicom.safe_decode import _importable; "
            "assert _importable('pydicom.pixels.decoders.gdcm') and _importable('engine.dicom.pixels'); "
            "assert not _importable('pydicom.no_such_module') and not _importable('no_such_package.x'); "
            "print('pydicom' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_torch_preload_plan_follows_torchs_own_load_order(tmp_path):
    site = tmp_path / "site-packages"
    lib = site / "torch" / "lib"
    lib.mkdir(parents=True)
    for name in ("libtorch_global_deps.so", "libc10.so", "libtorch_cpu.so", "libtorch_python.so"):
        (lib / name).write_bytes(b"")
    cu = site / "nvidia" / "cu13" / "lib"
    cu.mkdir(parents=True)
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13"):
        (cu / name).write_bytes(b"")
    (site / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    (site / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9").write_bytes(b"")
    (site / "triton" / "_C").mkdir(parents=True)
    (site / "triton" / "_C" / "libtriton.so").write_bytes(b"")

    plan = [(Path(p).name, g, c) for p, g, c in service.torch_preload_plan(str(site / "torch"))]
    assert plan == [("libtorch_global_deps.so", True, False), ("libcublasLt.so.13", False, True),
                    ("libcublas.so.13", False, True), ("libcudnn.so.9", False, True),
                    ("libcudart.so.13", False, True), ("libc10.so", True, False),
                    ("libtorch_cpu.so", True, False), ("libtorch_python.so", True, False),
                    ("libtriton.so", False, False)]


def test_a_second_preload_caller_waits_for_the_first(monkeypatch):
    """The analysis worker must not ``import torch`` (GIL held) while the model-card loader is
    still mapping the libraries without it."""
    if "torch" in sys.modules:
        pytest.skip("torch already imported in this test process")
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    monkeypatch.setattr(service, "_preloaded", False)
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_plan(torch_dir: str) -> list:
        entered.set()
        release.wait(60)
        order.append("first mapped")
        return []

    monkeypatch.setattr(service, "torch_preload_plan", slow_plan)
    first = threading.Thread(target=service.preload_model_runtime)
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=lambda: (service.preload_model_runtime(), order.append("second returned")))
    second.start()
    second.join(0.3)             # room for a second caller that does not wait to return early
    release.set()
    first.join(60)
    second.join(60)
    assert order == ["first mapped", "second returned"]


def test_indexing_is_submitted_before_the_window_is_shown(monkeypatch):
    """open_path runs in a worker while the window is shown and painted (first image sooner)."""
    import viewer.app as app_mod
    import viewer.main_window as mw

    calls: list[str] = []

    class FakeWindow:
        def open_path(self, path, select=True):
            calls.append(f"open {path} {select}")

        def show(self):
            calls.append("show")

    class FakeApp:
        def exec(self):
            calls.append("exec")
            return 0

    monkeypatch.setattr(mw, "MainWindow", FakeWindow)
    monkeypatch.setattr(app_mod, "create_app", lambda argv=None: FakeApp())
    monkeypatch.setattr(app_mod, "QTimer", types.SimpleNamespace(singleShot=lambda ms, fn: calls.append("timer")))
    assert app_mod.run_viewer(["a", "b"]) == 0
    assert calls == ["open a True", "open b False", "show", "timer", "exec"]


@pytest.mark.parametrize("start_scp", [False, True])
def test_pacs_module_is_imported_at_start_only_when_the_listener_is_wanted(monkeypatch, start_scp):
    import engine.interop.netconfig as netconfig
    import viewer.app as app_mod

    started: list[object] = []
    fake = types.ModuleType("viewer.pacs.pacs_dialog")
    fake.autostart_storage_scp = started.append
    monkeypatch.setitem(sys.modules, "viewer.pacs.pacs_dialog", fake)
    monkeypatch.setattr(netconfig, "load_settings", lambda path=None: types.SimpleNamespace(start_scp=start_scp))
    app_mod._autostart_pacs("window")
    assert started == (["window"] if start_scp else [])


def test_an_unreadable_network_file_still_reaches_the_pacs_module(monkeypatch):
    """The error message stays with viewer.pacs.pacs_dialog.autostart_storage_scp."""
    import engine.interop.netconfig as netconfig
    import viewer.app as app_mod

    started: list[object] = []
    fake = types.ModuleType("viewer.pacs.pacs_dialog")
    fake.autostart_storage_scp = started.append
    monkeypatch.setitem(sys.modules, "viewer.pacs.pacs_dialog", fake)

    def broken(path=None):
        raise ValueError("Network settings file is unreadable")

    monkeypatch.setattr(netconfig, "load_settings", broken)
    app_mod._autostart_pacs("window")
    assert started == ["window"]
