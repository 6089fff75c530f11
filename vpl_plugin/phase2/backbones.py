"""Frozen CLIP image encoders for the phase-2 decoder: per-block patch-token maps.

The protocol (what :class:`~vpl_plugin.phase2.PrototypeSegmenter` needs) is small: calling a
backbone on CLIP-normalised images ``(B, 3, H, W)`` (``H``, ``W`` multiples of ``patch_size``)
returns the patch tokens output by every transformer block as maps ``[(B, width, H/p, W/p), ...]``
(``num_layers`` of them, CLS dropped, no final norm), and it has the attributes ``width``,
``num_layers`` and ``patch_size`` and a ``describe()`` dict from which :func:`create_backbone`
rebuilds it.

Two families:

* :class:`OpenAICLIPBackbone` over the project's :class:`~vpl_plugin.backbones.CLIPDense`
  (OpenAI checkpoints by name or path; positional table bilinearly interpolated to any grid, as
  CLIP-ES).
* :class:`TimmCLIPBackbone` over a timm ``VisionTransformer`` (e.g.
  ``vit_base_patch16_clip_224.openai``) built with ``dynamic_img_size=True``; intermediate blocks
  come from timm's ``forward_intermediates``.

Example:
    >>> bb = create_backbone("timm:vit_base_patch16_clip_224.openai", pretrained=False,
    ...                      embed_dim=64, depth=2, num_heads=2)  # doctest: +SKIP
    >>> [t.shape for t in bb(torch.zeros(1, 3, 32, 48))]  # doctest: +SKIP
    [torch.Size([1, 64, 2, 3]), torch.Size([1, 64, 2, 3])]
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from vpl_plugin._imports import require
from vpl_plugin.backbones.clip import CLIP_MEAN, CLIP_STD, CLIPDense, load_clip

__all__ = [
    "BACKBONE_FAMILIES",
    "OpenAICLIPBackbone",
    "TimmCLIPBackbone",
    "backbone_from_description",
    "create_backbone",
]

BACKBONE_FAMILIES = ("clip", "timm")


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _fingerprint(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:65536])
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


class _FrozenBackbone(nn.Module):
    """Common behaviour: frozen weights, eval mode kept under ``.train()``, no-grad forward."""

    mean = CLIP_MEAN
    std = CLIP_STD

    def train(self, mode: bool = True) -> "_FrozenBackbone":
        return super().train(False)  # frozen: dropout / norm statistics never switch to training

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}.")
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch "
                             f"size {p}; resize or pad the images to multiples of {p}.")

    def extra_repr(self) -> str:
        return f"width={self.width}, num_layers={self.num_layers}, patch_size={self.patch_size}"


class OpenAICLIPBackbone(_FrozenBackbone):
    """OpenAI CLIP ViT image encoder (via :class:`~vpl_plugin.backbones.CLIPDense`), frozen.

    Args:
        encoder: a ``CLIPDense``, or an OpenAI ``clip.model.CLIP`` (wrapped on the CPU).

    Calling it returns ``num_layers`` maps ``(B, width, H/p, W/p)`` in float32: the residual
    stream after each block (CLS dropped), with the positional table interpolated to the grid.
    """

    family = "clip"

    def __init__(self, encoder: Union[CLIPDense, nn.Module]) -> None:
        super().__init__()
        if not isinstance(encoder, CLIPDense):
            encoder = CLIPDense(encoder)
        self.encoder = encoder
        _freeze(self.encoder)

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def fingerprint(self) -> str:
        return self.encoder.fingerprint()

    def describe(self) -> Dict[str, Any]:
        return {"family": self.family, "checkpoint": self.encoder.checkpoint,
                "fp16_compat": self.encoder.fp16_compat, "fingerprint": self.fingerprint(),
                "width": self.width, "num_layers": self.num_layers, "patch_size": self.patch_size}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        self._check(images)
        # CLIPDense moves inputs to its recorded device; follow the weights if .to() moved them.
        self.encoder.device = self.encoder.visual.conv1.weight.device  # type: ignore[assignment]  # nn.Module attr
        b = images.shape[0]
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.encoder.embed(images)  # (L, B, width)
        maps = []
        for block in self.encoder.visual.transformer.resblocks:
            x = block(x)
            maps.append(x[1:].permute(1, 2, 0).reshape(b, -1, h, w).float())
        return maps


class TimmCLIPBackbone(_FrozenBackbone):
    """A timm ViT (CLIP architecture by default) as a frozen per-block token-map encoder.

    Args:
        name: timm model name (default ``vit_base_patch16_clip_224.openai``).
        pretrained: load timm's weights (downloads on first use; tests pass False).
        model: an already built timm ``VisionTransformer`` to wrap instead (``name`` is then only
            recorded).
        checkpoint_path: a local weights file for timm's ``create_model`` (no download).
        **model_kwargs: forwarded to ``timm.create_model`` (e.g. ``embed_dim``, ``depth``,
            ``num_heads`` for a tiny random model). ``dynamic_img_size=True`` is always set so any
            size that is a multiple of the patch works.

    Deviation: timm resamples the positional table with its own defaults (bicubic, antialiased),
    while the OpenAI path (:class:`OpenAICLIPBackbone`,
    ``docs/upstream_clip_es.md#positional-table``)
    interpolate bilinearly; the same weights therefore give slightly different tokens under
    ``timm:`` and ``clip:`` at sizes other than the pretraining grid.
    """

    family = "timm"

    def __init__(self, name: str = "vit_base_patch16_clip_224.openai", pretrained: bool = False,
                 *, model: Optional[nn.Module] = None, checkpoint_path: Optional[str] = None,
                 **model_kwargs: Any) -> None:
        super().__init__()
        self.name = str(name)
        self.pretrained = bool(pretrained)
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.model_kwargs = dict(model_kwargs)
        if model is None:
            timm = require("timm")
            kwargs = dict(model_kwargs, dynamic_img_size=True, num_classes=0)
            if self.checkpoint_path:
                kwargs["checkpoint_path"] = self.checkpoint_path
            try:
                model = timm.create_model(self.name, pretrained=self.pretrained, **kwargs)
            except RuntimeError as err:
                if "Unknown model" in str(err):
                    raise ValueError(f"timm has no model {self.name!r}; CLIP ViTs are listed by "
                                     f"timm.list_models('*clip*').") from err
                raise
        elif not getattr(model, "dynamic_img_size", False):
            raise ValueError("the timm model must be built with dynamic_img_size=True (any image "
                             "size that is a multiple of the patch); e.g. timm.create_model(name, "
                             "dynamic_img_size=True), or pass the name instead of the model.")
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise TypeError(f"TimmCLIPBackbone needs a timm VisionTransformer (with "
                            f"forward_intermediates and blocks); got {type(model).__name__}.")
        if getattr(model, "num_prefix_tokens", 1) < 0:
            raise TypeError("unexpected timm model without a token sequence.")
        self.model = model
        _freeze(self.model)

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def patch_size(self) -> int:
        ps = self.model.patch_embed.patch_size
        if isinstance(ps, (tuple, list)):
            if ps[0] != ps[1]:
                raise ValueError(f"non-square patches {tuple(ps)} are not supported.")
            ps = ps[0]
        return int(ps)

    def fingerprint(self) -> str:
        pe = self.model.patch_embed.proj.weight
        return _fingerprint([pe, self.model.blocks[-1].attn.qkv.weight])

    def describe(self) -> Dict[str, Any]:
        return {"family": self.family, "name": self.name, "pretrained": self.pretrained,
                "checkpoint_path": self.checkpoint_path, "model_kwargs": dict(self.model_kwargs),
                "fingerprint": self.fingerprint(), "width": self.width,
                "num_layers": self.num_layers, "patch_size": self.patch_size}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        self._check(images)
        device = self.model.patch_embed.proj.weight.device
        dtype = self.model.patch_embed.proj.weight.dtype
        maps = self.model.forward_intermediates(images.to(device, dtype),
                                                indices=self.num_layers, norm=False,
                                                output_fmt="NCHW", intermediates_only=True)
        return [m.float() for m in maps]


def _split_spec(spec: str):
    if ":" in spec:
        family, _, rest = spec.partition(":")
        if family in BACKBONE_FAMILIES:
            return family, rest
        # a Windows drive letter or an unknown prefix: a path / name for OpenAI CLIP if it exists
        if not os.path.exists(spec):
            raise ValueError(f"unknown backbone family {family!r} in {spec!r}; use one of "
                             f"{[f + ':...' for f in BACKBONE_FAMILIES]} ('clip:ViT-B/16', "
                             f"'clip:/path/ViT-B-16.pt', 'timm:vit_base_patch16_clip_224.openai') "
                             f"or a bare OpenAI CLIP name or checkpoint path.")
    return "clip", spec


def create_backbone(spec: str, device: Union[str, torch.device] = "cpu", *,
                    trust_torchscript: bool = False, **kwargs: Any) -> nn.Module:
    """Build a frozen backbone from a spec string.

    Args:
        spec: ``"clip:NAME_OR_PATH"`` (OpenAI CLIP: ``clip:ViT-B/16`` downloads, a path loads),
            ``"timm:MODEL_NAME"`` (timm ViT, ``pretrained=True`` unless passed), or a bare OpenAI
            CLIP name / checkpoint path.
        device: where the backbone runs.
        trust_torchscript: OpenAI CLIP only: read a TorchScript checkpoint with
            ``torch.jit.load``, which runs the code stored in it; by default it is read as data
            (:func:`~vpl_plugin.backbones.load_state_dict_file`).
        **kwargs: ``exact_fp32`` (default: upstream CLIP-ES's numerics, see
            :func:`~vpl_plugin.backbones.load_clip`), its former opposite ``fp16_compat`` and
            ``download_root`` for OpenAI CLIP; ``pretrained``, ``checkpoint_path`` and timm model
            kwargs for timm.

    Raises:
        ValueError: an unknown family (the message lists the choices) or empty name.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"backbone spec must be a non-empty string such as 'clip:ViT-B/16' or "
                         f"'timm:vit_base_patch16_clip_224.openai'; got {spec!r}.")
    family, name = _split_spec(spec)
    if not name:
        raise ValueError(f"backbone spec {spec!r} names no model after '{family}:'.")
    if family == "clip":
        unknown = set(kwargs) - {"exact_fp32", "fp16_compat", "download_root"}
        if unknown:
            raise ValueError(f"OpenAI CLIP backbones take exact_fp32 / fp16_compat / download_root only; "
                             f"got {sorted(unknown)}.")
        return OpenAICLIPBackbone(load_clip(name, device, trust_torchscript=trust_torchscript,
                                            **kwargs))
    if kwargs.pop("exact_fp32", False):
        raise ValueError(f"exact_fp32 (--exact-fp32) applies to OpenAI CLIP backbones; {spec!r} is a "
                         f"timm model, which always computes in fp32.")
    kwargs.setdefault("pretrained", True)
    return TimmCLIPBackbone(name, **kwargs).to(device)


def backbone_from_description(desc: Dict[str, Any], device: Union[str, torch.device] = "cpu", *,
                              trust_torchscript: bool = False) -> nn.Module:
    """Rebuild a backbone from its ``describe()`` record (what :func:`save_segmenter` stores).

    An OpenAI CLIP backbone needs its checkpoint file at the recorded path (or an OpenAI model
    name); a timm backbone is rebuilt by name with the recorded kwargs. Random-weight backbones
    cannot be rebuilt: pass the backbone to ``load_segmenter`` instead. ``trust_torchscript``
    is passed to :func:`create_backbone` (OpenAI CLIP checkpoints only).
    """
    family = desc.get("family")
    if family == "clip":
        ckpt = desc.get("checkpoint")
        if not ckpt:
            raise ValueError("the segmenter's OpenAI CLIP backbone was not loaded from a checkpoint "
                             "(random weights?), so it cannot be rebuilt; pass backbone=... (or "
                             "--clip on the command line).")
        # "fp16_compat" records upstream's numerics; False (or absent: older records) is exact fp32
        return create_backbone(f"clip:{ckpt}", device, exact_fp32=not desc.get("fp16_compat"),
                               trust_torchscript=trust_torchscript)
    if family == "timm":
        return create_backbone(f"timm:{desc['name']}", device, pretrained=bool(desc.get("pretrained")),
                               checkpoint_path=desc.get("checkpoint_path"),
                               **dict(desc.get("model_kwargs") or {}))
    raise ValueError(f"unknown backbone family {family!r} in the description; known: "
                     f"{list(BACKBONE_FAMILIES)}.")
