"""Process-wide set-up the viewer's modules need before any widget exists: a refcount workaround for
PySide6 on CPython < 3.12 (``protect_singletons``) and a lean import of the display stack
(``preload_display_stack``). A module of its own so that viewer.app (which opens the main window)
and the views (which need these at import) do not import each other.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from contextlib import contextmanager
from typing import Iterator


_IMMORTAL = 1 << 40


def protect_singletons() -> bool:
    """Work around PySide6 6.12 on CPython < 3.12: its abi3 build returns ``Py_True``/``Py_None``
    without a new reference (it assumes PEP 683 immortal objects), so every ``Signal.emit()`` drops
    True's refcount by one and every void Qt call drops None's. After some thousands of emits
    CPython aborts with "bool_dealloc: deallocating True or False" (seen here after ~600 emits in
    a bare process). Giving True/False/None/Ellipsis/NotImplemented an effectively infinite
    refcount makes them immortal as on 3.12+. Idempotent; a no-op on 3.12+. Returns True if applied.
    """
    if sys.version_info >= (3, 12):
        return False
    import ctypes

    for obj in (True, False, None, Ellipsis, NotImplemented):
        ref = ctypes.c_ssize_t.from_address(id(obj))
        if ref.value < _IMMORTAL:
            ref.value += _IMMORTAL
    return True


protect_singletons()


def skip_feature_scan() -> bool:
    """Stop PySide6 from reading the source of every module imported after it.

    PySide6's ``__feature__`` support (``from __feature__ import snake_case, true_property``) hooks
    the import system: for each newly imported module, ``shibokensupport.feature.feature_imported``
    calls ``_mod_uses_pyside``, which runs ``inspect.getsource`` on the whole module to look for the
    string "PySide6" (some 430 modules while the viewer starts: 0.15-0.2 s of its start-up on a
    2-core machine, bench/bench_viewer_start.py). The answer only matters to modules that switch
    features on; no module of the viewer does (tests/test_viewer_start.py checks), so every module
    is reported as not switching, which PySide6 records as "ignore this module". Best effort: a
    PySide6 without this hook is left alone. Returns True if applied.
    """
    import shiboken6  # noqa: F401 - loads shibokensupport

    feature = sys.modules.get("shibokensupport.feature")
    if feature is None or not hasattr(feature, "_mod_uses_pyside"):
        return False
    feature._mod_uses_pyside = _uses_no_features
    return True


def _uses_no_features(module: object) -> bool:
    return False


skip_feature_scan()


class _HiddenModules(importlib.abc.MetaPathFinder):
    """A finder that makes ``import NAME`` (and its submodules) fail with ImportError."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported while the display stack loads")
        return None


@contextmanager
def imports_hidden(*names: str) -> Iterator[None]:
    """Within the block, optional packages that libraries merely probe for at import time look
    absent. Nothing is cached for them (a failed import leaves no sys.modules entry), so a later
    ``import`` elsewhere (torch in the AI worker) loads them normally."""
    finder = _HiddenModules(tuple(n for n in names if n not in sys.modules))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def preload_display_stack() -> None:
    """Import pyqtgraph without the extra it probes for at import and never uses here.

    pyqtgraph's ``widgets.RawImageWidget`` imports ``cuda.bindings.runtime`` (cuda-python, pulled in
    by torch's wheels) for an OpenGL widget the viewer does not use: about 0.2 s and 30 MB before
    the first image on a 2-core machine (bench/bench_viewer_start.py). Its Qt mirror modules are
    loaded lazily (``_LazyQtMirror``, another 0.1 s). pydicom is not imported
    here, nor later while a study is read: frames, annotations, tags and overlay planes come from
    the sandboxed decoder as plain data (engine.dicom.safe_decode). Idempotent; call before
    pyqtgraph is imported.
    """
    if "pyqtgraph" in sys.modules:
        return
    finder = _LazyQtMirror()
    sys.meta_path.insert(0, finder)
    try:
        with imports_hidden("cuda"):
            import pyqtgraph  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


# pyqtgraph/Qt/__init__.py (pyqtgraph 0.13/0.14): its QtCore/QtGui/QtWidgets mirrors get every name of
# the binding's modules copied in, which makes PySide6 build all of its ~1,500 lazily created types
# and their enums at once: about 0.1 s of the viewer's start-up on a 2-core machine, for types the
# viewer never touches. A mirror that looks names up in the binding when asked (PEP 562 module
# ``__getattr__``) holds the same objects.
_EAGER_COPY = """def _copy_attrs(src, dst):
    for o in dir(src):
        if not hasattr(dst, o):
            setattr(dst, o, getattr(src, o))
"""
_LAZY_COPY = """def _copy_attrs(src, dst):
    dst.__getattr__ = lambda name, _src=src: getattr(_src, name)
"""


class _LazyQtMirrorLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):  # noqa: D102 - importlib protocol
        source = self.get_data(self.path).decode("utf-8")
        return compile(source.replace(_EAGER_COPY, _LAZY_COPY, 1), self.path, "exec", dont_inherit=True)


class _LazyQtMirror(importlib.abc.MetaPathFinder):
    """Loads ``pyqtgraph.Qt`` with lazy mirrors when its source holds exactly the copy loop above;
    any other pyqtgraph is imported untouched."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname != "pyqtgraph.Qt":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not str(spec.origin or "").endswith(".py"):
            return None
        try:
            with open(spec.origin, encoding="utf-8") as fh:
                if _EAGER_COPY not in fh.read():
                    return None
        except OSError:
            return None
        spec.loader = _LazyQtMirrorLoader(fullname, spec.origin)
        return spec
