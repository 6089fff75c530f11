"""The demo's learning sets: probes of the learning scenes and the targets VPL learns from.

A :class:`Probe` is what one text-prototype CLIP-ES pass over a scene leaves: the patch features,
the text GradCAMs, the image-level labels (and, for controls that use masks, the ground-truth
label of each token). The learning sets built from probes are the paper's seed-hardened targets
(:func:`seed_targets`), the region-pooled set of the recommended configuration
(:func:`region_targets`) and the ground-truth control (:func:`gt_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch

from vpl_plugin.demo.evaluation import scene_tensor
from vpl_plugin.prototypes import (
    PrototypeSet,
    build_targets,
    learn_vision_prototypes,
    region_pool,
    seeds_from_cams,
)

__all__ = ["Probe", "class_centroids", "gt_targets", "probe_scenes", "recommended_prototypes", "region_targets",
           "seed_labels", "seed_targets", "token_labels"]

LearningSet = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # features, targets, candidates


@dataclass
class Probe:
    """One scene's text-prototype pass."""

    features: torch.Tensor  # (n, D)
    cams: torch.Tensor  # (k, h, w) text GradCAMs
    labels: Tuple[int, ...]
    token_labels: torch.Tensor  # (n,) GT label per token (majority; -1 void), 0 bg, c+1


def token_labels(mask: np.ndarray, grid: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth label per token of an ``h x w`` grid: the majority label of its pixels (void
    pixels left out; ``-1`` where all are void)."""
    h, w = grid
    s = mask.shape[0] // h
    blocks = mask.reshape(h, s, w, s).transpose(0, 2, 1, 3).reshape(h * w, s * s)
    out = np.full(h * w, -1, np.int64)
    for i, row in enumerate(blocks):
        vals = row[row != 255]
        if vals.size:
            out[i] = np.bincount(vals).argmax()
    return torch.from_numpy(out)


def probe_scenes(adapter: Any, scenes: Sequence[Any]) -> List[Probe]:
    """One :class:`Probe` per scene, from ``adapter``'s text-prototype GradCAMs."""
    text = adapter.text_prototypes
    probes = []
    for sc in scenes:
        x = scene_tensor(sc.image)
        res = adapter.gradcams(x, list(sc.labels), prototypes=text)
        probes.append(Probe(res.features, res.cams, sc.labels, token_labels(sc.mask, res.grid)))
    return probes


def seed_targets(probes: List[Probe], text: PrototypeSet, phi: float, mode: str = "seed_hardened") -> LearningSet:
    """The paper's learning set: :func:`~vpl_plugin.prototypes.build_targets` per scene."""
    feats, targets, cands = [], [], []
    tau_text = 1.0 / float(text.logit_scale)
    for p in probes:
        q, c = build_targets(p.features, text.prototypes, p.cams.reshape(len(p.labels), -1),
                             torch.tensor(p.labels, dtype=torch.long), text.num_fg, phi=phi,
                             tau_text=tau_text, mode=mode)
        feats.append(p.features)
        targets.append(q)
        cands.append(c[None].expand(q.shape[0], -1))
    return torch.cat(feats), torch.cat(targets), torch.cat(cands)


def gt_targets(probes: List[Probe], text: PrototypeSet) -> LearningSet:
    """Targets from ground-truth token labels (upper-bound control): one-hot on things, the text
    background distribution on background tokens, void tokens dropped."""
    feats, targets, cands = [], [], []
    tau_text = 1.0 / float(text.logit_scale)
    nf = text.num_fg
    for p in probes:
        keep = p.token_labels >= 0
        x = p.features[keep]
        lab = p.token_labels[keep]
        cand = torch.zeros(text.prototypes.shape[0], dtype=torch.bool)
        cand[list(p.labels)] = True
        cand[nf:] = True
        logits = (x @ text.prototypes[nf:].t()) / tau_text
        q = torch.zeros(x.shape[0], text.prototypes.shape[0])
        q[:, nf:] = logits.softmax(dim=-1)
        fg = lab > 0
        q[fg] = 0
        q[fg, lab[fg] - 1] = 1
        feats.append(x)
        targets.append(q)
        cands.append(cand[None].expand(x.shape[0], -1))
    return torch.cat(feats), torch.cat(targets), torch.cat(cands)


def region_targets(probes: List[Probe], text: PrototypeSet, phi: float) -> LearningSet:
    """Region-pooled learning set (:func:`~vpl_plugin.prototypes.region_pool` per scene)."""
    tau_text = 1.0 / float(text.logit_scale)
    rows = [region_pool(p.features, seeds_from_cams(p.cams.reshape(len(p.labels), -1), phi),
                        torch.tensor(p.labels, dtype=torch.long), text.prototypes, text.num_fg,
                        tau_text=tau_text) for p in probes]
    x, q, c = (torch.cat(parts) for parts in zip(*rows))
    return x, q, c


def recommended_prototypes(probes: List[Probe], text: PrototypeSet, phi: float, lr: float,
                           iters: int) -> PrototypeSet:
    """The recommended VPL prototypes: region-pooled learning at tau_I 0.1 (``bb`` rule)."""
    x, q, c = region_targets(probes, text, phi)
    w = learn_vision_prototypes(x, q, text.prototypes, c, tau=0.1, lr=lr, iters=iters, step_rule="bb")
    assert isinstance(w, torch.Tensor)  # without return_history: the prototypes alone
    return PrototypeSet(w, text.class_names, text.background_names, tau=0.1, kind="vision")


def class_centroids(probes: List[Probe], text: PrototypeSet, backgrounds: List[int]) -> torch.Tensor:
    """Ground-truth class centroids (things by their tokens, background concepts by the tokens of
    scenes on that background); a class with no token keeps its text prototype."""
    w = text.prototypes.clone()
    nf = text.num_fg
    sums = torch.zeros_like(w)
    for p, bg in zip(probes, backgrounds):
        for c in set(int(v) for v in p.token_labels.tolist() if v > 0):
            sums[c - 1] += p.features[p.token_labels == c].sum(0)
        sums[nf + bg] += p.features[p.token_labels == 0].sum(0)
    has = sums.norm(dim=1) > 0
    w[has] = torch.nn.functional.normalize(sums[has], dim=1)
    return w


def seed_labels(p: Probe, phi: float) -> torch.Tensor:
    """Seed class per token (0-based), ``-1`` for background."""
    rows = seeds_from_cams(p.cams.reshape(len(p.labels), -1), phi)
    if not p.labels:
        return rows
    return torch.where(rows >= 0, torch.tensor(p.labels)[rows.clamp_min(0)], rows)
