"""GradCAM over any prototype set and CLIP-ES's class-aware attention-affinity (CAA) refinement.

Functional pieces, each faithful to upstream CLIP-ES (``docs/upstream_clip_es.md#gradcam`` and
``docs/upstream_clip_es.md#class-aware-attention-affinity-caa``):

* :func:`prototype_probabilities` - softmax of ``scale * normalise(f) @ normalise(T)^T``.
* :func:`gradcam` - channel weights = spatial mean of the gradient, ReLU of the weighted sum,
  min-max normalised twice (``docs/upstream_clip_es.md#double-min-max``).
* :func:`box_mask` - the ``scoremap2bbox`` box mask (upstream's dropped last row and column
  switchable, ``box_clip_fix``).
* :func:`affinity_transition` - attention affinity: last layers' patch attention averaged, three
  Sinkhorn rounds, symmetrised, squared. It does not depend on the class, so it is computed once
  per image.
* :func:`refine_cams` - ``T @ (mask * cam)`` for all classes at once, min-max, resized.
* :func:`image_gradcams` - one trunk forward and one batched backward through the last block for
  all classes of an image; on the CPU with subnormal floats flushed to zero
  (:func:`flushes_subnormals`, ``docs/upstream_clip_es.md#subnormals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Sequence, Tuple, Union

import numpy as np
import torch

from vpl_plugin._imports import require
from vpl_plugin._subnormals import flushed_subnormals

if TYPE_CHECKING:
    from vpl_plugin.backbones.clip import CLIPDense

__all__ = [
    "GradCAMResult",
    "affinity_transition",
    "box_mask",
    "choose_backward",
    "flushes_subnormals",
    "dense_maps",
    "gradcam",
    "image_gradcams",
    "minmax_scale",
    "prototype_probabilities",
    "refine_cams",
    "resize_maps",
    "batch_image_gradcams",
]


def minmax_scale(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``(x - min) / (eps + max(x - min))`` over the last two dims, as CLIP-ES's ``scale_cam_image``.

    Args:
        x: ``(..., h, w)`` float32.
    """
    flat = x.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (eps + flat.max(dim=-1, keepdim=True).values)
    return flat.reshape(x.shape)


def dense_maps(features: torch.Tensor, stacked: torch.Tensor, k: int, grid: Tuple[int, int],
               logit_scale: float, kind: str = "softmax") -> torch.Tensor:
    """Per-class dense maps ``(k, h, w)`` of the first ``k`` rows of ``stacked`` (VPL's per-token
    map, ``--map-mode dense``; ``docs/vpl.md``).

    Args:
        features: ``(h*w, D)`` unit patch features.
        stacked: ``(k + n_bg, D)`` prototypes, the image's classes first, then the background.
        k: how many leading rows are the image's classes.
        grid: ``(h, w)``.
        logit_scale: the set's scale (``1/tau``) for the softmax.
        kind: ``"softmax"`` (per-token posterior over the ``stacked`` rows) or ``"cosine"``.

    Returns:
        float32 maps, min-max normalised per class (:func:`minmax_scale`).
    """
    stacked = stacked / stacked.norm(dim=-1, keepdim=True)
    sims = features.float() @ stacked.t()  # (n, k + n_bg)
    if kind == "softmax":
        maps = (sims * float(logit_scale)).softmax(dim=-1)[:, :k]
    elif kind == "cosine":
        maps = sims[:, :k]
    else:
        raise ValueError(f"kind must be 'softmax' or 'cosine'; got {kind!r}.")
    return minmax_scale(maps.t().reshape(k, *grid))


def prototype_probabilities(image_embedding: torch.Tensor, prototypes: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP-ES's image-level softmax over a stacked prototype set.

    Args:
        image_embedding: ``(B, D)`` unnormalised pooled embeddings.
        prototypes: ``(P, D)`` rows (renormalised here by plain division, as upstream).
        logit_scale: 0-d tensor multiplied into the normalised embedding before the product.

    Returns:
        ``(B, P)`` probabilities.
    """
    f = image_embedding / image_embedding.norm(dim=-1, keepdim=True)
    t = prototypes.to(f.dtype)
    t = t / t.norm(dim=-1, keepdim=True)
    logits = (logit_scale.to(f.device, f.dtype) * f) @ t.t()
    return logits.softmax(dim=-1)


def gradcam(activation: torch.Tensor, gradient: torch.Tensor, grid: Tuple[int, int],
            half_arithmetic: bool = False) -> torch.Tensor:
    """GradCAM of ViT tokens, normalised twice like CLIP-ES.

    Args:
        activation: ``(L, B, C)`` target-layer tokens (CLS first).
        gradient: ``(L, B, C)`` gradient of each copy's score with respect to ``activation``.
        grid: token grid ``(h, w)``.
        half_arithmetic: emulate upstream's fp16 numpy arithmetic (its GPU path,
            docs/upstream_clip_es.md#fp16-on-gpu).

    Returns:
        ``(B, h, w)`` float32 maps in ``[0, 1)``.
    """
    h, w = grid
    act = activation[1:].permute(1, 0, 2).detach()
    grad = gradient[1:].permute(1, 0, 2).detach()
    if half_arithmetic:
        act16, grad16 = act.half().cpu(), grad.half().cpu()
        weights = grad16.float().mean(dim=1).half()
        cam = (weights[:, None, :] * act16).float().sum(dim=-1).half()
        cam = cam.clamp_min(0).float()
    else:
        act, grad = act.float().cpu(), grad.float().cpu()
        weights = grad.mean(dim=1)
        cam = (weights[:, None, :] * act).sum(dim=-1).clamp_min(0)
    cam = cam.reshape(-1, h, w)
    return minmax_scale(minmax_scale(cam))


def box_mask(cam: Union[np.ndarray, torch.Tensor], threshold: float, clip_fix: bool = False) -> np.ndarray:
    """CLIP-ES's ``scoremap2bbox`` mask: union of the bounding boxes of all contours above threshold.

    Args:
        cam: ``(h, w)`` float32 map in ``[0, 1)``.
        threshold: relative threshold (0.4 VOC, 0.7 COCO) of the uint8 map's maximum.
        clip_fix: ``False`` reproduces upstream (box ends clamped to ``size - 1`` and used as
            exclusive ends, so the last row and column are never in the mask,
            docs/upstream_clip_es.md#box-mask-last-row-column).

    Returns:
        ``(h, w)`` float32 0/1 mask.
    """
    cv2 = require("cv2")
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    h, w = cam.shape
    s8 = (cam.astype(np.float32) * np.float32(255)).astype(np.uint8)
    t = int(threshold * int(s8.max()))
    _, binary = cv2.threshold(s8, t, 255, cv2.THRESH_BINARY)
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[0] if len(found) == 2 else found[1]
    mask = np.zeros((h, w), dtype=np.float32)
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        if clip_fix:
            x1, y1 = min(x + bw, w), min(y + bh, h)
        else:
            x1, y1 = min(x + bw, w - 1), min(y + bh, h - 1)
        mask[y:y1, x:x1] = 1
    return mask


def affinity_transition(attention_maps: Sequence[torch.Tensor], layers: int = 8,
                        rounds: int = 3) -> torch.Tensor:
    """Class-independent CAA transition matrix from head-averaged attention.

    Args:
        attention_maps: per-block ``(1, L, L)`` (or ``(L, L)``) attention, last block last.
        layers: how many of the last blocks to average (8 in CLIP-ES).
        rounds: column- then row-normalisation rounds (3 in CLIP-ES).

    Returns:
        ``(n, n)`` float32 CPU matrix ``T``, symmetrised and squared.
    """
    maps = [m[0] if m.dim() == 3 else m for m in attention_maps]
    stacked = torch.stack([m[1:, 1:] for m in maps])[-layers:]
    aff = stacked.mean(dim=0).float().cpu()
    t = aff
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.t()) / 2
    return t @ t


def refine_cams(transition: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """CAA for all classes: ``r_c = T (mask_c * cam_c)``, min-max normalised.

    Masking the columns of ``T`` by ``mask_c`` and multiplying by ``cam_c`` equals multiplying ``T``
    by the masked map, so all classes take one matrix product.

    Args:
        transition: ``(n, n)`` from :func:`affinity_transition`.
        cams: ``(k, h, w)`` GradCAMs.
        masks: ``(k, h, w)`` box masks.

    Returns:
        ``(k, h, w)`` refined maps at token resolution (before resizing); all-zero where the mask
        is empty.
    """
    k, h, w = cams.shape
    src = (masks.float() * cams.float()).reshape(k, h * w)
    refined = (transition @ src.t()).t().reshape(k, h, w)
    return minmax_scale(refined)


def resize_maps(maps: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear ``cv2.resize`` (half-pixel centres) of ``(k, h, w)`` maps to ``(H0, W0)`` float32."""
    cv2 = require("cv2")
    height, width = size
    arr = maps.detach().cpu().numpy().astype(np.float32)
    if arr.shape[0] == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    return np.stack([cv2.resize(m, (width, height)) for m in arr])


def flushes_subnormals(encoder: object) -> bool:
    """Whether GradCAMs of ``encoder`` flush subnormal floats to zero: on the CPU, when the encoder
    asks for it (:class:`~vpl_plugin.backbones.CLIPDense` does unless built with
    ``flush_subnormals=False``, ``--keep-subnormals``; ``docs/upstream_clip_es.md#subnormals``)."""
    device = getattr(encoder, "device", "cpu")
    return bool(getattr(encoder, "flush_subnormals", False)) and torch.device(device).type == "cpu"


def choose_backward(device: Union[str, torch.device]) -> str:
    """The per-class backward :func:`image_gradcams` uses with ``backward="auto"``: ``"batched"``
    on CUDA, ``"shared"`` elsewhere (tests call it with ``"cuda"`` to run the GPU branch on a CPU)."""
    return "batched" if torch.device(device).type == "cuda" else "shared"


@dataclass
class GradCAMResult:
    """Everything one image's forward gives.

    Attributes:
        cams: ``(k, h, w)`` GradCAMs (double min-max), one per target class.
        probabilities: ``(P,)`` the image-level softmax over the stacked prototypes.
        features: ``(n, D)`` unit-norm projected patch tokens (VPL's pixel features).
        attention: last ``layers`` attention maps, each ``(1, L, L)``, last block last.
        grid: ``(h, w)``.
    """

    cams: torch.Tensor
    probabilities: torch.Tensor
    features: torch.Tensor
    attention: List[torch.Tensor]
    grid: Tuple[int, int]


def image_gradcams(encoder: "CLIPDense", image: torch.Tensor, prototypes: torch.Tensor, targets: Sequence[int],
                   logit_scale: torch.Tensor, *, affinity_layers: int = 8,
                   backward: str = "auto") -> GradCAMResult:
    """GradCAMs of all target columns of one image from one trunk forward.

    ``backward`` chooses how the per-class gradients through the last block are taken (all give
    the per-class results of upstream's loop, which re-runs the last block for every class):

    * ``"batched"``: the last block runs on ``k`` copies of the trunk tokens (one per target) and
      one backward of the summed copy scores gives each copy its class gradient (best on GPUs).
    * ``"shared"``: one last-block forward, then ``k`` backward passes through the same graph
      (measured fastest on CPU: 0.74 s against 1.19 s for upstream's loop and 1.46 s batched, 4
      classes, ViT-B/16, one thread).
    * ``"auto"``: ``"batched"`` on CUDA, ``"shared"`` elsewhere.

    Args:
        encoder: a :class:`~vpl_plugin.backbones.CLIPDense`.
        image: ``(3, H, W)`` preprocessed image (sizes multiples of the patch size).
        prototypes: ``(P, D)`` stacked prototypes (image classes first, then background).
        targets: column indices whose probability is explained (``len = k``).
        logit_scale: 0-d tensor (CLIP's ``exp(logit_scale)`` for text, ``1/tau`` for vision).
    """
    if image.dim() != 3:
        raise ValueError(f"image must have shape (3, H, W); got {tuple(image.shape)}.")
    p = encoder.patch_size
    grid = (image.shape[-2] // p, image.shape[-1] // p)
    if backward == "auto":
        backward = choose_backward(encoder.device)
    if backward not in ("batched", "shared"):
        raise ValueError(f"backward must be 'auto', 'batched' or 'shared'; got {backward!r}.")
    with flushed_subnormals(flushes_subnormals(encoder)):
        return _image_gradcams(encoder, image, prototypes, targets, logit_scale, grid, affinity_layers, backward)


def _image_gradcams(encoder: "CLIPDense", image: torch.Tensor, prototypes: torch.Tensor, targets: Sequence[int],
                    logit_scale: torch.Tensor, grid: Tuple[int, int], affinity_layers: int,
                    backward: str) -> GradCAMResult:
    tokens, maps = encoder.trunk(image[None], keep_attention=affinity_layers)
    k = len(targets)
    out = encoder.last_block(tokens, copies=max(k, 1) if backward == "batched" else 1)
    protos = prototypes.to(out.image_embedding.device)
    activation = out.activation
    with torch.enable_grad():
        probs = prototype_probabilities(out.image_embedding, protos, logit_scale)
        if k and backward == "batched":
            idx = torch.as_tensor(list(targets), device=probs.device)
            score = probs[torch.arange(k, device=probs.device), idx].sum()
            (grad,) = torch.autograd.grad(score, activation)
        elif k:
            grads = [torch.autograd.grad(probs[0, int(t)], activation, retain_graph=j < k - 1)[0]
                     for j, t in enumerate(targets)]
            grad = torch.cat(grads, dim=1)
            activation = activation.expand(-1, k, -1)
    if k:
        cams = gradcam(activation, grad, grid, half_arithmetic=encoder.half_arithmetic)
    else:
        cams = torch.zeros(0, *grid)
    feats = out.patch_features[0].detach().float()
    feats = (feats / feats.norm(dim=-1, keepdim=True)).cpu()
    attention = [m[:1] for m in maps] + [out.attention[:1].detach()]
    return GradCAMResult(cams, probs[0].detach().float().cpu(), feats, attention, grid)


def batch_image_gradcams(encoder: "CLIPDense", images: torch.Tensor, prototypes: Sequence[torch.Tensor],
                         targets: Sequence[Sequence[int]], logit_scales: Sequence[torch.Tensor], *,
                         affinity_layers: int = 8) -> List[GradCAMResult]:
    """:func:`image_gradcams` for a batch of equally sized images in one trunk forward.

    The trunk runs once on the ``B`` images; the last block runs once on one copy of each image's
    tokens per target (``sum_b k_b`` copies; one copy for an image without targets), and one
    backward of the summed copy scores gives every copy its class gradient. Each image keeps its
    own stacked prototypes and logit scale (their column counts may differ). The results equal
    per-image calls up to floating-point summation order (tested within 1e-5 in fp32). Meant for
    GPUs, where the per-image and per-class launches dominate; on a CPU thread the k-wide batch
    was measured slower (``benchmarks/NOTES.md``).

    Args:
        encoder: a :class:`~vpl_plugin.backbones.CLIPDense`.
        images: ``(B, 3, H, W)`` preprocessed images of one size.
        prototypes: ``B`` stacked prototype matrices ``(P_b, D)``.
        targets: ``B`` lists of column indices (``k_b`` each).
        logit_scales: ``B`` 0-d tensors.

    Returns:
        one :class:`GradCAMResult` per image, in order.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}.")
    b = images.shape[0]
    if not (len(prototypes) == len(targets) == len(logit_scales) == b):
        raise ValueError(f"need one prototype matrix, target list and logit scale per image: {b} images, "
                         f"{len(prototypes)} prototype matrices, {len(targets)} target lists, "
                         f"{len(logit_scales)} scales.")
    p = encoder.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    with flushed_subnormals(flushes_subnormals(encoder)):
        return _batch_image_gradcams(encoder, images, prototypes, targets, logit_scales, grid, affinity_layers)


def _batch_image_gradcams(encoder: "CLIPDense", images: torch.Tensor, prototypes: Sequence[torch.Tensor],
                          targets: Sequence[Sequence[int]], logit_scales: Sequence[torch.Tensor],
                          grid: Tuple[int, int], affinity_layers: int) -> List[GradCAMResult]:
    b = images.shape[0]
    tokens, maps = encoder.trunk(images, keep_attention=affinity_layers)
    counts = [max(len(t), 1) for t in targets]
    starts = [sum(counts[:i]) for i in range(b)]
    index = torch.repeat_interleave(torch.arange(b, device=tokens.device),
                                    torch.as_tensor(counts, device=tokens.device))
    out = encoder.last_block(tokens[:, index])
    activation = out.activation
    probs_per_image = []
    with torch.enable_grad():
        score = activation.new_zeros((), dtype=torch.float32)
        for i in range(b):
            rows = slice(starts[i], starts[i] + counts[i])
            protos = prototypes[i].to(out.image_embedding.device)
            probs = prototype_probabilities(out.image_embedding[rows], protos, logit_scales[i])
            probs_per_image.append(probs[0].detach().float().cpu())
            if targets[i]:
                idx = torch.as_tensor(list(targets[i]), device=probs.device)
                score = score + probs[torch.arange(len(idx), device=probs.device), idx].sum().float()
        has_targets = any(len(t) for t in targets)
        grad = torch.autograd.grad(score, activation)[0] if has_targets else None
    results = []
    for i in range(b):
        rows = slice(starts[i], starts[i] + counts[i])
        if targets[i]:
            assert grad is not None  # some image has targets, so the gradient was taken
            cams = gradcam(activation[:, rows], grad[:, rows], grid, half_arithmetic=encoder.half_arithmetic)
        else:
            cams = torch.zeros(0, *grid)
        feats = out.patch_features[starts[i]].detach().float()
        feats = (feats / feats.norm(dim=-1, keepdim=True)).cpu()
        attention = [m[i:i + 1] for m in maps] + [out.attention[starts[i]:starts[i] + 1].detach()]
        results.append(GradCAMResult(cams, probs_per_image[i], feats, attention, grid))
    return results
