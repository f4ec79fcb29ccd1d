"""The house rules of docs/ARCHITECTURE.md, checked on the source: which room may import which,
no import circles, the engine free of Qt and the viewer free of torch.

Imports are read with ``ast`` from every module (function-level imports included), so a lazy import
that breaks a rule fails here as well as one at the top of a file.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# engine rooms; "foundation" is the top-level modules every room may use
FOUNDATION = {"engine", "engine.errors", "engine.paths", "engine.logscrub", "engine.metrics", "engine.results",
              "engine.cpu"}
ENGINE_MAY_IMPORT: dict[str, set[str]] = {
    "foundation": {"foundation"},
    "dicom": {"foundation", "dicom"},
    "ai": {"foundation", "dicom", "ai"},
    "interop": {"foundation", "dicom", "ai", "interop"},
    "reading": {"foundation", "dicom", "ai", "interop", "reading"},
    "review": {"foundation", "dicom", "ai", "interop", "reading", "review"},
    "demo": {"foundation", "dicom", "ai", "demo"},
    "training": {"foundation", "dicom", "ai", "interop", "reading", "demo", "training"},
    "service": {"foundation", "dicom", "ai", "interop", "reading", "review", "service"},
}
# viewer rooms; "helpers" is the top-level Qt helpers every room may use
VIEWER_HELPERS = {"viewer", "viewer.qt_workers", "viewer.qt_startup", "viewer.style", "viewer.settings_store"}
VIEWER_MAY_IMPORT: dict[str, set[str]] = {
    "helpers": {"helpers"},
    "view": {"helpers", "view"},
    "browse": {"helpers", "view", "browse"},
    "pacs": {"helpers", "pacs"},
    "ai": {"helpers", "view", "pacs", "ai"},
    "window": {"helpers", "view", "browse", "pacs", "ai", "window"},
}
# the engine rooms the viewer may call: never the AI internals (they go through engine.service) or training
VIEWER_ENGINE_ROOMS = {"foundation", "service", "dicom", "interop", "reading", "review"}
QT_MODULES = ("PySide6", "shiboken6", "pyqtgraph")
TORCH_MODULES = ("torch", "torchvision", "safetensors.torch")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in ("engine", "viewer"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to the deepest module that exists in the tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in MODULES else node.module)
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def engine_room(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module == "engine.service":
        return "service"
    return module.split(".")[1]


def viewer_room(module: str) -> str:
    if module in VIEWER_HELPERS:
        return "helpers"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "window"          # viewer.app, viewer.main_window


def test_every_module_belongs_to_a_known_room():
    for m in MODULES:
        if m.startswith("engine"):
            assert engine_room(m) in ENGINE_MAY_IMPORT, f"{m}: not in a room of docs/ARCHITECTURE.md"
        else:
            assert viewer_room(m) in VIEWER_MAY_IMPORT, f"{m}: not in a room of docs/ARCHITECTURE.md"


def test_engine_rooms_import_only_downwards_and_never_qt():
    bad = []
    for m, deps in IMPORTS.items():
        if not m.startswith("engine"):
            continue
        room = engine_room(m)
        for d in deps:
            if d.split(".")[0] in QT_MODULES or d.startswith("viewer"):
                bad.append(f"{m} imports {d} (the engine never imports Qt or the viewer)")
            elif d.startswith("engine") and engine_room(d) not in ENGINE_MAY_IMPORT[room]:
                bad.append(f"{m} ({room}) imports {d} ({engine_room(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_viewer_rooms_import_only_downwards_never_torch_and_reach_the_ai_through_the_service():
    bad = []
    for m, deps in IMPORTS.items():
        if not m.startswith("viewer"):
            continue
        room = viewer_room(m)
        for d in deps:
            if d.startswith(TORCH_MODULES):
                bad.append(f"{m} imports {d} (the viewer never imports torch)")
            elif d.startswith("viewer.") and viewer_room(d) not in VIEWER_MAY_IMPORT[room]:
                bad.append(f"{m} ({room}) imports {d} ({viewer_room(d)})")
            elif d.startswith("engine") and engine_room(d) not in VIEWER_ENGINE_ROOMS:
                bad.append(f"{m} imports {d} (the viewer calls the AI through engine.service)")
    assert not bad, "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = {m: {d for d in deps if d in MODULES and d != m and not MODULES[m].name == "__init__.py"}
             for m, deps in IMPORTS.items()}
    assert _cycles(graph) == []


def test_the_check_sees_a_circle_and_a_wrong_way_import():
    """The rules above can fail: a planted circle and an upward import are reported."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "review" not in ENGINE_MAY_IMPORT[engine_room("engine.ai.analysis")]
    assert engine_room("engine.review.batch") == "review" and viewer_room("viewer.main_window") == "window"


@pytest.mark.timeout(300)
def test_importing_every_viewer_module_loads_no_torch():
    """At run time too: importing the whole viewer (every room) leaves torch unloaded."""
    mods = sorted(m for m in MODULES if m.startswith("viewer"))
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
