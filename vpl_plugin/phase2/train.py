"""Training of the phase-2 decoder (``docs/vpl.md#training-recipe``), single process or torchrun.

``train_segmenter`` runs SGD (momentum 0.9, weight decay 1e-4) with a poly learning rate
(power 0.9, no warm-up) on the decoder of a :class:`~vpl_plugin.phase2.PrototypeSegmenter`, over
the deterministic batch stream of :mod:`vpl_plugin.phase2.data`, and writes under ``out``:

* ``last.pt``: the training state (decoder weights, optimizer, grad scaler, iteration, RNG states,
  curves; plain tensors, numbers and strings, read with ``torch.load(weights_only=True)``),
  atomically every ``checkpoint_every`` iterations and at the end; a rerun resumes from it
  and ends with the weights an uninterrupted run would have (bit for bit on the CPU with the same
  number of threads, tested; another thread count, or CUDA kernels, change float rounding);
* ``segmenter.pt``: the trained segmenter (:func:`~vpl_plugin.phase2.save_segmenter`), at the end;
* ``curves.json`` / ``curves.png``: loss, CE, RSC, learning rate and (optional) validation mIoU.

**Multi-GPU** (``torchrun --nproc_per_node N -m vpl_plugin train ...``): every process runs this
function; the model is wrapped in ``DistributedDataParallel``, each rank reads its slice of the same
global batch (``batch_size`` is the *total*, 6 in the paper), the decoder's BatchNorm uses the
statistics of the global batch (:class:`GlobalBatchNorm`), and the loss is computed on the outputs
gathered from all ranks, so CE is the mean over every valid pixel of the global batch and RSC
contrasts every region of the global batch. A DDP step therefore equals the single-process step on
the same global batch (tested with gloo on CPU). Only rank 0 writes files and shows the progress bar.

Example:
    >>> model = build_segmenter(create_backbone("ViT-B/16", "cuda"), PrototypeSet.load("vpl.pt"))  # doctest: +SKIP
    >>> data = PseudoMaskDataset(VOCDataset("VOC2012", "train_aug.txt"), "pseudo")               # doctest: +SKIP
    >>> record = train_segmenter(model, data, "runs/decoder", device="cuda")                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vpl_plugin._checks import check_choice, check_range, describe_diff, settings_diff
from vpl_plugin._cli_common import cli_option, finite_float, nonnegative_int, positive_float, positive_int
from vpl_plugin._io import atomic_path, write_json
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.distributed import barrier, init_distributed
from vpl_plugin.phase2.data import (IterationBatchSampler, TrainStream, batch_positions, collate,
                                    normalize_image)

__all__ = [
    "AUTOCAST_DEVICE_TYPES",
    "GlobalBatchNorm",
    "TrainConfig",
    "amp_dtype_for",
    "convert_global_batchnorm",
    "evaluate_segmenter",
    "load_train_state",
    "plot_curves",
    "poly_lr",
    "train_segmenter",
]

log = logging.getLogger(__name__)

_STATE_FORMAT = "vpl-plugin/phase2-train-state"
# fields that change the arithmetic of a run: a resume with other values would not continue it
_RUN_FIELDS = ("iterations", "batch_size", "lr", "poly_power", "momentum", "weight_decay", "crop",
               "scale_range", "flip", "amp", "amp_dtype", "seed")


@dataclass
class TrainConfig:
    """Phase-2 optimisation settings (defaults: ``docs/vpl.md#training-recipe``).

    Attributes:
        iterations: SGD iterations (30 000).
        batch_size: global batch size over all processes (6); a multiple of the process count.
        lr: base learning rate (0.01), poly decay ``lr * (1 - t/T)^poly_power`` (no warm-up).
        poly_power: 0.9.
        momentum: 0.9.
        weight_decay: 1e-4 (on every decoder parameter).
        crop: square crop side in pixels (448 = 28x28 tokens at patch 16); a multiple of the patch.
        scale_range: random rescale range (0.5, 2.0).
        flip: random horizontal flip.
        checkpoint_every: write ``last.pt`` every this many iterations (and at the end).
        eval_every: validation mIoU every this many iterations (needs a validation set; None: only
            at the end when a validation set is given).
        eval_limit: evaluate on the first N validation images only (None: all).
        log_every: curve points average this many iterations.
        amp: mixed precision on CUDA (ignored on CPU).
        amp_dtype: ``"bf16"`` (no loss scaling) or ``"fp16"`` (with a gradient scaler).
        seed: data order, augmentation and any random choice in the loss.
        num_workers: data-loading processes per rank.
    """

    # fields with `cli_option` metadata are `vpl train` flags (flag, help, argparse type)
    iterations: int = field(default=30000, metadata=cli_option(
        "--iters", "iterations (30000)", type=nonnegative_int))
    batch_size: int = field(default=6, metadata=cli_option(
        "--batch-size", "global batch over all processes (6); a multiple of the process count",
        type=positive_int))
    lr: float = field(default=0.01, metadata=cli_option(
        "--lr", "base learning rate, poly 0.9 decay (0.01)", type=positive_float))
    poly_power: float = 0.9
    momentum: float = field(default=0.9, metadata=cli_option("--momentum", None, type=finite_float))
    weight_decay: float = field(default=1e-4, metadata=cli_option("--weight-decay", None, type=finite_float))
    crop: int = field(default=448, metadata=cli_option(
        "--crop", "crop side, a multiple of the patch (448)", type=positive_int))
    scale_range: Tuple[float, float] = field(default=(0.5, 2.0), metadata=cli_option(
        "--scale", "random rescale range (0.5 2.0)", type=positive_float, nargs=2, metavar=("LO", "HI")))
    flip: bool = field(default=True, metadata=cli_option("--no-flip", "no horizontal flip"))
    checkpoint_every: int = field(default=1000, metadata=cli_option(
        "--checkpoint-every", "write OUT/last.pt every N iterations (1000) and at the end",
        type=positive_int, metavar="N"))
    eval_every: Optional[int] = field(default=None, metadata=cli_option(
        "--eval-every", "validation mIoU every N iterations (needs --val-split-file)",
        type=positive_int, metavar="N"))
    eval_limit: Optional[int] = field(default=None, metadata=cli_option(
        "--val-limit", "validate on the first N images only", type=positive_int, metavar="N"))
    log_every: int = 20
    amp: bool = field(default=True, metadata=cli_option(
        "--amp", "mixed precision on CUDA (default on; ignored on CPU)",
        off_flag="--no-amp", off_help="full fp32 on CUDA"))
    amp_dtype: str = field(default="bf16", metadata=cli_option(
        "--amp-dtype", "autocast dtype (bf16 default; fp16 adds a gradient scaler)", choices=("bf16", "fp16")))
    seed: int = field(default=0, metadata=cli_option(
        "--seed", "decoder init, data order and augmentation (0)", type=int))
    num_workers: int = field(default=2, metadata=cli_option(
        "--workers", "data-loading processes per rank (2)", type=nonnegative_int))

    def __post_init__(self) -> None:
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        check_range("iterations", self.iterations, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("poly_power", self.poly_power, 0.0)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("crop", self.crop, 1)
        check_range("scale_range[0]", self.scale_range[0], 0.0, low_open=True)
        check_range("scale_range[1]", self.scale_range[1], self.scale_range[0])
        check_range("checkpoint_every", self.checkpoint_every, 1)
        if self.eval_every is not None:
            check_range("eval_every", self.eval_every, 1)
        check_range("log_every", self.log_every, 1)
        check_choice("amp_dtype", self.amp_dtype, ("bf16", "fp16"))
        check_range("num_workers", self.num_workers, 0)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """Poly schedule: ``base_lr * (1 - iteration / total) ** power`` for ``iteration`` in ``[0, total)``.

    Example:
        >>> poly_lr(0.01, 0, 100), round(poly_lr(0.01, 50, 100), 6)
        (0.01, 0.005359)
    """
    if not 0 <= iteration <= total:
        raise ValueError(f"iteration must be in [0, {total}]; got {iteration}.")
    return float(base_lr) * (1.0 - iteration / total) ** power


# -- global-batch BatchNorm --------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all processes.

    The same state dict as ``nn.BatchNorm{1,2,3}d``. Outside a process group, or in eval mode, it
    is ordinary BatchNorm. Inside one (any backend, CPU included, which ``nn.SyncBatchNorm`` does
    not support), the per-channel sum and the sum of squared deviations are all-reduced with
    autograd-aware collectives, so the forward and the gradients equal single-process BatchNorm on
    the concatenated batch (up to float rounding).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input; got {tuple(input.shape)}.")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[c]
        mean = total[:c] / n
        shape = [1, c] + [1] * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var), alpha=factor)
        return y.to(input.dtype)


def convert_global_batchnorm(module: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm under ``module`` by a :class:`GlobalBatchNorm` sharing its state.

    Returns:
        ``(parent, name, original)`` for each replacement, for :func:`_restore_batchnorm`.
    """
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
                if child.affine:  # share the parameters so optimisers and DDP see one tensor
                    new.weight, new.bias = child.weight, child.bias
                if child.track_running_stats:
                    new.running_mean, new.running_var = child.running_mean, child.running_var
                    new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(parent, name, new)
                swapped.append((parent, name, child))
    return swapped


def _restore_batchnorm(swapped: List[Tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, original in reversed(swapped):
        current = getattr(parent, name)
        if original.track_running_stats:  # buffers may have been replaced by a load
            original.running_mean = current.running_mean
            original.running_var = current.running_var
            original.num_batches_tracked = current.num_batches_tracked
        original.train(current.training)
        setattr(parent, name, original)


# -- distributed loss ---------------------------------------------------------------------------------
_BATCHED_KEYS = ("logits", "features")  # what Phase2Loss reads per image


def _gather_rows(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; this rank's rows keep their autograd graph."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.cat(parts)


def _global_loss(loss_fn: nn.Module, outputs: Dict[str, torch.Tensor], masks: torch.Tensor,
                 labels: torch.Tensor, world: int, rank: int):
    """The loss of the global batch, on every rank; gradients reach this rank's outputs only.

    DDP averages gradients over ranks, and each rank's gradient holds the terms of its own rows,
    so the backward pass uses ``world * loss`` and the average is the gradient of the global loss.
    """
    if world == 1:
        return loss_fn(outputs, masks, labels)
    local = masks.shape[0]
    gathered = {k: (_gather_rows(v, world, rank) if k in _BATCHED_KEYS and torch.is_tensor(v)
                    and v.shape[0] == local else v) for k, v in outputs.items()}
    return loss_fn(gathered, _gather_rows(masks, world, rank), _gather_rows(labels, world, rank))


# -- validation -----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset: Any, *, device: Union[str, torch.device] = "cpu",
                       limit: Optional[int] = None, amp_dtype: Optional[torch.dtype] = None,
                       progress: bool = False) -> Dict[str, Any]:
    """Single-scale, no-flip, no-CRF mIoU of a segmenter on a dataset with ground truth.

    Each image is CLIP-normalised, padded with the mean pixel to a multiple of the patch size,
    segmented, its logits bilinearly upsampled and cropped back, and the argmax scored against
    ``sample.gt_path`` (255 ignored) in one confusion matrix. For the paper's inference
    (multi-scale, flip, CRF) use ``vpl segment`` / :func:`vpl_plugin.phase2.segment_dataset`.

    Args:
        model: a :class:`~vpl_plugin.phase2.PrototypeSegmenter` (optionally DDP-wrapped).
        dataset: a dataset of :class:`~vpl_plugin.data.voc.Sample` with ``gt_path``.
        limit: first N images only.

    Returns:
        ``{"miou", "images", "per_class", ...}`` (:class:`~vpl_plugin.metrics.MeanIoU`).
    """
    from vpl_plugin.data.labels import read_label_png
    from vpl_plugin.data.voc import sample_image
    from vpl_plugin.metrics import MeanIoU

    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    patch = int(getattr(inner, "patch_size", 16))
    metric = MeanIoU(num_classes=int(inner.num_classes))
    ids = list(range(len(dataset)))[: limit if limit is not None else None]
    done = 0
    try:
        for i in progress_bar(ids, desc="val", enabled=progress, leave=False):
            sample = dataset[i]
            if sample.gt_path is None:
                continue
            with sample_image(dataset, sample) as img:  # pixel limit, 16-bit images, named errors
                image = np.asarray(img.convert("RGB"), dtype=np.float32)
            h, w = image.shape[:2]
            ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
            x = F.pad(normalize_image(image), (0, pw - w, 0, ph - h))[None].to(device)
            with _autocast(device, amp_dtype):
                logits = inner(x)["logits"]
            logits = F.interpolate(logits.float(), size=(ph, pw), mode="bilinear", align_corners=False)
            pred = logits[0, :, :h, :w].argmax(0).cpu().numpy()
            metric.update(pred, read_label_png(sample.gt_path, int(inner.num_classes), what="ground truth"))
            done += 1
    finally:
        inner.train(was_training)
    result = metric.compute()
    result.pop("confusion", None)
    return {"miou": float(result["miou"]), "images": done,
            **{k: v for k, v in result.items() if k not in ("miou",)}}


#: device types whose forward runs under autocast when ``amp`` is on. Only CUDA by default; tests
#: add ``"cpu"`` to run the CUDA branch (bf16 autocast) on a machine without a GPU.
AUTOCAST_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)


def amp_dtype_for(config: "TrainConfig", device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype of a run (``None``: full fp32): ``config.amp_dtype`` when ``config.amp``
    and the device type is in :data:`AUTOCAST_DEVICE_TYPES`. On a CPU only bf16 is used."""
    kind = torch.device(device).type
    if not config.amp or kind not in AUTOCAST_DEVICE_TYPES:
        return None
    if kind != "cuda":
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[config.amp_dtype]


def _autocast(device: Union[str, torch.device], dtype: Optional[torch.dtype]):
    kind = torch.device(device).type
    enabled = dtype is not None and kind in AUTOCAST_DEVICE_TYPES
    return torch.autocast(device_type=kind if enabled else "cpu", dtype=dtype, enabled=enabled)


# -- curves -----------------------------------------------------------------------------------------------
def plot_curves(curves: Dict[str, List[Dict[str, float]]], path: Union[str, os.PathLike]) -> bool:
    """Draw loss / CE / RSC, learning rate and validation mIoU against iterations into a PNG.

    Returns:
        False (with a warning) when matplotlib is not installed, else True.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'vpl-plugin[viz]'); %s not drawn", path)
        return False
    train, val = curves.get("train") or [], curves.get("val") or []
    panels = 3 if val else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    it = [p["iteration"] for p in train]
    for key, style in (("loss", "-"), ("ce", "--"), ("rsc", ":")):
        axes[0].plot(it, [p[key] for p in train], style, label=key)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(it, [p["lr"] for p in train])
    axes[1].set_xlabel("iteration")
    axes[1].set_title("learning rate")
    if val:
        axes[2].plot([p["iteration"] for p in val], [100 * p["miou"] for p in val], "o-")
        axes[2].set_xlabel("iteration")
        axes[2].set_title("validation mIoU (%, single scale)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


# -- state ------------------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    """The global RNG states as plain data (tensors, numbers, strings): loads with weights_only."""
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"algorithm": str(algorithm), "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version),
                        "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`_rng_state`'s output (or the numpy / python tuples older states hold)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["algorithm"], np_state["key"].numpy().astype(np.uint32),
                    np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    py_state = state["python"]
    if isinstance(py_state, dict):
        py_state = (py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()),
                    py_state["gauss_next"])
    random.setstate(py_state)
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # a different number of GPUs
            log.warning("CUDA RNG states not restored (different devices)")


def _describe_loss(loss_fn: nn.Module) -> Dict[str, Any]:
    out: Dict[str, Any] = {"class": type(loss_fn).__name__}
    for name, value in sorted(vars(loss_fn).items()):
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)):
            out[name] = value
    for name, child in loss_fn.named_children():
        out[name] = _describe_loss(child)
    return out


def load_train_state(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a ``last.pt`` training state (for inspection; :func:`train_segmenter` resumes from it).

    The state is plain data read with ``torch.load(weights_only=True)``; nothing in the file is
    executed. States written by earlier versions (numpy's RNG state as a numpy array) still load;
    a file that asks for any other Python object is refused with
    :class:`~vpl_plugin._unpickle.UnsafeFileError`.
    """
    from vpl_plugin._unpickle import load_weights_only

    state = load_weights_only(path, kind="phase-2 training state",
                              hint="Use another --out, or --no-resume (resume=False) to start over "
                                   "and overwrite it.")
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a phase-2 training state (no format tag {_STATE_FORMAT!r}); "
                         f"use another --out, or --no-resume to overwrite it.")
    return state


def _describe_model(model: nn.Module) -> Dict[str, Any]:
    """What a resumed run must share with the saved one: decoder config, prototypes, backbone."""
    import hashlib

    out: Dict[str, Any] = {}
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        out["decoder"] = config.to_dict()
    protos = getattr(model, "prototypes", None)
    if isinstance(protos, torch.Tensor):
        out["prototypes_sha1"] = hashlib.sha1(protos.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "fingerprint"):
        out["backbone"] = backbone.fingerprint()
    numerics = getattr(getattr(backbone, "encoder", None), "numerics", None)
    if numerics is not None:  # absent from states of earlier versions: not compared there
        out["backbone_numerics"] = numerics.name
    return out


def _check_resumable(path: Path, state: Dict[str, Any], config: TrainConfig, loss_desc: Dict[str, Any],
                     model_desc: Dict[str, Any]) -> None:
    saved, now = state["config"], config.to_dict()
    diff = settings_diff(saved, now, _RUN_FIELDS)
    if state.get("loss") != loss_desc:
        diff["loss"] = (state.get("loss"), loss_desc)
    for k, v in model_desc.items():  # another decoder, prototype set or backbone
        if state.get("model", {}).get(k, v) != v:
            diff[f"model {k}"] = (state["model"][k], v)
    if diff:
        text = describe_diff(diff)
        hint = ""
        if "model backbone" in diff and model_desc.get("backbone_numerics") == "upstream" \
                and "backbone_numerics" not in state.get("model", {}):
            hint = (" A run of an earlier version computed its CLIP backbone in exact fp32 (then the "
                    "default): `vpl train --exact-fp32` continues it.")
        raise ValueError(f"{path} was written by a run with other settings ({text}); resuming would "
                         f"not continue that run.{hint} Use another --out, delete it, or pass resume=False "
                         f"(`vpl train --no-resume`) to start over.")


def _resume(state_path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, loss_desc: Dict[str, Any], model_desc: Dict[str, Any],
            main: bool) -> Tuple[int, float, Dict[str, Any], Dict[str, Any]]:
    """Restore a run from ``last.pt`` (refused when written under other settings): the decoder,
    optimiser, scaler and RNG states; returns ``(iteration, seconds, curves, window)``."""
    state = load_train_state(state_path)
    _check_resumable(state_path, state, config, loss_desc, model_desc)
    model.load_decoder_state_dict(state["decoder"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    start, seconds = int(state["iteration"]), float(state["seconds"])
    if main:
        log.info("resuming from %s at iteration %d of %d", state_path, start, config.iterations)
    return start, seconds, state["curves"], state["window"]


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, without DDP's buffer broadcasts."""
    import inspect

    ddp = nn.parallel.DistributedDataParallel
    # buffers are synchronised at construction (rank 0's) and kept equal by GlobalBatchNorm
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def _train_step(net: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                batch: Dict[str, torch.Tensor], *, lr: float, device: torch.device,
                amp_dtype: Optional[torch.dtype], world: int, rank: int,
                iteration: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """One optimisation step at learning rate ``lr``: forward (under autocast), the loss over the
    global batch in float32, backward and step; refuses a non-finite loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = batch["images"].to(device, non_blocking=True)
    masks = batch["masks"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with _autocast(device, amp_dtype):
        outputs = net(images)
    with torch.autocast(device_type=device.type, enabled=False):
        outputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in outputs.items()}
        value, parts = _global_loss(loss, outputs, masks, labels, world, rank)
    if not torch.isfinite(value.detach()):
        raise ValueError(f"non-finite loss {float(value)} at iteration {iteration + 1} "
                         f"(ce {parts.get('ce')}, rsc {parts.get('rsc')}); lower --lr, or "
                         f"use --amp-dtype bf16 / --no-amp.")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value * world).backward()
    scaler.step(optimizer)
    scaler.update()
    return value, parts


# -- training -------------------------------------------------------------------------------------------
def train_segmenter(model: nn.Module, dataset: Any, out: Union[str, os.PathLike], *,
                    config: Optional[TrainConfig] = None, loss: Optional[nn.Module] = None,
                    val_dataset: Any = None, device: Union[str, torch.device] = "cpu",
                    resume: bool = True, progress: bool = True,
                    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
                    save_final: bool = True) -> Dict[str, Any]:
    """Train the decoder of ``model`` on pseudo masks; resumable; DDP under torchrun.

    See ``docs/vpl.md#training-recipe``.

    Args:
        model: a :class:`~vpl_plugin.phase2.PrototypeSegmenter` (moved to ``device``; its decoder
            is trained in place).
        dataset: a :class:`~vpl_plugin.phase2.data.PseudoMaskDataset` (anything with ``__len__``,
            ``load(i)``, ``labels(i)``).
        out: output folder (``last.pt``, ``segmenter.pt``, ``curves.json``, ``curves.png``).
        config: :class:`TrainConfig` (default: its defaults).
        loss: the criterion, called ``loss(outputs, masks, labels) -> (loss, {"ce", "rsc"})``;
            default ``Phase2Loss()`` (CE + RSC, weights 1 and 1, tau_RSC 0.07).
        val_dataset: optional dataset of samples with ground truth for mIoU curves
            (:func:`evaluate_segmenter`, rank 0).
        device: ``"cpu"`` or ``"cuda"``; under torchrun each rank uses ``cuda:LOCAL_RANK``.
        resume: continue from ``out/last.pt`` when it exists (its settings must match).
        progress: show a progress bar (rank 0) with loss, learning rate and ETA.
        on_step: called as ``on_step(iteration, values)`` after each completed iteration (1-based;
            values: loss, ce, rsc, lr); an exception raised there stops training (tests use it to
            simulate a kill).
        save_final: write ``segmenter.pt`` at the end.

    Returns:
        ``{"iteration", "seconds", "curves", "final": {loss, ce, rsc}, "paths": {...}}``.

    Raises:
        ValueError: bad settings, a ``last.pt`` from a run with other settings, or a non-finite loss.
    """
    config = TrainConfig() if config is None else config
    env = init_distributed(str(device))
    world, rank = env.world_size, env.rank
    device = torch.device(device)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    batch_positions(0, config.batch_size, world, rank)  # raises unless batch % world == 0
    patch = getattr(model, "patch_size", None)
    if patch and config.crop % int(patch):
        raise ValueError(f"crop ({config.crop}) must be a multiple of the backbone's patch size "
                         f"({patch}); e.g. {max(1, round(config.crop / patch)) * patch}.")
    if loss is None:
        from vpl_plugin.phase2.losses import Phase2Loss

        loss = Phase2Loss()
    amp_dtype = amp_dtype_for(config, device)
    out = Path(out)
    main = rank == 0
    state_path, curves_path = out / "last.pt", out / "curves.json"
    if main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # same on every rank: random choices in the loss agree
    model.to(device)
    loss.to(device)
    swapped = convert_global_batchnorm(model) if env.distributed else []
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_desc = _describe_loss(loss)
    model_desc = _describe_model(model)

    start, seconds = 0, 0.0
    curves: Dict[str, List[Dict[str, float]]] = {"train": [], "val": []}
    window = {"loss": 0.0, "ce": 0.0, "rsc": 0.0, "n": 0}
    if resume and state_path.exists():
        start, seconds, curves, window = _resume(state_path, config, model, optimizer, scaler, loss_desc,
                                                 model_desc, main)
    elif main and state_path.exists():
        log.info("not resuming: %s will be overwritten", state_path)

    net: nn.Module = _wrap_ddp(model, device) if env.distributed else model
    model.train()

    stream = TrainStream(dataset, crop=config.crop, seed=config.seed,
                         scale_range=config.scale_range, flip=config.flip)
    sampler = IterationBatchSampler(start, config.iterations, config.batch_size, world, rank)
    # its own generator: creating the iterator must not draw from the global RNG restored above
    loader = torch.utils.data.DataLoader(stream, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(config.seed))

    def save_state(iteration: int) -> None:
        if not main:
            return
        state = {"format": _STATE_FORMAT, "iteration": iteration, "seconds": seconds,
                 "decoder": model.decoder_state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "config": config.to_dict(), "loss": loss_desc, "model": model_desc,
                 "curves": curves, "window": window,
                 "rng": _rng_state(), "world_size": world}
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)
        write_json(curves_path, {"config": config.to_dict(), "loss": loss_desc, **curves})
        plot_curves(curves, out / "curves.png")

    def validate(iteration: int) -> None:
        if val_dataset is not None and main:
            result = evaluate_segmenter(model, val_dataset, device=device, limit=config.eval_limit,
                                        amp_dtype=amp_dtype)
            curves["val"].append({"iteration": iteration, "miou": result["miou"]})
            log.info("iteration %d: validation mIoU %.2f on %d images", iteration,
                     100 * result["miou"], result["images"])
        barrier()

    bar = progress_bar(total=config.iterations, initial=start, desc="vpl train",
                       enabled=progress and main)
    last = {"loss": float("nan"), "ce": float("nan"), "rsc": float("nan")}
    iteration = start
    tick = time.perf_counter()
    try:
        for batch in loader:
            lr = poly_lr(config.lr, iteration, config.iterations, config.poly_power)
            value, parts = _train_step(net, loss, optimizer, scaler, batch, lr=lr, device=device,
                                       amp_dtype=amp_dtype, world=world, rank=rank, iteration=iteration)
            iteration += 1
            now = time.perf_counter()
            seconds += now - tick
            tick = now
            last = {"loss": float(value.detach()), "ce": float(parts.get("ce", float("nan"))),
                    "rsc": float(parts.get("rsc", float("nan")))}
            for key in ("loss", "ce", "rsc"):
                window[key] += last[key]
            window["n"] += 1
            if window["n"] == config.log_every or iteration == config.iterations:
                n = window["n"]
                curves["train"].append({"iteration": iteration, "lr": lr, "seconds": round(seconds, 3),
                                        **{k: window[k] / n for k in ("loss", "ce", "rsc")}})
                if bar is None and main:
                    log.info("iteration %d/%d: loss %.4f (ce %.4f, rsc %.4f), lr %.2e", iteration,
                             config.iterations, window["loss"] / n, window["ce"] / n,
                             window["rsc"] / n, lr)
                window = {"loss": 0.0, "ce": 0.0, "rsc": 0.0, "n": 0}
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}",
                                rsc=f"{last['rsc']:.3f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if config.eval_every and iteration % config.eval_every == 0 and iteration < config.iterations:
                validate(iteration)
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                if iteration == config.iterations:
                    validate(iteration)
                save_state(iteration)
                barrier()
                tick = time.perf_counter()  # checkpoint time is not training time
            if on_step is not None:
                on_step(iteration, {**last, "lr": lr})
    finally:
        if bar is not None:
            bar.close()
        if swapped:
            _restore_batchnorm(swapped)

    if start >= config.iterations and main:  # nothing left to run: refresh the outputs
        write_json(curves_path, {"config": config.to_dict(), "loss": loss_desc, **curves})
        plot_curves(curves, out / "curves.png")
    paths = {"state": str(state_path), "curves": str(curves_path), "plot": str(out / "curves.png")}
    if save_final and main:
        from vpl_plugin.phase2.decoder import save_segmenter

        save_segmenter(out / "segmenter.pt", model,
                       extra={"train_config": config.to_dict(), "loss": loss_desc,
                              "iteration": iteration, "world_size": world, "seconds": seconds})
        paths["segmenter"] = str(out / "segmenter.pt")
    barrier()
    final = curves["train"][-1] if curves["train"] else last
    return {"iteration": iteration, "seconds": seconds, "curves": curves,
            "final": {k: final.get(k) for k in ("loss", "ce", "rsc")},
            "val": curves["val"][-1] if curves["val"] else None, "paths": paths}
