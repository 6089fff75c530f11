"""Train the demo CLIP (OpenAI's architecture, small) from scratch on the synthetic scene world.

The image embedding during training is the CLS token, as in real CLIP (CLIP-ES later scores the
mean of the patch tokens, an untrained substitute, exactly as it does with real CLIP). The loss is
CLIP's symmetric contrastive loss in which every caption describing the same label set as the
image counts as a positive, with a learnable temperature. Batches are a deterministic function of
the seed and the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from vpl_plugin._cli_common import cli_option, positive_float, positive_int
from vpl_plugin._imports import require
from vpl_plugin._io import atomic_path, write_json
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.demo.evaluation import images_to_tensor, text_gradcam_seed_miou

__all__ = ["DemoCLIPConfig", "DemoTrainConfig", "build_demo_clip", "export_training_state", "images_to_tensor",
           "train_demo_clip"]


@dataclass(frozen=True)
class DemoCLIPConfig:
    """Architecture of the demo CLIP (arguments of ``clip.model.CLIP``).

    A 64x64 image with patch 8 gives an 8x8 token grid. Widths are multiples of 64 because
    ``clip.model.build_model`` infers 64-wide heads when it loads the checkpoint back.
    """

    embed_dim: int = 128
    image_resolution: int = 64
    vision_layers: int = field(default=6, metadata=cli_option(
        "--vision-layers", "ViT depth (default 6)", type=int, metavar="L"))
    vision_width: int = field(default=128, metadata=cli_option(
        "--vision-width", "ViT width, a multiple of 64 (default 128, the shipped model)", type=int, metavar="W"))
    patch_size: int = field(default=8, metadata=cli_option(
        "--patch-size", "ViT patch size: 8 gives the 64x64 scenes an 8x8 token grid, 4 a 16x16 grid at about "
                        "3x the time per step on a CPU (default 8; the shipped model uses 4)", type=int, metavar="P"))
    context_length: int = 32
    vocab_size: int = 49408
    transformer_width: int = 128
    transformer_heads: int = 2
    transformer_layers: int = 3


@dataclass
class DemoTrainConfig:
    """Training recipe (defaults sized for a CPU run in the background; raise ``steps`` on a GPU)."""

    # fields with `cli_option` metadata are `vpl train-clip` flags (flag, help, argparse type)
    steps: int = field(default=2500, metadata=cli_option(
        "--steps", "optimiser steps (default 2500)", type=positive_int))
    batch_size: int = field(default=128, metadata=cli_option(
        "--batch-size", "scenes per step; every caption of the same label set in the batch counts as a "
                        "positive (default 128)", type=positive_int))
    lr: float = field(default=1e-3, metadata=cli_option(
        "--lr", "AdamW peak learning rate, cosine schedule after 100 warm-up steps (default 1e-3)",
        type=positive_float))
    weight_decay: float = 0.05
    warmup: int = 100
    world_seed: int = 1
    seed: int = field(default=0, metadata=cli_option(
        "--seed", "weight-initialisation seed; the batches depend on the step only (default 0)", type=int))
    checkpoint_every: int = 250
    log_every: int = 25
    select_every: int = field(default=0, metadata=cli_option(
        "--select-every", "every N steps, score the model on held-out scenes of the training world (text "
                          "GradCAM seed mIoU, the demo's second gate) and save the best-scored state "
                          "instead of the last (default 0: the last)", type=int, metavar="N"))
    select_scenes: int = field(default=300, metadata=cli_option(
        "--select-scenes", "how many held-out scenes --select-every scores on (default 300)", type=int,
        metavar="N"))
    select_offset: int = 50_000_000

    def __post_init__(self) -> None:
        if self.select_every < 0:
            raise ValueError(f"select_every must be >= 0 (0: keep the last state); got {self.select_every}.")
        if self.select_scenes < 1:
            raise ValueError(f"select_scenes must be >= 1; got {self.select_scenes}.")
        if self.select_every and self.steps * self.batch_size > self.select_offset:
            raise ValueError(f"training draws scenes 0..{self.steps * self.batch_size - 1} of the world, which "
                             f"reaches the selection scenes at index {self.select_offset}; use fewer steps "
                             f"x batch size or raise select_offset.")


def build_demo_clip(config: DemoCLIPConfig = DemoCLIPConfig(), seed: int = 0) -> Any:  # clip.model.CLIP
    """A freshly initialised demo CLIP (fp32, trainable)."""
    from vpl_plugin.backbones import build_random_clip

    model = build_random_clip(seed=seed, **asdict(config))
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _batch(world, step: int, batch_size: int, context_length: int):
    clip = require("clip")
    scenes = world.batch(step * batch_size, batch_size)
    images = images_to_tensor([s.image for s in scenes])
    tokens = clip.tokenize([s.caption for s in scenes], context_length=context_length, truncate=True)
    sets = [frozenset(s.labels) for s in scenes]
    same = torch.tensor([[a == b for b in sets] for a in sets], dtype=torch.float32)
    return images, tokens, same


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where ``positives[i, j] = 1`` marks every caption that fits image ``i``.

    Args:
        image_emb, text_emb: ``(B, D)`` (normalised here).
        logit_scale: log of the inverse temperature (CLIP's parameter).
        positives: ``(B, B)`` 0/1 with a non-zero diagonal.
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    target_rows = positives / positives.sum(dim=1, keepdim=True)
    target_cols = positives.t() / positives.t().sum(dim=1, keepdim=True)
    loss_i = -(target_rows * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(target_cols * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def selection_score(state: Dict[str, torch.Tensor], scenes: List[Any]) -> float:
    """The demo's second quality gate (text-prototype GradCAM seed mIoU, no CAA, no CRF) of a CLIP
    given as an fp16 state dict, loaded exactly as ``load_clip`` loads the saved checkpoint."""
    from vpl_plugin.backbones.clip import CLIPDense, build_clip_from_state_dict

    encoder = CLIPDense(build_clip_from_state_dict(state), device="cpu")
    return text_gradcam_seed_miou(encoder, scenes)


def export_training_state(state_path: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Dict:
    """Write the checkpoint an unfinished ``vpl train-clip`` run would keep: the best-scored state
    when the run selects (``--select-every``), else the last saved one, as an fp16 state dict like
    the finished run writes. Returns ``{"step", "selected"}``.
    """
    saved = _load_state(state_path, "cpu")
    model = build_demo_clip(DemoCLIPConfig(**saved["arch"]))
    model.load_state_dict(saved["model"])
    best = saved.get("best")
    _save_kept(model, best, out)
    return {"step": best["step"] if best else saved["step"], "selected": best is not None}


def _load_state(state_path: Union[str, os.PathLike], device: Union[str, torch.device]) -> Dict:
    """Read a ``.train.pt`` state with ``torch.load(weights_only=True)``: nothing in it is executed.

    States are plain data (tensors, numbers, strings, lists, dicts); one that asks for any other
    Python object than numpy's arrays and scalars is refused
    (:class:`~vpl_plugin._unpickle.UnsafeFileError`).
    """
    from vpl_plugin._unpickle import load_weights_only

    return load_weights_only(state_path, map_location=device, kind="demo-CLIP training state",
                             hint="Delete it, or pass --no-resume (resume=False) to start over and "
                                  "overwrite it.")


def _save_kept(model, best: Optional[Dict], out: Union[str, os.PathLike]) -> None:
    """Save the checkpoint a run keeps: the best-scored state when it selects, else ``model``'s own."""
    from vpl_plugin.backbones import save_checkpoint

    if best is not None:
        model.load_state_dict(best["state"])
    save_checkpoint(model.half(), out)


class _StepBatches(torch.utils.data.Dataset):
    """The training batches of steps ``start, start + 1, ...`` (each a function of its step only)."""

    def __init__(self, world, start: int, stop: int, batch_size: int, context_length: int) -> None:
        self.world, self.start, self.stop = world, start, stop
        self.batch_size, self.context_length = batch_size, context_length

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int):
        return _batch(self.world, self.start + i, self.batch_size, self.context_length)


def _batches(world, start: int, config: DemoTrainConfig, context_length: int, workers: int, pin: bool):
    """Batches for steps ``start..config.steps - 1`` in order, drawn in ``workers`` processes
    (0: in this process). The batches do not depend on ``workers``."""
    data = _StepBatches(world, start, config.steps, config.batch_size, context_length)
    if workers == 0:
        return (data[i] for i in range(len(data)))
    return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                            pin_memory=pin, prefetch_factor=4))


def train_demo_clip(out: Union[str, os.PathLike], *, arch: DemoCLIPConfig = DemoCLIPConfig(),
                    config: DemoTrainConfig = DemoTrainConfig(), device: str = "cpu", resume: bool = True,
                    progress: bool = True, log: Optional[Callable[[str], None]] = print,
                    workers: int = 0) -> Dict:
    """Train the demo CLIP and save it to ``out`` (fp16 state dict, OpenAI format).

    A training state (fp32 weights, optimiser, step, curve) is checkpointed to ``<out>.train.pt``
    every ``checkpoint_every`` steps; with ``resume`` a rerun continues from it. The curve is
    written to ``<out>.curve.json``. ``workers`` data-loader processes draw the scenes ahead of
    the optimiser (0: in this process); they change the speed, never the batches or the weights.

    Returns:
        the training record (config, curve, seconds).
    """
    from vpl_plugin.data.synthetic import SceneWorld

    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: draw the scenes in this process); got {workers}.")
    out = Path(out)
    state_path = out.with_name(out.name + ".train.pt")
    world = SceneWorld(seed=config.world_seed)
    model = build_demo_clip(arch, config.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    step, curve, seconds = 0, [], 0.0
    selection: List[Dict] = []
    best: Optional[Dict] = None  # {"step", "score", "state" (fp16 state dict)}
    if resume and state_path.exists():
        saved = _load_state(state_path, device)
        free = ("steps", "checkpoint_every", "log_every")  # a resumed run may extend or log differently
        now = {k: v for k, v in asdict(config).items() if k not in free}
        # settings a state written by an older version lacks were at their defaults then
        then = {k: v for k, v in {**asdict(DemoTrainConfig()), **saved.get("config", asdict(config))}.items()
                if k not in free}
        if saved.get("arch", asdict(arch)) != asdict(arch) or then != now:
            raise ValueError(f"{state_path} was written by a run with different settings "
                             f"(arch {saved.get('arch')}, recipe {then}; this run: arch {asdict(arch)}, "
                             f"recipe {now}); delete it or pass resume=False (--no-resume) to start over.")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
        selection, best = saved.get("selection", []), saved.get("best")
        if log:
            log(f"resuming demo-CLIP training at step {step} from {state_path}")

    def lr_at(s: int) -> float:
        if s < config.warmup:
            return config.lr * (s + 1) / config.warmup
        t = (s - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def save_state() -> None:
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "curve": curve, "seconds": seconds, "arch": asdict(arch), "config": asdict(config),
                        "selection": selection, "best": best}, tmp)

    select_scenes = (world.batch(config.select_offset, config.select_scenes) if config.select_every else [])

    def select() -> None:
        nonlocal best
        model.eval()
        state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
                 for k, v in model.state_dict().items()}
        score = float(selection_score(state, select_scenes))  # plain data in the saved state
        model.train()
        selection.append({"step": step, "text_gradcam_seed_miou": round(score, 3)})
        if best is None or score > best["score"]:
            best = {"step": step, "score": score, "state": {k: v.clone() for k, v in state.items()}}
        if log:
            log(f"step {step}: text GradCAM seed mIoU {score:.2f} on {len(select_scenes)} selection scenes "
                f"(best {best['score']:.2f} at step {best['step']})")

    bar = progress_bar(total=config.steps, initial=step, desc="train-clip", enabled=progress)
    model.train()
    window: List[float] = []
    cuda = str(device).startswith("cuda")
    batches = _batches(world, step, config, arch.context_length, workers, pin=cuda)
    t0 = time.time()
    for images, tokens, same in batches:
        images, tokens, same = (t.to(device, non_blocking=True) for t in (images, tokens, same))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            img = model.encode_image(images)
            txt = model.encode_text(tokens)
        loss = contrastive_loss(img.float(), txt.float(), model.logit_scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        seconds += time.time() - t0
        last = loss.item()
        window.append(last)
        if step % config.log_every == 0 or step == config.steps:
            curve.append({"step": step, "loss": float(np.mean(window)), "seconds": round(seconds, 1),
                          "temperature": float(1 / model.logit_scale.detach().exp())})
            window = []
            if log and not bar:
                log(f"step {step}/{config.steps} loss {curve[-1]['loss']:.4f} ({seconds:.0f} s)")
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
        if config.select_every and (step % config.select_every == 0 or step == config.steps):
            select()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_state()
        t0 = time.time()  # the time of a step includes waiting for its batch, not scoring or saving
    if bar:
        bar.close()
    model.eval()
    _save_kept(model, best, out)
    record = {"arch": asdict(arch), "config": asdict(config), "curve": curve, "seconds": seconds,
              "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "selection": selection, "selected_step": best["step"] if best else config.steps}
    write_json(out.with_name(out.name + ".curve.json"), record)
    return record
