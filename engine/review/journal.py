"""Per-study result files that survive ``kill -9``: temp file + fsync + rename, then resume.

Why: a batch over thousands of studies must never lose finished work nor leave a half-written
file that a restart would trust. POSIX ``rename`` within one directory is atomic, so a reader
sees either the old file or the complete new one; ``fsync`` of the file (and of the directory)
makes the rename durable across a power cut. A restarted batch reads the journal and skips every
study whose record exists *and* whose input fingerprint is unchanged.

Layout inside the output folder (never the input folder)::

    batch.json              settings the journal was written with (deidentify must match on resume)
    journal/<key>.json      one record per study (schema ``chestview-batch-journal/1``)
    .lock                   advisory lock: one batch per output folder at a time

The journal is the single source of truth for the report: the CSV/JSON/HTML are re-derived from
it, so an interrupted-then-resumed run and an uninterrupted run give the same report.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

JOURNAL_SCHEMA = "chestview-batch-journal/1"
_TMP_PREFIX = ".tmp-"


def _current_umask() -> int:
    """The process umask without changing it (Linux reports it; elsewhere set-and-restore once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or none of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.suffix, dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # mkstemp creates 0600; results are ordinary files
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def study_key(study_uid: str) -> str:
    """File-name-safe, fixed-length key for a Study Instance UID (PS3.5 9.1: up to 64 chars)."""
    return hashlib.sha256(study_uid.encode("utf-8")).hexdigest()[:24]


def fingerprint(parts: Iterable[Any]) -> str:
    """Hash of what a study's result depends on (series UIDs, files, sizes, settings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


class JournalLocked(RuntimeError):
    """Another batch is writing to the same output folder."""


class Journal:
    """The per-study record store of one output folder."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.dir = self.out / "journal"
        self._lock_fh = None

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, settings: dict[str, Any]) -> None:
        """Create folders, take the lock, check/record settings and sweep stale temp files.

        Raises ValueError when the folder was written with incompatible settings (e.g. a
        de-identified journal must not be mixed with identified rows), and JournalLocked when
        another batch holds the folder.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        manifest = self.out / "batch.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text("utf-8"))
            except (OSError, ValueError):
                old = None
            if old is not None:
                for k in ("deidentify", "schema"):
                    if k in settings and old.get(k) != settings.get(k):
                        self.close()
                        raise ValueError(
                            f"{self.out} holds a batch made with {k}={old.get(k)!r}, not {settings.get(k)!r}: "
                            "use the same option, or choose a new --out folder")
        atomic_write_json(manifest, settings)
        self.sweep_temp()

    def close(self) -> None:
        if self._lock_fh is not None:
            try:
                import fcntl

                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            except (ImportError, OSError):
                pass
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; documented limitation
            return
        fh = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise JournalLocked(f"another batch is writing to {self.out}; wait for it or choose a new --out")
        self._lock_fh = fh

    def sweep_temp(self) -> int:
        """Remove temp files a killed run left behind (they were never renamed, so never trusted)."""
        n = 0
        for folder in (self.out, self.dir, self.out / "thumbs"):
            if not folder.is_dir():
                continue
            for p in folder.glob(_TMP_PREFIX + "*"):
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    pass
        return n

    # -- records -------------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        p = self.path_for(key)
        try:
            rec = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("schema") == JOURNAL_SCHEMA else None

    def is_done(self, key: str, fp: str) -> bool:
        rec = self.read(key)
        return rec is not None and rec.get("fingerprint") == fp

    def write(self, key: str, fp: str, record: dict[str, Any]) -> None:
        """Commit one study: after this returns, a restart will skip it."""
        rec = dict(record)
        rec["schema"] = JOURNAL_SCHEMA
        rec["study_key"] = key
        rec["fingerprint"] = fp
        atomic_write_json(self.path_for(key), rec)

    def records(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Records sorted by key (deterministic); ``keys`` limits them to the current plan."""
        if keys is None:
            names = sorted(p.stem for p in self.dir.glob("*.json") if not p.name.startswith(_TMP_PREFIX))
        else:
            names = sorted(set(keys))
        out = []
        for k in names:
            rec = self.read(k)
            if rec is not None:
                out.append(rec)
        return out
