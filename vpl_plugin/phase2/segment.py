"""Phase-2 inference: multi-scale + flip softmax averaging, optional dense CRF, label PNGs
(``docs/vpl.md#inference``).

For every scale ``s`` the CLIP-normalised image is resized (bilinear) to ``(H s, W s)`` rounded up
to multiples of the patch size, the segmentation logits are upsampled (bilinear,
``align_corners=False``) back to the original ``(H, W)`` and soft-maxed; with ``flip`` the mirrored
image is run in the same batch and its probabilities are mirrored back. The average over all
passes is the prediction. With ``crf`` the averaged probabilities go through
:func:`~vpl_plugin.pseudo_masks.dense_crf` with CLIP-ES's parameters on the plain RGB image (not
upstream's wrapped one), then argmax. Labels are written by
:func:`~vpl_plugin.pseudo_masks.save_label_png` (the format of ``vpl masks``), so ``vpl eval
--masks`` scores them.

Example:
    >>> probs = predict_probabilities(model, Image.open("x.jpg"))  # doctest: +SKIP
    >>> label = probs.argmax(0)  # (H, W), 0 = background, c + 1 = class c  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpl_plugin._imports import require
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.phase2.data import normalize_image
from vpl_plugin.phase2.decoder import unwrap_segmenter

if TYPE_CHECKING:
    from PIL import Image

    from vpl_plugin.data.voc import SampleDataset

__all__ = ["DEFAULT_SCALES", "predict_probabilities", "segment_dataset", "segment_image", "to_clip_tensor"]

DEFAULT_SCALES: Tuple[float, ...] = (0.75, 1.0, 1.25)


def to_clip_tensor(image: "Image.Image") -> torch.Tensor:
    """A PIL image -> CLIP-normalised ``(3, H, W)`` float32 tensor at its own size (RGB)."""
    return normalize_image(np.asarray(image.convert("RGB")))


def _check_scales(scales: Sequence[float]) -> Tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers; got {scales}.")
    return scales


def _scaled_size(h: int, w: int, s: float, p: int) -> Tuple[int, int]:
    return max(p, int(math.ceil(h * s / p)) * p), max(p, int(math.ceil(w * s / p)) * p)


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: "Image.Image", scales: Sequence[float] = DEFAULT_SCALES,
                          flip: bool = True) -> torch.Tensor:
    """Multi-scale (+ flip) averaged softmax of a :class:`~vpl_plugin.phase2.PrototypeSegmenter`.

    Args:
        model: the segmenter (optionally DDP-wrapped); run in eval mode, its mode is restored.
        image: a PIL image, or a CLIP-normalised ``(3, H, W)`` tensor (any ``H``, ``W``).
        scales: resize factors; each size is rounded up to multiples of the patch size.
        flip: also run the horizontally mirrored image.

    Returns:
        ``(1 + N_fg, H, W)`` float32 probabilities on the CPU (channel 0 background), the mean
        over ``len(scales) * (2 if flip else 1)`` passes.
    """
    net = unwrap_segmenter(model)
    scales = _check_scales(scales)
    x = image if isinstance(image, torch.Tensor) else to_clip_tensor(image)
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"image must be a PIL image or a (3, H, W) tensor; got shape {tuple(x.shape)}.")
    device = net.prototypes.device
    x = x.to(device=device, dtype=torch.float32)[None]
    h, w = x.shape[-2:]
    p = int(net.patch_size)
    was_training = net.training
    net.eval()
    try:
        total = None
        for s in scales:
            size = _scaled_size(h, w, s, p)
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
            logits = net(batch)["logits"].float()
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = torch.softmax(logits, dim=1)
            part = probs[0] + probs[1].flip(-1) if flip else probs[0]
            total = part if total is None else total + part
    finally:
        net.train(was_training)
    return (total / (len(scales) * (2 if flip else 1))).cpu()


def segment_image(model: nn.Module, image: "Image.Image", *, scales: Sequence[float] = DEFAULT_SCALES,
                  flip: bool = True, crf: bool = False, labels: Optional[Sequence[int]] = None) -> np.ndarray:
    """One image's label map: averaged probabilities, optional CRF, argmax.

    Args:
        model, scales, flip: see :func:`predict_probabilities`.
        image: a PIL image (the CRF needs its RGB pixels).
        crf: dense CRF (CLIP-ES parameters, 10 iterations) on the RGB image before the argmax.
        labels: restrict the foreground to these 0-based classes (image-level labels); None: all.

    Returns:
        ``(H, W)`` uint8 labels, 0 background, ``c + 1`` class ``c``.
    """
    probs = predict_probabilities(model, image, scales, flip).numpy()
    if labels is not None:
        keep = np.zeros(probs.shape[0], dtype=bool)
        keep[0] = True
        for c in labels:
            if not 0 <= int(c) < probs.shape[0] - 1:
                raise ValueError(f"label {c} is outside the model's {probs.shape[0] - 1} classes.")
            keep[int(c) + 1] = True
        probs = probs * keep[:, None, None]
        probs = probs / np.maximum(probs.sum(0, keepdims=True), 1e-12)
    if crf:
        from vpl_plugin.pseudo_masks import dense_crf

        rgb = np.array(image.convert("RGB"), dtype=np.uint8, order="C")  # writable: pydensecrf
        probs = dense_crf(np.ascontiguousarray(probs, dtype=np.float32), rgb)
    if probs.shape[0] > 256:
        raise ValueError(f"{probs.shape[0]} classes do not fit a uint8 label PNG.")
    return probs.argmax(0).astype(np.uint8)


def segment_dataset(model: nn.Module, dataset: "SampleDataset", out_dir: Union[str, os.PathLike], *,
                    scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True, crf: bool = False,
                    limit: Optional[int] = None, progress: bool = True, skip_existing: bool = True,
                    use_image_labels: bool = False, palette: bool = True, rank: int = 0,
                    world_size: int = 1) -> Dict[str, Any]:
    """Write ``<out_dir>/<id>.png`` label maps for a dataset (resumable, atomic per image).

    Args:
        model: the segmenter.
        dataset: a :class:`~vpl_plugin.data.voc.VOCDataset` (or any dataset with ``ids`` and
            samples with ``image_path`` / ``labels``).
        out_dir: output folder (created).
        scales, flip, crf: see :func:`segment_image`.
        limit: only the first ``limit`` images of the list.
        progress: progress bar.
        skip_existing: a rerun skips images whose PNG exists.
        use_image_labels: restrict each image to its image-level classes (off: inference has no
            labels; without it, images whose labels cannot be read are still segmented).
        palette: VOC-palette P-mode PNGs (default) or greyscale (see ``save_label_png``).
        rank, world_size: process every ``world_size``-th image starting at ``rank``.

    Images are read by :func:`~vpl_plugin.data.voc.load_image` with the dataset's
    ``max_pixels`` (default :data:`~vpl_plugin.data.voc.DEFAULT_MAX_PIXELS`).

    Returns:
        :class:`~vpl_plugin.pipeline.RunSummary`: a failure of any kind for one image is listed
        with the image and the reason (``TypeName: message``) and the run goes on.
    """
    from vpl_plugin.data.labels import save_label_png
    from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS, DatasetError, load_image
    from vpl_plugin.pipeline import RunSummary, failure_text

    require("PIL.Image")
    if crf:
        require("pydensecrf.densecrf")
    scales = _check_scales(scales)
    net = unwrap_segmenter(model)
    spec = getattr(dataset, "class_spec", None)
    if spec is not None and len(spec.names) != net.num_fg:
        raise ValueError(f"the segmenter has {net.num_fg} foreground classes but the dataset's label "
                         f"space {getattr(spec, 'name', '')!r} has {len(spec.names)}; "
                         "use the dataset the prototypes were learned for.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_pixels = getattr(dataset, "max_pixels", DEFAULT_MAX_PIXELS)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    indices = range(int(rank), n, int(world_size))
    summary = RunSummary(total=len(indices))
    start = time.time()
    for i in progress_bar(indices, desc="segment", enabled=progress):
        image_id = dataset.ids[i]
        target = out_dir / f"{image_id}.png"
        if skip_existing and target.is_file():
            summary.skipped_existing += 1
            continue
        image_path = None
        try:
            labels = None
            try:
                sample = dataset[i]
                image_path = sample.image_path
                labels = sample.labels
            except DatasetError:
                # inference needs no labels: fall back to the image file itself
                image_dir = getattr(dataset, "image_dir", None)
                if use_image_labels or image_dir is None:
                    raise
                image_path = Path(image_dir) / f"{image_id}.jpg"
            image = load_image(image_path, max_pixels=max_pixels)
            label = segment_image(model, image, scales=scales, flip=flip, crf=crf,
                                  labels=labels if use_image_labels else None)
        except Exception as err:  # noqa: BLE001 - any per-image failure is recorded, the run goes on
            summary.failed.append((image_id, failure_text(err, image_path)))
            continue
        save_label_png(target, label, palette=palette)
        summary.done += 1
    summary.seconds = time.time() - start
    return summary
