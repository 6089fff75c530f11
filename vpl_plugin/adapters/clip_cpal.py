"""CLIP-CPAL as an adapter: CLIP-ES with CPAL's context-prototype fusion before CAA refinement.

A reconstruction: CPAL's code is unreleased and its method section was not readable. This follows
the training-free default of ``docs/clip_cpal.md#what-the-adapter-does`` (every interpretation is a
config field):

* pass 1 (:func:`vpl_plugin.adapters.cpal_bank.build_context_bank`): per image and labelled class, an instance
  prototype from the dense features weighted by the CLIP-ES map ``G`` above ``delta_p``; per class,
  spherical k-means of the split's instance prototypes gives ``M`` context prototypes;
* pass 2 (this adapter's ``__call__``): per image and class, the instance prototype, its soft
  positive neighbours among the context prototypes, the aligned prototype ``q``, the prototype map
  ``S = maxnorm(ReLU(cos(F, q)))`` and the fused map ``P = maxnorm((G + S) / 2)``, which replaces
  ``G`` for the box mask and the CAA refinement (the :meth:`fuse` hook of CLIP-ES).

``head=True`` is the trained-head alternative (``docs/clip_cpal.md#the-trained-head-alternative``):
pass 1 also trains a CAM head on the
frozen dense features, pass 2 refines ``maxnorm((G + PACAM_head) / 2)``.

With vision prototypes (``prototypes=`` a VPL set), ``G`` is the VPL GradCAM (or the dense map with
``map_mode="dense"``), i.e. CLIP-CPAL + VPL (``docs/clip_cpal.md#clip-cpal--vpl``). The bank must
come from the same ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch

from vpl_plugin._checks import check_choice, check_range
from vpl_plugin._cli_common import cli_option, finite_float, nonnegative_int, positive_int
from vpl_plugin.adapters.base import register_adapter
from vpl_plugin.adapters.clip_es import CLIPESAdapter, CLIPESConfig
from vpl_plugin.cam import GradCAMResult
from vpl_plugin.cpal import (
    ContextBank,
    context_aware_maps,
    fuse_maps,
    head_cams,
    instance_prototypes,
    tensor_fingerprint,
)
from vpl_plugin.data.classes import ClassSpec, VOC
from vpl_plugin.prototypes import PrototypeSet

if TYPE_CHECKING:
    from PIL import Image

    from vpl_plugin.backbones.clip import CLIPDense

__all__ = ["CPAL_FIELDS", "CLIPCPALAdapter", "CLIPCPALConfig", "CPALResult"]


@dataclass
class CLIPCPALConfig(CLIPESConfig):
    """CLIP-ES settings plus CPAL's (all interpretations of ``docs/clip_cpal.md``, with its defaults).

    Attributes:
        features: dense features ``F``: ``"ln1"`` (the GradCAM activation, last block's ``ln_1``
            tokens, CLS dropped; default) or ``"proj"`` (projected patch tokens, VPL's features).
        candidates: neighbour candidates: ``"same"`` (the class's own context prototypes, default)
            or ``"all"`` (every class's; weights of other classes' prototypes zeroed).
        fusion: ``"mean"`` (``maxnorm((G + S) / 2)``, default) or ``"max"``.
        num_context: context prototypes per class ``M``; ``None`` = 8, or 4 for COCO.
        neighbours: ``k`` of the top-k neighbour set (3).
        tau_s: positive-score temperature (0.1).
        gamma: shift strength toward the soft positive context (0.5; 0 = no alignment).
        delta_p: instance-prototype map threshold (0.4).
        kmeans_iters, kmeans_seed: spherical k-means iterations (10) and initialisation seed (0).
        head: the trained-head alternative: pass 1 trains a 1x1-conv CAM head on the
            frozen dense features (``L_BCE + head_lambda * L_self``); pass 2 fuses CLIP-ES's map
            with the head's PA-CAM, ``maxnorm((G + PACAM_head) / 2)``. Default off (training-free).
        head_iters, head_lr: Adam steps (200) and learning rate (0.05) of the head.
        head_lambda: weight of ``L_self`` (default 1; 0 = BCE only).
    """

    # each field is a `vpl cams --cpal-*` flag (metadata: flag, help, argparse type)
    features: str = field(default="ln1", metadata=cli_option(
        "--cpal-features", "dense features: last block's ln_1 tokens (default) or projected patch tokens",
        choices=("ln1", "proj")))
    candidates: str = field(default="same", metadata=cli_option(
        "--cpal-candidates", "neighbour candidates: the class's own context prototypes (default) or all "
                             "classes' (other classes' weights zeroed)", choices=("same", "all")))
    fusion: str = field(default="mean", metadata=cli_option(
        "--cpal-fusion", "fused map: maxnorm((G + S) / 2) (default) or maxnorm(max(G, S))",
        choices=("mean", "max")))
    num_context: Optional[int] = field(default=None, metadata=cli_option(
        "--cpal-m", "context prototypes per class (8; COCO 4)", type=positive_int, metavar="M"))
    neighbours: int = field(default=3, metadata=cli_option(
        "--cpal-k", "soft positive neighbours kept (3)", type=positive_int, metavar="K"))
    tau_s: float = field(default=0.1, metadata=cli_option(
        "--cpal-tau-s", "positive-score temperature (0.1)", type=finite_float, metavar="T"))
    gamma: float = field(default=0.5, metadata=cli_option(
        "--cpal-gamma", "shift strength (0.5; 0 = no shift)", type=finite_float, metavar="G"))
    delta_p: float = field(default=0.4, metadata=cli_option(
        "--cpal-delta-p", "instance-prototype map threshold (0.4)", type=finite_float, metavar="D"))
    kmeans_iters: int = field(default=10, metadata=cli_option(
        "--cpal-kmeans-iters", "spherical k-means iterations (10)", type=nonnegative_int, metavar="N"))
    kmeans_seed: int = field(default=0, metadata=cli_option(
        "--cpal-kmeans-seed", "k-means++ seed (0)", type=int, metavar="S"))
    head: bool = field(default=False, metadata=cli_option(
        "--cpal-head", "the trained-head alternative (docs/clip_cpal.md): pass 1 trains a CAM head on the "
                       "frozen dense features (keeps them all in memory) and pass 2 fuses CLIP-ES's map with "
                       "the head's PA-CAM"))
    head_iters: int = field(default=200, metadata=cli_option(
        "--cpal-head-iters", "head training steps (200)", type=nonnegative_int, metavar="N"))
    head_lr: float = field(default=0.05, metadata=cli_option(
        "--cpal-head-lr", "head learning rate, Adam (0.05)", type=finite_float, metavar="LR"))
    head_lambda: float = field(default=1.0, metadata=cli_option(
        "--cpal-head-lambda", "weight of the self-supervised L_self term (0 = BCE only)",
        type=finite_float, metavar="L"))


#: CPAL fields of :class:`CLIPCPALConfig` (the CLI exposes each as ``--cpal-<name>``)
CPAL_FIELDS = tuple(f.name for f in fields(CLIPCPALConfig) if f.name not in {g.name for g in fields(CLIPESConfig)})


@dataclass
class CPALResult(GradCAMResult):
    """A :class:`GradCAMResult` with CPAL's dense features.

    Attributes:
        tokens: ``(n, D')`` unit dense features (``ln_1`` tokens or projected patch tokens).
    """

    tokens: Optional[torch.Tensor] = None


@register_adapter("clip-cpal")
class CLIPCPALAdapter(CLIPESAdapter):
    """CLIP-CPAL CAMs (training-free reconstruction, ``docs/clip_cpal.md``; with VPL:
    ``docs/clip_cpal.md#clip-cpal--vpl``).

    Args:
        encoder: the CLIP encoder.
        class_spec: label space.
        prototypes: GradCAM prototypes: ``None`` = CLIP-ES text prototypes (CLIP-CPAL), a VPL
            :class:`PrototypeSet` = CLIP-CPAL + VPL.
        config: :class:`CLIPCPALConfig`; keyword arguments override its fields.
        bank: the :class:`~vpl_plugin.cpal.ContextBank` of pass 1 (or :meth:`set_bank` later).

    Example:
        >>> adapter = CLIPCPALAdapter(load_clip("ViT-B-16.pt"))  # doctest: +SKIP
        >>> adapter.set_bank(build_context_bank(adapter, VOCDataset("VOC2012", "train.txt")))  # doctest: +SKIP
        >>> out = adapter(PIL.Image.open("2007_000032.jpg"), [0, 14])  # doctest: +SKIP
    """

    config: CLIPCPALConfig

    config_class = CLIPCPALConfig
    #: one image at a time: the ``ln_1`` tokens are captured inside :meth:`gradcams`
    supports_batch: ClassVar[bool] = False

    def __init__(self, encoder: "CLIPDense", class_spec: ClassSpec = VOC, prototypes: Optional[PrototypeSet] = None,
                 config: Optional[CLIPCPALConfig] = None, bank: Optional[ContextBank] = None,
                 **overrides: Any) -> None:
        super().__init__(encoder, class_spec, prototypes, config, **overrides)
        cfg = self.config
        check_choice("features", cfg.features, ("ln1", "proj"))
        check_choice("candidates", cfg.candidates, ("same", "all"))
        check_choice("fusion", cfg.fusion, ("mean", "max"))
        if cfg.num_context is not None and int(cfg.num_context) < 1:
            raise ValueError(f"num_context (M) must be >= 1 or None (8 VOC / 4 COCO); got {cfg.num_context}.")
        if int(cfg.neighbours) < 1:
            raise ValueError(f"neighbours (k) must be >= 1; got {cfg.neighbours}.")
        check_range("tau_s", float(cfg.tau_s), 0.0, low_open=True)
        check_range("gamma", float(cfg.gamma), 0.0)
        check_range("delta_p", float(cfg.delta_p), 0.0, 1.0)
        if int(cfg.kmeans_iters) < 0:
            raise ValueError(f"kmeans_iters must be >= 0; got {cfg.kmeans_iters}.")
        if int(cfg.head_iters) < 1:
            raise ValueError(f"head_iters must be >= 1; got {cfg.head_iters}.")
        check_range("head_lr", float(cfg.head_lr), 0.0, low_open=True)
        check_range("head_lambda", float(cfg.head_lambda), 0.0)
        self.bank: Optional[ContextBank] = None
        if bank is not None:
            self.set_bank(bank)

    # -- settings -----------------------------------------------------------------------------------
    @property
    def num_context(self) -> int:
        """``M``: the configured value, else 4 for COCO and 8 otherwise."""
        if self.config.num_context is not None:
            return int(self.config.num_context)
        return 4 if self.class_spec.name.lower().startswith("coco") else 8

    @property
    def dense_dim(self) -> int:
        """Dimension of the dense features (``ln_1`` width or the embedding)."""
        return int(self.encoder.width if self.config.features == "ln1" else self.encoder.embed_dim)

    def bank_settings(self) -> Dict[str, Any]:
        """What pass 1 depends on: a bank made under other values cannot serve this adapter."""
        cfg = self.config
        head: Dict[str, Any] = {"head": True, "head_iters": int(cfg.head_iters), "head_lr": float(cfg.head_lr),
                "head_lambda": float(cfg.head_lambda)} if cfg.head else {"head": False}
        if cfg.head:  # the head's training targets depend on the PA-CAM settings too
            head.update({"candidates": cfg.candidates, "neighbours": int(cfg.neighbours),
                         "tau_s": float(cfg.tau_s), "gamma": float(cfg.gamma), "fusion": cfg.fusion,
                         "head_num_context": self.num_context})
        return {
            **head,
            "features": cfg.features, "delta_p": float(cfg.delta_p), "map_mode": cfg.map_mode,
            "dense_kind": cfg.dense_kind, "dataset": self.class_spec.name,
            "model": self.encoder.fingerprint(), "gradcam_prototypes": self.prototypes.kind,
            "prototypes_fingerprint": tensor_fingerprint(self.prototypes.prototypes),
            "logit_scale": float(self.prototypes.logit_scale),
            "templates": list(cfg.templates),
        }

    def set_prototypes(self, prototypes: PrototypeSet) -> None:
        old = getattr(self, "prototypes", None)
        super().set_prototypes(prototypes)
        if getattr(self, "bank", None) is not None:  # the bank was built from the old maps
            try:
                self.set_bank(self.bank)
            except ValueError:
                if old is not None:  # refused: keep the prototypes the bank belongs to
                    super().set_prototypes(old)
                raise

    def set_bank(self, bank: ContextBank) -> None:
        """Use ``bank`` in pass 2. It must match the class count, the dense-feature dimension and
        :meth:`bank_settings`; other clustering settings (``num_context``, k-means) re-cluster its
        instance prototypes."""
        bank.check(num_classes=len(self.class_spec.names), dim=self.dense_dim, settings=self.bank_settings())
        cfg = self.config
        want = {"num_context": self.num_context, "kmeans_iters": int(cfg.kmeans_iters),
                "kmeans_seed": int(cfg.kmeans_seed)}
        if any(bank.settings.get(k) != v for k, v in want.items()):
            bank = bank.recluster(**want)
        self.bank = bank

    # -- plug points --------------------------------------------------------------------------------
    def gradcams(self, image: torch.Tensor, labels: Sequence[int],
                 prototypes: Optional[PrototypeSet] = None) -> CPALResult:
        """CLIP-ES GradCAMs plus the dense features CPAL pools (``ln_1`` tokens are read with a
        forward hook on the last block's ``ln_1``, removed before returning)."""
        captured = []
        handle = None
        if self.config.features == "ln1":
            ln_1 = self.encoder.visual.transformer.resblocks[-1].ln_1
            handle = ln_1.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            res = super().gradcams(image, labels, prototypes)
        finally:
            if handle is not None:
                handle.remove()
        if self.config.features == "ln1":
            if not captured:
                raise RuntimeError("the last block's ln_1 did not run during the GradCAM forward; "
                                   "use features='proj' with this encoder.")
            tokens = captured[-1][1:, 0].float().cpu()  # (n, width), CLS dropped, first copy
            tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        else:
            tokens = res.features
        return CPALResult(res.cams, res.probabilities, res.features, res.attention, res.grid, tokens)

    def base_maps(self, result: GradCAMResult, labels: Sequence[int]) -> torch.Tensor:
        """``G``: the map CLIP-ES would refine (GradCAM, or the ``map_mode`` map)."""
        return super().fuse(result, labels)

    def image_instance_prototypes(self, image: "Image.Image",
                                  labels: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 for one image: ``(protos (k', D'), classes (k',))`` of the labelled classes whose
        map reaches ``delta_p`` (classes without such a token are left out)."""
        result, _, labels = self.analyse(image, labels)
        protos = instance_prototypes(result.tokens, self.base_maps(result, labels), self.config.delta_p)
        keep = protos.norm(dim=1) > 0
        return protos[keep], torch.as_tensor(labels, dtype=torch.long)[keep]

    def pass_one(self, image: "Image.Image", labels: Sequence[int]) -> Dict[str, torch.Tensor]:
        """What pass 1 keeps of one image: its instance prototypes (training-free) or, with the
        trained head, its dense features, token grid and labels."""
        if not self.config.head:
            protos, classes = self.image_instance_prototypes(image, labels)
            return {"protos": protos.float().cpu(), "classes": classes}
        result, _, labels = self.analyse(image, labels)
        return {"tokens": result.tokens.float().cpu(), "grid": torch.tensor(result.grid),
                "labels": torch.as_tensor(labels, dtype=torch.long)}

    def cpal_maps(self, result: CPALResult, labels: Sequence[int], base: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Pass 2 intermediates: instance prototypes ``p``, neighbour weights, aligned ``q``,
        prototype maps ``S`` and fused maps ``P`` (a class with no token at ``delta_p`` keeps
        ``G``; a class without context prototypes is not shifted). With the trained head, ``base``
        is the head's CAM and ``fused`` its PA-CAM."""
        if self.bank is None:
            raise ValueError("CLIP-CPAL needs its context bank (pass 1) before computing CAMs: "
                             "adapter.set_bank(build_context_bank(adapter, dataset)) or "
                             "adapter.set_bank(ContextBank.load(path)); on the command line "
                             "`vpl cams --adapter clip-cpal` builds it (or loads --cpal-bank FILE).")
        cfg = self.config
        return context_aware_maps(result.tokens, base, labels, self.bank, candidates=cfg.candidates,
                                  k=cfg.neighbours, tau=cfg.tau_s, gamma=cfg.gamma, delta_p=cfg.delta_p,
                                  fusion=cfg.fusion)

    def fuse(self, result: GradCAMResult, labels: Sequence[int]) -> torch.Tensor:
        """Hook: ``P = maxnorm((G + S) / 2)`` replaces ``G`` before the box mask and CAA."""
        base = self.base_maps(result, labels)
        if not len(labels):
            return base
        if not self.config.head:
            return self.cpal_maps(result, labels, base)["fused"]
        if self.bank is None or self.bank.head is None:
            raise ValueError("head=True needs a context bank with a trained head: build it with "
                             "build_context_bank(adapter, dataset) from this adapter (or `vpl cams "
                             "--adapter clip-cpal --cpal-head`).")
        cam = head_cams(result.tokens, self.bank.head)[list(labels)].reshape(len(labels), *result.grid)
        return fuse_maps(base, self.cpal_maps(result, labels, cam)["fused"], "mean")

    def describe(self) -> dict:
        out = super().describe()
        out["num_context"] = self.num_context
        if self.bank is not None:
            out["bank"] = {"images": len(self.bank.ids), "instances_per_class": self.bank.counts(),
                           "context_prototypes": int(self.bank.centres.shape[0]),
                           "settings": dict(self.bank.settings)}
        return out
