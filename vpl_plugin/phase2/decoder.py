"""VPL phase-2 segmentation network: frozen CLIP encoder, trainable decoder, frozen prototypes.

``docs/vpl.md#network`` (decoder architecture: the project's interpretation, WeCLIP-like)::

    per-block patch tokens (B, C, h, w) x L      frozen backbone, no gradient
      -> per-layer Linear(C -> 256), concat      (B, 256 L, h, w)
      -> 1x1 conv(256 L -> 256) + BN + ReLU
      -> 3 pre-norm transformer layers (d 256, 8 heads, FFN 1024, no dropout) + final LayerNorm
      -> Linear(256 -> D) -> V, V-hat = normalize(V)
    A = W^T V-hat / tau_seg                      (B, N, h, w) prototype logits
    A' = [logsumexp_bg A, A_fg]                  (B, 1 + N_fg, h, w) segmentation logits

The transformer layers are timm's ``vision_transformer.Block`` (pre-norm ``Attention`` + ``Mlp``
with GELU, qkv bias on), the final norm timm's ``LayerNorm``; no positional embedding is added in
the decoder (the CLIP tokens carry their positions).

Example:
    >>> from vpl_plugin.phase2 import build_segmenter, TimmCLIPBackbone  # doctest: +SKIP
    >>> model = build_segmenter(TimmCLIPBackbone(embed_dim=64, depth=2, num_heads=2), prototypes)  # doctest: +SKIP
    >>> out = model(images)  # {"logits", "prototype_logits", "features", "prototypes"}  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vpl_plugin._checks import check_range
from vpl_plugin._imports import require
from vpl_plugin._io import atomic_path
from vpl_plugin._unpickle import check_tensor_sizes
from vpl_plugin.phase2.backbones import backbone_from_description
from vpl_plugin.phase2.losses import segmentation_logits
from vpl_plugin.prototypes import PrototypeSet

__all__ = [
    "DecoderConfig",
    "PrototypeSegmenter",
    "SegmentationDecoder",
    "build_segmenter",
    "load_segmenter",
    "read_segmenter_checkpoint",
    "save_segmenter",
]

_FORMAT = "vpl-plugin/segmenter"
_FORMAT_VERSION = 1


@dataclass
class DecoderConfig:
    """Phase-2 decoder configuration (defaults: ``docs/vpl.md#network``).

    Attributes:
        layers: backbone blocks whose patch tokens feed the decoder (0-based, negative counts from
            the end); None = all blocks.
        proj_dim: width of the per-layer projections (256).
        dim: transformer width (256).
        depth: transformer layers (3).
        heads: attention heads (8).
        ffn_dim: feed-forward hidden width (1024).
        dropout: dropout in attention and FFN (0: none).
        final_norm: LayerNorm after the pre-norm transformer layers (default on; not in the literal
            design, which goes from the layers straight to the projection: a pre-norm stack leaves
                its
            residual stream unnormalised, and ViTs normalise it before their head as timm's
            ``VisionTransformer.norm`` does. ``final_norm=False`` is the literal design).
        input_norm: LayerNorm on each backbone layer's tokens before its projection (off in the
            literal design; the raw residual stream of late CLIP blocks has large-magnitude
            channels).
        tau_seg: temperature of the prototype logits; None = the prototype set's (``1/logit_scale``
            of the set, i.e. ``tau_I`` for vision prototypes).
    """

    layers: Optional[Tuple[int, ...]] = None
    proj_dim: int = 256
    dim: int = 256
    depth: int = 3
    heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.0
    final_norm: bool = True
    input_norm: bool = False
    tau_seg: Optional[float] = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise ValueError("layers must name at least one backbone block (or be None for all).")
        for name in ("proj_dim", "dim", "heads", "ffn_dim"):
            check_range(name, getattr(self, name), 1)
        check_range("depth", self.depth, 0)
        check_range("dropout", float(self.dropout), 0.0, 1.0)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}).")
        if self.tau_seg is not None:
            self.tau_seg = float(self.tau_seg)
            check_range("tau_seg", self.tau_seg, 0.0, low_open=True)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DecoderConfig keys {unknown}; known: {sorted(known)}.")
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    def resolve_layers(self, num_layers: int) -> Tuple[int, ...]:
        """The 0-based block indices for a backbone with ``num_layers`` blocks."""
        if self.layers is None:
            return tuple(range(num_layers))
        out = []
        for i in self.layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"DecoderConfig.layers has {i}, outside the backbone's "
                                 f"{num_layers} blocks.")
            out.append(j)
        return tuple(out)


class SegmentationDecoder(nn.Module):
    """The trainable part: multi-layer token maps ``[(B, C, h, w)] * L`` -> ``(B, D, h, w)``.

    Args:
        in_channels: backbone width ``C``.
        num_inputs: number of input maps ``L``.
        out_dim: output dimension ``D`` (the prototypes' dimension).
        config: the decoder configuration.
    """

    def __init__(self, in_channels: int, num_inputs: int, out_dim: int,
                 config: Optional[DecoderConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else DecoderConfig()
        vit = require("timm.models.vision_transformer")
        layers = require("timm.layers")
        self.input_norms = nn.ModuleList(
            [nn.LayerNorm(in_channels) if config.input_norm else nn.Identity()
             for _ in range(num_inputs)])
        self.projs = nn.ModuleList([nn.Linear(in_channels, config.proj_dim) for _ in range(num_inputs)])
        self.fuse = nn.Sequential(
            nn.Conv2d(config.proj_dim * num_inputs, config.dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.dim),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[
            vit.Block(config.dim, config.heads, mlp_ratio=config.ffn_dim / config.dim, qkv_bias=True,
                      proj_drop=config.dropout, attn_drop=config.dropout)
            for _ in range(config.depth)])
        self.norm = layers.LayerNorm(config.dim) if config.final_norm else nn.Identity()
        self.head = nn.Linear(config.dim, out_dim)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.projs):
            raise ValueError(f"the decoder was built for {len(self.projs)} input maps; got {len(maps)}.")
        b, _, h, w = maps[0].shape
        projected = []
        for x, norm, proj in zip(maps, self.input_norms, self.projs):
            t = x.flatten(2).transpose(1, 2)  # (B, hw, C)
            projected.append(proj(norm(t)))
        x = torch.cat(projected, dim=-1).transpose(1, 2).reshape(b, -1, h, w)
        x = self.fuse(x).flatten(2).transpose(1, 2)  # (B, hw, dim)
        x = self.norm(self.blocks(x))
        return self.head(x).transpose(1, 2).reshape(b, -1, h, w)


class PrototypeSegmenter(nn.Module):
    """Frozen backbone + trainable :class:`SegmentationDecoder` + frozen prototypes (docs/vpl.md).

    Args:
        backbone: a frozen backbone (see :mod:`vpl_plugin.phase2.backbones`).
        prototypes: the phase-1 prototype set (fg first, then bg concepts; ``D`` = its width).
        config: decoder configuration.

    ``forward(images)`` with CLIP-normalised ``(B, 3, H, W)`` images (multiples of the patch size)
    returns a dict:

    * ``"logits"``: ``(B, 1 + N_fg, h, w)`` segmentation logits (channel 0 background),
    * ``"prototype_logits"``: ``(B, N, h, w)`` = ``w_n . V-hat / tau_seg``,
    * ``"features"``: ``(B, D, h, w)`` unit-norm ``V-hat``,
    * ``"prototypes"``: the ``(N, D)`` prototype buffer (for the RSC loss).

    The backbone gets no gradient and stays in eval mode under ``.train()``; only
    :meth:`trainable_parameters` (the decoder's) are optimised.
    """

    def __init__(self, backbone: nn.Module, prototypes: PrototypeSet,
                 config: Optional[DecoderConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else DecoderConfig()
        if not isinstance(prototypes, PrototypeSet):
            raise TypeError(f"prototypes must be a PrototypeSet (vpl_plugin.prototypes); got "
                            f"{type(prototypes).__name__}. Load one with PrototypeSet.load(path).")
        if prototypes.num_fg < 1 or len(prototypes.background_names) < 1:
            raise ValueError(f"the prototype set needs at least one foreground and one background "
                             f"prototype; got {prototypes.num_fg} and {len(prototypes.background_names)}.")
        for attr in ("width", "num_layers", "patch_size"):
            if not hasattr(backbone, attr):
                raise TypeError(f"backbone must have .{attr} (see vpl_plugin.phase2.backbones); got "
                                f"{type(backbone).__name__}.")
        self.config = config
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.layers = config.resolve_layers(int(backbone.num_layers))
        self.prototype_set = PrototypeSet(
            prototypes.prototypes.detach().cpu().float().clone(), prototypes.class_names,
            prototypes.background_names, prototypes.tau, kind=prototypes.kind,
            provenance=dict(prototypes.provenance),
            logit_scale_override=prototypes.logit_scale_override)
        self.register_buffer("prototypes", self.prototype_set.prototypes.clone())
        self.num_fg = prototypes.num_fg
        self.logit_scale = (1.0 / config.tau_seg if config.tau_seg is not None
                            else float(prototypes.logit_scale))
        self.decoder = SegmentationDecoder(int(backbone.width), len(self.layers),
                                           int(prototypes.prototypes.shape[1]), config)

    # -- properties ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """``1 + N_fg`` segmentation classes (0 = background)."""
        return 1 + self.num_fg

    @property
    def class_names(self) -> Tuple[str, ...]:
        return tuple(self.prototype_set.class_names)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    @property
    def tau_seg(self) -> float:
        return 1.0 / self.logit_scale

    # -- modes and parameters --------------------------------------------------------------------
    def train(self, mode: bool = True) -> "PrototypeSegmenter":
        super().train(mode)
        self.backbone.eval()  # frozen encoder: always eval
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The decoder's parameters (everything that is trained)."""
        return self.decoder.parameters()

    def decoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The decoder's weights and BN statistics (CPU copies; neither backbone nor prototypes)."""
        return {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}

    def load_decoder_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load weights written by :meth:`decoder_state_dict` (a ``decoder.`` / ``module.`` prefix
        is stripped)."""
        return self.decoder.load_state_dict(_strip_prefixes(state), strict=strict)

    # -- forward -----------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` unit-norm decoder features ``V-hat``."""
        with torch.no_grad():
            maps = self.backbone(images)
        maps = [maps[i].detach() for i in self.layers]
        v = self.decoder(maps)
        return F.normalize(v.float(), dim=1)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        v_hat = self.features(images)
        w = self.prototypes.to(v_hat)
        # float32 even under autocast: at 1/tau_seg ~ 33 a bf16 logit would be off by ~0.1
        with torch.autocast(device_type=v_hat.device.type, enabled=False):
            proto_logits = torch.einsum("nd,bdhw->bnhw", w, v_hat) * self.logit_scale
        return {"logits": segmentation_logits(proto_logits, self.num_fg),
                "prototype_logits": proto_logits, "features": v_hat, "prototypes": w}

    def extra_repr(self) -> str:
        return (f"num_fg={self.num_fg}, num_prototypes={self.prototypes.shape[0]}, "
                f"layers={list(self.layers)}, tau_seg={self.tau_seg:.4g}")


def _strip_prefixes(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with a leading ``module.`` / ``decoder.`` dropped from each key."""
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "decoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    return clean


def build_segmenter(backbone: nn.Module, prototypes: PrototypeSet,
                    config: Optional[DecoderConfig] = None, **overrides: Any) -> PrototypeSegmenter:
    """Build a :class:`PrototypeSegmenter`; keyword arguments override ``config`` fields.

    Example:
        >>> model = build_segmenter(backbone, ps, depth=1)  # doctest: +SKIP
    """
    config = config if config is not None else DecoderConfig()
    if overrides:
        config = DecoderConfig.from_dict({**config.to_dict(), **overrides})
    return PrototypeSegmenter(backbone, prototypes, config)


def unwrap_segmenter(model: nn.Module) -> PrototypeSegmenter:
    inner = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    if not isinstance(inner, PrototypeSegmenter):
        raise TypeError(f"expected a PrototypeSegmenter (optionally DDP-wrapped); got "
                        f"{type(inner).__name__}.")
    return inner


def save_segmenter(path: Union[str, os.PathLike], model: nn.Module,
                   extra: Optional[Dict[str, Any]] = None) -> None:
    """Write a segmenter checkpoint atomically (a plain dict; ``torch.load(weights_only=True)``).

    Stores the decoder weights, the decoder configuration, the prototype set and a description of
    the backbone (family, checkpoint / timm name, fingerprint) from which :func:`load_segmenter`
    rebuilds it; the backbone's weights are not stored. ``extra`` holds plain values (numbers,
    strings, lists, dicts, tensors), e.g. the iteration and the training configuration.
    """
    model = unwrap_segmenter(model)
    ps = model.prototype_set
    describe = getattr(model.backbone, "describe", None)
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "decoder": model.decoder_state_dict(),
        "config": model.config.to_dict(),
        "prototypes": {
            "prototypes": ps.prototypes.detach().cpu().clone(),
            "class_names": list(ps.class_names),
            "background_names": list(ps.background_names),
            "tau": ps.tau,
            "kind": ps.kind,
            "logit_scale_override": ps.logit_scale_override,
            "provenance": ps.provenance,
        },
        "backbone": describe() if callable(describe) else {"family": type(model.backbone).__name__},
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_segmenter(path: Union[str, os.PathLike], backbone: Optional[nn.Module] = None,
                   map_location: Union[str, torch.device] = "cpu", *,
                   check_backbone: bool = True,
                   trust_torchscript: bool = False) -> PrototypeSegmenter:
    """Rebuild a segmenter written by :func:`save_segmenter`.

    Args:
        path: the checkpoint.
        backbone: the frozen backbone to use; None rebuilds it from the stored description
            (OpenAI CLIP from its checkpoint path or name, timm by name).
        map_location: where the model is placed (``"cpu"``, ``"cuda"``).
        check_backbone: raise if the backbone's weight fingerprint differs from the stored one.
        trust_torchscript: when the backbone is rebuilt from an OpenAI CLIP TorchScript
            checkpoint, read it with ``torch.jit.load``, which runs the code stored in it; by
            default it is read as data.

    Returns:
        The model in eval mode on ``map_location``; the stored ``extra`` dict is its
        ``checkpoint_extra`` attribute (:func:`read_segmenter_checkpoint` reads it without a model).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a segmenter checkpoint, or a different backbone.
    """
    path = os.fspath(path)
    payload = read_segmenter_checkpoint(path)
    p = payload["prototypes"]
    try:
        ps = PrototypeSet(p["prototypes"], p["class_names"], p["background_names"], p["tau"],
                          kind=p["kind"], provenance=p.get("provenance") or {},
                          logit_scale_override=p.get("logit_scale_override"))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"segmenter checkpoint {path!r}: its prototype set is invalid "
                         f"({type(err).__name__}: {err}).") from err
    desc = payload.get("backbone") or {}
    if backbone is None:
        backbone = _rebuild_backbone(desc, path, map_location, trust_torchscript)
    if check_backbone and desc.get("fingerprint") and hasattr(backbone, "fingerprint"):
        got = backbone.fingerprint()
        if got != desc["fingerprint"]:
            raise ValueError(f"the backbone's weights (fingerprint {got}) are not those the "
                             f"decoder in {path!r} was trained on ({desc['fingerprint']}, "
                             f"{desc.get('family')} {desc.get('checkpoint') or desc.get('name')}); "
                             "pass the right backbone, or check_backbone=False to use it anyway.")
    for key in ("width", "num_layers", "patch_size"):
        if key in desc and int(getattr(backbone, key)) != int(desc[key]):
            raise ValueError(f"backbone {key} {getattr(backbone, key)} differs from the one the "
                             f"decoder was trained on ({desc[key]}).")
    model = PrototypeSegmenter(backbone, ps, _checked_config(payload, backbone, ps, path))
    model.load_decoder_state_dict(payload["decoder"])
    model.to(map_location)
    model.eval()
    model.checkpoint_extra = dict(payload.get("extra") or {})  # type: ignore[assignment]  # a new attribute on an nn.Module
    return model


def _checked_config(payload: Dict[str, Any], backbone: nn.Module, ps: PrototypeSet,
                    path: str) -> DecoderConfig:
    """The checkpoint's decoder configuration, refused (naming the file) unless it is valid and
    the stored decoder weights have exactly the shapes it implies. The decoder is first built on
    PyTorch's ``meta`` device (no memory), so a configuration edited to ask for an enormous
    decoder is refused before anything is allocated."""
    try:
        if not isinstance(payload["config"], dict):
            raise TypeError(f"the configuration is a {type(payload['config']).__name__}, not a dict")
        config = DecoderConfig.from_dict(payload["config"])
        layers = config.resolve_layers(int(backbone.num_layers))
        with torch.device("meta"):
            decoder = SegmentationDecoder(int(backbone.width), len(layers), int(ps.prototypes.shape[1]),
                                          config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"segmenter checkpoint {path!r}: its decoder configuration is invalid "
                         f"({err}).") from err
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    stored = payload["decoder"] if isinstance(payload["decoder"], dict) else {}
    got = {k: tuple(v.shape) for k, v in _strip_prefixes(stored).items() if isinstance(v, torch.Tensor)}
    wrong = [f"{k} missing" for k in expected if k not in got]
    wrong += [f"{k} unexpected" for k in got if k not in expected]
    wrong += [f"{k} {got[k]} instead of {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if wrong:
        shown = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise ValueError(f"segmenter checkpoint {path!r}: its decoder weights do not fit its configuration "
                         f"and backbone ({shown}); the file is damaged or was edited.")
    return config


def _rebuild_backbone(desc: Dict[str, Any], path: str, map_location: Union[str, torch.device],
                      trust_torchscript: bool) -> nn.Module:
    """The backbone a checkpoint describes. timm reports a weights file it refuses to unpickle
    (``torch.load(weights_only=True)``) as a bare RuntimeError without the file's name; that
    becomes a ValueError naming the checkpoint and the files its description points to."""
    try:
        return backbone_from_description(desc, map_location, trust_torchscript=trust_torchscript)
    except (RuntimeError, pickle.UnpicklingError) as err:
        if desc.get("family") != "timm":
            raise
        overlay = (desc.get("model_kwargs") or {}).get("pretrained_cfg_overlay") or {}
        overlay_file = overlay.get("file") if isinstance(overlay, dict) else None
        files = [f for f in (desc.get("checkpoint_path"), overlay_file) if f]
        where = f" from {', '.join(map(str, files))}" if files else ""
        raise ValueError(f"segmenter checkpoint {path!r}: its timm backbone {desc.get('name')!r} could "
                         f"not be rebuilt{where} ({type(err).__name__}: {' '.join(str(err).split())}).") from err


def read_segmenter_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The raw payload of a :func:`save_segmenter` file (keys ``decoder``, ``config``,
    ``prototypes``, ``backbone``, ``extra``), validated, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable segmenter checkpoint (nothing in it is executed), keys
            missing, or NaN/inf in the decoder weights or the prototypes (the tensors are named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmenter checkpoint {path!r} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign files
        raise ValueError(f"{path!r} is not a readable segmenter checkpoint "
                         f"({type(err).__name__}: {err}).") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a segmenter checkpoint (no format tag {_FORMAT!r}); "
                         "write it with save_segmenter.")
    missing = [k for k in ("decoder", "config", "prototypes", "backbone") if k not in payload]
    if missing:
        raise ValueError(f"segmenter checkpoint {path!r} is missing keys {missing}.")
    check_tensor_sizes(payload, path, "segmenter checkpoint")
    _check_finite_weights(payload, path)
    return payload


def _check_finite_weights(payload: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose decoder weights or prototypes hold NaN/inf (they would segment
    every image into one class, reported as done), naming the file and the tensors."""
    tensors = dict(payload["decoder"]) if isinstance(payload["decoder"], dict) else {}
    protos = payload["prototypes"].get("prototypes") if isinstance(payload["prototypes"], dict) else None
    if isinstance(protos, torch.Tensor):
        tensors["prototypes"] = protos
    bad = [name for name, t in tensors.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"segmenter checkpoint {path!r} holds non-finite values (NaN/inf) in {shown}; "
                         "it cannot segment anything. Retrain or use an earlier checkpoint.")
