"""CLIP-ES (Lin et al., CVPR 2023) as an adapter, with text or vision prototypes.

Faithful to upstream CLIP-ES's ``generate_cams_voc12.py`` on the same weights and images
(``docs/upstream_clip_es.md``), except where a documented switch fixes an upstream quirk, and except
that all
classes of an image share one trunk forward and one backward (identical results, fewer passes).
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vpl_plugin._cli_common import cli_option, finite_float
from vpl_plugin._checks import check_template
from vpl_plugin.adapters.base import CAMAdapter, CAMOutput, register_adapter
from vpl_plugin.cam import (
    batch_image_gradcams,
    GradCAMResult,
    affinity_transition,
    box_mask,
    dense_maps,
    image_gradcams,
    minmax_scale,
    refine_cams,
    resize_maps,
)
from vpl_plugin.data.classes import CLIP_ES_TEMPLATE, ClassSpec, VOC
from vpl_plugin.prototypes import PrototypeSet

if TYPE_CHECKING:
    from PIL import Image
    from vpl_plugin.backbones.clip import CLIPDense

__all__ = ["CLIPESAdapter", "CLIPESConfig", "text_prototype_set"]

# Text prototypes per encoder (dropped with it), then per weights / device / classes / templates.
_TEXT_CACHE: "weakref.WeakKeyDictionary[Any, Dict[tuple, PrototypeSet]]" = weakref.WeakKeyDictionary()


@dataclass
class CLIPESConfig:
    """Settings of the CLIP-ES CAM stage (defaults = upstream).

    Attributes:
        box_threshold: CAA box threshold; ``None`` takes the dataset's (0.4 VOC, 0.7 COCO).
        affinity_layers: attention maps of the last this-many blocks are averaged (8).
        sinkhorn_rounds: column/row normalisation rounds of the affinity (3).
        box_clip_fix: ``True`` fixes upstream's box mask, which never includes the last row and
            column
            (``docs/upstream_clip_es.md#box-mask-last-row-column``).
        refine: apply CAA (``False`` saves the upsampled GradCAM instead, for ablations).
        save_gradcam: also save the raw upsampled GradCAM under ``highres`` (float16).
        templates: prompt templates averaged per class (CLIP-ES: one).
        map_mode: which per-class map enters refinement. ``"gradcam"`` (CLIP-ES; with vision
            prototypes this is the paper-literal VPL); ``"dense"``: the per-token posterior of
            each class under the current prototypes (softmax over the image's classes and the
            background concepts at the set's temperature), min-max normalised; ``"fused"``: the
            text-prototype GradCAM times the dense map of the current prototypes, min-max
            normalised (compare it with the text prototypes' own fusion, not with plain GradCAM).
        dense_kind: ``"softmax"`` (posterior, default) or ``"cosine"`` (raw similarity) dense maps.
    """

    # fields with `cli_option` metadata are flags of `vpl cams` (and, where shared, `vpl learn`)
    box_threshold: Optional[float] = field(default=None, metadata=cli_option(
        "--box-threshold", "CAA box threshold (default 0.4 VOC, 0.7 COCO)", type=finite_float))
    affinity_layers: int = 8
    sinkhorn_rounds: int = 3
    box_clip_fix: bool = field(default=False, metadata=cli_option(
        "--box-clip-fix", "fix upstream's box mask, which drops the last row and column; off = upstream "
                          "(docs/upstream_clip_es.md#box-mask-last-row-column)"))
    refine: bool = field(default=True, metadata=cli_option(
        "--no-refine", "skip CAA refinement (attn_highres = upsampled GradCAM)"))
    save_gradcam: bool = field(default=False, metadata=cli_option(
        "--save-gradcam", "also save the unrefined upsampled GradCAM under the key 'highres'"))
    templates: Tuple[str, ...] = field(default=(CLIP_ES_TEMPLATE,))
    map_mode: str = field(default="gradcam", metadata=cli_option(
        "--map-mode", "map refined into CAMs: gradcam (CLIP-ES; with --prototypes the paper-literal "
                      "VPL), dense (per-token class posterior of the prototypes), fused (text "
                      "GradCAM x dense map)", choices=["gradcam", "dense", "fused"]))
    dense_kind: str = "softmax"


def text_prototype_set(encoder: "CLIPDense", class_spec: ClassSpec = VOC,
                       templates: Sequence[str] = (CLIP_ES_TEMPLATE,)) -> PrototypeSet:
    """CLIP-ES text prototypes (foreground prompt names, then background concepts), cached per
    model and class list. The set carries CLIP's exact fp32 logit scale."""
    key = (encoder.fingerprint(), str(encoder.device), getattr(encoder, "numerics", None),
           class_spec.prompt_names, class_spec.background, tuple(templates))
    cache = _TEXT_CACHE.setdefault(encoder, {})
    if key not in cache:
        names = list(class_spec.prompt_names) + list(class_spec.background)
        protos = encoder.encode_text_prototypes(names, templates)
        scale = float(encoder.logit_scale)
        cache[key] = PrototypeSet(
            protos, class_spec.names, class_spec.background, tau=1.0 / scale, kind="text",
            provenance={"templates": list(templates), "model": encoder.fingerprint(),
                        "checkpoint": encoder.checkpoint},
            logit_scale_override=scale,
        )
    cached = cache[key]
    return PrototypeSet(cached.prototypes.clone(), cached.class_names, cached.background_names,
                        cached.tau, cached.kind, dict(cached.provenance), cached.logit_scale_override)


@register_adapter("clip-es")
class CLIPESAdapter(CAMAdapter):
    """CLIP-ES CAMs from a :class:`~vpl_plugin.backbones.CLIPDense` encoder.

    Args:
        encoder: the CLIP encoder.
        class_spec: label space (VOC or COCO, or your own :class:`ClassSpec`).
        prototypes: a :class:`PrototypeSet` (vision prototypes from ``learn``); ``None`` = text.
        config: :class:`CLIPESConfig`; keyword arguments override its fields.

    Example:
        >>> adapter = CLIPESAdapter(load_clip("ViT-B-16.pt"))  # doctest: +SKIP
        >>> out = adapter(PIL.Image.open("2007_000032.jpg"), [0, 14])  # doctest: +SKIP
        >>> out.attn_highres.shape  # doctest: +SKIP
        (2, 281, 500)
    """

    #: the configuration dataclass (a subclass adapter may extend it)
    config_class = CLIPESConfig
    #: CLIP-ES needs more of the encoder than the contract's ``ImageEncoder`` (text encoder,
    #: trunk and last block, embedding size)
    encoder: CLIPDense

    #: :meth:`call_batch` runs a whole batch through one trunk forward. A subclass that overrides
    #: :meth:`gradcams` gets ``False`` (the batched forward would bypass its hook) unless it sets
    #: the attribute itself.
    supports_batch: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "gradcams" in vars(cls) and "supports_batch" not in vars(cls):
            cls.supports_batch = False

    def __init__(self, encoder: "CLIPDense", class_spec: ClassSpec = VOC, prototypes: Optional[PrototypeSet] = None,
                 config: Optional[CLIPESConfig] = None, **overrides: Any) -> None:
        self.encoder = encoder
        self.class_spec = class_spec
        cls = self.config_class
        self.config = cls(**{**asdict(config or cls()), **overrides})
        if self.config.map_mode not in ("gradcam", "dense", "fused"):
            raise ValueError(f"map_mode must be 'gradcam', 'dense' or 'fused'; got {self.config.map_mode!r}.")
        if self.config.dense_kind not in ("softmax", "cosine"):
            raise ValueError(f"dense_kind must be 'softmax' or 'cosine'; got {self.config.dense_kind!r}.")
        if not self.config.templates:
            raise ValueError("templates must hold at least one prompt template, e.g. 'a photo of a {}.'.")
        for template in self.config.templates:
            check_template(template)
        self.text_prototypes = text_prototype_set(encoder, class_spec, self.config.templates)
        self.prototypes = self.text_prototypes
        if prototypes is not None:
            self.set_prototypes(prototypes)

    # -- plug points ------------------------------------------------------------------------------
    def set_prototypes(self, prototypes: PrototypeSet) -> None:
        """Use ``prototypes`` (text or vision) in the GradCAM from now on."""
        spec = self.class_spec
        if tuple(prototypes.class_names) != tuple(spec.names) or \
                len(prototypes.background_names) != len(spec.background):
            raise ValueError(
                f"prototype set has classes {list(prototypes.class_names)[:5]}... and "
                f"{len(prototypes.background_names)} background concepts; the adapter's label space "
                f"{spec.name!r} has {list(spec.names)[:5]}... and {len(spec.background)}. Learn the "
                f"prototypes with the same --dataset."
            )
        if prototypes.prototypes.shape[1] != self.encoder.embed_dim:
            raise ValueError(
                f"prototypes have dimension {prototypes.prototypes.shape[1]} but the CLIP model's "
                f"embedding has {self.encoder.embed_dim}: they were learned with another model."
            )
        self.prototypes = prototypes

    @property
    def box_threshold(self) -> float:
        return self.config.box_threshold if self.config.box_threshold is not None else self.class_spec.box_threshold

    def logit_scale(self) -> torch.Tensor:
        """0-d fp32 scale: CLIP's ``exp(logit_scale)`` for text, ``1/tau_I`` for vision prototypes."""
        return torch.tensor(self.prototypes.logit_scale, dtype=torch.float32)

    def stacked_prototypes(self, labels: Sequence[int], prototypes: Optional[PrototypeSet] = None) -> torch.Tensor:
        """``[fg[labels]; bg]`` rows, the per-image softmax candidates
        (``docs/upstream_clip_es.md#per-image-softmax``)."""
        ps = prototypes or self.prototypes
        idx = torch.as_tensor(list(labels), dtype=torch.long)
        return torch.cat([ps.fg[idx], ps.bg], dim=0).float()

    def gradcams(self, image: torch.Tensor, labels: Sequence[int],
                 prototypes: Optional[PrototypeSet] = None) -> GradCAMResult:
        """GradCAMs of a preprocessed image for its labels with the current (or given) prototypes."""
        ps = prototypes or self.prototypes
        stacked = self.stacked_prototypes(labels, ps)
        scale = torch.tensor(ps.logit_scale, dtype=torch.float32)
        return image_gradcams(self.encoder, image, stacked, list(range(len(labels))), scale,
                              affinity_layers=self.config.affinity_layers)

    def dense_maps(self, features: torch.Tensor, labels: Sequence[int], grid: Tuple[int, int],
                   prototypes: Optional[PrototypeSet] = None) -> torch.Tensor:
        """Per-class dense maps ``(k, h, w)`` from the patch features and the (current) prototypes."""
        ps = prototypes or self.prototypes
        return dense_maps(features, self.stacked_prototypes(labels, ps), len(labels), grid,
                          float(ps.logit_scale), self.config.dense_kind)

    def fuse(self, result: GradCAMResult, labels: Sequence[int]) -> torch.Tensor:
        """Hook: the maps that enter refinement (``map_mode``; CLIP-ES: the GradCAMs unchanged)."""
        mode = self.config.map_mode
        if mode == "gradcam" or not len(labels):
            return result.cams
        dense = self.dense_maps(result.features, labels, result.grid)
        if mode == "dense":
            return dense
        return minmax_scale(result.cams * dense)

    def refine(self, result: GradCAMResult, maps: torch.Tensor) -> torch.Tensor:
        """CAA refinement at token resolution ``(k, h, w)``."""
        transition = affinity_transition(result.attention, self.config.affinity_layers,
                                         self.config.sinkhorn_rounds)
        masks = torch.stack([torch.from_numpy(box_mask(m, self.box_threshold, self.config.box_clip_fix))
                             for m in maps]) if len(maps) else torch.zeros_like(maps)
        return refine_cams(transition, maps, masks)

    # -- the whole stage --------------------------------------------------------------------------
    def analyse(self, image: "Image.Image", labels: Sequence[int]) -> Tuple[GradCAMResult, Tuple[int, int], List[int]]:
        """Validate ``labels``, preprocess ``image`` and run the GradCAM forward (with the text
        prototypes when ``map_mode="fused"``, else the current ones).

        Returns:
            the :class:`GradCAMResult`, the original size ``(H0, W0)`` and the labels as ints.
        """
        labels = self.check_labels(labels)
        x, size = self.encoder.preprocess(image)
        # "fused" explains the image with the text prototypes and localises with the current ones
        gradcam_set = self.text_prototypes if self.config.map_mode == "fused" else None
        return self.gradcams(x, labels, prototypes=gradcam_set), size, labels

    def call_batch(self, images: Sequence, labels: Sequence[Sequence[int]]) -> List[CAMOutput]:
        """CAMs of several images whose preprocessed sizes are equal, through one trunk forward and
        one last-block backward (:func:`~vpl_plugin.cam.batch_image_gradcams`): each output equals
        ``self(image, labels)`` up to float summation order (tested within 1e-5 on the GradCAMs).
        Worth it on a GPU; on a CPU thread per-image calls were faster (``benchmarks/NOTES.md``).
        An adapter whose :attr:`supports_batch` is false (CLIP-CPAL, which overrides
        :meth:`gradcams`) is served one image at a time.

        Raises:
            ValueError: lengths differ, a label is out of range, or the sizes differ (group images
                by ``encoder.padded_size`` first, as :func:`~vpl_plugin.pipeline.generate_cams` does).
        """
        if len(images) != len(labels) or not self.supports_batch or len(images) <= 1:
            return super().call_batch(images, labels)
        checked = [self.check_labels(lab) for lab in labels]
        prepared = [self.encoder.preprocess(im) for im in images]
        shapes = {tuple(x.shape) for x, _ in prepared}
        if len(shapes) > 1:
            raise ValueError(f"call_batch needs images of one preprocessed size; got {sorted(shapes)}. "
                             f"Group them by encoder.padded_size(height, width) first.")
        ps = self.text_prototypes if self.config.map_mode == "fused" else self.prototypes
        scale = torch.tensor(ps.logit_scale, dtype=torch.float32)
        results = batch_image_gradcams(
            self.encoder, torch.stack([x for x, _ in prepared]),
            [self.stacked_prototypes(lab, ps) for lab in checked],
            [list(range(len(lab))) for lab in checked], [scale] * len(checked),
            affinity_layers=self.config.affinity_layers)
        return [self.finish(r, size, lab) for r, (_, size), lab in zip(results, prepared, checked)]

    def finish(self, result: GradCAMResult, size: Tuple[int, int], labels: List[int]) -> CAMOutput:
        """Fuse, refine (when ``config.refine``) and resize one image's GradCAM result into its
        :class:`CAMOutput` (with the raw GradCAM under ``highres`` when ``config.save_gradcam``)."""
        maps = self.fuse(result, labels)
        final = self.refine(result, maps) if self.config.refine else maps
        extra = {}
        if self.config.save_gradcam:
            extra["highres"] = resize_maps(result.cams, size).astype(np.float16)
        return CAMOutput(
            keys=np.asarray(labels, dtype=np.int64),
            attn_highres=resize_maps(final, size).astype(np.float16),
            cams=maps, features=result.features, probabilities=result.probabilities,
            grid=result.grid, extra=extra,
        )

    def describe(self) -> dict:
        return {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "adapter": self.name,
            "dataset": self.class_spec.name,
            "prototypes": self.prototypes.kind,
            "logit_scale": float(self.prototypes.logit_scale),
            "tau": float(self.prototypes.tau),
            "box_threshold": self.box_threshold,
            "fp16_compat": bool(getattr(self.encoder, "fp16_compat", False)),
            "checkpoint": getattr(self.encoder, "checkpoint", None),
        }
