"""Flushing subnormal floats to zero on the CPU while CAMs are computed
(``docs/upstream_clip_es.md#subnormals``).

A CLIP whose attention is peaked (the test bed's random ViT-B/16 with scaled query and key
weights; a trained CLIP to the degree its attention is peaked) puts many softmax probabilities
below float32's smallest normal number, ``1.18e-38``. x86 CPUs compute with such subnormal
operands in microcode, tens of times slower than with normal ones, so the attention products of
every block (probabilities times values, and in the backward pass their transposes) took most of
a ViT-B/16's CPU time. Flushing them to zero (the CPU's flush-to-zero and denormals-are-zero
modes, :func:`torch.set_flush_denormal`) removes that cost. A term below ``1.18e-38`` cannot move
a sum of ordinary size, except by deciding a rounding tie; such a one-ulp change is of the kind
a different summation order makes, and peaked attention carries it on as it carries those.

The mode belongs to a thread: :func:`flushed_subnormals` sets it on the calling thread and
restores it afterwards, so the intra-op worker threads of a multi-threaded CPU run keep their own.
Threads started after ``torch.set_flush_denormal(True)`` inherit it, so a script that calls it
before any other torch work flushes on every thread.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["flushed_subnormals", "flushing_subnormals"]


def flushing_subnormals() -> bool:
    """Whether the calling thread flushes subnormal floats to zero now (a subnormal times one is
    zero exactly then)."""
    probe = torch.tensor(1e-39, dtype=torch.float32)
    return bool((probe * 1.0).item() == 0.0)


@contextlib.contextmanager
def flushed_subnormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the calling thread inside the block.

    Args:
        enabled: ``False`` leaves the thread's mode as it is (IEEE subnormals, unless the caller
            set the mode itself).

    Yields:
        whether the thread flushes inside the block (``False`` where the CPU has no such mode).

    Example:
        >>> with flushed_subnormals() as on:
        ...     x = torch.tensor(1e-39) * 1.0
        >>> (x.item() == 0.0) == on
        True
    """
    before = flushing_subnormals()
    if not enabled or before:
        yield before
        return
    if not torch.set_flush_denormal(True):  # no flush-to-zero mode on this CPU
        yield False
        return
    try:
        yield True
    finally:
        torch.set_flush_denormal(False)
