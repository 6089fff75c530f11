"""VPL phase-2 losses: masked average pooling (Eq. 12), regional semantic contrast (Eq. 13) and
the final loss ``L = lambda_ce * L_ce + lambda_rsc * L_RSC`` (Eq. 14); ``docs/vpl.md#loss``.

Functional core, thin module twins: :func:`rsc_loss` / :class:`RSCLoss`; :class:`Phase2Loss`
combines cross-entropy on the segmentation logits of :class:`~vpl_plugin.phase2.PrototypeSegmenter`
with RSC over the regions of each image's (image-level) foreground classes.

Example:
    >>> import torch
    >>> w = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> float(rsc_loss(w[:2], w[:2], torch.tensor([0, 1]), tau=0.01)) < 1e-3
    True
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vpl_plugin._checks import check_choice, check_ndim, check_range, check_same
from vpl_plugin.data.voc import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "RSC_FORMS",
    "Phase2Loss",
    "RSCLoss",
    "masked_average_pool",
    "rsc_from_similarity",
    "rsc_loss",
    "segmentation_logits",
]

RSC_FORMS = ("pairs", "class", "literal")


# -- segmentation logits (docs/vpl.md#loss) --------------------------------------------------------
def segmentation_logits(prototype_logits: torch.Tensor, num_fg: int) -> torch.Tensor:
    """Collapse prototype logits into ``1 + N_fg`` segmentation logits (``docs/vpl.md#loss``).

    Channel 0 is ``logsumexp`` over the background concepts, so after a softmax the background
    probability is the sum of the background-concept probabilities; channels ``1..N_fg`` are the
    foreground prototype logits unchanged.

    Args:
        prototype_logits: ``(B, N, h, w)`` logits ``w_n . V / tau``, prototypes ordered foreground
            first, then background concepts (as :class:`~vpl_plugin.prototypes.PrototypeSet`).
        num_fg: number of foreground prototypes ``N_fg`` (``0 < N_fg < N``).

    Returns:
        ``(B, 1 + N_fg, h, w)`` logits.

    Example:
        >>> segmentation_logits(torch.zeros(1, 5, 2, 2), 2).shape
        torch.Size([1, 3, 2, 2])
    """
    check_ndim("prototype_logits", prototype_logits, 4, "(B, N, h, w)")
    n = prototype_logits.shape[1]
    num_fg = int(num_fg)
    if not 0 < num_fg < n:
        raise ValueError(f"num_fg must satisfy 0 < num_fg < N = {n} (at least one background "
                         f"concept is needed for the background channel); got {num_fg}.")
    bg = torch.logsumexp(prototype_logits[:, num_fg:], dim=1, keepdim=True)
    return torch.cat([bg, prototype_logits[:, :num_fg]], dim=1)


# -- masked average pooling (Eq. 12) ---------------------------------------------------------------
def masked_average_pool(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6,
                        normalize: bool = True) -> torch.Tensor:
    """Eq. 12: ``P_k = sum_uv a_k(u,v) V(:,u,v) / (sum_uv a_k(u,v) + eps)``, then L2-normalised.

    Args:
        features: ``(B, D, h, w)`` feature map (``V-hat``).
        weights: ``(B, K, h, w)`` non-negative soft masks at the feature resolution.
        eps: added to the mask mass (default ``1e-6``).
        normalize: L2-normalise each pooled vector.

    Returns:
        ``(B, K, D)`` pooled region embeddings. Gradients reach both ``features`` and ``weights``
        (detach ``weights`` yourself for the detached variant).

    Example:
        >>> f = torch.randn(1, 3, 2, 2)
        >>> masked_average_pool(f, torch.ones(1, 1, 2, 2), normalize=False).shape
        torch.Size([1, 1, 3])
    """
    check_ndim("features", features, 4, "(B, D, h, w)")
    check_ndim("weights", weights, 4, "(B, K, h, w)")
    if features.shape[0] != weights.shape[0] or features.shape[-2:] != weights.shape[-2:]:
        raise ValueError(f"weights {tuple(weights.shape)} must share the batch size and the spatial "
                         f"size of features {tuple(features.shape)}; resize the masks to the "
                         f"feature resolution first.")
    check_range("eps", float(eps), 0.0)
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (soft masks, e.g. a softmax over classes); "
                         f"got a minimum of {float(weights.min())}.")
    weights = weights.to(features.dtype)
    pooled = torch.einsum("bkhw,bdhw->bkd", weights, features)
    pooled = pooled / (weights.sum(dim=(2, 3)).unsqueeze(-1) + eps)
    return F.normalize(pooled, dim=-1) if normalize else pooled


# -- regional semantic contrast (Eq. 13) -----------------------------------------------------------
def _check_regions(regions: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor) -> None:
    check_ndim("regions", regions, 2, "(R, D)")
    check_ndim("prototypes", prototypes, 2, "(R, D)")
    check_ndim("classes", classes, 1, "(R,)")
    if prototypes.shape != regions.shape:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} must have the shape of regions "
                         f"{tuple(regions.shape)}: one matched prototype per region (columns may "
                         "repeat).")
    check_same("classes.shape[0]", classes.shape[0], "regions.shape[0]", regions.shape[0])
    if classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise TypeError(f"classes must hold integer class ids; got dtype {classes.dtype}.")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 (autocast) -> float32 for the loss arithmetic; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero(x: torch.Tensor) -> torch.Tensor:
    # A zero that stays attached to the graph (no unused-parameter surprises under DDP).
    return x.sum() * 0.0


def rsc_from_similarity(similarity: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over an ``(R, R)`` region-prototype logit matrix, positives on the diagonal.

    Off-diagonal entries of the same class (``classes[r] == classes[s]``, ``r != s``) are removed
    (set to ``-inf``): they are not negatives. ``L = 1/2 mean_r[-log softmax_row(S)_rr] +
    1/2 mean_s[-log softmax_col(S)_ss]``; ``L(S) == L(S^T)``.

    Args:
        similarity: ``(R, R)`` logits ``S[r, s] = cos(P_r, w_{n_s}) / tau``.
        classes: ``(R,)`` class id of each region.

    Returns:
        Scalar loss; 0 when ``R < 2``.
    """
    check_ndim("similarity", similarity, 2, "(R, R)")
    r = similarity.shape[0]
    check_same("similarity.shape[1]", similarity.shape[1], "similarity.shape[0]", r)
    check_same("classes.shape[0]", classes.shape[0], "R", r)
    if r < 2:
        return _zero(similarity)
    classes = classes.to(similarity.device)
    same = classes.unsqueeze(0) == classes.unsqueeze(1)
    eye = torch.eye(r, dtype=torch.bool, device=similarity.device)
    s = similarity.masked_fill(same & ~eye, float("-inf"))
    row = -torch.diagonal(torch.log_softmax(s, dim=1))
    col = -torch.diagonal(torch.log_softmax(s, dim=0))
    return 0.5 * row.mean() + 0.5 * col.mean()


def _class_form(regions: torch.Tensor, classes: torch.Tensor, all_prototypes: torch.Tensor,
                tau: float) -> torch.Tensor:
    """RSC, class form: row term CE over all prototypes per region; column term a multi-positive CE
    over the regions for each present class (mean of ``-log softmax`` over its regions)."""
    logits = regions @ all_prototypes.t() / tau  # (R, N)
    row = F.cross_entropy(logits, classes)
    present = torch.unique(classes)
    col_logp = torch.log_softmax(logits[:, present], dim=0)  # over regions, per present class
    pos = (classes.unsqueeze(1) == present.unsqueeze(0)).to(logits.dtype)  # (R, C)
    col = -((col_logp * pos).sum(0) / pos.sum(0)).mean()
    return 0.5 * row + 0.5 * col


def _one_per_group(groups: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices of one randomly chosen region per group (image), in group order."""
    keep = []
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        j = int(torch.randint(len(idx), (1,), generator=generator).item()) if len(idx) > 1 else 0
        keep.append(idx[j])
    return torch.stack(keep) if keep else groups.new_zeros(0)


def rsc_loss(regions: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor,
             tau: float = 0.01, form: str = "pairs", *,
             all_prototypes: Optional[torch.Tensor] = None, groups: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Regional semantic contrast loss (Eq. 13, ``docs/vpl.md#loss``).

    ``form="pairs"`` (default): ``S = cos(P_r, w_{n_s}) / tau`` over the ``R`` regions of the
    batch and their matched prototypes; same-class off-diagonals are not negatives; symmetric
    InfoNCE (:func:`rsc_from_similarity`); 0 when ``R < 2``.
    ``form="class"`` (8.6 a): needs ``all_prototypes`` ``(N_fg, D)`` and ``classes`` indexing its
    rows; row term = CE of each region over all prototypes, column term = multi-positive CE over
    the regions of each present class.
    ``form="literal"`` (8.6 b): one region per image (``groups`` gives the image of each region;
    the region is drawn with ``generator``), then the pairs form on those ``B`` regions.

    Regions and prototypes are L2-normalised here (a no-op for unit inputs).

    Args:
        regions: ``(R, D)`` pooled region embeddings ``P_r``.
        prototypes: ``(R, D)`` the matched prototype ``w_{n_r}`` of each region.
        classes: ``(R,)`` long class ids ``n_r``.
        tau: temperature (the paper's reading: 0.01).
        form: ``"pairs"``, ``"class"`` or ``"literal"``.
        all_prototypes: ``(N, D)`` every prototype (``form="class"`` only).
        groups: ``(R,)`` image index of each region (``form="literal"``; default: every region its
            own image, which equals ``"pairs"``).
        generator: random source for ``form="literal"``.

    Returns:
        Scalar loss.

    Example:
        >>> w = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
        >>> loss = rsc_loss(w, w, torch.tensor([0, 1, 2]))
    """
    _check_regions(regions, prototypes, classes)
    check_choice("form", form, RSC_FORMS)
    check_range("tau", float(tau), 0.0, low_open=True)
    regions = F.normalize(regions, dim=-1)
    prototypes = F.normalize(prototypes.to(regions.dtype), dim=-1)
    classes = classes.to(regions.device).long()
    if form == "class":
        if all_prototypes is None:
            raise ValueError("form='class' needs all_prototypes (N, D): every prototype the "
                             "regions' classes index.")
        check_ndim("all_prototypes", all_prototypes, 2, "(N, D)")
        check_same("all_prototypes.shape[1]", all_prototypes.shape[1], "regions.shape[1]",
                   regions.shape[1])
        if regions.shape[0] == 0:
            return _zero(regions)
        if int(classes.max()) >= all_prototypes.shape[0] or int(classes.min()) < 0:
            raise ValueError(f"classes must index the rows of all_prototypes (0..{all_prototypes.shape[0] - 1}); "
                             f"got [{int(classes.min())}, {int(classes.max())}].")
        allp = F.normalize(all_prototypes.to(regions), dim=-1)
        return _class_form(regions, classes, allp, float(tau))
    if form == "literal" and groups is not None:
        check_ndim("groups", groups, 1, "(R,)")
        check_same("groups.shape[0]", groups.shape[0], "regions.shape[0]", regions.shape[0])
        keep = _one_per_group(groups.cpu(), generator).to(regions.device)
        regions, prototypes, classes = regions[keep], prototypes[keep], classes[keep]
    return rsc_from_similarity(regions @ prototypes.t() / float(tau), classes)


class RSCLoss(nn.Module):
    """Module twin of :func:`rsc_loss` holding ``tau`` and ``form``.

    Example:
        >>> crit = RSCLoss(tau=0.01)
        >>> w = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> crit(w, w, torch.tensor([0, 1])).shape
        torch.Size([])
    """

    def __init__(self, tau: float = 0.01, form: str = "pairs") -> None:
        super().__init__()
        check_range("tau", float(tau), 0.0, low_open=True)
        check_choice("form", form, RSC_FORMS)
        self.tau = float(tau)
        self.form = form

    def forward(self, regions: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        return rsc_loss(regions, prototypes, classes, self.tau, self.form, **kwargs)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, form={self.form!r}"


# -- final loss (Eq. 14) ---------------------------------------------------------------------------
def _region_batch(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  prototypes: torch.Tensor, num_fg: int, *, detach_weights: bool,
                  include_background: bool) -> Tuple[torch.Tensor, ...]:
    """Regions of the batch: ``(regions (R,D), matched prototypes (R,D), classes (R,), groups (R,),
    all prototypes (N_fg[+1], D))``. Background, when included, is class ``N_fg`` with prototype
    ``normalize(mean_b w_b)``, one region per image."""
    weights = torch.softmax(_f32(logits), dim=1)  # A-hat at feature resolution (docs/vpl.md#loss)
    if detach_weights:
        weights = weights.detach()
    feats = _f32(features)
    weights = weights.to(feats.dtype)
    protos = prototypes.to(feats)
    fg_protos = F.normalize(protos[:num_fg], dim=-1)
    present = labels.to(feats.device) > 0  # (B, N_fg)
    channels = 1 if not include_background else 0
    pooled = masked_average_pool(feats, weights[:, channels:])  # (B, N_fg[+1], D)
    if include_background:
        bg_proto = F.normalize(protos[num_fg:].mean(0, keepdim=True), dim=-1)
        all_protos = torch.cat([fg_protos, bg_proto], dim=0)
        # pooled channel 0 is the background; reorder to fg first, bg last (class id N_fg)
        pooled = torch.cat([pooled[:, 1:], pooled[:, :1]], dim=1)
        present = torch.cat([present, torch.ones_like(present[:, :1])], dim=1)
    else:
        all_protos = fg_protos
    groups, classes = torch.nonzero(present, as_tuple=True)
    regions = pooled[groups, classes]
    return regions, all_protos[classes], classes, groups, all_protos


class Phase2Loss(nn.Module):
    """``L = lambda_ce * CE(upsampled logits, M) + lambda_rsc * L_RSC`` (Eq. 14, ``docs/vpl.md#loss``).

    * CE: the ``(B, 1+N_fg, h, w)`` logits are bilinearly upsampled (``align_corners=False``) to
      the target size; pixel-wise CE with ``ignore_index=255``, mean over valid pixels (0 when a
      batch has none).
    * RSC: soft masks ``A-hat = softmax_channel(logits)`` pool the unit features ``V-hat`` for
      every image-level foreground class of every image (Eq. 12); the regions contrast with their
      matched prototypes (:func:`rsc_loss`).

    Args:
        lambda_ce, lambda_rsc: loss weights (the paper: 1 and 1). ``lambda_rsc=0`` skips RSC.
        tau_rsc: RSC temperature. Default 0.07, the project's recommendation: the literal reading of
            Eq. 13 (0.01, CLIP's temperature) collapsed decoder training to all background on the
            demo world (7.8 mIoU against 58.5 for CE only; 0.03: 60.5; 0.07: 68.5;
            ``benchmarks/results/phase2_ablation.md``). Pass 0.01 for the literal value.
        rsc_form: ``"pairs"`` (default), ``"class"`` or ``"literal"`` (see :func:`rsc_loss`).
        detach_weights: pool with detached soft masks (gradient only through the features).
        include_background: add one background region per image, class ``N_fg``, prototype
            ``normalize(mean of the background concepts)``.
        prototypes: ``(N, D)`` prototypes used when ``outputs`` carries none (the segmenter's
            outputs include them under ``"prototypes"``).
        generator: random source of ``rsc_form="literal"``.

    Call ``loss(outputs, target, labels)`` with the segmenter's output dict (``"logits"``,
    ``"features"`` and ``"prototypes"``), ``target`` ``(B, H, W)`` long pseudo masks with 255
    ignored and ``labels`` ``(B, N_fg)`` 0/1 image-level labels. Returns ``(loss, {"ce", "rsc"})``
    with the unweighted terms as Python floats.
    """

    def __init__(self, lambda_ce: float = 1.0, lambda_rsc: float = 1.0, tau_rsc: float = 0.07,
                 rsc_form: str = "pairs", detach_weights: bool = False,
                 include_background: bool = False, *, prototypes: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        check_range("lambda_ce", float(lambda_ce), 0.0)
        check_range("lambda_rsc", float(lambda_rsc), 0.0)
        self.lambda_ce = float(lambda_ce)
        self.lambda_rsc = float(lambda_rsc)
        self.rsc = RSCLoss(tau_rsc, rsc_form)
        self.detach_weights = bool(detach_weights)
        self.include_background = bool(include_background)
        self.generator = generator
        if prototypes is not None:
            check_ndim("prototypes", prototypes, 2, "(N, D)")
            self.register_buffer("prototypes", prototypes.detach().clone(), persistent=False)
        else:
            self.prototypes = None

    def ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the upsampled logits against ``target`` (255 ignored)."""
        check_ndim("logits", logits, 4, "(B, 1+N_fg, h, w)")
        check_ndim("target", target, 3, "(B, H, W)")
        check_same("target.shape[0]", target.shape[0], "logits.shape[0]", logits.shape[0])
        target = target.to(logits.device).long()
        c = logits.shape[1]
        bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            raise ValueError(f"target holds labels outside 0..{c - 1} and {IGNORE_INDEX}: "
                             f"{torch.unique(target[bad]).tolist()[:10]}; the masks must use the "
                             f"label space of the prototypes (0 = background).")
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        if not bool((target != IGNORE_INDEX).any()):
            return _zero(logits)
        return F.cross_entropy(_f32(logits), target, ignore_index=IGNORE_INDEX)

    def forward(self, outputs: Dict[str, torch.Tensor], target: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        for key in ("logits", "features"):
            if key not in outputs:
                raise KeyError(f"outputs must hold {key!r} (the PrototypeSegmenter output dict); "
                               f"got keys {sorted(outputs)}.")
        logits, features = outputs["logits"], outputs["features"]
        num_fg = logits.shape[1] - 1
        check_ndim("labels", labels, 2, "(B, N_fg)")
        if tuple(labels.shape) != (logits.shape[0], num_fg):
            raise ValueError(f"labels must have shape (B, N_fg) = {(logits.shape[0], num_fg)} "
                             f"(0/1 image-level labels); got {tuple(labels.shape)}.")
        # the loss arithmetic runs in float32 (or float64) even inside an autocast region
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._forward(_f32(logits), _f32(features), outputs.get("prototypes"), target,
                                 labels, num_fg)

    def _forward(self, logits, features, prototypes, target, labels, num_fg):
        ce = self.ce(logits, target) if self.lambda_ce > 0 else _zero(logits)
        if self.lambda_rsc > 0:
            prototypes = prototypes if prototypes is not None else self.prototypes
            if prototypes is None:
                raise ValueError("RSC needs the prototypes: use the segmenter's outputs (they hold "
                                 "'prototypes') or pass Phase2Loss(prototypes=...).")
            regions, matched, classes, groups, all_protos = _region_batch(
                features, logits, labels, prototypes, num_fg,
                detach_weights=self.detach_weights, include_background=self.include_background)
            rsc = self.rsc(regions, matched, classes, all_prototypes=all_protos, groups=groups,
                           generator=self.generator)
        else:
            rsc = _zero(features)
        loss = self.lambda_ce * ce + self.lambda_rsc * rsc
        return loss, {"ce": float(ce.detach()), "rsc": float(rsc.detach())}

    def extra_repr(self) -> str:
        return (f"lambda_ce={self.lambda_ce}, lambda_rsc={self.lambda_rsc}, "
                f"detach_weights={self.detach_weights}, include_background={self.include_background}")
