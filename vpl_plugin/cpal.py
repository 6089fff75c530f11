"""CLIP-CPAL's training-free core, as pure tensor functions (``docs/clip_cpal.md``).

CPAL (Tang et al., CVPR 2024) has no released code; every formula here is the project's
interpretation (``docs/clip_cpal.md#every-interpretation-and-its-switch``). The pieces, in the order
a CAM goes through them:

* :func:`instance_prototypes` - per class, the unit mean of the image's unit dense features
  weighted by ``G * 1[G >= delta_p]`` (``docs/clip_cpal.md#pass-1-the-context-bank``).
* :func:`spherical_kmeans` - per-class context prototypes from a bank of instance prototypes
  (cosine, k-means++ init, seeded).
* :func:`soft_neighbours` - top-``k`` context prototypes by cosine, softmax weights at ``tau_s``
  (``docs/clip_cpal.md#pass-2-the-fused-map``); with ``candidates="all"`` the weights of other
  classes' prototypes are zeroed.
* :func:`align_prototypes` - ``q = normalise(p + gamma * sum_m pi_m (c_m - p))``.
* :func:`prototype_maps` - ``ReLU(cos(F_k, q))``, max-normalised over tokens.
* :func:`fuse_maps` - ``maxnorm((G + S) / 2)`` (default) or ``maxnorm(max(G, S))``.
* :func:`context_aware_maps` - the above for one image's classes given a :class:`ContextBank`.

The trained-head alternative (``docs/clip_cpal.md#the-trained-head-alternative``): :func:`head_cams`
(1x1-conv head CAMs) and
:func:`train_cam_head` (``L_BCE + lambda * L_self`` on frozen dense features, PA-CAM targets
refreshed from an offline bank of the head's instance prototypes).

:class:`ContextBank` holds the instance prototypes of a split and their per-class k-means centres,
with the settings they were made under; it saves atomically and refuses, on load or use, a bank
made under other settings. :func:`build_context_bank` is pass 1 over a dataset (resumable).

Example:
    >>> import torch
    >>> from vpl_plugin.cpal import spherical_kmeans
    >>> x = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    >>> centres, assign = spherical_kmeans(x, 4, seed=0)
    >>> centres.shape, assign.shape
    (torch.Size([4, 8]), torch.Size([50]))
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from vpl_plugin._checks import check_choice, check_ndim, check_range, check_same, settings_diff
from vpl_plugin._io import atomic_path
from vpl_plugin._unpickle import check_tensor_sizes


__all__ = [
    "ContextBank",
    "align_prototypes",
    "context_aware_maps",
    "fuse_maps",
    "head_cams",
    "instance_prototypes",
    "max_normalise",
    "prototype_maps",
    "soft_neighbours",
    "spherical_kmeans",
    "tensor_fingerprint",
    "train_cam_head",
]

log = logging.getLogger("vpl_plugin")

_BANK_FORMAT = "vpl_plugin.cpal.ContextBank"
_BANK_VERSION = 1
_EPS = 1e-12


# -- functional core -------------------------------------------------------------------------------
def max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map by its maximum over the last two dims (an all-zero map stays zero).

    Args:
        maps: ``(..., h, w)`` non-negative maps.
    """
    peak = maps.flatten(-2).max(dim=-1).values[..., None, None]
    return torch.where(peak > 0, maps / peak.clamp_min(_EPS), torch.zeros_like(maps))


def spherical_kmeans(x: torch.Tensor, k: int, *, iters: int = 10, seed: int = 0
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine similarity) with k-means++ initialisation.

    Rows are L2-normalised first. Initialisation draws the first centre uniformly and each next
    one with probability proportional to ``1 - cos`` to the nearest chosen centre (a seeded
    generator, so the result depends on ``seed`` only). Each iteration assigns every row to its
    most similar centre and sets each centre to the normalised sum of its rows; a centre left
    without rows is moved to the row least similar to its own centre. Stops early when the
    assignment no longer changes.

    Args:
        x: ``(N, D)`` rows (need not be unit norm; zero rows are not allowed).
        k: number of centres; ``min(k, N)`` are returned.
        iters: Lloyd iterations (default 10).
        seed: seed of the initialisation.

    Returns:
        ``centres (min(k, N), D)`` unit rows and ``assign (N,)`` int64 centre index per row.
    """
    check_ndim("x", x, 2, "(N, D)")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    if int(iters) < 0:
        raise ValueError(f"iters must be >= 0; got {iters}.")
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0, x.shape[1]), torch.zeros(0, dtype=torch.long)
    norms = x.norm(dim=1)
    if bool((norms <= 0).any()):
        raise ValueError(f"x has {int((norms <= 0).sum())} zero rows; spherical k-means needs "
                         "directions (drop the zero rows).")
    x = x / norms[:, None]
    k = min(int(k), n)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    dist = (1 - x @ x[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        total = float(dist.sum())
        if total > 0:
            idx = int(torch.multinomial((dist / total).double().cpu(), 1, generator=gen))
        else:  # every row coincides with a chosen centre: take the first unused row
            idx = next(i for i in range(n) if i not in chosen)
        chosen.append(idx)
        dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
    centres = x[chosen].clone()
    assign = (x @ centres.t()).argmax(dim=1)
    for _ in range(int(iters)):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:  # move the rows least similar to their centres (from clusters of > 1 row)
            order = iter((x * centres[assign]).sum(dim=1).argsort().tolist())
            for j in empty:
                far = next(r for r in order if counts[assign[r]] > 1)
                old = int(assign[far])
                sums[old] -= x[far]
                counts[old] -= 1
                sums[j] = x[far]
                counts[j] = 1
                assign[far] = j
        centres = F.normalize(sums, dim=1)
        new = (x @ centres.t()).argmax(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


def instance_prototypes(features: torch.Tensor, cams: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """CPAL instance prototypes (anchors) of one image.

    ``p_c = normalise(sum_k w_c(k) F_k / sum_k w_c(k))`` with ``w_c = G_c * 1[G_c >= threshold]``
    and unit features ``F_k``.

    Args:
        features: ``(n, D)`` dense features of the ``n`` tokens (normalised here).
        cams: ``(k, n)`` or ``(k, h, w)`` maps in ``[0, 1]`` (``h * w = n``).
        threshold: ``delta_p`` (default 0.4, CLIP-ES's box threshold).

    Returns:
        ``(k, D)`` unit rows; a class whose map has no token at or above ``threshold`` gets a zero
        row (callers skip it).
    """
    check_ndim("features", features, 2, "(n, D)")
    flat = cams.reshape(cams.shape[0], -1) if cams.ndim == 3 else cams
    check_ndim("cams", flat, 2, "(k, n) or (k, h, w)")
    check_same("cams tokens", flat.shape[1], "features rows", features.shape[0],
               "The maps and the features must come from the same token grid.")
    feats = F.normalize(features.to(flat.dtype), dim=1)
    weights = flat * (flat >= threshold).to(flat.dtype)
    mass = weights.sum(dim=1, keepdim=True)
    pooled = (weights @ feats) / mass.clamp_min(_EPS)
    return torch.where(mass > 0, F.normalize(pooled, dim=1), torch.zeros_like(pooled))


def soft_neighbours(prototypes: torch.Tensor, context: torch.Tensor, *, k: int = 3, tau: float = 0.1,
                    classes: Optional[torch.Tensor] = None,
                    context_classes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft positive neighbour weights of each instance prototype over the context prototypes.

    ``sigma_m = cos(p, c_m)``; the ``k`` most similar context prototypes form the neighbour set
    ``N``; ``pi_m = softmax_{m in N}(sigma_m / tau)``, zero outside ``N``. Given ``classes`` and
    ``context_classes`` (candidates from all classes), ``pi_m`` is then multiplied by
    ``1[class(m) = class(p)]`` without renormalising, so the weights sum to the positive share of
    the neighbour set (one when all neighbours are of the prototype's class).

    Args:
        prototypes: ``(B, D)`` instance prototypes.
        context: ``(M, D)`` context prototypes (candidates).
        k: neighbours kept (``min(k, M)``).
        tau: positive-score temperature ``tau_s``.
        classes: ``(B,)`` class of each prototype (only with ``context_classes``).
        context_classes: ``(M,)`` class of each context prototype.

    Returns:
        ``(B, M)`` weights, each row summing to one (same-class candidates) or less.
    """
    check_ndim("prototypes", prototypes, 2, "(B, D)")
    check_ndim("context", context, 2, "(M, D)")
    check_same("context dim", context.shape[1], "prototypes dim", prototypes.shape[1])
    if int(k) < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    check_range("tau", float(tau), 0.0, low_open=True)
    if (classes is None) != (context_classes is None):
        raise ValueError("give both classes and context_classes (candidates from all classes) or neither.")
    b, m = prototypes.shape[0], context.shape[0]
    weights = prototypes.new_zeros(b, m)
    if m == 0 or b == 0:
        return weights
    sims = F.normalize(prototypes, dim=1) @ F.normalize(context.to(prototypes.dtype), dim=1).t()
    top = sims.topk(min(int(k), m), dim=1)
    weights.scatter_(1, top.indices, (top.values / tau).softmax(dim=1))
    if classes is not None:
        assert context_classes is not None  # both or neither, checked above
        same = classes.reshape(-1, 1).to(torch.long) == context_classes.reshape(1, -1).to(torch.long)
        weights = weights * same.to(weights.dtype)
    return weights


def align_prototypes(prototypes: torch.Tensor, context: torch.Tensor, weights: torch.Tensor,
                     gamma: float = 0.5) -> torch.Tensor:
    """Shift each instance prototype toward its soft positive context (feature alignment).

    ``delta = sum_m pi_m (c_m - p)`` (``= c_hat - p`` when the weights sum to one) and
    ``q = normalise(p + gamma * delta)``. ``gamma = 0`` returns the (normalised) instance
    prototype, ``gamma = 1`` the normalised weighted context when the weights sum to one.

    Args:
        prototypes: ``(B, D)`` instance prototypes ``p``.
        context: ``(M, D)`` context prototypes ``c``.
        weights: ``(B, M)`` from :func:`soft_neighbours`.
        gamma: shift strength.

    Returns:
        ``(B, D)`` aligned prototypes ``q`` (a zero ``p`` with no neighbour stays zero).
    """
    check_ndim("prototypes", prototypes, 2, "(B, D)")
    check_ndim("context", context, 2, "(M, D)")
    check_ndim("weights", weights, 2, "(B, M)")
    check_same("weights rows", weights.shape[0], "prototypes rows", prototypes.shape[0])
    check_same("weights columns", weights.shape[1], "context rows", context.shape[0])
    check_range("gamma", float(gamma), 0.0)
    ctx = context.to(prototypes.dtype)
    delta = weights.to(prototypes.dtype) @ ctx - weights.sum(dim=1, keepdim=True).to(prototypes.dtype) * prototypes
    return F.normalize(prototypes + float(gamma) * delta, dim=1, eps=_EPS)


def prototype_maps(features: torch.Tensor, prototypes: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``S_c(k) = ReLU(cos(F_k, q_c))``, max-normalised over the tokens of each class.

    Args:
        features: ``(n, D)`` dense features (normalised here).
        prototypes: ``(k, D)`` aligned prototypes.
        grid: ``(h, w)`` with ``h * w = n``.

    Returns:
        ``(k, h, w)`` maps in ``[0, 1]``.
    """
    check_ndim("features", features, 2, "(n, D)")
    check_ndim("prototypes", prototypes, 2, "(k, D)")
    check_same("prototypes dim", prototypes.shape[1], "features dim", features.shape[1])
    h, w = int(grid[0]), int(grid[1])
    check_same("grid h * w", h * w, "features rows", features.shape[0])
    sims = F.normalize(features, dim=1) @ F.normalize(prototypes.to(features.dtype), dim=1, eps=_EPS).t()
    return max_normalise(sims.clamp_min(0).t().reshape(-1, h, w))


def fuse_maps(cams: torch.Tensor, maps: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """PA-CAM fusion of the GradCAMs with the prototype maps, max-normalised per class.

    Args:
        cams: ``(k, h, w)`` GradCAMs ``G`` in ``[0, 1]``.
        maps: ``(k, h, w)`` prototype maps ``S``.
        mode: ``"mean"`` (``maxnorm((G + S) / 2)``, the default) or ``"max"``.

    Returns:
        ``(k, h, w)`` maps whose maximum is 1 (or all zero).
    """
    check_choice("mode", mode, ("mean", "max"))
    if cams.shape != maps.shape:
        raise ValueError(f"cams {tuple(cams.shape)} and maps {tuple(maps.shape)} must have the same "
                         "(k, h, w) shape.")
    fused = (cams + maps) / 2 if mode == "mean" else torch.maximum(cams, maps)
    return max_normalise(fused)


def context_aware_maps(features: torch.Tensor, cams: torch.Tensor, labels: Sequence[int], bank: "ContextBank", *,
                       candidates: str = "same", k: int = 3, tau: float = 0.1, gamma: float = 0.5,
                       delta_p: float = 0.4, fusion: str = "mean") -> Dict[str, Any]:
    """CPAL's pass 2 for one image: instance prototypes, soft positive neighbours, aligned
    prototypes, prototype maps and the fused maps (PA-CAM).

    Args:
        features: ``(n, D)`` dense features.
        cams: ``(k, h, w)`` maps ``G`` of the ``labels`` (``h * w = n``).
        labels: the ``k`` class indices.
        bank: context prototypes (:class:`ContextBank`).
        candidates: ``"same"`` (the class's own context prototypes) or ``"all"``.

    Returns:
        dict with ``instance`` ``(k, D)``, ``weights`` (list of ``(M,)``), ``aligned`` ``(k, D)``,
        ``prototype_maps`` ``(k, h, w)`` and ``fused`` ``(k, h, w)``. A class whose map has no token
        at ``delta_p`` keeps its map; a class without context prototypes is not shifted.
    """
    check_choice("candidates", candidates, ("same", "all"))
    labels = [int(c) for c in labels]
    if not labels:
        return {"instance": features.new_zeros(0, features.shape[1]), "weights": [],
                "aligned": features.new_zeros(0, features.shape[1]), "prototype_maps": cams.clone(),
                "fused": cams}
    p = instance_prototypes(features, cams, delta_p)
    q = torch.zeros_like(p)
    weights = []
    for j, c in enumerate(labels):
        if candidates == "same":
            ctx = bank.context(c)
            w = soft_neighbours(p[j:j + 1], ctx, k=k, tau=tau)
        else:
            ctx = bank.centres
            w = soft_neighbours(p[j:j + 1], ctx, k=k, tau=tau, classes=torch.tensor([c]),
                                context_classes=bank.centre_classes)
        q[j] = align_prototypes(p[j:j + 1], ctx.to(p.dtype), w, gamma)[0]
        weights.append(w[0])
    grid = (cams.shape[-2], cams.shape[-1])
    s = prototype_maps(features, q, grid)
    fused = torch.where((p.norm(dim=1) > 0)[:, None, None], fuse_maps(cams, s, fusion), cams)
    return {"instance": p, "weights": weights, "aligned": q, "prototype_maps": s, "fused": fused}


# -- the trained CAM head (docs/clip_cpal.md) ------------------------------------------------------
_HEAD_SCALE = 10.0  # logits = 10 * GAP(F) @ W^T (with Adam the scale only sets the early step size)


def head_cams(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAM of a 1x1-conv head: ``ReLU(F W_c) / (max_k ReLU(F W_c) + 1e-5)``.

    Args:
        features: ``(..., n, D)`` dense features.
        weight: ``(K, D)`` head weights.

    Returns:
        ``(..., K, n)`` maps in ``[0, 1)``.
    """
    raw = torch.relu(features @ weight.t()).transpose(-1, -2)
    return raw / (raw.amax(dim=-1, keepdim=True) + 1e-5)


def train_cam_head(tokens: Sequence[torch.Tensor], labels: Sequence[Sequence[int]], num_classes: int, *,
                   iters: int = 200, lr: float = 0.05, lambda_self: float = 1.0, recluster_every: int = 25,
                   grid: Optional[Sequence[Tuple[int, int]]] = None, pacam: Optional[Dict[str, Any]] = None,
                   batched: Optional[bool] = None) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
    """Train CPAL's CAM head on frozen dense features: ``L = L_BCE + lambda * L_self``.

    The trained-head alternative of ``docs/clip_cpal.md#the-trained-head-alternative``.

    ``L_BCE``: multi-label BCE of ``10 * GAP(F) @ W^T`` against the image labels. ``L_self``: mean
    ``|CAM_c(k) - sg(PACAM_c(k))|`` over the labelled classes and tokens, where the PA-CAM targets
    are recomputed from the current head every ``recluster_every`` steps (instance prototypes of all
    images, per-class spherical k-means, :func:`context_aware_maps`). Adam from ``W = 0``.

    Args:
        tokens: per image ``(n_i, D)`` unit dense features.
        labels: per image its class indices.
        num_classes: ``K``.
        grid: per image ``(h, w)`` (default: square grids).
        pacam: keyword arguments of :func:`context_aware_maps` and ``num_context`` for the targets.
        batched: compute ``L_self`` for all images at once (default: when all have one token count).

    Returns:
        ``W (K, D)`` and a history with ``loss`` per step.
    """
    if len(tokens) != len(labels):
        raise ValueError(f"tokens ({len(tokens)} images) and labels ({len(labels)}) must have one entry per image.")
    if not tokens:
        raise ValueError("train_cam_head needs at least one image.")
    check_range("lambda_self", float(lambda_self), 0.0)
    if int(recluster_every) < 1:
        raise ValueError(f"recluster_every must be >= 1; got {recluster_every}.")
    dim = tokens[0].shape[1]
    pooled = torch.stack([t.float().mean(dim=0) for t in tokens])
    target = torch.zeros(len(tokens), int(num_classes))
    for i, lab in enumerate(labels):
        target[i, list(lab)] = 1.0
    grids = list(grid) if grid is not None else [(int(math.isqrt(t.shape[0])),) * 2 for t in tokens]
    opts = dict(pacam or {})
    num_context = int(opts.pop("num_context", 8))
    w = torch.zeros(int(num_classes), dim, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    history: Dict[str, List[float]] = {"loss": []}
    targets: Optional[List[torch.Tensor]] = None
    # equal token counts (one image size): one batched L_self; otherwise a loop over images
    same = len({tuple(t.shape) for t in tokens}) == 1
    if batched and not same:
        raise ValueError("batched=True needs every image to have the same number of tokens.")
    stacked = torch.stack([t.float() for t in tokens]) if (same if batched is None else batched) else None
    for step in range(int(iters)):
        if lambda_self > 0 and step % int(recluster_every) == 0 and step > 0:
            targets = _pacam_targets(tokens, labels, grids, w.detach(), int(num_classes), num_context, opts)
            if targets is not None and stacked is not None:
                dense = torch.zeros(len(tokens), int(num_classes), stacked.shape[1])
                for i, (lab, t) in enumerate(zip(labels, targets)):
                    dense[i, list(lab)] = t
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(_HEAD_SCALE * pooled @ w.t(), target)
        if targets is not None:
            if stacked is not None:  # mean over images of the per-image mean over (class, token)
                per = ((head_cams(stacked, w) - dense).abs() * target[:, :, None]).sum(dim=(1, 2))
                count = target.sum(dim=1) * stacked.shape[1]
                has = count > 0
                loss = loss + lambda_self * (per[has] / count[has]).mean()
            else:
                self_terms = [(head_cams(x.float(), w)[list(lab)] - t).abs().mean()
                              for x, lab, t in zip(tokens, labels, targets) if len(lab)]
                loss = loss + lambda_self * torch.stack(self_terms).mean()
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
    return w.detach(), history


def _pacam_targets(tokens, labels, grids, w, num_classes, num_context, opts) -> Optional[List[torch.Tensor]]:
    with torch.no_grad():
        cams = [head_cams(x.float(), w)[list(lab)].reshape(len(lab), *g) for x, lab, g in zip(tokens, labels, grids)]
        protos, owners = [], []
        for x, lab, cam in zip(tokens, labels, cams):
            p = instance_prototypes(x.float(), cam, opts.get("delta_p", 0.4))
            keep = p.norm(dim=1) > 0
            protos.append(p[keep])
            owners.append(torch.as_tensor(list(lab), dtype=torch.long)[keep])
        if not any(len(o) for o in owners):
            return None
        bank = ContextBank.from_instances(torch.cat(protos), torch.cat(owners), num_classes, num_context=num_context)
        return [context_aware_maps(x.float(), cam, lab, bank, **opts)["fused"].reshape(len(lab), -1)
                for x, lab, cam in zip(tokens, labels, cams)]


# -- the context bank -------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None))


def plain_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, tuple):
            value = list(value)
        if not (isinstance(value, _PLAIN) or (isinstance(value, list) and all(isinstance(v, _PLAIN) for v in value))):
            raise TypeError(f"bank setting {key!r} holds a {type(value).__name__}; use plain values.")
        out[str(key)] = value
    return out


def tensor_fingerprint(x: torch.Tensor) -> str:
    """Short SHA-1 of a tensor's float32 bytes (identifies a prototype set in bank settings)."""
    data = x.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


@dataclass
class ContextBank:
    """Instance prototypes of a split and their per-class spherical k-means centres.

    Attributes:
        instances: ``(N, D)`` unit instance prototypes (pass 1).
        instance_classes: ``(N,)`` int64 class of each instance prototype.
        num_classes: number of foreground classes of the label space.
        centres: ``(R, D)`` unit context prototypes, all classes, grouped by class.
        centre_classes: ``(R,)`` int64 class of each context prototype.
        settings: plain values the bank was made under (pass-1 settings such as the feature kind,
            ``delta_p``, the model and the GradCAM prototypes; clustering settings ``num_context``,
            ``kmeans_iters``, ``kmeans_seed``).
        ids: image ids whose prototypes are in the bank.
        head: ``(K, D)`` weights of the trained CAM head (the trained-head alternative), or ``None``
            (training-free).

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
        >>> bank = ContextBank.from_instances(x, torch.arange(30) % 3, 3, num_context=4)
        >>> bank.context(0).shape
        torch.Size([4, 8])
    """

    instances: torch.Tensor
    instance_classes: torch.Tensor
    num_classes: int
    centres: torch.Tensor
    centre_classes: torch.Tensor
    settings: Dict[str, Any] = field(default_factory=dict)
    ids: List[str] = field(default_factory=list)
    head: Optional[torch.Tensor] = None

    CLUSTER_KEYS = ("num_context", "kmeans_iters", "kmeans_seed")

    def __post_init__(self) -> None:
        check_ndim("instances", self.instances, 2, "(N, D)")
        check_ndim("centres", self.centres, 2, "(R, D)")
        check_same("instance_classes length", self.instance_classes.numel(), "instances rows",
                   self.instances.shape[0])
        check_same("centre_classes length", self.centre_classes.numel(), "centres rows", self.centres.shape[0])
        check_same("centres dim", self.centres.shape[1], "instances dim", self.instances.shape[1])
        self.num_classes = int(self.num_classes)
        for name, cls in (("instance_classes", self.instance_classes), ("centre_classes", self.centre_classes)):
            if cls.numel() and not (0 <= int(cls.min()) and int(cls.max()) < self.num_classes):
                raise ValueError(f"{name} must lie in 0..{self.num_classes - 1}; got "
                                 f"{int(cls.min())}..{int(cls.max())}.")
        self.settings = plain_settings(dict(self.settings))
        self.ids = [str(i) for i in self.ids]
        if self.head is not None:
            check_ndim("head", self.head, 2, "(K, D)")
            if tuple(self.head.shape) != (self.num_classes, self.dim):
                raise ValueError(f"head must have shape ({self.num_classes}, {self.dim}) (classes, feature "
                                 f"dim); got {tuple(self.head.shape)}.")

    @classmethod
    def from_instances(cls, instances: torch.Tensor, classes: torch.Tensor, num_classes: int, *,
                       num_context: int = 8, kmeans_iters: int = 10, kmeans_seed: int = 0,
                       settings: Optional[Dict[str, Any]] = None,
                       ids: Sequence[str] = (), head: Optional[torch.Tensor] = None) -> "ContextBank":
        """Cluster each class's instance prototypes into ``min(num_context, N_c)`` centres."""
        check_ndim("instances", instances, 2, "(N, D)")
        if int(num_context) < 1:
            raise ValueError(f"num_context (M) must be >= 1; got {num_context}.")
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        instances = instances.detach().float().cpu()
        centres, owners = [], []
        for c in range(int(num_classes)):
            rows = instances[classes == c]
            if rows.shape[0] == 0:
                continue
            cen, _ = spherical_kmeans(rows, num_context, iters=kmeans_iters, seed=kmeans_seed)
            centres.append(cen)
            owners.append(torch.full((cen.shape[0],), c, dtype=torch.long))
        dim = instances.shape[1]
        settings = {**(settings or {}), "num_context": int(num_context), "kmeans_iters": int(kmeans_iters),
                    "kmeans_seed": int(kmeans_seed)}
        return cls(instances, classes, int(num_classes),
                   torch.cat(centres) if centres else instances.new_zeros(0, dim),
                   torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long),
                   settings, list(ids), None if head is None else head.detach().float().cpu())

    def recluster(self, *, num_context: int, kmeans_iters: int, kmeans_seed: int) -> "ContextBank":
        """The same instance prototypes clustered with other settings."""
        keep = {k: v for k, v in self.settings.items() if k not in self.CLUSTER_KEYS}
        return ContextBank.from_instances(self.instances, self.instance_classes, self.num_classes,
                                          num_context=num_context, kmeans_iters=kmeans_iters,
                                          kmeans_seed=kmeans_seed, settings=keep, ids=self.ids,
                                          head=self.head)

    @property
    def dim(self) -> int:
        return int(self.instances.shape[1])

    def context(self, c: int) -> torch.Tensor:
        """``(M_c, D)`` context prototypes of class ``c`` (``M_c = 0`` if the split had none)."""
        return self.centres[self.centre_classes == int(c)]

    def counts(self) -> List[int]:
        """Instance prototypes per class."""
        return torch.bincount(self.instance_classes, minlength=self.num_classes).tolist()

    def check(self, *, num_classes: Optional[int] = None, dim: Optional[int] = None,
              settings: Optional[Dict[str, Any]] = None, source: str = "the context bank") -> None:
        """Raise ValueError naming every mismatch of the class count, the dimension or a setting."""
        problems = []
        if num_classes is not None and int(num_classes) != self.num_classes:
            problems.append(f"class count: {self.num_classes} in the bank, {num_classes} expected")
        if dim is not None and int(dim) != self.dim:
            problems.append(f"feature dimension: {self.dim} in the bank, {dim} expected")
        diff = settings_diff(self.settings, plain_settings(settings or {}))
        problems += [f"{key}: {have!r} in the bank, {want!r} now" for key, (have, want) in diff.items()]
        if problems:
            raise ValueError(
                f"{source} was made under other settings ({'; '.join(problems)}). Rebuild it for "
                f"these settings (delete the file or pass another --cpal-bank / build_context_bank) "
                f"or use the settings it was made with.")

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the bank atomically as plain tensors and values (``weights_only`` loadable)."""
        payload = {
            "format": _BANK_FORMAT, "format_version": _BANK_VERSION,
            "instances": self.instances.detach().cpu().contiguous().clone(),
            "instance_classes": self.instance_classes.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "centres": self.centres.detach().cpu().contiguous().clone(),
            "centre_classes": self.centre_classes.detach().cpu().clone(),
            "settings": dict(self.settings), "ids": list(self.ids),
            "head": None if self.head is None else self.head.detach().cpu().contiguous().clone(),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, num_classes: Optional[int] = None,
             dim: Optional[int] = None, settings: Optional[Dict[str, Any]] = None) -> "ContextBank":
        """Load a bank written by :meth:`save` and check it against the expected class count,
        feature dimension and settings (each mismatch is named in the error)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"context bank {path!r} does not exist; build it with "
                                    "build_context_bank (or `vpl cams --adapter clip-cpal` without "
                                    "--cpal-bank, which saves OUT/cpal_bank.pt).")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a foreign or corrupt file
            raise ValueError(f"{path!r} is not a readable context bank ({type(err).__name__}: {err}).") from err
        check_tensor_sizes(payload, path, "context bank")
        if not isinstance(payload, dict) or payload.get("format") != _BANK_FORMAT:
            raise ValueError(f"{path!r} is not a CLIP-CPAL context bank (no format tag "
                             f"{_BANK_FORMAT!r}); write it with ContextBank.save.")
        if payload.get("format_version") != _BANK_VERSION:
            raise ValueError(f"context bank {path!r} has format version {payload.get('format_version')}; "
                             f"this vpl-plugin reads version {_BANK_VERSION}. Rebuild it.")
        keys = ("instances", "instance_classes", "num_classes", "centres", "centre_classes", "settings")
        missing = [k for k in keys if k not in payload]
        if missing:
            raise ValueError(f"context bank {path!r} is missing {missing}.")
        try:
            bank = cls(payload["instances"], payload["instance_classes"], payload["num_classes"],
                       payload["centres"], payload["centre_classes"], payload["settings"],
                       payload.get("ids", []), payload.get("head"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"context bank {path!r} is invalid: {err}") from err
        bank.check(num_classes=num_classes, dim=dim, settings=settings, source=f"context bank {path!r}")
        return bank
