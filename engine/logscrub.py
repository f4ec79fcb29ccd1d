"""Keep patient identifiers out of stderr and logs (DESIGN.md 5).

Why: pydicom's warnings quote raw element values (a patient name, an ID) and file paths;
highdicom's warnings print the patient name; pynetdicom logs whole datasets at DEBUG; and
folders are often named after patients, so any absolute path is an identifier. Nothing here
knows which strings are identifiers, so it removes the *places* they appear: quoted values,
byte literals, person names in DICOM PN form (PS3.5 6.2, ``Family^Given``) and absolute paths.

:func:`install` hooks the two ways text reaches stderr from Python code — the ``warnings``
machinery and every ``logging`` record (through the record factory, so records of any logger
and any handler are covered) — and is called at process start by main.py, engine.service and
each decode child of engine.dicom.safe_decode.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
import threading
import warnings
from typing import Any

_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:\\|\\\\|/)(?:[^\s'\"<>|:;,()\[\]{}]+[/\\])+[^\s'\"<>|:;,()\[\]{}]*")
_BYTES = re.compile(r"""b(['"])(?:\\.|(?!\1).)*\1""")
_QUOTED = re.compile(r"""(?<![\w])(['"])(?:\\.|(?!\1).){1,200}?\1""")
_PN = re.compile(r"\b[\w'-]+\^[\w' ^-]*")
_VALUE_AFTER = re.compile(r"(?i)\b(value|name|id)\s*[:=]\s*[^\s,;)]+")

_lock = threading.Lock()
_installed = False
_orig_showwarning: Any = None
_orig_factory: Any = None


def _hash(text: str, n: int = 10) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:n]


def scrub_paths(text: str) -> str:
    """Absolute paths (POSIX, Windows, UNC) -> ``<file #hash>``; the hash lets a user match two
    lines that name the same file without either line naming the folders it lies in."""
    return _PATH.sub(lambda m: f"<file #{_hash(m.group())}>", text)


def scrub_text(text: Any) -> str:
    """``text`` without absolute paths, quoted or byte-literal values and PN-form names."""
    s = str(text)
    s = scrub_paths(s)
    s = _BYTES.sub("<bytes>", s)
    s = _QUOTED.sub("<value>", s)
    s = _PN.sub("<name>", s)
    s = _VALUE_AFTER.sub(lambda m: f"{m.group(1)}=<value>", s)
    return s


def deid_path(rel_path: str, key: bytes = b"") -> str:
    """A stable, non-reversible name for a file under ``--deidentify``: ``file-<hmac>.<ext>``.

    Relative paths keep folder names, and folders are often named after patients; the keyed hash
    (engine.review.report's de-identification key) identifies the file across runs without naming it.
    A ZIP member keeps the separator so the two halves stay distinguishable.
    """
    head, sep, member = str(rel_path).partition("::")

    def one(p: str) -> str:
        name = p.replace("\\", "/").rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        ext = ext if ext.isalnum() and len(ext) <= 5 else ""
        digest = hmac.new(key or b"chestview", p.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]
        return f"file-{digest}" + (f".{ext}" if ext else "")

    return one(head) + (sep + one(member) if sep else "")


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    stream = file if file is not None else sys.stderr
    if stream is None:
        return
    try:
        where = filename.replace("\\", "/").rsplit("/site-packages/", 1)[-1]
        if where.startswith("/"):
            where = where.rsplit("/", 1)[-1]
        stream.write(f"{where}:{lineno}: {category.__name__}: {scrub_text(message)}\n")
    except Exception:
        pass


def _scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _orig_factory(*args, **kwargs)
    try:
        record.msg = scrub_text(record.getMessage())
        record.args = ()
        if record.exc_info:
            import traceback

            record.exc_text = scrub_text("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
    except Exception:
        record.msg, record.args = "<log message withheld: it could not be scrubbed>", ()
    return record


def install() -> None:
    """Scrub every warning and log record of this process from now on (idempotent)."""
    global _installed, _orig_showwarning, _orig_factory
    with _lock:
        if _installed:
            return
        _orig_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
        _orig_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_scrubbing_factory)
        # pynetdicom logs every dataset it sends or receives at DEBUG (PS3.7 messages with names)
        logging.getLogger("pynetdicom").setLevel(max(logging.getLogger("pynetdicom").level, logging.INFO))
        _installed = True


def uninstall() -> None:
    """Restore the original hooks (tests)."""
    global _installed
    with _lock:
        if not _installed:
            return
        warnings.showwarning = _orig_showwarning
        logging.setLogRecordFactory(_orig_factory)
        _installed = False
