"""The error every dataset reader raises for a file it cannot use (path, reason and fix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Tuple

__all__ = ["DatasetError"]

class DatasetError(ValueError):
    """A dataset file that cannot be used, with the path and the reason.

    Raised for one sample (the caller may skip it, e.g. an annotation without objects) or for
    a whole dataset whose layout is wrong.

    Attributes:
        path: the offending file or folder.
        reason: what is wrong with it.
        hint: how to fix it (may be empty).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self) -> Tuple[Any, ...]:  # keep the attributes when sent between DataLoader workers
        return (type(self), (self.path, self.reason, self.hint))
