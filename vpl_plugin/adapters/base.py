"""The adapter protocol every wrapped pipeline implements, and the adapter registry.

An adapter turns one image and its image-level labels into CAMs in upstream CLIP-ES's file format.
It exposes the few plug points a prototype-based CAM method needs: the prototype set, the per-class
GradCAM maps, a hook that may replace them (``fuse``; CLIP-CPAL overrides it) and the refinement.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Type

import numpy as np
import torch

__all__ = ["CAMAdapter", "CAMOutput", "create_adapter", "list_adapters", "register_adapter"]


@dataclass
class CAMOutput:
    """CAMs of one image.

    Attributes:
        keys: ``(k,)`` int64 foreground class indices (0-based), in label order.
        attn_highres: ``(k, H0, W0)`` float16 refined maps at the original image size.
        cams: ``(k, h, w)`` float32 GradCAMs (or fused maps) at token resolution, before refinement.
        features: ``(n, D)`` unit-norm patch features of the image (VPL's pixel features).
        probabilities: ``(P,)`` image-level softmax over the stacked prototypes.
        grid: token grid ``(h, w)``.
        extra: arrays saved beside the upstream keys (e.g. ``highres`` raw GradCAMs).
    """

    keys: np.ndarray
    attn_highres: np.ndarray
    cams: torch.Tensor
    features: torch.Tensor
    probabilities: torch.Tensor
    grid: tuple
    extra: Dict[str, np.ndarray] = field(default_factory=dict)

    def to_upstream(self) -> dict:
        """The dict upstream CLIP-ES saves as ``<id>.npy`` (plus any ``extra`` arrays)."""
        out = {"keys": self.keys.astype(np.int64), "attn_highres": self.attn_highres.astype(np.float16)}
        out.update(self.extra)
        return out


class CAMAdapter(abc.ABC):
    """Base class of pipeline adapters (CLIP-ES, CLIP-CPAL, ...)."""

    name: str = ""

    @abc.abstractmethod
    def __call__(self, image, labels: Sequence[int]) -> CAMOutput:
        """CAMs of a PIL ``image`` for its foreground ``labels`` (0-based class indices)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-serialisable description of the configuration (written beside outputs)."""


_REGISTRY: Dict[str, Type[CAMAdapter]] = {}


def register_adapter(name: str) -> Callable[[Type[CAMAdapter]], Type[CAMAdapter]]:
    """Class decorator registering an adapter under ``name`` for :func:`create_adapter`."""

    def wrap(cls: Type[CAMAdapter]) -> Type[CAMAdapter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an adapter named {name!r} is already registered ({_REGISTRY[name]}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_adapters() -> List[str]:
    """Names of the registered adapters."""
    return sorted(_REGISTRY)


def create_adapter(name: str, *args, **kwargs) -> CAMAdapter:
    """Instantiate a registered adapter; an unknown name lists the choices."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter {name!r}; registered adapters: {list_adapters()}.")
    return _REGISTRY[name](*args, **kwargs)
