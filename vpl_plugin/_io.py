"""Atomic file writes: a crash never leaves a half-written output that a rerun would trust."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file keeps the final suffix so libraries that dispatch on it (PIL, cv2) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_npy_dict(path: str | os.PathLike, obj: dict) -> None:
    """Save a CAM dict as ``np.save(path, dict)`` does, atomically (upstream CLIP-ES's format).

    Kept for compatibility: it is :func:`vpl_plugin.data.cam_files.write_cam_file`; read the file
    back with :func:`vpl_plugin.data.cam_files.read_cam_file` (never with ``allow_pickle=True``).
    """
    from vpl_plugin.data.cam_files import write_cam_file  # lazy: cam_files imports this module

    write_cam_file(path, obj)


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
