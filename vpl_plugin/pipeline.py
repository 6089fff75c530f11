"""Dataset-level stages: CAM generation, VPL learning-set collection and prototype learning.

Each stage is resumable and never loses finished work: CAM files are written atomically and a
rerun skips images whose file exists; per-image failures (unreadable image, missing annotation,
unknown class) are recorded with the file and the reason, and the run goes on with the rest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vpl_plugin._io import save_npy_dict, write_json
from vpl_plugin.data.voc import DatasetError, load_image
from vpl_plugin.prototypes import PrototypeSet, build_targets, learn_vision_prototypes

__all__ = ["RunSummary", "collect_learning_set", "generate_cams", "learn_from_dataset", "LearningSet"]


@dataclass
class RunSummary:
    """What a dataset stage did: counts and the images it had to skip, with reasons."""

    total: int = 0
    done: int = 0
    skipped_existing: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "done": self.done, "skipped_existing": self.skipped_existing,
                "failed": [{"id": i, "reason": r} for i, r in self.failed], "seconds": round(self.seconds, 2)}

    def line(self) -> str:
        return (f"{self.done} done, {self.skipped_existing} already there, {len(self.failed)} failed "
                f"of {self.total} in {self.seconds:.1f} s")


def _bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


def generate_cams(adapter, dataset, out_dir: Union[str, os.PathLike], *, limit: Optional[int] = None,
                  skip_existing: bool = True, progress: bool = True, rank: int = 0,
                  world_size: int = 1) -> RunSummary:
    """Write ``<out_dir>/<id>.npy`` (upstream CLIP-ES format) for every image of ``dataset``.

    Args:
        adapter: a :class:`~vpl_plugin.adapters.CAMAdapter`.
        dataset: a :class:`~vpl_plugin.data.voc.VOCDataset` (or any indexable of samples).
        limit: only the first ``limit`` images of the list.
        skip_existing: resume: images whose output exists are not recomputed.
        rank, world_size: process only every ``world_size``-th image starting at ``rank``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = _shard(n, rank, world_size)
    summary = RunSummary(total=len(indices))
    start = time.time()
    for i in _bar(indices, len(indices), "cams", progress):
        image_id = dataset.ids[i]
        target = out_dir / f"{image_id}.npy"
        if skip_existing and target.exists():
            summary.skipped_existing += 1
            continue
        try:
            sample = dataset[i]
            out = adapter(load_image(sample.image_path), sample.labels)
        except (DatasetError, OSError, ValueError) as err:
            summary.failed.append((image_id, str(err)))
            continue
        save_npy_dict(target, out.to_upstream())
        summary.done += 1
    summary.seconds = time.time() - start
    return summary


@dataclass
class LearningSet:
    """Pixel features, targets and candidates of VPL phase 1 (spec ``vpl.md`` sections 3-4).

    Attributes:
        features: list of ``(n_i, D)`` tensors (float16) or a ``(K, D)`` memmap.
        targets: list of ``(n_i, N)`` float32 tensors or a ``(K, N)`` memmap.
        candidates: list of ``(N,)`` bool tensors (one per image) or a ``(K, N)`` bool memmap.
        seeds: list of ``(n_i,)`` seed labels (0 bg, c+1 class c) for the gap measure.
        ids: image ids in order.
    """

    features: Any
    targets: Any
    candidates: Any
    seeds: List[torch.Tensor]
    ids: List[str]

    @property
    def num_pixels(self) -> int:
        return int(sum(s.numel() for s in self.seeds))


def collect_learning_set(adapter, dataset, *, phi: float = 0.4, target_mode: str = "seed_hardened",
                         candidates: str = "image", seed_source: str = "gradcam",
                         limit: Optional[int] = None, progress: bool = True,
                         summary: Optional[RunSummary] = None) -> LearningSet:
    """One pass with text prototypes: pixel features, text GradCAM seeds and target distributions.

    Args:
        adapter: a CLIP-ES-style adapter holding text prototypes.
        phi: seed threshold on the GradCAM (0.4).
        target_mode: ``seed_hardened`` (Q-A), ``inmap`` (Q-B), ``cam`` (Q-C), ``kl`` (Q-D).
        candidates: ``image`` (GT classes + background, like CLIP-ES's softmax) or ``all``.
        seed_source: ``gradcam`` (raw map, the default reading) or ``refined`` (CAA map at patch
            resolution).
    """
    text = adapter.text_prototypes
    tau_text = 1.0 / float(text.logit_scale)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    summary = summary if summary is not None else RunSummary()
    summary.total = n
    feats, targets, cands, seeds, ids = [], [], [], [], []
    start = time.time()
    for i in _bar(range(n), n, "features", progress):
        image_id = dataset.ids[i]
        try:
            sample = dataset[i]
            x, _ = adapter.encoder.preprocess(load_image(sample.image_path))
            labels = list(sample.labels)
            result = adapter.gradcams(x, labels, prototypes=text)
        except (DatasetError, OSError, ValueError) as err:
            summary.failed.append((image_id, str(err)))
            continue
        maps = adapter.fuse(result, labels)
        if seed_source == "refined":
            maps = adapter.refine(result, maps)
        elif seed_source != "gradcam":
            raise ValueError(f"seed_source must be 'gradcam' or 'refined'; got {seed_source!r}.")
        flat = maps.reshape(len(labels), -1).float()
        q, cand = build_targets(result.features, text.prototypes, flat,
                                torch.as_tensor(labels, dtype=torch.long), text.num_fg, phi=phi,
                                tau_text=tau_text, mode=target_mode, candidates=candidates)
        best, arg = (flat.max(dim=0) if len(labels) else (torch.zeros(flat.shape[1]), None))
        seed = torch.zeros(flat.shape[1], dtype=torch.long)
        if len(labels):
            seed = torch.where(best > phi, torch.as_tensor(labels)[arg] + 1, seed)
        feats.append(result.features.half())
        targets.append(q.float())
        cands.append(cand.bool())
        seeds.append(seed)
        ids.append(image_id)
        summary.done += 1
    summary.seconds = time.time() - start
    return LearningSet(feats, targets, cands, seeds, ids)


def learn_from_dataset(adapter, learning_set: LearningSet, *, tau: Union[float, str] = 0.03,
                       lr: float = 10.0, iters: int = 3000, step_rule: Optional[str] = None,
                       level: str = "instance", chunk_size: int = 65536, device: Optional[str] = None,
                       progress: bool = True, provenance: Optional[dict] = None
                       ) -> Tuple[PrototypeSet, Dict[str, Any]]:
    """Learn vision prototypes from a :class:`LearningSet`, initialised at the text prototypes.

    Args:
        tau: ``tau_I`` (0.03), or ``"clip"`` for CLIP's own temperature (then the set carries
            CLIP's exact logit scale, so zero iterations reproduce the text CAMs exactly).

    Returns:
        the :class:`PrototypeSet` and the optimisation history.
    """
    text = adapter.text_prototypes
    scale_override = None
    if isinstance(tau, str):
        if tau != "clip":
            raise ValueError(f"tau must be a positive number or 'clip'; got {tau!r}.")
        scale_override = float(text.logit_scale)
        tau_value = 1.0 / scale_override
    else:
        tau_value = float(tau)
    if not learning_set.ids:
        raise ValueError("the learning set is empty: no image could be processed (see the failures).")
    kwargs = {} if step_rule is None else {"step_rule": step_rule}
    feats = [f.float() for f in learning_set.features] if isinstance(learning_set.features, list) \
        else learning_set.features
    w, history = learn_vision_prototypes(
        feats, learning_set.targets, text.prototypes, learning_set.candidates, tau=tau_value, lr=lr,
        iters=iters, level=level, tau_text=1.0 / float(text.logit_scale), chunk_size=chunk_size,
        device=device, progress=progress, return_history=True, **kwargs)
    record = {
        "tau": tau_value, "lr": lr, "iters": iters, "level": level,
        "step_rule": step_rule or "default", "images": len(learning_set.ids),
        "pixels": learning_set.num_pixels, "text_model": text.provenance.get("model"),
        "final_loss": float(history["loss"][-1]) if history.get("loss") else None,
        "initial_loss": float(history["loss"][0]) if history.get("loss") else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record.update(provenance or {})
    ps = PrototypeSet(w, text.class_names, text.background_names, tau=tau_value, kind="vision",
                      provenance=record, logit_scale_override=scale_override)
    return ps, history
