"""Vision prototype learning (VPL phase 1, ``docs/vpl.md#choices-the-paper-leaves-open``).

Everything here is a pure function of tensors except :class:`PrototypeSet`, a small container that
saves and loads a learned (or text) prototype set.

Conventions (all public functions):

* prototypes are stored **row-wise**, shape ``(N, D)``, ``N = N_fg + N_bg`` (foreground classes
  first, then background concepts; VOC 20 + 25), unit rows. The paper writes ``W`` column-wise
  (``D x N``); ``W_here = W_paper^T``.
* pixel features ``X`` are ``(K, D)`` unit rows (``docs/vpl.md#pixel-features``).
* targets ``Q`` are ``(K, N)``; rows sum to 1 and are zero outside the candidates (an all-zero
  row is an ignored pixel: it contributes no loss and no gradient but still counts in ``K``).
* candidates are boolean; a non-candidate prototype gets probability exactly 0 for that pixel.

The objective (instance level, ``docs/vpl.md#level``) is

    L(W) = (1/K) sum_k sum_n -Q[k, n] log P[k, n](W),
    P[k] = softmax over the candidates of X[k] W^T / tau,

with exact gradient ``(1/(K tau)) (P - Q)^T X`` (row layout), computed chunk by chunk so that only
``chunk_size`` rows of activations are ever in memory besides the features themselves.

Example:
    >>> import torch
    >>> X = torch.nn.functional.normalize(torch.randn(500, 16), dim=1)
    >>> Z = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    >>> Q = torch.softmax(X @ Z.T / 0.01, dim=1)
    >>> W = learn_vision_prototypes(X, Q, Z, tau=0.03, iters=20)
    >>> W.shape
    torch.Size([4, 16])
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from vpl_plugin._progress import progress as progress_bar
from ._checks import check_choice, check_ndim, check_positive, check_range, check_same
from ._io import atomic_path
from ._unpickle import check_tensor_sizes

__all__ = [
    "ChunkShare",
    "NonFiniteRowsError",
    "STEP_RULES",
    "TARGET_MODES",
    "PrototypeSet",
    "build_targets",
    "learn_vision_prototypes",
    "modality_gap",
    "prototype_gradient",
    "prototype_loss",
    "region_pool",
    "seeds_from_cams",
    "shift_text_prototypes",
]

STEP_RULES: Tuple[str, ...] = ("bb", "halving")
"""Step rules of :func:`learn_vision_prototypes`; ``"bb"`` is the recommended default."""

TARGET_MODES: Tuple[str, ...] = ("seed_hardened", "inmap", "cam", "kl")
"""Target constructions of :func:`build_targets` (``docs/vpl.md#targets``)."""

RowData = Union[torch.Tensor, np.ndarray, Sequence[Any], Iterable[Any]]
ReduceSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes that share a learning set (each holds some of its rows) and
returns the sum, identical in every process (e.g. :func:`vpl_plugin.distributed.all_reduce_sum`)."""


@dataclass(frozen=True)
class ChunkShare:
    """This process's place in a learning set shared chunk by chunk among processes.

    The whole set's rows, in order, are cut into chunks of ``chunk_size`` rows (the last one may be
    shorter); process ``rank`` holds chunks ``rank``, ``rank + world_size``, ``rank + 2 *
    world_size``, ..., one after the other (see :func:`vpl_plugin.pipeline.collect_learning_set`).
    Every pass gathers each chunk's sums and adds them in chunk order, as one process holding every
    row adds them, so the learned prototypes are bit for bit those of one process (given the same
    per-chunk arithmetic: device, dtype, thread count).

    Attributes:
        rank, world_size: this process and the process count.
        all_gather: returns every process's tensor (same shape) in rank order, e.g.
            :func:`vpl_plugin.distributed.all_gather_tensor`.
    """

    rank: int
    world_size: int
    all_gather: Callable[[torch.Tensor], List[torch.Tensor]]

_FORMAT = "vpl_plugin.PrototypeSet"
_FORMAT_VERSION = 1
_UNIT_TOL = 1e-6  # init rows closer than this to unit norm are taken verbatim (not re-normalised)


class NonFiniteRowsError(ValueError):
    """Rows of ``features`` or ``targets`` hold NaN/inf (found while streaming them).

    Attributes:
        name: ``"features"`` or ``"targets"``.
        row: the first offending row (0-based, over all ``K`` rows).
        count: non-finite values in the chunk holding that row.
    """

    def __init__(self, name: str, row: int, count: int, where: str = "") -> None:
        self.name, self.row, self.count = name, int(row), int(count)
        super().__init__(
            f"{name} row {row}{where} holds NaN/inf ({count} non-finite value(s) in its chunk); "
            f"learning from it would give NaN prototypes. Recompute or drop that image's rows.")

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.name, self.row, self.count))


# ------------------------------------------------------------------------------------------------
# Seeds and targets (docs/vpl.md#seeds, docs/vpl.md#targets)
# ------------------------------------------------------------------------------------------------


def seeds_from_cams(cams: torch.Tensor, phi: float = 0.4) -> torch.Tensor:
    """Seed labels from an image's text GradCAMs with threshold ``phi`` (``docs/vpl.md#seeds``).

    ``m_k = argmax_c cams[c, k]`` where ``max_c cams[c, k] > phi``, else background (``-1``). A
    maximum equal to ``phi`` is background; among foreground classes tied for the maximum the first
    row wins (upstream ``eval_cam``'s argmax over the CAMs padded with a background plane at
    ``phi``).
    ``phi`` is compared in the dtype of ``cams`` (float32 for upstream CAMs, like its padding).

    Args:
        cams: ``(n_fg_i, n)`` GradCAMs of the image's foreground classes at patch resolution, values
            in ``[0, 1)`` (flatten ``(n_fg_i, h, w)`` maps first). ``n_fg_i`` may be 0.
        phi: seed threshold (paper: 0.4).

    Returns:
        ``(n,)`` int64: row index into ``cams`` (``0..n_fg_i-1``) or ``-1`` for background.

    Example:
        >>> seeds_from_cams(torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.7, 0.3]]), phi=0.4)
        tensor([-1,  1,  0])
    """
    check_ndim("cams", cams, 2, "(n_fg_i, n)")
    n = cams.shape[1]
    if cams.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.long, device=cams.device)
    if not cams.is_floating_point():
        cams = cams.float()
    best, idx = cams.max(dim=0)  # first index among ties
    return torch.where(best > phi, idx, torch.full_like(idx, -1))


def region_pool(features: torch.Tensor, seeds: torch.Tensor, fg_classes: torch.Tensor,
                text_prototypes: torch.Tensor, num_fg: int, *, tau_text: float = 0.01,
                candidates: str = "image") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region-pooled learning rows of one image (``pooling="region"``; an interpretation, not the
    paper's instance-level objective).

    Each foreground seed region (pixels whose seed is class ``c``) becomes one row: the normalised
    mean of its pixel features, with target ``onehot(c)``. The remaining (background) pixels become
    one row whose target is the text softmax of the pooled feature over the background concepts.
    Pooling averages out token noise, which the research probes found to give better dense maps.

    Args:
        features: ``(n, D)`` unit pixel features.
        seeds: ``(n,)`` from :func:`seeds_from_cams` (row index into ``fg_classes``, ``-1`` bg).
        fg_classes: ``(k,)`` the image's class indices.
        text_prototypes: ``(N, D)`` text prototypes, foreground first.
        num_fg: number of foreground prototypes.

    Returns:
        ``(R, D)`` pooled features, ``(R, N)`` targets and ``(R, N)`` candidates.
    """
    check_ndim("features", features, 2, "(n, D)")
    n_proto = text_prototypes.shape[0]
    cand = torch.zeros(n_proto, dtype=torch.bool)
    if candidates == "all":
        cand[:] = True
    else:
        cand[fg_classes] = True
        cand[num_fg:] = True
    rows, targets = [], []
    for j, c in enumerate(fg_classes.tolist()):
        sel = seeds == j
        if bool(sel.any()):
            rows.append(torch.nn.functional.normalize(features[sel].float().mean(0), dim=0))
            q = torch.zeros(n_proto)
            q[c] = 1.0
            targets.append(q)
    sel = seeds < 0
    if bool(sel.any()):
        x = torch.nn.functional.normalize(features[sel].float().mean(0), dim=0)
        q = torch.zeros(n_proto)
        q[num_fg:] = ((x @ text_prototypes[num_fg:].float().t()) / tau_text).softmax(0)
        rows.append(x)
        targets.append(q)
    if not rows:
        d = features.shape[1]
        return torch.zeros(0, d), torch.zeros(0, n_proto), torch.zeros(0, n_proto, dtype=torch.bool)
    x = torch.stack(rows)
    return x, torch.stack(targets), cand[None].expand(x.shape[0], -1).clone()


def build_targets(
    features: torch.Tensor,
    text_prototypes: torch.Tensor,
    cams: torch.Tensor,
    fg_classes: torch.Tensor,
    num_fg: int,
    *,
    phi: float = 0.4,
    tau_text: float = 0.01,
    mode: str = "seed_hardened",
    candidates: str = "image",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target distribution ``Q_i`` and candidate set ``Omega_i`` of one image (``docs/vpl.md#targets``).

    The text distribution ``P'`` (Eq. 5) is the softmax over the candidates of
    ``X Z^T / tau_text``. ``B`` is the set of background rows ``num_fg..N-1``. Modes:

    * ``"seed_hardened"`` (default): a foreground seed pixel (``seeds_from_cams(cams, phi)``)
      gets ``onehot(c)``; every other pixel gets ``P'`` restricted to ``B`` and renormalised.
    * ``"inmap"`` (pure InMaP): ``Q = P'``; rows with ``max P' > phi`` become one-hot argmax.
    * ``"cam"``: over ``{bg} + C_i``, ``Q ∝ [phi, G_c(k) ...]``; the bg mass is split over
      ``B`` by the restricted text softmax. Needs non-negative ``cams``.
    * ``"kl"`` (Eq. 7 literally): ``Q = P'``.

    Args:
        features: ``(n, D)`` pixel features of the image (unit rows).
        text_prototypes: ``(N, D)`` text prototypes ``Z``, foreground rows first.
        cams: ``(n_fg_i, n)`` text GradCAMs of the image's classes, rows in the order of
            ``fg_classes``.
        fg_classes: ``(n_fg_i,)`` int64 distinct foreground class indices in ``0..num_fg-1``.
        num_fg: number of foreground prototypes ``N_fg``.
        phi: seed / hardening threshold.
        tau_text: temperature of the text distribution (paper 0.01).
        mode: one of :data:`TARGET_MODES`.
        candidates: ``"image"`` (``Omega_i = C_i + B``, default) or ``"all"`` (every prototype).

    Returns:
        ``(Q, cand)``: ``Q`` ``(n, N)`` float32 with rows summing to 1 and zeros outside the
        candidates; ``cand`` ``(N,)`` bool.

    Example:
        >>> X = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> Z = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
        >>> Q, cand = build_targets(X, Z, torch.rand(1, 6), torch.tensor([2]), num_fg=3)
        >>> Q.shape, cand.tolist()
        (torch.Size([6, 5]), [False, False, True, True, True])
    """
    check_choice("mode", mode, TARGET_MODES)
    check_choice("candidates", candidates, ("image", "all"))
    check_ndim("features", features, 2, "(n, D)")
    check_ndim("text_prototypes", text_prototypes, 2, "(N, D)")
    check_ndim("cams", cams, 2, "(n_fg_i, n)")
    check_ndim("fg_classes", fg_classes, 1, "(n_fg_i,)")
    check_same("features.shape[1]", features.shape[1], "text_prototypes.shape[1]",
               text_prototypes.shape[1], "Features and prototypes must live in the same space.")
    check_same("cams.shape[1]", cams.shape[1], "features.shape[0]", features.shape[0],
               "Give one CAM value per pixel (flatten (n_fg_i, h, w) to (n_fg_i, h*w)).")
    check_same("cams.shape[0]", cams.shape[0], "len(fg_classes)", fg_classes.shape[0],
               "cams has one row per foreground class of the image, in fg_classes order.")
    check_range("tau_text", tau_text, 0.0, low_open=True)
    check_range("phi", phi, 0.0)
    n_proto = text_prototypes.shape[0]
    check_range("num_fg", num_fg, 0, n_proto)
    if num_fg == n_proto and mode in ("seed_hardened", "cam"):
        raise ValueError(f"mode={mode!r} needs background prototypes (rows num_fg..N-1); "
                         f"num_fg={num_fg} equals N={n_proto}.")
    fg_classes = fg_classes.to(torch.long).cpu()
    if fg_classes.numel():
        if int(fg_classes.min()) < 0 or int(fg_classes.max()) >= num_fg:
            raise ValueError(f"fg_classes must index foreground prototypes 0..{num_fg - 1}; "
                             f"got {fg_classes.tolist()}.")
        if fg_classes.unique().numel() != fg_classes.numel():
            raise ValueError(f"fg_classes must be distinct; got {fg_classes.tolist()}.")
    if mode == "cam" and cams.numel() and float(cams.min()) < 0:
        raise ValueError("mode='cam' needs non-negative cams (GradCAMs are min-max normalised to "
                         f"[0, 1)); got a minimum of {float(cams.min())}.")

    device = features.device
    fg_idx = fg_classes.to(device)
    cand = torch.zeros(n_proto, dtype=torch.bool, device=device)
    if candidates == "all":
        cand[:] = True
    else:
        cand[fg_idx] = True
        cand[num_fg:] = True

    x = features.to(torch.float64)
    logits = x @ text_prototypes.to(device=device, dtype=torch.float64).T / tau_text
    text_p = torch.softmax(logits.masked_fill(~cand, -math.inf), dim=1)  # Eq. 5 over Omega_i
    n = x.shape[0]

    if mode == "kl":
        q = text_p
    elif mode == "inmap":
        q = text_p.clone()
        top, arg = text_p.max(dim=1)
        hard = top > phi
        q[hard] = 0.0
        q[hard, arg[hard]] = 1.0
    else:
        bg_p = torch.softmax(logits[:, num_fg:], dim=1)  # P' restricted to B, renormalised
        q = torch.zeros(n, n_proto, dtype=torch.float64, device=device)
        if mode == "seed_hardened":
            seeds = seeds_from_cams(cams.to(device), phi)
            fg = seeds >= 0
            q[~fg, num_fg:] = bg_p[~fg]
            q[fg, fg_idx[seeds[fg]]] = 1.0
        else:  # "cam"
            g = cams.to(device=device, dtype=torch.float64)
            weights = torch.cat([torch.full((1, n), float(phi), dtype=torch.float64,
                                            device=device), g], dim=0)  # (1 + n_fg_i, n)
            total = weights.sum(dim=0)
            empty = total <= 0  # phi == 0 and no activation: all mass to background
            weights[0, empty] = 1.0
            weights = weights / weights.sum(dim=0, keepdim=True)
            q[:, num_fg:] = weights[0, :, None] * bg_p
            if fg_idx.numel():
                q[:, fg_idx] = weights[1:].T
    return q.to(torch.float32), cand


# ------------------------------------------------------------------------------------------------
# Row sources: tensors, arrays, memmaps and lists of per-image blocks, read chunk by chunk
# ------------------------------------------------------------------------------------------------


class _Broadcast:
    """A ``(N,)`` vector repeated over ``length`` rows, sliceable like a ``(length, N)`` array."""

    def __init__(self, row: torch.Tensor, length: int) -> None:
        self.row = row
        self.shape = (int(length), int(row.shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> torch.Tensor:
        start, stop, _ = item.indices(self.shape[0])
        return self.row.unsqueeze(0).expand(max(stop - start, 0), -1)


def _is_array_like(x: Any) -> bool:
    shape = getattr(x, "shape", None)
    return shape is not None and hasattr(x, "__getitem__") and not isinstance(x, (list, tuple))


def _as_torch(piece: Any) -> torch.Tensor:
    """Convert a (small, chunk-sized) slice to a torch tensor without touching anything else."""
    if isinstance(piece, torch.Tensor):
        return piece
    arr = np.array(piece)  # copies the slice only (memmaps may be read-only)
    return torch.from_numpy(arr)


class _Rows:
    """Row-indexable view over one 2-D block or a list of 2-D blocks (``(n_i, C)`` each)."""

    def __init__(self, name: str, blocks: List[Any], cols: int, per_image: bool) -> None:
        self.name = name
        self.blocks = blocks
        self.cols = cols
        self.per_image = per_image  # given as a list of per-image blocks (even of length 1)
        self.sizes = [int(b.shape[0]) for b in blocks]
        self.starts = [0]
        for s in self.sizes:
            self.starts.append(self.starts[-1] + s)
        self.total = self.starts[-1]

    def get(self, a: int, b: int, device: torch.device,
            dtype: Optional[torch.dtype]) -> torch.Tensor:
        """Rows ``a..b-1`` as one tensor on ``device`` (cast to ``dtype`` when given)."""
        i = max(bisect.bisect_right(self.starts, a) - 1, 0)
        pieces: List[torch.Tensor] = []
        while a < b and i < len(self.blocks):
            s, e = self.starts[i], self.starts[i + 1]
            if e > a:
                pieces.append(_as_torch(self.blocks[i][a - s:min(b, e) - s]))
                a = min(b, e)
            i += 1
        if len(pieces) == 1:
            out = pieces[0]
        elif len({p.device for p in pieces}) == 1:
            out = torch.cat(pieces, dim=0)
        else:
            out = torch.cat([p.to(device) for p in pieces], dim=0)
        out = out.to(device)
        return out.to(dtype) if dtype is not None else out


def _is_single(data: Any) -> bool:
    return isinstance(data, (torch.Tensor, np.ndarray)) or _is_array_like(data)


def _blocks(name: str, data: Any, shape_doc: str) -> List[Any]:
    """Normalise a tensor / array / memmap / list / iterable into a list of 2-D blocks."""
    if _is_single(data):
        check_ndim(name, data, 2, shape_doc)
        return [data]
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a tensor, an array / np.memmap or a list of per-image "
                        f"arrays; got a path {data!r} (open it with np.load(..., mmap_mode='r')).")
    try:
        items = list(data)  # a generator is consumed once here; the blocks stay where they are
    except TypeError:
        raise TypeError(f"{name} must be a tensor, an array / np.memmap or a list of per-image "
                        f"{shape_doc} arrays; got {type(data).__name__}.") from None
    if not items:
        raise ValueError(f"{name} is an empty list; give at least one image.")
    return items


def _rows(name: str, data: Any, shape_doc: str) -> _Rows:
    per_image = not _is_single(data)
    blocks = _blocks(name, data, shape_doc)
    cols: Optional[int] = None
    for j, blk in enumerate(blocks):
        if not (isinstance(blk, (torch.Tensor, np.ndarray)) or _is_array_like(blk)):
            raise TypeError(f"{name}[{j}] must be a tensor or array; got {type(blk).__name__}.")
        check_ndim(f"{name}[{j}]" if per_image else name, blk, 2, shape_doc)
        if cols is None:
            cols = int(blk.shape[1])
        elif int(blk.shape[1]) != cols:
            raise ValueError(f"{name}[{j}] has {blk.shape[1]} columns but {name}[0] has {cols}; "
                             "every image must have the same number of columns.")
    assert cols is not None  # _blocks refuses an empty list
    return _Rows(name, blocks, int(cols), per_image)


def _candidate_rows(candidates: Any, n_proto: int, total: int,
                    image_sizes: Optional[List[int]]) -> Optional[_Rows]:
    """Candidates as a row source of ``(K, N)`` bools (``None`` = every prototype everywhere)."""
    if candidates is None:
        return None
    if isinstance(candidates, (torch.Tensor, np.ndarray)) and candidates.ndim == 1:
        row = _as_torch(candidates).to(torch.bool)
        check_same("len(candidates)", row.shape[0], "number of prototypes N", n_proto)
        return _Rows("candidates", [_Broadcast(row, total)], n_proto, per_image=False)
    if _is_single(candidates):
        src = _rows("candidates", candidates, "(K, N)")
    else:
        items = _blocks("candidates", candidates, "(n_i, N) or (N,)")
        if image_sizes is None:
            raise ValueError("candidates is a list of per-image masks, so features or targets "
                             "must be a list of per-image arrays too (to know each image's pixel "
                             "count).")
        check_same("len(candidates)", len(items), "number of images", len(image_sizes),
                   "Give one mask per image.")
        blocks: List[Any] = []
        for j, (item, n_i) in enumerate(zip(items, image_sizes)):
            if getattr(item, "ndim", None) == 1:
                row = _as_torch(item).to(torch.bool)
                check_same(f"len(candidates[{j}])", row.shape[0], "number of prototypes N", n_proto)
                blocks.append(_Broadcast(row, n_i))
            else:
                check_ndim(f"candidates[{j}]", item, 2, "(n_i, N) or (N,)")
                check_same(f"candidates[{j}].shape[0]", item.shape[0], f"pixels of image {j}", n_i)
                blocks.append(item)
        src = _Rows("candidates", blocks, n_proto, per_image=True)
    check_same("candidates.shape[1]", src.cols, "number of prototypes N", n_proto)
    check_same("candidate rows", src.total, "feature rows K", total)
    return src


def _check_finite_chunk(name: str, chunk: torch.Tensor, start: int) -> None:
    """Raise :class:`NonFiniteRowsError` if a streamed chunk (rows ``start..``) holds NaN/inf."""
    finite = torch.isfinite(chunk)
    if bool(finite.all()):
        return
    bad_rows = (~finite).any(dim=1).nonzero()
    raise NonFiniteRowsError(name, start + int(bad_rows[0]), int((~finite).sum()))


class _Problem:
    """Aligned chunked sources of features, targets and candidates (one full-batch problem)."""

    def __init__(self, features: Any, targets: Any, candidates: Any, n_proto: int,
                 chunk_size: int, device: Optional[Union[str, torch.device]],
                 dtype: torch.dtype, reduce_sum: Optional[ReduceSum] = None,
                 share: Optional[ChunkShare] = None) -> None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows; got {chunk_size}.")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a floating dtype; got {dtype}.")
        self.x = _rows("features", features, "(K, D)")
        self.q = _rows("targets", targets, "(K, N)")
        check_same("targets.shape[1]", self.q.cols, "number of prototypes N", n_proto,
                   "targets has one column per prototype (foreground first, then background).")
        check_same("target rows", self.q.total, "feature rows K", self.x.total)
        if self.x.per_image and self.q.per_image and self.x.sizes != self.q.sizes:
            raise ValueError("features and targets are per-image lists with different pixel counts "
                             "per image; give targets with one row per feature row.")
        sizes = self.x.sizes if self.x.per_image else (self.q.sizes if self.q.per_image else None)
        self.cand = _candidate_rows(candidates, n_proto, self.x.total, sizes)
        self.D = self.x.cols
        self.N = n_proto
        self.chunk = int(chunk_size)
        if device is None:
            first = self.x.blocks[0]
            device = first.device if isinstance(first, torch.Tensor) else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype
        self.checked = False  # set once a full pass found no NaN/inf
        if reduce_sum is not None and share is not None:
            raise ValueError("give reduce_sum or share, not both.")
        self.reduce_sum = reduce_sum
        self.share = share
        self.K_local = self.x.total  # this process's rows; K counts every process's
        self.K = self.K_local
        self.total_chunks = -(-self.K_local // self.chunk)
        if reduce_sum is not None:
            count = torch.tensor([float(self.K_local)], dtype=torch.float64, device=self.device)
            self.K = int(reduce_sum(count)[0])
        elif share is not None:
            self._check_share(share)
        if self.K == 0:
            raise ValueError("features has no rows (K = 0)" + (" in any process." if reduce_sum or share
                                                                else "."))

    def _check_share(self, share: ChunkShare) -> None:
        """Learn every process's row and chunk count; refuse rows that are not whole global chunks."""
        mine = torch.tensor([float(self.K_local), float(self.total_chunks)], dtype=torch.float64,
                            device=self.device)
        counts = [(int(t[0]), int(t[1])) for t in share.all_gather(mine)]
        self.K = sum(k for k, _ in counts)
        self.total_chunks = sum(c for _, c in counts)
        for rank, (k, c) in enumerate(counts):
            owned = range(rank, self.total_chunks, share.world_size)
            last_short = self.total_chunks - 1 in owned
            if c != len(owned) or (not last_short and k != c * self.chunk) or k > c * self.chunk:
                raise ValueError(
                    f"process {rank} holds {k} rows in {c} chunks of {self.chunk}, which are not the "
                    f"global chunks {rank}, {rank} + {share.world_size}, ... of {self.K} rows; assemble "
                    "each process's rows with the same chunk size as the learning.")

    def chunks(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """Aligned ``(features, targets, candidates)`` chunks of ``chunk_size`` rows.

        The first complete pass also checks every chunk for NaN/inf as it streams (so a memmap is
        not read an extra time for it) and raises :class:`NonFiniteRowsError` at the first bad
        one; later passes skip the check.
        """
        check = not self.checked
        for a in range(0, self.K_local, self.chunk):
            b = min(a + self.chunk, self.K_local)
            x = self.x.get(a, b, self.device, self.dtype)
            q = self.q.get(a, b, self.device, self.dtype)
            m = None if self.cand is None else self.cand.get(a, b, self.device, torch.bool)
            if check:
                _check_finite_chunk("features", x, a)
                _check_finite_chunk("targets", q, a)
            yield x, q, m
        if check:
            self.checked = True

    def loss(self, w: torch.Tensor, tau: float) -> float:
        """Mean cross-entropy at ``w`` (``(N, D)``)."""
        return self._pass(w, tau, grad=False)[0]

    def evaluate(self, w: torch.Tensor, tau: float) -> Tuple[float, torch.Tensor]:
        """Mean cross-entropy at ``w`` and its exact gradient (``(N, D)`` float64), one pass."""
        loss, grad = self._pass(w, tau, grad=True)
        return loss, grad if grad is not None else torch.zeros(self.N, self.D)

    def _pass(self, w: torch.Tensor, tau: float, grad: bool
              ) -> Tuple[float, Optional[torch.Tensor]]:
        total = self.combine(self._chunk_rows(w, tau, grad), 2 + (self.N * self.D if grad else 0))
        if bool(total[1] > 0):
            raise ValueError("some pixels have no candidate prototype; every row of candidates "
                             "needs at least one True.")
        mean = float(-total[0]) / self.K
        r = total[2:].view(self.N, self.D) if grad else None
        return mean, (None if r is None else r / (self.K * tau))

    def _chunk_rows(self, w: torch.Tensor, tau: float, grad: bool) -> Iterator[torch.Tensor]:
        """Per chunk: ``[sum Q log P, any pixel without a candidate, (P * sum(Q) - Q)^T X ...]``
        (float64; the gradient part only when ``grad``)."""
        w = w.to(device=self.device, dtype=self.dtype)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        for x, q, m in self.chunks():
            # prototype-major (N, c) layout: the softmax runs along the long contiguous pixel axis
            # (on one CPU thread 2x faster than (c, N) for the demo's 15 prototypes; benchmarks/NOTES.md)
            s = torch.mm(w, x.T).div_(tau)
            q = q.T.contiguous()
            none = torch.zeros(1, dtype=torch.float64, device=self.device)
            if m is not None:
                m = m.T.contiguous()
                none = (~m.any(dim=0)).any().double().view(1)
                s.masked_fill_(~m, -math.inf)
            log_p = torch.log_softmax(s, dim=0)  # exactly -inf (P = 0) at non-candidates
            parts = [torch.where(q > 0, q * log_p, zero).sum().double().view(1), none]
            if grad:
                # (N, c); equals P - Q for pixels whose target sums to one
                resid = log_p.exp_().mul_(q.sum(dim=0, keepdim=True)).sub_(q)
                parts.append(torch.mm(resid, x).double().flatten())
            yield torch.cat(parts)

    def combine(self, rows: Iterator[torch.Tensor], width: int) -> torch.Tensor:
        """The sum of per-chunk float64 vectors of ``width`` values over every process's chunks.

        One process: added as they stream. ``reduce_sum``: this process's sum, then one
        collective sum. ``share``: every process's chunk vectors are gathered and added in global
        chunk order, the order one process adds them in, so the sum is bit for bit that of one
        process. A process whose rows hold NaN/inf (:class:`NonFiniteRowsError`, raised while the
        chunks stream) still takes part in the collective, so no process waits forever, then raises
        its own error naming the row; the others raise one that points to it.
        """
        total = torch.zeros(width, dtype=torch.float64, device=self.device)
        kept: List[torch.Tensor] = []
        failure: Optional[NonFiniteRowsError] = None
        try:
            for row in rows:
                if self.share is not None:
                    kept.append(row)
                else:
                    total += row
        except NonFiniteRowsError as err:
            if self.reduce_sum is None and self.share is None:
                raise
            failure = err
        if self.reduce_sum is not None:
            flag = torch.full((1,), float(failure is not None), dtype=torch.float64, device=self.device)
            summed = self.reduce_sum(torch.cat([total, flag]))
            others = int(summed[-1]) - (failure is not None)
            total = summed[:-1]
        elif self.share is not None:
            total, others = self._ordered_sum(kept, width, failure is not None)
        else:
            return total
        if failure is not None:
            raise failure
        if others:
            raise ValueError(f"{others} other process(es) found NaN/inf rows in their share of the "
                             "learning set (their error names the row); learning from them would give "
                             "NaN prototypes.")
        return total

    def _ordered_sum(self, kept: List[torch.Tensor], width: int, failed: bool) -> Tuple[torch.Tensor, int]:
        """Gather every process's chunk vectors and add them in global chunk order."""
        share = self.share
        assert share is not None
        world = share.world_size
        slots = -(-self.total_chunks // world)
        buf = torch.zeros(slots + 1, width, dtype=torch.float64, device=self.device)
        if kept and not failed:
            buf[:len(kept)] = torch.stack(kept)
        buf[slots, 0] = float(failed)
        gathered = share.all_gather(buf)
        others = sum(int(g[slots, 0]) for g in gathered) - failed
        total = torch.zeros(width, dtype=torch.float64, device=self.device)
        if others or failed:
            return total, others
        for j in range(self.total_chunks):
            total += gathered[j % world][j // world]
        return total, 0


# ------------------------------------------------------------------------------------------------
# Functional loss and gradient
# ------------------------------------------------------------------------------------------------


def prototype_loss(
    features: RowData,
    targets: RowData,
    prototypes: torch.Tensor,
    candidates: Any = None,
    tau: float = 0.03,
    *,
    chunk_size: int = 65536,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    reduce_sum: Optional[ReduceSum] = None,
    share: Optional[ChunkShare] = None,
) -> float:
    """Mean cross-entropy ``(1/K) sum -Q log P(W)``, computed in chunks.

    Equals ``mean KL(Q || P) + mean H(Q)``. ``inf`` when a target puts mass on a non-candidate.
    ``prototypes`` is used as given (not normalised), so the function is convex in it.

    Args:
        features: ``(K, D)`` tensor / array / np.memmap, or a list of per-image ``(n_i, D)``.
        targets: ``(K, N)`` in the same layouts (a list needs no alignment with ``features``).
        prototypes: ``(N, D)`` prototypes ``W``.
        candidates: ``None`` (all), ``(N,)`` bool for every pixel, ``(K, N)`` bool, or a list of
            per-image ``(N,)`` / ``(n_i, N)`` bool masks.
        tau: temperature ``tau_I``.
        chunk_size: rows per chunk.
        device: where to compute (default: the device of a tensor ``features``, else CPU).
        dtype: compute dtype of the chunk GEMMs (sums are accumulated in float64).
        reduce_sum: the rows are shared among processes (this one holds some of them): a function
            summing a tensor over the processes (see :func:`learn_vision_prototypes`); the result
            is the mean over every process's rows.
        share: the rows are this process's chunks of a set shared chunk by chunk
            (:class:`ChunkShare`): the result is bit for bit that of one process.

    Returns:
        The mean loss as a Python float.

    Example:
        >>> X = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
        >>> round(prototype_loss(X, torch.full((10, 3), 1 / 3), torch.zeros(3, 4)), 4)
        1.0986
    """
    check_ndim("prototypes", prototypes, 2, "(N, D)")
    tau = check_positive("tau", tau)
    prob = _Problem(features, targets, candidates, prototypes.shape[0], chunk_size, device, dtype,
                    reduce_sum, share)
    check_same("prototypes.shape[1]", prototypes.shape[1], "features.shape[1]", prob.D)
    return prob.loss(prototypes, tau)


def prototype_gradient(
    features: RowData,
    targets: RowData,
    prototypes: torch.Tensor,
    candidates: Any = None,
    tau: float = 0.03,
    *,
    chunk_size: int = 65536,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    reduce_sum: Optional[ReduceSum] = None,
    share: Optional[ChunkShare] = None,
) -> torch.Tensor:
    """Exact Euclidean gradient ``(1/(K tau)) (P - Q)^T X`` of :func:`prototype_loss`.

    For rows of ``Q`` that do not sum to one the exact gradient ``(P * sum(Q) - Q)^T X / (K tau)``
    is used (an all-zero row contributes nothing). Non-candidate entries contribute exactly zero.
    Arguments as in :func:`prototype_loss`.

    Returns:
        ``(N, D)`` gradient in ``dtype`` (accumulated over chunks in float64), on ``device``.
    """
    check_ndim("prototypes", prototypes, 2, "(N, D)")
    tau = check_positive("tau", tau)
    prob = _Problem(features, targets, candidates, prototypes.shape[0], chunk_size, device, dtype,
                    reduce_sum, share)
    check_same("prototypes.shape[1]", prototypes.shape[1], "features.shape[1]", prob.D)
    return prob.evaluate(prototypes, tau)[1].to(dtype)


# ------------------------------------------------------------------------------------------------
# Algorithm 1: projected / Riemannian gradient descent
# ------------------------------------------------------------------------------------------------


def _project_init(init: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    w = init.detach().to(device=device, dtype=dtype).clone()
    norms = w.double().norm(dim=1)
    if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("init_prototypes has a zero or non-finite row; it cannot be projected "
                         "to the unit sphere.")
    off = (norms - 1).abs() > _UNIT_TOL
    if bool(off.any()):
        w[off] = F.normalize(w[off], dim=1)
    return w


def _retract(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``normalize(w - step)`` row-wise; rows with an exactly zero step stay bit-identical."""
    moved = step.ne(0).any(dim=1)
    out = w.clone()
    if bool(moved.any()):
        out[moved] = F.normalize(w[moved] - step[moved], dim=1)
    return out


def _tangent(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Riemannian gradient on the product of unit spheres: ``g - <g, w> w`` per row."""
    return g - (g * w).sum(dim=1, keepdim=True) * w


_ARMIJO_C = 1e-4  # sufficient-decrease constant of the Armijo test
_MAX_BACKTRACKS = 40  # halvings of one trial step before declaring numerical stationarity
_BB_RANGE = (1e-10, 1e10)  # safeguard on Barzilai-Borwein steps (mean-gradient units)
_NOISE_FLOOR = 1.0  # "bb": required decrease, in units of eps(dtype) * |L|


def _bb_step(s: torch.Tensor, y: torch.Tensor, iteration: int, last: float) -> float:
    """Alternating Barzilai-Borwein step: ``<s,s>/<s,y>`` on odd iterations, ``<s,y>/<y,y>`` on
    even ones (Dai & Fletcher 2005); ``2 * last`` when the curvature ``<s,y>`` is not positive."""
    sy = float((s * y).sum())
    if not sy > 0.0:
        return 2.0 * last
    step = float((s * s).sum()) / sy if iteration % 2 else sy / float((y * y).sum())
    if not math.isfinite(step):
        return 2.0 * last
    return min(max(step, _BB_RANGE[0]), _BB_RANGE[1])


def _class_level_problem(prob: _Problem, init: torch.Tensor, tau_text: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-level anchors (``docs/vpl.md#level``): ``mu_n = normalize(sum_k Q[k, n] x_k)`` and targets
    ``softmax_j(mu_n . z_j / tau_text)`` over the prototypes that are a candidate somewhere."""
    def rows() -> Iterator[torch.Tensor]:
        for x, q, m in prob.chunks():
            active = torch.ones(prob.N, dtype=torch.bool, device=prob.device) if m is None else m.any(dim=0)
            yield torch.cat([(q.T @ x).double(), q.sum(dim=0).double()[:, None],
                             active.double()[:, None]], dim=1).flatten()

    total = prob.combine(rows(), prob.N * (prob.D + 2)).view(prob.N, prob.D + 2)
    base, mass, active = total[:, :prob.D], total[:, prob.D], total[:, prob.D + 1] > 0
    has_anchor = (mass > 0) & active
    if not bool(has_anchor.any()):
        raise ValueError("level='class' found no prototype with target mass; targets are all zero.")
    anchors = F.normalize(base[has_anchor], dim=1)
    s = (anchors @ init.to(device=prob.device, dtype=torch.float64).T / tau_text)
    q_cls = torch.softmax(s.masked_fill(~active, -math.inf), dim=1)
    return anchors.to(prob.dtype), q_cls.to(prob.dtype), active


def learn_vision_prototypes(
    features: RowData,
    targets: RowData,
    init_prototypes: torch.Tensor,
    candidates: Any = None,
    *,
    tau: float = 0.03,
    lr: float = 10.0,
    iters: int = 3000,
    step_rule: str = "bb",
    level: str = "instance",
    tau_text: float = 0.01,
    tol: Optional[float] = None,
    chunk_size: int = 65536,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    callback: Optional[Callable[[int, torch.Tensor], Optional[bool]]] = None,
    progress: bool = False,
    return_history: bool = False,
    reduce_sum: Optional[ReduceSum] = None,
    share: Optional[ChunkShare] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, Any]]]:
    """Learn vision prototypes ``W`` by full-batch gradient descent on the unit spheres (Alg. 1).

    Minimises :func:`prototype_loss` (mean over all ``K`` pixels of ``-sum_n Q log P(W)``, ``P`` the
    softmax over the candidates of ``X W^T / tau``) starting from ``init_prototypes`` (the text
    prototypes), keeping every row unit-norm. Each pass over the data streams ``chunk_size`` rows
    at a time to ``device``: features may be an ``np.memmap`` far larger than device memory.

    Step rules (``lr`` is in the paper's unit in both: a multiplier of the Euclidean gradient of the
    *mean* cross-entropy, ``G = (1/(K tau)) (P - Q)^T X``, so ``lr = 10`` means what the paper's
    ``alpha = 10`` means):

    * ``"bb"`` (recommended, default): Riemannian gradient descent on the product of spheres with
      Barzilai-Borwein step sizes and Armijo backtracking. Direction: the tangent part
      ``G_t = G - <G, w> w`` of each row (the radial part only changes norms, which the projection
      undoes; with a large step it can even flip a prototype). Trial
      ``W' = normalize(W - eta G_t)``, accepted when
      ``L(W') <= L(W) - max(1e-4 eta ||G_t||_F^2, eps |L(W)|)`` (``eps`` of
      ``dtype``: smaller decreases are rounding noise), else ``eta`` is halved and the trial
      repeated; every trial is one pass over the data. The first trial of iteration 1 is
      ``eta = lr``; later first trials are the alternating BB steps ``<s,s>/<s,y>`` and
      ``<s,y>/<y,y>`` (``s = W_t - W_{t-1}``, ``y`` the change of the tangent gradient), i.e. an
      inverse-curvature estimate in the same units. So ``lr`` is the paper's first step, and the
      step then follows the curvature both ways instead of only shrinking. The loss history is
      monotone non-increasing by construction. When backtracking reaches a step whose first-order
      decrease ``eta ||G_t||^2`` is below the noise floor (or 40 halvings), no representable
      progress is possible and learning stops early with ``history['stopped'] == 'converged'``.
    * ``"halving"`` (the paper / InMaP Algorithm 1 literally,
      ``docs/vpl.md#step-rule-and-what-lr-means``):
      ``R = (P - Q)^T X``; ``alpha`` (``= lr`` at the start) is halved whenever ``||R||_F`` grew
      since the previous iteration; ``W <- normalize(W - (alpha / (K tau)) R)``; one pass per
      iteration, always ``iters`` iterations. ``alpha`` never grows back, so it can collapse long
      before convergence, and the loss is not monotone.

    How the two rules compare, measured: ``benchmarks/NOTES.md``, section "Step rules of
    learn_vision_prototypes" (``test_bb_reaches_lower_loss_than_halving_at_tau_01`` keeps one case).

    Both rules leave a row whose gradient is exactly zero (a prototype that is never a candidate)
    bit-identical to its init; init rows already unit to 1e-6 are taken verbatim.

    Args:
        features: ``(K, D)`` tensor, ndarray / np.memmap (float16 or float32, read chunk by chunk),
            any array-like with ``.shape`` and slicing (h5py, zarr), or a list / iterable of
            per-image ``(n_i, D)`` arrays.
        targets: ``(K, N)`` targets in any of the same layouts (rows sum to 1, zero outside the
            candidates; see :func:`build_targets`).
        init_prototypes: ``(N, D)`` initial prototypes (text prototypes ``Z``), fg rows first.
        candidates: ``None`` (every prototype), ``(N,)`` bool for all pixels, ``(K, N)`` bool, or a
            list of per-image ``(N,)`` masks (broadcast over the image's pixels) or ``(n_i, N)``.
        tau: temperature ``tau_I`` (paper 0.03).
        lr: step size in mean-gradient units (paper 10); see the step rules above.
        iters: number of iterations (accepted steps for ``"bb"``; paper: 3000, fixed).
        step_rule: ``"bb"`` (default) or ``"halving"``.
        level: ``"instance"`` (default; anchor = each pixel) or ``"class"`` (an
            ablation, ``docs/vpl.md#level``: anchors ``mu_n = normalize(sum_k Q[k, n] x_k)``, i.e.
            the seed-pixel centroid
            for a one-hot class and the ``Q``-weighted bg centroid for a bg concept; target
            ``softmax_j(mu_n . z_j / tau_text)`` with ``Z = init_prototypes`` over the prototypes
            that are a candidate anywhere; loss = mean over anchors of the cross-entropy).
        tau_text: text temperature of the class-level targets (ignored at instance level).
        tol: early stop once the Riemannian gradient norm ``||G_t||_F <= tol * ||G_t(W_0)||_F``.
            Default ``None``: run all ``iters`` (the paper's fixed schedule).
        chunk_size: rows per chunk (chunked equals unchunked up to float rounding).
        device: compute device (default: that of a tensor ``features``, else CPU).
        dtype: compute dtype (chunks are cast on the device; sums accumulate in float64).
        callback: ``callback(iteration, W)`` after every update (``iteration`` from 1, ``W`` the
            ``(N, D)`` current prototypes on ``device``; clone to keep). Returning True stops.
        progress: show a tqdm bar when tqdm is installed (silently none otherwise).
        reduce_sum: several processes, each holding a share of the rows (``features``,
            ``targets`` and ``candidates`` are this process's rows; a share may be empty): a
            function summing a tensor over the processes, e.g.
            :func:`vpl_plugin.distributed.all_reduce_sum` under torchrun. Every pass sums the loss
            and gradient statistics over the processes (one call of ``(N * D + 3)`` float64 values),
            so every process takes the same steps and returns the same ``W``: that of one process
            holding all the rows, up to the order of float summation. Every process must call this
            function with the same arguments apart from its rows. ``None``: this process has all
            rows.
        share: instead of ``reduce_sum``, when this process's rows are whole chunks of the set
            (:class:`ChunkShare`): every pass gathers the per-chunk sums and adds them in chunk
            order, so ``W`` is bit for bit that of one process holding every row (same
            ``chunk_size``, device, dtype and thread count). Costs one gather of
            ``chunks x (N * D + 2)`` float64 values per pass.
        return_history: also return a dict of per-iteration lists: ``loss`` (``L(W_0..W_T)``,
            length ``T + 1``), ``grad_norm`` (``||G(W_t)||_F``, Euclidean, length ``T``),
            ``lr`` (step size used at iteration ``t``), ``evaluations`` (cumulative passes over the
            data after iteration ``t``), ``iterations``, ``stopped`` (``"iters"``, ``"converged"``,
            ``"zero_gradient"``, ``"tol"`` or ``"callback"``), ``step_rule``, ``tau``, ``level``.

    Returns:
        ``(N, D)`` float32 CPU tensor of unit rows, and the history dict when ``return_history``.

    Raises:
        ValueError: ``tau``, ``lr`` or ``tau_text`` is not a finite number > 0; shapes disagree;
            :class:`NonFiniteRowsError` (a ValueError) when a features or targets row holds
            NaN/inf (checked chunk by chunk during the first pass over the data).

    Example:
        >>> X = torch.nn.functional.normalize(torch.randn(300, 8), dim=1)
        >>> Z = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
        >>> Q = torch.softmax(X @ Z.T / 0.01, dim=1)
        >>> W, hist = learn_vision_prototypes(X, Q, Z, iters=5, return_history=True)
        >>> hist["loss"][-1] <= hist["loss"][0]
        True
    """
    check_choice("step_rule", step_rule, STEP_RULES)
    check_choice("level", level, ("instance", "class"))
    check_ndim("init_prototypes", init_prototypes, 2, "(N, D)")
    tau = check_positive("tau", tau)
    lr = check_positive("lr", lr)
    check_range("iters", iters, 0)
    tau_text = check_positive("tau_text", tau_text)
    if tol is not None:
        check_range("tol", tol, 0.0)

    prob = _Problem(features, targets, candidates, init_prototypes.shape[0], chunk_size, device,
                    dtype, reduce_sum, share)
    check_same("init_prototypes.shape[1]", init_prototypes.shape[1], "features.shape[1]", prob.D,
               "Prototypes and features must live in the same (joint CLIP) space.")
    dev = prob.device
    w = _project_init(init_prototypes, dev, dtype)
    if level == "class":
        anchors, q_cls, active = _class_level_problem(prob, w, tau_text)
        prob = _Problem(anchors, q_cls, active, prob.N, chunk_size, dev, dtype)

    history: Dict[str, Any] = {"loss": [], "grad_norm": [], "lr": [], "evaluations": [],
                               "step_rule": step_rule, "tau": float(tau), "level": level,
                               "stopped": "iters"}
    loss, g = prob.evaluate(w, tau)
    if not math.isfinite(loss):
        raise ValueError("the loss at init_prototypes is not finite: targets put mass on "
                         "non-candidate prototypes (P = 0 there) or features contain inf/nan. "
                         "Zero those target entries or widen candidates.")
    evals = 1
    history["loss"].append(loss)
    g_t0 = float(_tangent(g, w.double()).norm())
    bar = progress_bar(total=iters, desc="vision prototypes", enabled=progress, leave=False)
    eta = float(lr)
    g_prev = math.inf
    w_prev: Optional[torch.Tensor] = None
    gt_prev: Optional[torch.Tensor] = None
    try:
        for it in range(1, iters + 1):
            gnorm = float(g.norm())
            if step_rule == "halving":
                if gnorm > g_prev:
                    eta /= 2.0
                g_prev = gnorm
                w = _retract(w, (eta * g).to(dtype))
                loss, g_new = prob.evaluate(w, tau)
                evals += 1
            else:
                w64 = w.double()
                gt = _tangent(g, w64)
                gt_sq = float((gt * gt).sum())
                if gt_sq == 0.0:
                    history["stopped"] = "zero_gradient"
                    break
                if w_prev is not None and gt_prev is not None:
                    eta = _bb_step(w64 - w_prev, gt - _tangent(gt_prev, w64), it, eta)
                # A decrease below ~eps(dtype) |L| is rounding noise (measured: the fp32 loss
                # error is about 0.5 eps |L|); steps whose first-order decrease eta |G_t|^2 is below
                # it cannot make representable progress, so backtracking stops there.
                floor = _NOISE_FLOOR * torch.finfo(dtype).eps * abs(loss)
                accepted = False
                for _ in range(_MAX_BACKTRACKS + 1):
                    w_try = _retract(w, (eta * gt).to(dtype))
                    loss_try, g_try = prob.evaluate(w_try, tau)
                    evals += 1
                    if loss_try <= loss - max(_ARMIJO_C * eta * gt_sq, floor):
                        accepted = True
                        break
                    eta /= 2.0
                    if eta * gt_sq < floor:
                        break
                if not accepted:
                    history["stopped"] = "converged"
                    break
                w_prev, gt_prev = w64, gt
                w, loss, g_new = w_try, loss_try, g_try
            history["grad_norm"].append(gnorm)
            history["lr"].append(eta)
            history["loss"].append(loss)
            history["evaluations"].append(evals)
            g = g_new
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.5f}")
            if callback is not None and callback(it, w):
                history["stopped"] = "callback"
                break
            if tol is not None and float(_tangent(g, w.double()).norm()) <= tol * g_t0:
                history["stopped"] = "tol"
                break
    finally:
        if bar is not None:
            bar.close()
    out = w.detach().to(device="cpu", dtype=torch.float32)
    if return_history:
        history["iterations"] = len(history["lr"])
        return out, history
    return out


# ------------------------------------------------------------------------------------------------
# Modality gap (docs/vpl.md#measuring-the-modality-gap)
# ------------------------------------------------------------------------------------------------


def modality_gap(features: torch.Tensor, seed_labels: torch.Tensor,
                 prototypes: torch.Tensor) -> float:
    """Centroid gap between seed pixels and their class prototypes (``docs/vpl.md``, modality gap).

    ``Gap = || mean_{k in F} x_k - mean_{k in F} psi_{m_k} ||_2`` over the pixels ``F`` with a
    label ``m_k >= 0`` (Liang et al.'s centroid gap on (pixel, its-class-prototype) pairs).

    Args:
        features: ``(K, D)`` pixel features.
        seed_labels: ``(K,)`` int prototype row of each pixel's seed class; negative = excluded
            (background / unlabelled).
        prototypes: ``(N, D)`` prototypes ``psi`` (text ``Z`` or vision ``W``).

    Returns:
        The gap as a float (computed in float64).

    Example:
        >>> Z = torch.eye(2)
        >>> modality_gap(torch.eye(2), torch.tensor([0, 1]), Z)
        0.0
    """
    check_ndim("features", features, 2, "(K, D)")
    check_ndim("seed_labels", seed_labels, 1, "(K,)")
    check_ndim("prototypes", prototypes, 2, "(N, D)")
    check_same("len(seed_labels)", seed_labels.shape[0], "features.shape[0]", features.shape[0])
    check_same("prototypes.shape[1]", prototypes.shape[1], "features.shape[1]", features.shape[1])
    labels = seed_labels.to(device=features.device, dtype=torch.long)
    keep = labels >= 0
    n_sel = int(keep.sum())
    if n_sel == 0:
        raise ValueError("modality_gap needs at least one labelled (>= 0) seed pixel; got none.")
    if int(labels[keep].max()) >= prototypes.shape[0]:
        raise ValueError(f"seed_labels index prototype rows 0..{prototypes.shape[0] - 1}; got "
                         f"{int(labels[keep].max())}.")
    x_mean = features[keep].double().mean(dim=0)
    counts = torch.bincount(labels[keep], minlength=prototypes.shape[0]).double()
    psi_mean = counts.to(prototypes.device) @ prototypes.double() / n_sel
    return float((x_mean - psi_mean.to(x_mean.device)).norm())


def shift_text_prototypes(text: torch.Tensor, features: torch.Tensor,
                          lam: float = 0.5) -> torch.Tensor:
    """The "modify gap" baseline (Liang et al. 2022): move ``Z`` toward the images.

    See ``docs/vpl.md#measuring-the-modality-gap``.

    ``delta = mean(x) - mean(z)``; returns ``z' = normalize(z + lam * delta / 2)`` (the features
    would move by ``-lam * delta / 2``; only the prototypes are needed for CAMs).

    Args:
        text: ``(N, D)`` text prototypes.
        features: ``(K, D)`` image / pixel features whose centroid defines the gap.
        lam: fraction of the gap to close (tuned on val; e.g. 0.5).

    Returns:
        ``(N, D)`` unit-row prototypes in the dtype of ``text``.

    Example:
        >>> shift_text_prototypes(torch.eye(2), torch.eye(2), lam=0.0).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    check_ndim("text", text, 2, "(N, D)")
    check_ndim("features", features, 2, "(K, D)")
    check_same("features.shape[1]", features.shape[1], "text.shape[1]", text.shape[1])
    delta = features.double().mean(dim=0).to(text.device) - text.double().mean(dim=0)
    return F.normalize(text.double() + lam * delta / 2, dim=1).to(text.dtype)


# ------------------------------------------------------------------------------------------------
# Prototype sets on disk
# ------------------------------------------------------------------------------------------------


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` loads with ``torch.load(weights_only=True)``."""
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _check_plain(v, f"{where}[{j}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; use str.")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} holds a {type(value).__name__}, which a weights_only load cannot "
                    "read; store str / int / float / bool / None / lists / dicts / tensors "
                    "(e.g. str(value)).")


@dataclass
class PrototypeSet:
    """A prototype set (text or vision) with its names, temperature and provenance.

    Attributes:
        prototypes: ``(N, D)`` rows, fg classes first then background concepts.
        class_names: the ``N_fg`` foreground names.
        background_names: the ``N_bg`` background concept names.
        tau: temperature the set was learned / is used with; GradCAM's logit scale is ``1/tau``.
        kind: ``"text"`` or ``"vision"``.
        provenance: free-form record (config, model id, date, iterations, final loss, ...);
            plain values only (str / numbers / bool / None / lists / dicts / tensors).
        logit_scale_override: exact logit scale to use instead of ``1/tau`` (e.g. the fp32
            ``exp(logit_scale)`` of CLIP for a text set: ``1/(1/s)`` does not round-trip in fp32).

    Raises:
        ValueError: a row holds NaN/inf or is all zeros (the message names the row's class),
            ``tau`` or ``logit_scale_override`` is not a finite number > 0, or the names do not
            match the rows.

    Example:
        >>> ps = PrototypeSet(torch.eye(3), ["cat"], ["sky", "grass"], tau=0.03)
        >>> ps.num_fg, ps.bg.shape, round(ps.logit_scale, 3)
        (1, torch.Size([2, 3]), 33.333)
    """

    prototypes: torch.Tensor
    class_names: Sequence[str]
    background_names: Sequence[str]
    tau: float
    kind: str = "vision"
    provenance: Dict[str, Any] = field(default_factory=dict)
    logit_scale_override: Optional[float] = None

    def __post_init__(self) -> None:
        check_ndim("prototypes", self.prototypes, 2, "(N, D)")
        check_choice("kind", self.kind, ("text", "vision"))
        self.tau = check_positive("tau", self.tau)
        if isinstance(self.class_names, str) or isinstance(self.background_names, str):
            raise TypeError("class_names and background_names must be sequences of names, not a "
                            "single string.")
        self.class_names = tuple(str(n) for n in self.class_names)
        self.background_names = tuple(str(n) for n in self.background_names)
        check_same("prototypes.shape[0]", self.prototypes.shape[0],
                   "len(class_names) + len(background_names)",
                   len(self.class_names) + len(self.background_names),
                   "Give one name per prototype row, foreground first.")
        if self.logit_scale_override is not None:
            self.logit_scale_override = check_positive("logit_scale_override",
                                                        self.logit_scale_override)
        self._check_rows()
        if not isinstance(self.provenance, dict):
            raise TypeError(f"provenance must be a dict; got {type(self.provenance).__name__}.")

    def _check_rows(self) -> None:
        """Refuse rows holding NaN/inf or all zeros (which cannot be normalised), by name."""
        rows = self.prototypes.detach()
        if not rows.is_floating_point():
            raise TypeError(f"prototypes must be floating point; got {rows.dtype}.")
        finite = torch.isfinite(rows)
        problems = []
        names = list(self.class_names) + list(self.background_names)
        for i in (~finite).any(dim=1).nonzero().flatten().tolist():
            nan = int(torch.isnan(rows[i]).sum())
            inf = int((~finite[i]).sum()) - nan
            problems.append(f"row {i} ({names[i]!r}) holds {nan} NaN and {inf} inf values")
        zero = (rows == 0).all(dim=1) & finite.all(dim=1)
        for i in zero.nonzero().flatten().tolist():
            problems.append(f"row {i} ({names[i]!r}) is all zeros and cannot be normalised")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                               else "")
            raise ValueError(f"prototypes: {shown}. Relearn or re-export the set; a prototype "
                             "must be a finite non-zero vector.")

    @property
    def num_fg(self) -> int:
        """Number of foreground prototypes ``N_fg``."""
        return len(self.class_names)

    @property
    def fg(self) -> torch.Tensor:
        """``(N_fg, D)`` foreground prototypes (a view)."""
        return self.prototypes[: self.num_fg]

    @property
    def bg(self) -> torch.Tensor:
        """``(N_bg, D)`` background prototypes (a view)."""
        return self.prototypes[self.num_fg:]

    @property
    def logit_scale(self) -> float:
        """Scale multiplied into the normalised image feature in GradCAM: the override, else
        ``1/tau``. Cast with ``torch.tensor(ps.logit_scale, dtype=torch.float32)``; an override
        holding an fp32 value converts exactly."""
        if self.logit_scale_override is not None:
            return self.logit_scale_override
        return 1.0 / self.tau

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the set atomically as a plain dict (``torch.load(path, weights_only=True)``)."""
        _check_plain(self.provenance, "provenance")
        payload = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "prototypes": self.prototypes.detach().cpu().contiguous().clone(),
            "class_names": list(self.class_names),
            "background_names": list(self.background_names),
            "tau": self.tau,
            "kind": self.kind,
            "logit_scale_override": self.logit_scale_override,
            "provenance": self.provenance,
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PrototypeSet":
        """Load a set written by :meth:`save` (CPU tensors).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a readable prototype file, misses keys, its names do not
                match its rows, a row holds NaN/inf or is all zeros, or ``tau`` or the logit
                scale override is not a finite number > 0 (the message names the file and,
                for a row, its class).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prototype file {path!r} does not exist.")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt / foreign file
            raise ValueError(f"{path!r} is not a readable PrototypeSet file "
                             f"({type(err).__name__}: {err}).") from err
        check_tensor_sizes(payload, path, "prototype file")
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path!r} is not a PrototypeSet file (no format tag {_FORMAT!r}); "
                             "write it with PrototypeSet.save.")
        required = ("prototypes", "class_names", "background_names", "tau", "kind")
        missing = [k for k in required if k not in payload]
        if missing:
            raise ValueError(f"PrototypeSet file {path!r} is missing keys {missing}.")
        protos = payload["prototypes"]
        if not isinstance(protos, torch.Tensor) or protos.ndim != 2:
            raise ValueError(f"PrototypeSet file {path!r}: 'prototypes' must be an (N, D) tensor.")
        n_names = len(payload["class_names"]) + len(payload["background_names"])
        if protos.shape[0] != n_names:
            raise ValueError(f"PrototypeSet file {path!r} has {protos.shape[0]} prototype rows but "
                             f"{n_names} names (class_names + background_names).")
        try:
            return cls(prototypes=protos, class_names=payload["class_names"],
                       background_names=payload["background_names"], tau=payload["tau"],
                       kind=payload["kind"], provenance=payload.get("provenance", {}) or {},
                       logit_scale_override=payload.get("logit_scale_override"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"PrototypeSet file {path!r} is invalid: {err}") from err
