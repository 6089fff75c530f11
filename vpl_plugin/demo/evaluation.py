"""The demo's evaluation: scenes as CLIP inputs, and a CAM adapter scored on held-out scenes.

Shared by the demo report (:mod:`vpl_plugin.demo.report`) and the demo CLIP's training
(:mod:`vpl_plugin.demo.train_clip`, whose checkpoint selection scores the demo's second quality
gate), so neither imports the other.

Seeds are scored like upstream CLIP-ES's ``eval_cam.py``: the best background power of its search
for the map's CAM type. Pseudo masks are dense-CRF masks scored on all pixels, like upstream's
``--eval_only``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from vpl_plugin._imports import require
from vpl_plugin.adapters.clip_es import CLIPESAdapter
from vpl_plugin.backbones.clip import CLIP_MEAN, CLIP_STD
from vpl_plugin.data.synthetic import SYNTHETIC, THINGS, context_false_activation
from vpl_plugin.metrics import MeanIoU, auto_thresholds, cams_to_label, confusion_matrix

__all__ = ["DEMO_TEMPLATES", "Evaluation", "evaluate_adapter", "images_to_tensor", "label_set_accuracy",
           "pil_image", "scene_tensor", "text_gradcam_seed_miou"]

#: the demo's prompt (the demo CLIP was trained on captions of this form)
DEMO_TEMPLATES = ("a photo of a {}.",)


def images_to_tensor(images: List[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB scenes -> ``(B, 3, H, W)`` CLIP-normalised float32."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def scene_tensor(image: np.ndarray) -> torch.Tensor:
    """One ``(H, W, 3)`` uint8 RGB scene -> ``(3, H, W)`` CLIP-normalised float32."""
    return images_to_tensor([image])[0]


def pil_image(image: np.ndarray) -> Any:
    """An ``(H, W, 3)`` uint8 RGB array as a PIL image (what an adapter's ``__call__`` takes)."""
    return require("PIL.Image").fromarray(image)


@dataclass
class Evaluation:
    """An adapter's scores on a set of scenes (mIoU as fractions, 0-1).

    Attributes:
        seed: seed mIoU at the best background exponent.
        mask: CRF pseudo-mask mIoU (NaN when masks were not made).
        threshold: the best background exponent (the first maximum, as upstream).
        context_false_activation: share of context background pixels predicted as the object
            they usually surround (seeds at the best exponent).
        kept: the CAMs ``(k, H, W)`` float32 of the first ``keep`` scenes.
        sweep: ``{exponent: seed mIoU}``.
        seed_confusion: ``(exponents, scenes, C, C)`` int64 confusion matrix of each scene's seeds
            at each exponent of ``sweep`` (in its order): what a bootstrap over scenes resamples,
            repeating the exponent search inside each resample.
        mask_confusion: ``(scenes, C, C)`` int64 confusion matrix of each scene's CRF mask
            (``(0, C, C)`` when masks were not made).
    """

    seed: float
    mask: float
    threshold: float
    context_false_activation: float
    kept: List[np.ndarray] = field(default_factory=list)
    sweep: Dict[float, float] = field(default_factory=dict)
    seed_confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), np.int64))
    mask_confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int64))


def evaluate_adapter(adapter: Any, scenes: Sequence[Any], *, crf: bool = True, keep: int = 0) -> Evaluation:
    """Seeds and CRF masks of ``adapter`` (a CLIP-ES-style adapter) on the synthetic ``scenes``.

    Seeds: the best background power of upstream's ``eval_cam.py`` search for the map's CAM type:
    exponents {1, 2} for CAA-refined maps (``attn_highres``), {1, ..., 10} for maps without CAA
    (upstream's raw GradCAM type, ``highres``). Masks (``crf``): CRF, scored on all pixels
    (upstream's ``--eval_only``). The CAMs of the first ``keep`` scenes are returned, and every
    scene's confusion matrices (their sums are the scored matrices).
    """
    from vpl_plugin.pseudo_masks import cams_to_pseudo_mask

    n_cls = SYNTHETIC.num_classes
    exponents = auto_thresholds("power", "attn_highres" if adapter.config.refine else "highres")
    seeds = {e: MeanIoU(n_cls) for e in exponents}
    masks = MeanIoU(n_cls)
    fa = {e: [0, 0] for e in exponents}
    kept = []
    seed_conf = np.zeros((len(exponents), len(scenes), n_cls, n_cls), np.int64)
    mask_conf = np.zeros((len(scenes) if crf else 0, n_cls, n_cls), np.int64)
    for i, sc in enumerate(scenes):
        out = adapter(pil_image(sc.image), list(sc.labels))
        cams, keys = out.attn_highres, out.keys
        if i < keep:
            kept.append(cams.astype(np.float32))
        for j, (e, metric) in enumerate(seeds.items()):
            pred = cams_to_label(cams, keys, e, "power")
            seed_conf[j, i] = confusion_matrix(pred, sc.mask, n_cls, metric.ignore_index)
            metric.confusion += seed_conf[j, i]
            for wrong, total in context_false_activation(pred, sc.mask, sc.labels, sc.background).values():
                fa[e][0] += wrong
                fa[e][1] += total
        if crf:
            bgr = np.ascontiguousarray(sc.image[:, :, ::-1])
            mask = cams_to_pseudo_mask(cams, keys, bgr, crf=True, conf=None)
            mask_conf[i] = confusion_matrix(mask, sc.mask, n_cls, masks.ignore_index)
            masks.confusion += mask_conf[i]
    sweep = {e: m.compute()["miou"] for e, m in seeds.items()}
    best = max(sweep, key=lambda e: sweep[e])  # ties -> first (upstream: first strictly greater)
    fa_rate = fa[best][0] / max(fa[best][1], 1)
    return Evaluation(sweep[best], masks.compute()["miou"] if crf else float("nan"), best, fa_rate, kept, sweep,
                      seed_conf, mask_conf)


def text_gradcam_seed_miou(encoder: Any, scenes: Sequence[Any]) -> float:
    """Seed mIoU (0-100) of the text-prototype GradCAM itself (no CAA refinement, no CRF), scored
    like upstream's ``eval_cam.py`` scores that map type (``highres``: best of exponents 1..10):
    the demo CLIP's second quality gate."""
    raw = CLIPESAdapter(encoder, SYNTHETIC, templates=DEMO_TEMPLATES, refine=False)
    return 100 * evaluate_adapter(raw, scenes, crf=False).seed


def label_set_accuracy(encoder: Any, scenes: Sequence[Any], templates: Sequence[str] = DEMO_TEMPLATES) -> float:
    """Zero-shot recognition with CLIP's own image embedding (CLS): the top-``k`` classes by cosine
    to the class text prototypes, ``k`` = the true object count; exact label-set match rate."""
    names = [t.name for t in THINGS]
    protos = encoder.encode_text_prototypes(names, templates)
    hits = 0
    with torch.no_grad():
        for sc in scenes:
            x = scene_tensor(sc.image)[None].to(encoder.device)
            emb = encoder.model.encode_image(x.to(encoder.dtype)).float().cpu()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            top = (emb @ protos.t())[0].topk(len(sc.labels)).indices.tolist()
            hits += set(top) == set(sc.labels)
    return hits / max(len(scenes), 1)
