"""The adapter contract every wrapped pipeline keeps, and the adapter registry.

An adapter turns one image and its image-level labels into CAMs in upstream CLIP-ES's file format.
:class:`CAMAdapter` is the whole contract: every hook the dataset stages
(:func:`~vpl_plugin.pipeline.generate_cams`, :func:`~vpl_plugin.pipeline.collect_learning_set`,
:func:`~vpl_plugin.pipeline.learn_from_dataset`) call, with a default implementation wherever one
exists. Like pytorch-grad-cam's ``BaseCAM``, a new method overrides one hook: ``__call__`` is
``analyse`` (labels checked, image preprocessed, :meth:`~CAMAdapter.gradcams`) followed by
``finish`` (:meth:`~CAMAdapter.fuse`, :meth:`~CAMAdapter.refine`, resize). ``docs/adapters.md``
walks through the hooks and writes a third adapter.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Protocol, Sequence, Tuple, Type

import numpy as np
import torch

from vpl_plugin.cam import GradCAMResult, resize_maps
from vpl_plugin.data.classes import ClassSpec
from vpl_plugin.prototypes import PrototypeSet

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CAMAdapter", "CAMOutput", "ImageEncoder", "create_adapter", "list_adapters",
           "register_adapter"]


class ImageEncoder(Protocol):
    """What the dataset stages use of an adapter's ``encoder``
    (:class:`~vpl_plugin.backbones.CLIPDense` provides it)."""

    def preprocess(self, image: "Image.Image") -> Tuple[torch.Tensor, Tuple[int, int]]:
        """PIL image -> the model's ``(3, H, W)`` input and the original size ``(H0, W0)``."""

    def padded_size(self, height: int, width: int) -> Tuple[int, int]:
        """The input size ``(H, W)`` an image of ``height x width`` is preprocessed to; images
        with equal padded sizes can share one batched forward."""

    def fingerprint(self) -> str:
        """A short, stable hash of the weights; caches (learning records) are keyed by it."""


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
    """Base class of pipeline adapters (CLIP-ES, CLIP-CPAL, ...): the contract, hook by hook.

    A subclass must set the attributes below in ``__init__`` and implement :meth:`gradcams` and
    :meth:`describe`; every other hook has a default. Register it with :func:`register_adapter`
    to make it available to ``vpl cams --adapter NAME`` and the contract tests.

    Attributes:
        name: the registered name (set by :func:`register_adapter`).
        supports_batch: whether :meth:`call_batch` runs several images in one forward.
            :func:`~vpl_plugin.pipeline.generate_cams` groups images by
            ``encoder.padded_size`` and calls :meth:`call_batch` only when this is true and its
            ``batch_size`` is above 1; otherwise it calls the adapter once per image.
        encoder: the model (:class:`ImageEncoder`: ``preprocess``, ``padded_size``,
            ``fingerprint``).
        class_spec: the label space; labels are 0-based indices into ``class_spec.names``.
        text_prototypes: the text prototype set. VPL learning collects its seeds and targets with
            it and starts from it, whatever prototypes the adapter currently uses.
        prototypes: the prototype set the CAMs are made with (text or vision).
    """

    name: ClassVar[str] = ""
    supports_batch: ClassVar[bool] = False

    encoder: ImageEncoder
    class_spec: ClassSpec
    text_prototypes: PrototypeSet
    prototypes: PrototypeSet

    # -- hooks a subclass implements ----------------------------------------------------------------
    @abc.abstractmethod
    def gradcams(self, image: torch.Tensor, labels: Sequence[int],
                 prototypes: Optional[PrototypeSet] = None) -> GradCAMResult:
        """Per-class maps of one preprocessed image: the forward (and backward) pass.

        Called by :meth:`analyse` (so for every CAM) with ``prototypes=None`` (use
        :attr:`prototypes`), and by :func:`~vpl_plugin.pipeline.collect_learning_set` with
        ``prototypes=text_prototypes`` to make VPL's seeds.

        Args:
            image: ``(3, H, W)`` tensor from ``encoder.preprocess``.
            labels: the image's classes (0-based, already checked).
            prototypes: the set to explain the image with; ``None`` = :attr:`prototypes`.

        Returns:
            a :class:`~vpl_plugin.cam.GradCAMResult`: ``cams`` ``(k, h, w)`` in ``[0, 1]`` in
            label order, ``features`` ``(h*w, D)`` unit patch features, ``probabilities``,
            ``attention`` (whatever :meth:`refine` needs; may be empty) and ``grid`` ``(h, w)``.
        """

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-serialisable description of the configuration, with ``"adapter": name``.

        Written beside the outputs (``vpl_cams.yaml``) and compared when a run resumes into a
        folder, so it must hold every setting that changes the CAMs.
        """

    # -- hooks with defaults ------------------------------------------------------------------------
    def fuse(self, result: GradCAMResult, labels: Sequence[int]) -> torch.Tensor:
        """The maps that enter refinement, ``(k, h, w)`` at token resolution.

        Called by :meth:`finish` once per image after :meth:`gradcams`. Default: the GradCAMs
        unchanged. Override it to change what is refined (CLIP-ES's ``map_mode``, CLIP-CPAL's
        context-prototype fusion); it must return ``len(labels)`` maps in label order, of the
        grid ``result.grid``, with values in ``[0, 1]``.
        """
        return result.cams

    def refine(self, result: GradCAMResult, maps: torch.Tensor) -> torch.Tensor:
        """Refined maps ``(k, h, w)`` from the fused ``maps`` and the forward's ``result``.

        Called by :meth:`finish`, and by :func:`~vpl_plugin.pipeline.collect_learning_set` with
        ``seed_source="refined"`` (on the text GradCAMs). Default: no refinement (``maps``).
        CLIP-ES overrides it with the class-aware attention-based affinity refinement.
        """
        return maps

    def check_labels(self, labels: Sequence[int]) -> List[int]:
        """``labels`` as ints, refused by name when outside ``0..len(class_spec.names) - 1``."""
        labels = [int(c) for c in labels]
        bad = [c for c in labels if not 0 <= c < len(self.class_spec.names)]
        if bad:
            raise ValueError(f"labels {bad} are outside 0..{len(self.class_spec.names) - 1} "
                             f"({self.class_spec.name} has {len(self.class_spec.names)} classes).")
        return labels

    def analyse(self, image: "Image.Image", labels: Sequence[int]) -> Tuple[GradCAMResult, Tuple[int, int], List[int]]:
        """First half of :meth:`__call__`: check ``labels``, preprocess ``image``, :meth:`gradcams`.

        Returns:
            the :class:`~vpl_plugin.cam.GradCAMResult`, the original size ``(H0, W0)`` and the
            labels as ints.
        """
        labels = self.check_labels(labels)
        x, size = self.encoder.preprocess(image)
        return self.gradcams(x, labels), size, labels

    def finish(self, result: GradCAMResult, size: Tuple[int, int], labels: List[int]) -> CAMOutput:
        """Second half of :meth:`__call__`: :meth:`fuse`, :meth:`refine` and resize to ``size``."""
        maps = self.fuse(result, labels)
        final = self.refine(result, maps)
        return CAMOutput(keys=np.asarray(labels, dtype=np.int64),
                         attn_highres=resize_maps(final, size).astype(np.float16), cams=maps,
                         features=result.features, probabilities=result.probabilities,
                         grid=result.grid)

    def __call__(self, image: "Image.Image", labels: Sequence[int]) -> CAMOutput:
        """CAMs of a PIL ``image`` for its foreground ``labels`` (0-based class indices).

        Called by :func:`~vpl_plugin.pipeline.generate_cams` once per image (unless it batches).
        Returns a :class:`CAMOutput` whose ``keys`` are the labels in the given order and whose
        ``attn_highres`` holds one ``[0, 1]`` map per label at the image's size.
        """
        result, size, labels = self.analyse(image, labels)
        return self.finish(result, size, labels)

    def call_batch(self, images: Sequence, labels: Sequence[Sequence[int]]) -> List[CAMOutput]:
        """CAMs of several images, in order; each equals ``self(image, labels)``.

        Called by :func:`~vpl_plugin.pipeline.generate_cams` with images of one
        ``encoder.padded_size`` when :attr:`supports_batch` is true (a failing batch is retried
        image by image). Default: one :meth:`__call__` per image.

        Raises:
            ValueError: the number of label lists differs from the number of images.
        """
        if len(images) != len(labels):
            raise ValueError(f"call_batch needs one label list per image; got {len(images)} images and "
                             f"{len(labels)} label lists.")
        return [self(im, lab) for im, lab in zip(images, labels)]


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


def create_adapter(name: str, *args: Any, **kwargs: Any) -> CAMAdapter:
    """Instantiate a registered adapter; an unknown name lists the choices."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter {name!r}; registered adapters: {list_adapters()}.")
    return _REGISTRY[name](*args, **kwargs)
