"""OpenAI CLIP ViT as a dense-token encoder, reproducing the forward that CLIP-ES uses for CAMs.

Load a checkpoint by model name (downloaded by the ``clip`` package on a machine with internet) or
by path (OpenAI's TorchScript archives and plain state dicts both work, ``module.`` prefixes are
stripped, and no code stored in a checkpoint is ever run), then run :class:`CLIPDense`: no-crop
preprocessing at sizes rounded up to the patch size, positional embeddings interpolated to the
token grid, the first ``L-1`` blocks without gradient (keeping head-averaged attention maps), and
the last block with a gradient path to its ``ln_1`` output, the GradCAM target layer of CLIP-ES
(``docs/upstream_clip_es.md#how-upstream-computes-a-cam``).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpl_plugin._imports import require
from vpl_plugin.backbones import _torchscript

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPDense",
    "LastBlockOutput",
    "build_clip_from_state_dict",
    "build_random_clip",
    "load_clip",
    "load_state_dict_file",
    "save_checkpoint",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as an OpenAI CLIP ViT."""


def load_state_dict_file(path: Union[str, os.PathLike], *, trust_torchscript: bool = False,
                         mmap: bool = False) -> Dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file into a plain state dict, without running code from it.

    Accepts OpenAI's TorchScript archives (``ViT-B-16.pt``) and plain ``torch.save`` state dicts,
    optionally nested under ``"state_dict"`` or ``"model"``. A ``module.`` prefix (from
    DataParallel) is removed from every key. Plain files are read with
    ``torch.load(weights_only=True)``; TorchScript archives with a reader that parses the archive
    as data and returns exactly ``torch.jit.load(path).state_dict()`` without executing the code
    stored in it (:mod:`vpl_plugin.backbones._torchscript`).

    Args:
        path: the checkpoint file.
        trust_torchscript: read TorchScript archives with ``torch.jit.load``, which runs the code
            stored in the archive: only for files from a trusted source that the safe reader does
            not understand.
        mmap: plain (zip-format) files only: the tensors map the file instead of being read into
            memory (``torch.load(mmap=True)``), for a caller that copies them at once, as
            :func:`load_clip` does; the file must not be rewritten in place while they are alive.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a readable CLIP ViT checkpoint: the message names the file and what
            is wrong (an archive the safe reader does not understand, missing keys, a zero or
            non-square patch, NaN / inf weights, ...).
        vpl_plugin._unpickle.UnsafeFileError: the file asks for Python objects that a checkpoint
            never contains (e.g. ``os.system``); nothing from it was run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {path} does not exist. Pass an OpenAI model name such as 'ViT-B/16' "
            f"(downloaded on first use) or the path of a checkpoint file."
        )
    if _torchscript.is_torchscript_archive(path):
        state = _read_torchscript(path, trust_torchscript)
    else:
        state = _read_plain(path, mmap=mmap and zipfile.is_zipfile(path))
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if "visual.proj" not in state:
        kind = "a ResNet CLIP" if "visual.attnpool.positional_embedding" in state else "not CLIP"
        raise CheckpointError(
            f"{path} is {kind}: vpl-plugin needs an OpenAI CLIP ViT checkpoint (key 'visual.proj' "
            f"missing). ResNet CLIPs have no token grid for CLIP-ES's GradCAM."
        )
    _check_clip_state(state, str(path))
    _check_finite(state, str(path))
    return state


def _read_plain(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the Python global {found[1]!r}" if found else "Python objects"
        raise CheckpointError(
            f"{path} is not a plain torch.save state dict: it asks for {what}, beyond tensors and "
            f"containers. vpl-plugin reads checkpoints with torch.load(weights_only=True) and runs "
            f"no code from them; re-save the weights with torch.save(model.state_dict(), path)."
        ) from None
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(
            f"{path} is neither a TorchScript archive nor a torch.save state dict ({err})."
        ) from err


def _read_torchscript(path: Path, trust_torchscript: bool) -> Dict[str, torch.Tensor]:
    if trust_torchscript:
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"torch.jit.load could not read {path} ({err}).") from err
    try:
        return _torchscript.read_torchscript_state_dict(path)
    except _torchscript.ArchiveNotUnderstood as err:
        raise CheckpointError(
            f"{path}: the safe TorchScript reader did not understand this archive: {err.what}. "
            f"{_torchscript.TRUST_HINT}"
        ) from None
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is a damaged TorchScript archive ({err}).") from err


_CLIP_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
              "visual.proj", "text_projection", "positional_embedding", "token_embedding.weight",
              "ln_final.weight", "logit_scale")


def _check_clip_state(state: Dict[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has the keys and shapes of a CLIP ViT."""
    missing = [k for k in _CLIP_KEYS if k not in state]
    if not any(k.startswith("visual.transformer.resblocks.") for k in state):
        missing.append("visual.transformer.resblocks.0.*")
    if missing:
        raise CheckpointError(f"{source} is missing the OpenAI CLIP key(s) {missing}; it is not a "
                              f"complete CLIP ViT checkpoint.")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: the value(s) of {not_tensors[:5]} are not tensors.")
    conv = state["visual.conv1.weight"]
    if conv.dim() != 4 or conv.shape[-1] == 0 or conv.shape[-1] != conv.shape[-2]:
        raise CheckpointError(
            f"{source}: 'visual.conv1.weight' has shape {tuple(conv.shape)}; a CLIP ViT's patch "
            f"embedding is (width, 3, p, p) with a square patch p >= 1.")
    pos = state["visual.positional_embedding"]
    grid = int(round(math.sqrt(max(pos.shape[0] - 1, 0)))) if pos.dim() == 2 else 0
    if grid < 1 or grid * grid + 1 != pos.shape[0] or pos.shape[1] != conv.shape[0]:
        raise CheckpointError(
            f"{source}: 'visual.positional_embedding' has shape {tuple(pos.shape)}; a CLIP ViT "
            f"with width {conv.shape[0]} needs (1 + g*g, {conv.shape[0]}) for a g x g token grid.")


def _finite(t: torch.Tensor) -> bool:
    """Whether a non-empty tensor has no NaN or inf: its min and max are finite (both propagate
    NaN). One reduction pass without the full boolean mask ``isfinite`` allocates (7x faster)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_finite(state: Dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the floating-point tensors with NaN or inf values."""
    bad = [k for k, v in state.items() if v.is_floating_point() and v.numel() and not _finite(v)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{source} has non-finite (NaN or inf) weights in {bad[:5]}{more}: the checkpoint is "
            f"corrupt or comes from a diverged training run.")


def build_clip_from_state_dict(state: Dict[str, torch.Tensor], *, round_weights: bool = False,
                               source: str = "the CLIP state dict") -> nn.Module:
    """Build an fp32 OpenAI ``clip.model.CLIP`` from a state dict of any ViT size and patch size.

    Args:
        state: checkpoint tensors (see :func:`load_state_dict_file`).
        round_weights: keep the fp16 rounding of ``clip.model.build_model`` (upstream parity);
            by default the model holds the checkpoint's values exactly.
        source: what ``state`` came from, for error messages (e.g. the file name).

    Raises:
        CheckpointError: missing keys, a zero or non-square patch, or shapes from which no CLIP
            can be built (the message names ``source`` and the keys).
    """
    clip_model = require("clip.model")
    _check_clip_state(state, source)
    try:
        # build_model on the meta device: its shape inference, fp16 conversion and strict key and
        # shape checks, without allocating or randomly initialising weights that are replaced
        with torch.device("meta"):
            model = clip_model.build_model({k: v.to("meta") for k, v in state.items()})
        # build_model rounds through fp16 exactly the tensors it stores in fp16 (load_state_dict
        # copies into them); the CPU model is fp32 (a copy: the model never aliases ``state``)
        values = {}
        for key, slot in model.state_dict().items():
            value = state[key].to(slot.dtype) if round_weights else state[key]
            values[key] = value.to(torch.float32, copy=True)
        model.load_state_dict(values, assign=True)
    except (RuntimeError, KeyError, ValueError, AssertionError, ZeroDivisionError) as err:
        raise CheckpointError(
            f"{source} is not a consistent OpenAI CLIP ViT state dict: {err}") from err
    _materialise_attention_masks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _materialise_attention_masks(model: nn.Module) -> None:
    """Replace the meta-device causal masks of a CLIP built under ``torch.device("meta")`` by
    ``model.build_attention_mask()`` (the text blocks share one mask, as ``CLIP.__init__`` makes
    them), and check that no meta tensor is left anywhere in the model."""
    clip: Any = model  # a clip.model.CLIP (its attributes are not typed)
    mask = clip.build_attention_mask()
    for block in clip.transformer.resblocks:
        if block.attn_mask is not None:
            block.attn_mask = mask
    left = [f"{name}.{attr}" for name, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Tensor) and value.is_meta]
    left += [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"the CLIP built from the checkpoint left meta tensors: {left[:5]}")


def build_random_clip(
    *,
    embed_dim: int = 32,
    image_resolution: int = 64,
    vision_layers: int = 3,
    vision_width: int = 64,
    patch_size: int = 16,
    context_length: int = 77,
    vocab_size: int = 49408,
    transformer_width: int = 64,
    transformer_heads: int = 1,
    transformer_layers: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A random-weight OpenAI CLIP ViT of the real architecture (for tests and examples).

    ``clip.model.build_model`` infers 64-wide attention heads from a state dict, so widths must be
    multiples of 64 for the checkpoint to load back.

    ``ViT-B/16`` is ``embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
    patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12``.
    """
    clip_model = require("clip.model")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = clip_model.CLIP(
            embed_dim, image_resolution, vision_layers, vision_width, patch_size, context_length,
            vocab_size, transformer_width, transformer_heads, transformer_layers,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.float().eval()


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike], *, torchscript: bool = False) -> None:
    """Save a CLIP model's state dict atomically, as a plain ``torch.save`` file or as a TorchScript
    archive whose state dict has CLIP's keys (the container format of OpenAI's released files)."""
    from vpl_plugin._io import atomic_path

    with atomic_path(path) as tmp:
        if torchscript:
            torch.jit.save(torch.jit.script(_StateHolder(model.state_dict())), str(tmp))
        else:
            torch.save(model.state_dict(), str(tmp))


class _StateHolder(nn.Module):
    """A scriptable module holding a state dict under the same dotted names."""

    def __init__(self, state: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        for dotted, value in state.items():
            module: nn.Module = self
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _resolve_checkpoint(name_or_path: str, download_root: Optional[str]) -> Path:
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    clip = require("clip")
    if name_or_path in clip.available_models():
        root = download_root or os.path.expanduser("~/.cache/clip")
        try:
            return Path(clip.clip._download(clip.clip._MODELS[name_or_path], root))
        except Exception as err:  # noqa: BLE001 - network errors vary by platform
            raise CheckpointError(
                f"could not download CLIP {name_or_path!r} into {root} ({err}). Without internet, "
                f"copy OpenAI's checkpoint file (e.g. ViT-B-16.pt) to this machine and pass its path."
            ) from err
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a checkpoint file nor an OpenAI CLIP model name; model names "
        f"are {clip.available_models()}."
    )


def load_clip(
    name_or_path: str,
    device: Union[str, torch.device] = "cpu",
    *,
    fp16_compat: bool = False,
    download_root: Optional[str] = None,
    trust_torchscript: bool = False,
) -> "CLIPDense":
    """Load an OpenAI CLIP ViT checkpoint as a :class:`CLIPDense` encoder.

    Args:
        name_or_path: ``"ViT-B/16"`` (downloaded on first use, needs internet) or a checkpoint path.
        device: where the model runs.
        fp16_compat: reproduce upstream CLIP-ES's half-precision effects (fp16-rounded weights,
            fp16 positional embedding; on CUDA the whole model runs in fp16). Off: exact fp32.
        download_root: where OpenAI model names are downloaded (default ``~/.cache/clip``).
        trust_torchscript: read TorchScript archives with ``torch.jit.load``, which runs the code
            stored in them (see :func:`load_state_dict_file`); by default they are read as data.

    Example:
        >>> enc = load_clip("ViT-B-16.pt", "cuda")  # doctest: +SKIP
    """
    path = _resolve_checkpoint(name_or_path, download_root)
    # mapped, not read: the build below copies every tensor once and the mapping is then dropped
    state = load_state_dict_file(path, trust_torchscript=trust_torchscript, mmap=True)
    model = build_clip_from_state_dict(state, round_weights=fp16_compat, source=str(path))
    enc = CLIPDense(model, fp16_compat=fp16_compat, device=device)
    enc.checkpoint = str(path)
    return enc


@dataclass
class LastBlockOutput:
    """What the grad-enabled last block returns for a batch of ``B`` copies of one image.

    Attributes:
        activation: ``ln_1`` output of the last block, ``(L, B, width)``, a leaf requiring grad.
        image_embedding: mean of the ``ln_post`` patch tokens projected, ``(B, D)`` (unnormalised).
        patch_features: projected patch tokens, ``(B, n, D)`` (unnormalised).
        attention: head-averaged attention of the last block, ``(B, L, L)``.
        cls_embedding: the CLS token after ``ln_post`` and ``proj``, ``(B, D)`` (CLIP's own image
            embedding; CLIP-ES does not use it).
    """

    activation: torch.Tensor
    image_embedding: torch.Tensor
    patch_features: torch.Tensor
    attention: torch.Tensor
    cls_embedding: torch.Tensor


class CLIPDense(nn.Module):
    """Dense-token wrapper around an OpenAI ``clip.model.CLIP`` ViT (weights frozen).

    Args:
        model: a ``clip.model.CLIP`` with a ViT image encoder.
        fp16_compat: upstream half-precision effects (see :func:`load_clip`).
        device: where to run.
    """

    def __init__(self, model: nn.Module, *, fp16_compat: bool = False,
                 device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "proj") or not hasattr(visual, "conv1"):
            raise TypeError(
                "CLIPDense needs an OpenAI CLIP ViT model (with .visual.conv1 and .visual.proj); "
                f"got {type(model).__name__}."
            )
        self.model = model
        self.fp16_compat = bool(fp16_compat)
        self.device = torch.device(device)
        self.half = self.fp16_compat and self.device.type == "cuda"
        self.model.to(self.device)
        if self.half:
            self.model.half()
        self.checkpoint: Optional[str] = None

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    @property
    def pretrain_grid(self) -> int:
        return int(round(math.sqrt(self.visual.positional_embedding.shape[0] - 1)))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's logit scale: the fp32 ``exp`` of the stored log-scale, a 0-d fp32 tensor."""
        return self.model.logit_scale.detach().float().exp().cpu()

    def fingerprint(self) -> str:
        """A short hash of a few weights, to key caches by model."""
        h = hashlib.sha1()
        for t in (self.visual.proj, self.visual.conv1.weight, self.model.logit_scale):
            h.update(t.detach().float().cpu().numpy().tobytes()[:65536])
        h.update(str(tuple(self.visual.proj.shape) + (self.num_layers, self.patch_size)).encode())
        return h.hexdigest()[:16]

    def padded_size(self, height: int, width: int) -> Tuple[int, int]:
        """Input size ``(H, W)``: the original size rounded up to multiples of the patch size."""
        p = self.patch_size
        return int(math.ceil(height / p) * p), int(math.ceil(width / p) * p)

    # -- preprocessing ----------------------------------------------------------------------------
    def preprocess(self, image) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """PIL image -> normalised ``(3, H, W)`` fp32 tensor and the original ``(H0, W0)``.

        Bicubic resize (PIL) to the padded size, *then* RGB conversion, as upstream
        (``docs/upstream_clip_es.md#resize-then-rgb``).
        """
        Image = require("PIL.Image")
        w0, h0 = image.size
        height, width = self.padded_size(h0, w0)
        resized = image.resize((width, height), Image.BICUBIC).convert("RGB")
        arr = np.asarray(resized, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (x - mean) / std, (h0, w0)

    # -- encoder pieces ---------------------------------------------------------------------------
    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """Positional table ``(1 + h*w, width)`` bilinearly interpolated to an ``h x w`` grid."""
        pos = self.visual.positional_embedding
        g = self.pretrain_grid
        patch = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)
        patch = patch.reshape(1, -1, h * w).permute(0, 2, 1)[0]
        table = torch.cat([pos[:1].float(), patch], dim=0)
        # upstream always stores the table in fp16 (docs/upstream_clip_es.md#fp16-positional-table)
        if self.fp16_compat:
            table = table.half()
        return table

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add positions, ``ln_pre``: ``(B,3,H,W)`` -> ``(L, B, width)``."""
        v = self.visual
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}.")
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}; "
                f"use CLIPDense.preprocess, which rounds sizes up."
            )
        h, w = images.shape[-2] // p, images.shape[-1] // p
        x = v.conv1(images.to(self.device, self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                            device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(h, w).to(x.dtype)
        x = v.ln_pre(x)
        return x.permute(1, 0, 2)

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = block.ln_1(x)
        a, attn = block.attn(y, y, y, need_weights=True, attn_mask=block.attn_mask)
        x = x + a
        x = x + block.mlp(block.ln_2(x))
        return x, attn

    def trunk(self, images: torch.Tensor, keep_attention: int = 8) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Blocks ``1..L-1`` without gradient.

        Returns:
            tokens ``(L, B, width)`` and the head-averaged attention maps ``(B, L, L)`` of the last
            ``keep_attention - 1`` trunk blocks (the last block's map is added by the caller).
        """
        with torch.no_grad():
            x = self.embed(images)
            blocks = self.visual.transformer.resblocks
            maps = []
            first_kept = max(0, len(blocks) - keep_attention)
            for i, block in enumerate(blocks[:-1]):
                x, attn = self._block(block, x)
                if i >= first_kept:
                    maps.append(attn)
        return x, maps

    def last_block(self, tokens: torch.Tensor, copies: int = 1) -> LastBlockOutput:
        """The last block and head with a gradient path from its ``ln_1`` output.

        Args:
            tokens: trunk output ``(L, 1, width)`` (or ``(L, B, width)`` with ``copies=1``).
            copies: repeat a single image this many times along the batch so that one backward
                pass gives one gradient per copy (one per target class).
        """
        if copies > 1:
            if tokens.shape[1] != 1:
                raise ValueError("copies > 1 needs the tokens of a single image, shape (L, 1, width).")
            tokens = tokens.expand(-1, copies, -1)
        block = self.visual.transformer.resblocks[-1]
        with torch.enable_grad():
            act = block.ln_1(tokens).detach().requires_grad_(True)
            a, attn = block.attn(act, act, act, need_weights=True, attn_mask=block.attn_mask)
            x = tokens + a
            x = x + block.mlp(block.ln_2(x))
            x = self.visual.ln_post(x.permute(1, 0, 2))  # (B, L, width)
            pooled = x[:, 1:].mean(dim=1) @ self.visual.proj
            patches = x[:, 1:] @ self.visual.proj
            cls = x[:, 0] @ self.visual.proj
        return LastBlockOutput(act, pooled, patches, attn, cls)

    # -- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text_prototypes(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """CLIP-ES zero-shot classifier: per name, the mean of unit template embeddings, re-normalised.

        Returns:
            ``(len(names), D)`` fp32 unit rows on the CPU.
        """
        clip = require("clip")
        rows = []
        for name in names:
            tokens = clip.tokenize([t.format(name) for t in templates],
                                   context_length=int(self.model.context_length)).to(self.device)
            emb = self.model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            rows.append(emb / emb.norm())
        return torch.stack(rows).cpu()
