"""The one error type every loader boundary raises (DESIGN.md section 5)."""
from __future__ import annotations

from pathlib import Path


class LoadError(Exception):
    """A file or series could not be read; ``reason`` says why in words a user can act on.

    Every failure inside engine.dicom (pydicom's nine exception types, decoder errors,
    size-budget refusals, timeouts) is turned into this at the boundary.
    """

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else ""
        self.reason = reason
        super().__init__(f"{Path(self.path).name if self.path else '<input>'}: {reason}")


class ModelError(Exception):
    """A model file or card is missing, corrupt or fails its pinned sha256."""


class AnalysisCancelled(Exception):
    """Raised inside analyze() when the caller's cancel flag is set."""


class AIHostError(RuntimeError):
    """The AI process (engine.ai.host) stopped or could not run a call; the message says why in
    words a user can act on (it restarts on the next analysis)."""
