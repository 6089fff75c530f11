"""OpenAI CLIP ViT as a dense-token encoder, reproducing the forward that CLIP-ES uses for CAMs.

Load a checkpoint by model name (downloaded by the ``clip`` package on a machine with internet) or
by path (OpenAI's TorchScript archives and plain state dicts both work, ``module.`` prefixes are
stripped, and no code stored in a checkpoint is ever run), then run :class:`CLIPDense`: no-crop
preprocessing at sizes rounded up to the patch size, positional embeddings interpolated to the
token grid, the first ``L-1`` blocks without gradient (keeping head-averaged attention maps), and
the last block with a gradient path to its ``ln_1`` output, the GradCAM target layer of CLIP-ES
(``docs/upstream_clip_es.md#how-upstream-computes-a-cam``).

Numerics (:class:`Numerics`, ``docs/upstream_clip_es.md#numerics``): by default the encoder
computes what upstream CLIP-ES computes on the same device (weights rounded through fp16, the
interpolated positional table stored in fp16; on CUDA the model in fp16 and upstream's fp16
GradCAM arithmetic). ``exact_fp32=True`` keeps the checkpoint's values and computes in fp32.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import re
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpl_plugin._imports import require
from vpl_plugin._unpickle import check_tensor_sizes
from vpl_plugin.backbones import _torchscript

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPDense",
    "LastBlockOutput",
    "Numerics",
    "TrunkCache",
    "build_clip_from_state_dict",
    "build_random_clip",
    "clip_normalize",
    "load_clip",
    "load_state_dict_file",
    "numerics_for",
    "resolve_exact_fp32",
    "save_checkpoint",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP's per-channel normalisation of RGB values in ``[0, 1]``, ``(3, H, W)`` or ``(B, 3, H, W)``.

    Example:
        >>> clip_normalize(torch.full((3, 1, 1), 0.5)).flatten()
        tensor([0.0690, 0.1614, 0.3328])
    """
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


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
    state: Any
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
    try:
        check_tensor_sizes(state, path, "checkpoint")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
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


# -- numerics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Numerics:
    """How a :class:`CLIPDense` computes (``docs/upstream_clip_es.md#numerics``).

    :func:`numerics_for` gives the plan for a device; tests pass another plan to
    :class:`CLIPDense` (for example the CUDA plan on a CPU) to run a device's code path elsewhere.

    Attributes:
        exact_fp32: keep the checkpoint's values and an fp32 positional table (``--exact-fp32``);
            ``False`` rounds the weights upstream's loader rounds through fp16 and stores the
            interpolated positional table in fp16, as upstream does on every device.
        model_dtype: dtype of the weights upstream's loader converts (convolutions, linear and
            attention projections, ``proj`` / ``text_projection``); layer norms, embeddings and
            the logit scale stay fp32. ``torch.float16`` is upstream's CUDA model.
        half_arithmetic: upstream's fp16 GradCAM arithmetic (its GPU path, fp16 numpy arrays).
    """

    exact_fp32: bool = False
    model_dtype: torch.dtype = torch.float32
    half_arithmetic: bool = False

    @property
    def round_weights(self) -> bool:
        """Round the converted weights through fp16 (upstream's ``build_model``)."""
        return not self.exact_fp32

    @property
    def half_table(self) -> bool:
        """Store the interpolated positional table in fp16 (upstream, every device)."""
        return not self.exact_fp32

    @property
    def name(self) -> str:
        """``"exact-fp32"`` or ``"upstream"``."""
        return "exact-fp32" if self.exact_fp32 else "upstream"


def numerics_for(device: Union[str, torch.device], *, exact_fp32: bool = False) -> Numerics:
    """The numerics plan of a device: upstream's (fp16 model and fp16 GradCAM arithmetic on CUDA,
    fp32 model elsewhere, fp16-rounded weights and fp16 positional table everywhere), or exact
    fp32 on every device with ``exact_fp32=True``."""
    cuda = torch.device(device).type == "cuda"
    if exact_fp32:
        return Numerics(exact_fp32=True)
    return Numerics(model_dtype=torch.float16 if cuda else torch.float32, half_arithmetic=cuda)


def resolve_exact_fp32(exact_fp32: bool = False, fp16_compat: Optional[bool] = None) -> bool:
    """Combine ``exact_fp32`` with the former switch ``fp16_compat``.

    ``fp16_compat=True`` names upstream's numerics, now the default: accepted, refused together
    with ``exact_fp32=True``. ``fp16_compat=False`` was the former exact-fp32 default and still
    means it (with a :class:`FutureWarning` naming ``exact_fp32=True``).

    Raises:
        ValueError: ``fp16_compat=True`` together with ``exact_fp32=True``.
    """
    if fp16_compat is None:
        return bool(exact_fp32)
    if fp16_compat and exact_fp32:
        raise ValueError("fp16_compat=True (upstream's numerics, the default) contradicts "
                         "exact_fp32=True; pass one of them.")
    if not fp16_compat:
        warnings.warn("fp16_compat=False asks for exact fp32, no longer the default: pass "
                      "exact_fp32=True instead (upstream's numerics are the default).",
                      FutureWarning, stacklevel=3)
        return True
    return False


def _converted_tensors(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """``(module, attribute)`` of every tensor upstream's ``convert_weights`` casts to fp16."""
    found: List[Tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            found += [(module, a) for a in ("weight", "bias") if getattr(module, a, None) is not None]
        if isinstance(module, nn.MultiheadAttention):
            names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias", "bias_k", "bias_v")
            found += [(module, a) for a in names if getattr(module, a, None) is not None]
        found += [(module, a) for a in ("text_projection", "proj")
                  if isinstance(getattr(module, a, None), torch.Tensor)]
    return found


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _fits(model: nn.Module, numerics: Numerics, device: torch.device) -> bool:
    """Whether ``model`` already has the device, dtypes and rounding ``numerics`` asks for.

    The answer is remembered per model until one of its tensors changes (identity, storage,
    in-place version, dtype or device), so wrapping the same model again (e.g. once per image in
    :mod:`vpl_plugin.dropin`) does not re-read its weights (2.7 s for a ViT-B/16 on one thread).
    """
    state = _tensor_state(model)
    if _FIT_CACHE.get(model) == (numerics, str(device), state):
        return True
    converted = {id(getattr(m, a)) for m, a in _converted_tensors(model)}
    for t in list(model.parameters()) + list(model.buffers()):
        if not _on_device(t, device):
            return False
        if not t.is_floating_point():
            continue
        want = numerics.model_dtype if id(t) in converted else torch.float32
        if t.dtype != want:
            return False
        if id(t) in converted and numerics.round_weights and want == torch.float32:
            if not torch.equal(t, t.half().float()):
                return False
    _remember_fit(model, numerics, device)
    return True


_FIT_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, ...]]" = weakref.WeakKeyDictionary()


def _tensor_state(model: nn.Module) -> Tuple[Any, ...]:
    """Identity, storage, version, dtype, device and a sample of 16 values of every tensor (the
    sample also catches most writes through ``.data``, which the version counter misses)."""
    out = []
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)].double().sum().item() if flat.numel() else 0.0
            out.append((id(t), t.data_ptr(), t._version, t.dtype, str(t.device), sample))
    return tuple(out)


def _remember_fit(model: nn.Module, numerics: Numerics, device: torch.device) -> None:
    _FIT_CACHE[model] = (numerics, str(device), _tensor_state(model))


def _convert(model: nn.Module, numerics: Numerics, device: torch.device) -> nn.Module:
    """Give ``model`` (in place) the dtypes, rounding and device of ``numerics``."""
    converted = _converted_tensors(model)
    ids = {id(getattr(m, a)) for m, a in converted}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and id(t) not in ids:
                t.data = t.data.float()
        for module, attr in converted:
            t = getattr(module, attr)
            data = t.data.half() if numerics.round_weights else t.data.float()
            t.data = data.to(numerics.model_dtype)
    model = model.to(device)
    _remember_fit(model, numerics, device)
    return model


def _prepared_model(model: nn.Module, numerics: Numerics, device: torch.device) -> nn.Module:
    """``model`` itself when it already fits ``numerics`` on ``device``, else a converted copy
    (the caller's model is never changed)."""
    if _fits(model, numerics, device):
        return model
    return _convert(copy.deepcopy(model), numerics, device)


def load_clip(
    name_or_path: str,
    device: Union[str, torch.device] = "cpu",
    *,
    exact_fp32: bool = False,
    fp16_compat: Optional[bool] = None,
    download_root: Optional[str] = None,
    trust_torchscript: bool = False,
    flush_subnormals: bool = True,
) -> "CLIPDense":
    """Load an OpenAI CLIP ViT checkpoint as a :class:`CLIPDense` encoder.

    By default the encoder computes as upstream CLIP-ES does on the same device: weights rounded
    through fp16 as ``clip.model.build_model`` rounds them, the interpolated positional table
    stored in fp16, and on CUDA the model in fp16 with upstream's fp16 GradCAM arithmetic
    (``docs/upstream_clip_es.md#numerics``).

    Args:
        name_or_path: ``"ViT-B/16"`` (downloaded on first use, needs internet) or a checkpoint path.
        device: where the model runs.
        exact_fp32: keep the checkpoint's exact values and compute in fp32 on every device (the
            ``--exact-fp32`` switch; not upstream's numbers).
        fp16_compat: the former name of the default numerics: ``True`` is accepted (and refused
            with ``exact_fp32=True``); ``False`` means ``exact_fp32=True``, with a warning.
        download_root: where OpenAI model names are downloaded (default ``~/.cache/clip``).
        trust_torchscript: read TorchScript archives with ``torch.jit.load``, which runs the code
            stored in them (see :func:`load_state_dict_file`); by default they are read as data.
        flush_subnormals: see :class:`CLIPDense` (``False``: ``--keep-subnormals``).

    Example:
        >>> enc = load_clip("ViT-B-16.pt", "cuda")  # doctest: +SKIP
    """
    exact = resolve_exact_fp32(exact_fp32, fp16_compat)
    path = _resolve_checkpoint(name_or_path, download_root)
    # mapped, not read: the build below copies every tensor once and the mapping is then dropped
    state = load_state_dict_file(path, trust_torchscript=trust_torchscript, mmap=True)
    model = build_clip_from_state_dict(state, round_weights=not exact, source=str(path))
    numerics = numerics_for(device, exact_fp32=exact)
    model = _convert(model, numerics, torch.device(device))  # our own model: converted in place
    enc = CLIPDense(model, device=device, numerics=numerics, flush_subnormals=flush_subnormals)
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


class TrunkCache:
    """Remembers :meth:`CLIPDense.trunk`'s outputs per input image (set ``encoder.trunk_cache``).

    The trunk (blocks ``1..L-1``, no gradient, weights frozen) is a function of the image alone,
    so a caller that sends the same images through many prototype sets or map modes (the demo's
    rows) can run it once per image; the outputs are read, never written in place, downstream.
    Entries are keyed by the image bytes, shape and dtype and ``keep_attention``; memory grows by
    one entry (the tokens and the kept attention maps) per distinct input.
    """

    def __init__(self) -> None:
        self._memo: Dict[tuple, Tuple[torch.Tensor, List[torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self._memo)

    @staticmethod
    def key(images: torch.Tensor, keep_attention: int) -> tuple:
        """The entry of ``images`` (a hash of their bytes, their shape and dtype, ``keep_attention``)."""
        data = images.detach().cpu().contiguous().numpy().tobytes()
        return (hashlib.blake2b(data, digest_size=16).digest(), tuple(images.shape), str(images.dtype),
                keep_attention)

    def get(self, key: tuple) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The remembered output of ``key``, or None."""
        return self._memo.get(key)

    def put(self, key: tuple, value: Tuple[torch.Tensor, List[torch.Tensor]]) -> None:
        """Remember ``value`` as the output of ``key``."""
        self._memo[key] = value


class CLIPDense(nn.Module):
    """Dense-token wrapper around an OpenAI ``clip.model.CLIP`` ViT (weights frozen).

    The caller's model is never modified: when the device, dtypes or fp16 rounding that the
    numerics ask for differ from the model's, the encoder works on a converted copy.

    Args:
        model: a ``clip.model.CLIP`` with a ViT image encoder.
        exact_fp32: the checkpoint's exact values and fp32 everywhere (see :func:`load_clip`);
            by default upstream CLIP-ES's numerics.
        fp16_compat: the former name of the default numerics (see :func:`resolve_exact_fp32`).
        device: where to run.
        numerics: an explicit plan instead of ``numerics_for(device, exact_fp32=...)``, e.g. the
            CUDA plan on a CPU to exercise the half-precision code path without a GPU.
        trunk_cache: a :class:`TrunkCache` that makes :meth:`trunk` run once per distinct input
            (also settable later as the ``trunk_cache`` attribute; None: no caching).
        flush_subnormals: on the CPU, GradCAMs (:func:`~vpl_plugin.cam.image_gradcams`) flush
            subnormal floats to zero, which makes a CLIP with peaked attention several times
            faster and moved its maps by at most one fp16 step where it moved them at all
            (measured; ``docs/upstream_clip_es.md#subnormals``);
            ``False`` (``--keep-subnormals``) computes with IEEE subnormals.
    """

    def __init__(self, model: nn.Module, *, exact_fp32: bool = False,
                 fp16_compat: Optional[bool] = None, device: Union[str, torch.device] = "cpu",
                 numerics: Optional[Numerics] = None, trunk_cache: Optional[TrunkCache] = None,
                 flush_subnormals: bool = True) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "proj") or not hasattr(visual, "conv1"):
            raise TypeError(
                "CLIPDense needs an OpenAI CLIP ViT model (with .visual.conv1 and .visual.proj); "
                f"got {type(model).__name__}."
            )
        exact = resolve_exact_fp32(exact_fp32, fp16_compat)
        self.device = torch.device(device)
        self.numerics = numerics if numerics is not None else numerics_for(self.device, exact_fp32=exact)
        self.model = _prepared_model(model, self.numerics, self.device)
        self.checkpoint: Optional[str] = None
        self.trunk_cache = trunk_cache
        self._flush_subnormals = bool(flush_subnormals)

    @property
    def flush_subnormals(self) -> bool:
        """Whether GradCAMs on the CPU flush subnormal floats to zero (fixed at construction)."""
        return self._flush_subnormals

    @property
    def exact_fp32(self) -> bool:
        """``True`` under ``--exact-fp32``; ``False`` for upstream's numerics (the default)."""
        return self.numerics.exact_fp32

    @property
    def fp16_compat(self) -> bool:
        """Upstream's numerics (``not exact_fp32``), under the name earlier records use."""
        return not self.numerics.exact_fp32

    @property
    def half_arithmetic(self) -> bool:
        """Upstream's fp16 GradCAM arithmetic (its GPU path)."""
        return self.numerics.half_arithmetic

    @property
    def half(self) -> bool:  # type: ignore[override]  # the flag of earlier versions, not Module.half()
        """The former name of :attr:`half_arithmetic`. The numerics are fixed at construction; build
        another encoder (``numerics=...``) instead of converting this one."""
        return self.numerics.half_arithmetic

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
        """A short hash of a few weights and the numerics, to key caches by model.

        Under ``exact_fp32`` it is the hash earlier versions gave (their default), so caches
        written before upstream's numerics became the default stay valid with ``--exact-fp32``.
        """
        h = hashlib.sha1()
        for t in (self.visual.proj, self.visual.conv1.weight, self.model.logit_scale):
            h.update(t.detach().float().cpu().numpy().tobytes()[:65536])
        h.update(str(tuple(self.visual.proj.shape) + (self.num_layers, self.patch_size)).encode())
        if not self.numerics.exact_fp32:
            h.update(b"numerics=upstream")
        return h.hexdigest()[:16]

    def padded_size(self, height: int, width: int) -> Tuple[int, int]:
        """Input size ``(H, W)``: the original size rounded up to multiples of the patch size."""
        p = self.patch_size
        return int(math.ceil(height / p) * p), int(math.ceil(width / p) * p)

    # -- preprocessing ----------------------------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> Tuple[torch.Tensor, Tuple[int, int]]:
        """PIL image -> normalised ``(3, H, W)`` fp32 tensor and the original ``(H0, W0)``.

        Bicubic resize (PIL) to the padded size, *then* RGB conversion, as upstream
        (``docs/upstream_clip_es.md#resize-then-rgb``).
        """
        Image = require("PIL.Image")
        w0, h0 = image.size
        height, width = self.padded_size(h0, w0)
        resized = image.resize((width, height), Image.BICUBIC).convert("RGB")
        arr = np.asarray(resized, dtype=np.float32) / 255.0
        return clip_normalize(torch.from_numpy(arr).permute(2, 0, 1)), (h0, w0)

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
        if self.numerics.half_table:
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
            With a :attr:`trunk_cache`, an input seen before returns its remembered output.
        """
        if self.trunk_cache is not None:
            key = self.trunk_cache.key(images, keep_attention)
            hit = self.trunk_cache.get(key)
            if hit is None:
                hit = self._trunk(images, keep_attention)
                self.trunk_cache.put(key, hit)
            return hit
        return self._trunk(images, keep_attention)

    def _trunk(self, images: torch.Tensor, keep_attention: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
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
