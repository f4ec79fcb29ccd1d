"""Process-wide set-up the viewer's modules need before any widget exists: a refcount workaround for
PySide6 on CPython < 3.12 (``protect_singletons``) and a lean import of the display stack
(``preload_display_stack``). A module of its own so that viewer.app (which opens the main window)
and the views (which need these at import) do not import each other.
"""
from __future__ import annotations

import importlib.abc
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
    """Import pyqtgraph and pydicom without the extras they probe for at import and never use here.

    pyqtgraph's ``widgets.RawImageWidget`` imports ``cuda.bindings.runtime`` (cuda-python, pulled in
    by torch's wheels) for an OpenGL widget the viewer does not use, and ``pydicom.data.download``
    imports ``requests`` (with urllib3 and charset_normalizer) for downloading pydicom's own test
    files, falling back to urllib without it. Together about 0.4 s and 60 MB before the first image
    on a 2-core machine (bench/bench_viewer_start.py). Idempotent; call before either is imported.
    """
    if "pyqtgraph" in sys.modules and "pydicom" in sys.modules:
        return
    with imports_hidden("cuda", "requests"):
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401
        import pyqtgraph  # noqa: F401
