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
    monkeypatch.setattr(sd, "prefetch_index", lambda path: calls.append(f"index {path}"))
    fake_app = types.ModuleType("viewer.app")
    fake_app.run_viewer = lambda paths: calls.append(f"viewer {paths}") or 0
    monkeypatch.setitem(sys.modules, "viewer.app", fake_app)
    assert main.main(["view", "some/folder"]) == 0
    assert calls == ["decoder", "index some/folder", "viewer ['some/folder']"]


def test_a_prefetched_index_is_taken_once_by_the_next_open(tmp_path):
    """main.py view starts indexing its folder before Qt loads; the viewer's open_path takes that
    result, and a later open of the same folder reads it again (files may have been added)."""
    from tests.test_viewer_window import _write_dx

    _write_dx(tmp_path / "IM1.dcm", rows=8, cols=8, spacing=(1.0, 1.0))
    try:
        sd.prefetch_index(tmp_path)
        assert str(tmp_path) in sd._prefetched
        first = service.open_path(tmp_path)
        assert str(tmp_path) not in sd._prefetched
        _write_dx(tmp_path / "IM2.dcm", rows=8, cols=8, spacing=(1.0, 1.0))
        again = service.open_path(tmp_path)
    finally:
        sd.shutdown_boundary()
    assert sum(len(s.instances) for s in first.all_series()) == 1
    assert sum(len(s.instances) for s in again.all_series()) == 2


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

    from engine.ai import runtime_preload

    plan = [(Path(p).name, g, c) for p, g, c in runtime_preload.torch_preload_plan(str(site / "torch"))]
    assert plan == [("libtorch_global_deps.so", True, False), ("libcublasLt.so.13", False, True),
                    ("libcublas.so.13", False, True), ("libcudnn.so.9", False, True),
                    ("libcudart.so.13", False, True), ("libc10.so", True, False),
                    ("libtorch_cpu.so", True, False), ("libtorch_python.so", True, False),
                    ("libtriton.so", False, False)]


def test_models_run_in_this_process_only_after_torchs_libraries_are_mapped(monkeypatch):
    """engine.ai.host.run_here (CHESTVIEW_AI_PROCESS=0, or no AI process) maps torch's libraries
    without the GIL before any model work; the AI process path needs no such step here."""
    from engine.ai import host, runtime_preload

    order: list[str] = []
    monkeypatch.setattr(runtime_preload, "preload_model_runtime", lambda: order.append("preload"))
    monkeypatch.setitem(host.FUNCTIONS, "model_infos", lambda progress=None, cancel=None: order.append("model"))
    monkeypatch.setenv(host.ENV_SWITCH, "0")
    host.call("model_infos")
    assert order == ["preload", "model"]


def test_a_second_preload_caller_waits_for_the_first(monkeypatch):
    """The analysis worker must not ``import torch`` (GIL held) while the model-card loader is
    still mapping the libraries without it. (The plan is replaced: nothing is loaded here.)"""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    from engine.ai import runtime_preload as rp

    monkeypatch.setattr(rp, "_preloaded", False)
    monkeypatch.setattr(rp, "_torch_imported", lambda: False)   # other tests of this process import it
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_plan(torch_dir: str) -> list:
        entered.set()
        release.wait(60)
        order.append("first mapped")
        return []

    monkeypatch.setattr(rp, "torch_preload_plan", slow_plan)
    first = threading.Thread(target=rp.preload_model_runtime)
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=lambda: (rp.preload_model_runtime(), order.append("second returned")))
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
        def processEvents(self, flags):   # noqa: N802 - Qt API
            calls.append("events")

        def exec(self):
            calls.append("exec")
            return 0

    monkeypatch.setattr(mw, "MainWindow", FakeWindow)
    monkeypatch.setattr(app_mod, "create_app", lambda argv=None: FakeApp())
    monkeypatch.setattr(app_mod, "QTimer", types.SimpleNamespace(singleShot=lambda ms, fn: calls.append("timer")))
    assert app_mod.run_viewer(["a", "b"]) == 0
    # the construction's posted events run before the window is shown (no first-paint stall)
    assert calls == ["open a True", "open b False", "events", "show", "timer", "exec"]


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


FIRST_IMAGE_CHILD = r'''
import os, sys, time
sys.path.insert(0, sys.argv[1])
from viewer.app import create_app
app = create_app()
from viewer.main_window import MainWindow
win = MainWindow()
win.open_path(sys.argv[2])
win.show()
deadline = time.monotonic() + 90
def wait(cond):
    while not cond() and time.monotonic() < deadline:
        app.processEvents(); time.sleep(0.005)
wait(lambda: win.image_view.current_data() is not None)
at_first_image = "pydicom" in sys.modules
win.tags_dock.show()                       # the tag browser reads the displayed image's header
wait(lambda: win.tag_browser.tree.topLevelItemCount() > 0)
layer = win.image_view.overlay_planes      # and the 60xx overlay planes are read once it settles
wait(lambda: bool(layer._cache))
tags = win.tag_browser.visible_rows()
print("RESULT", win.image_view.current_data() is not None, at_first_image, "pydicom" in sys.modules,
      any(t[0] == "(0028,0010)" and t[2] == "64" for t in tags), len(layer._cache), flush=True)
os._exit(0)
'''


def test_the_viewer_process_reads_a_study_without_importing_pydicom(tmp_path):
    """pydicom takes 0.3 s to import on a 2-core machine, and an import in a worker thread still
    stalls the GUI thread for ~30 ms at a time (it holds the GIL in chunks). The viewer's process
    needs none of it: the folder is indexed, the frame decoded, and the annotations, the tag
    browser's rows and the overlay planes read in the decoder children, as plain data."""
    from tests.test_viewer_window import _write_dx

    folder = tmp_path / "dx"
    folder.mkdir()
    _write_dx(folder / "IM1.dcm", rows=64, cols=96, spacing=(0.2, 0.2))
    env = dict(__import__("os").environ, QT_QPA_PLATFORM="offscreen",
               CHESTVIEW_SETTINGS=str(tmp_path / "viewer.ini"))
    out = subprocess.run([sys.executable, "-c", FIRST_IMAGE_CHILD, str(REPO), str(folder)], env=env,
                         capture_output=True, text=True, timeout=180, cwd=str(REPO))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, out.stderr[-2000:]
    shown, at_first_image, after_tags_and_overlays, rows_tag_found, overlays_read = line.split()[1:]
    assert shown == "True"
    assert rows_tag_found == "True"          # the tag browser shows the header's Rows (64)
    assert overlays_read == "1"              # the overlay planes of the displayed frame were read
    assert at_first_image == "False"
    assert after_tags_and_overlays == "False"


def test_pyside_does_not_read_the_source_of_every_imported_module():
    """viewer.qt_startup.skip_feature_scan: PySide6's __feature__ hook read each module's source at
    import (0.15-0.2 s of start-up); it is switched off, which is right only while no module of ours
    uses ``from __feature__ import``."""
    import viewer.app  # noqa: F401 - applies skip_feature_scan
    from viewer.qt_startup import _uses_no_features

    feature = sys.modules.get("shibokensupport.feature")
    if feature is None or not hasattr(feature, "_mod_uses_pyside"):
        pytest.skip("this PySide6 has no __feature__ import hook")
    assert feature._mod_uses_pyside is _uses_no_features
    import ast

    def imports_features(path: Path) -> bool:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return any((isinstance(n, ast.ImportFrom) and n.module == "__feature__")
                   or (isinstance(n, ast.Import) and any(a.name == "__feature__" for a in n.names))
                   for n in ast.walk(tree))

    users = [p for folder in ("viewer", "engine") for p in (REPO / folder).rglob("*.py") if imports_features(p)]
    assert users == []


def test_pyqtgraph_mirrors_qt_lazily_with_the_same_objects():
    """viewer.qt_startup._LazyQtMirror: pyqtgraph's QtCore/QtGui/QtWidgets look names up in PySide6
    when asked instead of copying all of them at import (which built every PySide6 type)."""
    import PySide6.QtCore
    import PySide6.QtWidgets

    import viewer.view.image_view  # noqa: F401 - imports pyqtgraph through preload_display_stack
    import pyqtgraph.Qt as pgqt

    assert pgqt.QtCore.QPointF is PySide6.QtCore.QPointF
    assert pgqt.QtWidgets.QApplication is PySide6.QtWidgets.QApplication
    assert pgqt.QtWidgets.QOpenGLWidget is not None             # pyqtgraph's own Qt6 shims still apply
    if "__getattr__" in vars(pgqt.QtCore):                      # the lazy mirror was applied
        assert "QPointF" not in vars(pgqt.QtCore)
    with pytest.raises(AttributeError):
        pgqt.QtCore.NoSuchQtName  # noqa: B018
