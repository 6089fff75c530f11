"""One optional progress bar for every long loop (tqdm when installed, nothing otherwise)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Iterable, Optional


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, **kwargs: Any) -> Any:
    """Wrap ``iterable`` in a tqdm bar, or return it unchanged when disabled or tqdm is missing.

    With ``iterable=None`` it returns a manual bar (``update``/``close``) or ``None``.
    """
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    if total is None and iterable is not None and isinstance(iterable, Sized):
        total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **kwargs)
