"""Atomic file writes: a crash never leaves a half-written output that a rerun would trust."""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file keeps the final suffix so libraries that dispatch on it (PIL, cv2) work.
    The finished file gets the permissions a plain ``open(path, "w")`` would give it (``0o666``
    minus the process umask), not the private ``0o600`` of a temporary file. A temporary file
    left behind by a killed process matches :data:`TEMP_NAME` and is removed by
    :func:`remove_stale_temp_files` when the next run takes the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: names of the temporary files :func:`atomic_path` writes (``.<stem>.<8 random chars>.tmp<suffix>``)
TEMP_NAME = re.compile(r"^\..*\.[A-Za-z0-9_]{8}\.tmp(\.[^./]*)?$")


def remove_stale_temp_files(folder: str | os.PathLike, stem: Optional[str] = None) -> List[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` (not recursive).

    Only call this while holding the output lock (:mod:`vpl_plugin._lock`) of what the files
    belong to: then no other process is writing them and every such file is a leftover of a
    killed run.

    Args:
        folder: where to look.
        stem: only the temporary files of outputs with this stem (``X`` for ``X.pt``, ``X.yaml``),
            for a folder that other runs write into too; ``None``: every temporary file.

    Returns:
        the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = TEMP_NAME if stem is None else re.compile(
        rf"^\.{re.escape(stem)}\.[A-Za-z0-9_]{{8}}\.tmp(\.[^./]*)?$")
    removed = []
    for entry in folder.iterdir():
        if pattern.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no read-only API elsewhere: set and restore at once
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, sorted keys) atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
