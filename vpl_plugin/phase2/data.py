"""Phase-2 training data: images, pseudo masks (255 = ignore) and image-level labels.

``docs/vpl.md#training-recipe``: the decoder trains on the phase-1 pseudo masks with random
rescale ``x[0.5, 2.0]``, random crop (image padded with the mean pixel, mask with 255) and
horizontal flip.

**Determinism.** Training reads one endless *stream* of samples: stream position ``p`` is sample
``perm_e[p mod N]`` of epoch ``e = p // N`` (``perm_e`` a permutation drawn from ``(seed, e)``),
augmented with a generator drawn from ``(seed, p)``. Iteration ``t`` with global batch ``B``
reads positions ``t*B .. t*B + B - 1`` and rank ``r`` of ``W`` takes its contiguous slice of
``B / W`` of them. Nothing depends on what ran before, on the number of data-loader workers or on
the number of processes, so a resumed run and a multi-GPU run see exactly the batches of an
uninterrupted single-process run.

Example:
    >>> ds = PseudoMaskDataset(VOCDataset("VOC2012", "train_aug.txt"), "pseudo")  # doctest: +SKIP
    >>> stream = TrainStream(ds, crop=448, seed=0)                               # doctest: +SKIP
    >>> batch = collate([stream[p] for p in batch_positions(0, 6)])               # doctest: +SKIP
    >>> batch["images"].shape, batch["masks"].shape, batch["labels"].shape        # doctest: +SKIP
    (torch.Size([6, 3, 448, 448]), torch.Size([6, 448, 448]), torch.Size([6, 20]))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vpl_plugin._checks import check_range
from vpl_plugin._imports import require
from vpl_plugin.backbones.clip import CLIP_MEAN, clip_normalize
from vpl_plugin.data.labels import IGNORE_INDEX, read_label_png
from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS, DatasetError, load_image

__all__ = [
    "IGNORE_INDEX",
    "IterationBatchSampler",
    "PseudoMaskDataset",
    "TrainStream",
    "augment_pair",
    "batch_positions",
    "collate",
    "normalize_image",
    "stream_index",
]

log = logging.getLogger(__name__)

_MEAN_PIXEL = tuple(255.0 * m for m in CLIP_MEAN)


class PseudoMaskDataset:
    """Images of a dataset with their pseudo-mask PNGs and image-level labels.

    Args:
        samples: a dataset of :class:`vpl_plugin.data.voc.Sample` (``VOCDataset``,
            ``COCODataset``): image paths and image-level labels in ``samples.class_spec``.
        mask_dir: folder of ``<id>.png`` label maps (P or L mode, class ids, 255 = ignore), as
            ``vpl masks`` writes them.
        skip_missing: drop ids without a mask (or whose sample cannot be read) with a warning
            instead of raising.
        limit: use the first ``limit`` ids of the list only.

    Raises:
        FileNotFoundError: ``mask_dir`` does not exist, or (without ``skip_missing``) some ids have
            no mask; the message counts and names them.

    Attributes:
        ids: the usable image ids, in list order.
        skipped: ``(id, reason)`` of the dropped ids.
    """

    def __init__(self, samples: Any, mask_dir: Union[str, os.PathLike], *,
                 skip_missing: bool = False, limit: Optional[int] = None) -> None:
        self.mask_dir = Path(mask_dir)
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(f"pseudo-mask folder {self.mask_dir} does not exist; make it with "
                                    f"`vpl masks --cams CAM_DIR ... --out {self.mask_dir}`.")
        self.class_spec = samples.class_spec
        self.num_fg = len(self.class_spec.names)
        self.max_pixels = getattr(samples, "max_pixels", DEFAULT_MAX_PIXELS)

        self._items: List[Tuple[str, Path, Path, Tuple[int, ...]]] = []
        self.skipped: List[Tuple[str, str]] = []
        ids = samples.ids if limit is None else samples.ids[: int(limit)]
        for index, image_id in enumerate(ids):
            mask = self.mask_dir / f"{image_id}.png"
            if not mask.is_file():
                self.skipped.append((image_id, f"no pseudo mask {mask}"))
                continue
            try:
                sample = samples[index]
            except DatasetError as err:
                self.skipped.append((image_id, str(err)))
                continue
            self._items.append((image_id, Path(sample.image_path), mask, tuple(sample.labels)))
        if self.skipped and not skip_missing:
            first = "; ".join(f"{i}: {r}" for i, r in self.skipped[:3])
            raise FileNotFoundError(
                f"{len(self.skipped)} of {len(ids)} images cannot be used ({first}"
                f"{' ...' if len(self.skipped) > 3 else ''}). Make the missing masks, fix the list, "
                f"or pass skip_missing=True (`vpl train --skip-missing`).")
        for image_id, reason in self.skipped:
            log.warning("skipping %s: %s", image_id, reason)
        if not self._items:
            raise FileNotFoundError(f"no usable image with a pseudo mask in {self.mask_dir}.")

    @property
    def ids(self) -> List[str]:
        return [item[0] for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def labels(self, index: int) -> np.ndarray:
        """``(N_fg,)`` float32 0/1 image-level labels of item ``index``."""
        out = np.zeros(self.num_fg, np.float32)
        out[list(self._items[index][3])] = 1.0
        return out

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, 3) uint8 RGB, mask (H, W) uint8)`` of item ``index``.

        The image is read by :func:`~vpl_plugin.data.voc.load_image` with the samples' pixel limit
        (16-bit greyscale mapped to 8 bits); the mask by
        :func:`~vpl_plugin.data.labels.read_label_png` (an 8-bit P/L PNG with values in the class
        list or 255).

        Raises:
            DatasetError: (a ValueError) the image or the mask cannot be used (the message names
                the file and what was found).
            ValueError: the mask's size differs from the image's (the message names both files).
        """
        image_id, image_path, mask_path, _ = self._items[index]
        image = np.asarray(load_image(image_path, max_pixels=self.max_pixels).convert("RGB"),
                           dtype=np.uint8)
        mask = read_label_png(mask_path, self.class_spec.num_classes, what="pseudo mask")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"{image_path} is {image.shape[1]}x{image.shape[0]}; pseudo masks must "
                             f"have the image's size.")
        return image, mask


# -- augmentation -----------------------------------------------------------------------------------
def _resize(arr: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    Image = require("PIL.Image")
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((width, height), resample))


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, crop: int,
                 scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 fill: Sequence[float] = _MEAN_PIXEL,
                 ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
    """Random rescale, pad, random crop and horizontal flip of an image and its mask.

    See ``docs/vpl.md#training-recipe``.

    The generator is drawn from in a fixed order (scale, crop offsets, flip), so the result
    depends only on the inputs and the generator's state.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8 class ids (255 = ignore).
        rng: the generator (one per sample; see :class:`TrainStream`).
        crop: output side ``S``.
        scale_range: the rescale factor is uniform in this range (bilinear image, nearest mask).
        flip: flip both horizontally with probability 1/2.
        fill: RGB value (0-255) of the padding of the image (default the CLIP mean pixel, which
            normalises to 0).
        ignore_index: value of the padding of the mask.

    Returns:
        ``(image (S, S, 3) float32 in 0-255, mask (S, S) uint8)``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image must be (H, W, 3) and mask (H, W) of the same size; got "
                         f"{image.shape} and {mask.shape}.")
    lo, hi = scale_range
    scale = float(rng.uniform(lo, hi))
    h, w = mask.shape
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    image = _resize(image, nh, nw, nearest=False).astype(np.float32)
    mask = _resize(mask, nh, nw, nearest=True)
    ph, pw = max(crop, nh), max(crop, nw)
    if (ph, pw) != (nh, nw):
        padded = np.empty((ph, pw, 3), np.float32)
        padded[...] = np.asarray(fill, np.float32)
        padded[:nh, :nw] = image
        padded_mask = np.full((ph, pw), ignore_index, np.uint8)
        padded_mask[:nh, :nw] = mask
        image, mask = padded, padded_mask
    y0 = int(rng.integers(0, ph - crop + 1))
    x0 = int(rng.integers(0, pw - crop + 1))
    image = image[y0:y0 + crop, x0:x0 + crop]
    mask = mask[y0:y0 + crop, x0:x0 + crop]
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` RGB in 0-255 -> ``(3, H, W)`` float32 CLIP-normalised tensor."""
    return clip_normalize(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))


# -- the deterministic stream -----------------------------------------------------------------------
def stream_index(position: int, length: int, seed: int) -> int:
    """Dataset index read at stream ``position`` (a fresh permutation every ``length`` positions)."""
    epoch, offset = divmod(int(position), int(length))
    return int(_permutation(int(length), int(seed), epoch)[offset])


_PERM_CACHE: Dict[Tuple[int, int, int], np.ndarray] = {}


def _permutation(length: int, seed: int, epoch: int) -> np.ndarray:
    key = (length, seed, epoch)
    perm = _PERM_CACHE.get(key)
    if perm is None:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(length)
        _PERM_CACHE[key] = perm
    return perm


def batch_positions(iteration: int, batch_size: int, world_size: int = 1, rank: int = 0) -> List[int]:
    """Stream positions of ``rank``'s share of the global batch of ``iteration``.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ValueError(f"the global batch size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world_size}); e.g. "
                         f"--batch-size {world_size * max(1, batch_size // world_size)}.")
    local = batch_size // world_size
    start = iteration * batch_size + rank * local
    return list(range(start, start + local))


class TrainStream(torch.utils.data.Dataset):
    """Map-style view of the endless augmented stream: item ``p`` is stream position ``p``.

    Args:
        dataset: a :class:`PseudoMaskDataset` (anything with ``__len__``, ``load(i)`` and
            ``labels(i)``).
        crop: crop side (a multiple of the backbone's patch size).
        seed: data seed (order and augmentation).
        scale_range, flip: see :func:`augment_pair`.

    Each item is a dict: ``image (3, S, S)`` float32 normalised, ``mask (S, S)`` int64,
    ``labels (N_fg,)`` float32, ``index`` (dataset index) and ``position``.
    """

    def __init__(self, dataset: Any, *, crop: int, seed: int = 0,
                 scale_range: Tuple[float, float] = (0.5, 2.0), flip: bool = True) -> None:
        if len(dataset) == 0:
            raise ValueError("the training set is empty.")
        check_range("crop", crop, 1)
        check_range("scale_range[0]", scale_range[0], 0.0, low_open=True)
        check_range("scale_range[1]", scale_range[1], scale_range[0])
        self.dataset = dataset
        self.crop = int(crop)
        self.seed = int(seed)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)

    def __len__(self) -> int:  # positions are unbounded; this only satisfies the Dataset protocol
        return 2 ** 62

    def __getitem__(self, position: int) -> Dict[str, Any]:
        index = stream_index(position, len(self.dataset), self.seed)
        rng = np.random.default_rng([self.seed, int(position)])
        image, mask = self.dataset.load(index)
        image, mask = augment_pair(image, mask, rng, crop=self.crop, scale_range=self.scale_range,
                                   flip=self.flip)
        return {"image": normalize_image(image), "mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(self.dataset.labels(index)), "index": index,
                "position": int(position)}


class IterationBatchSampler(torch.utils.data.Sampler):
    """Yields, for iterations ``start .. end - 1``, this rank's stream positions (a list each).

    The distributed-sampler equivalent: every rank walks the same global batches and takes its
    contiguous ``batch_size / world_size`` slice of each.
    """

    def __init__(self, start: int, end: int, batch_size: int, world_size: int = 1, rank: int = 0) -> None:
        batch_positions(0, batch_size, world_size, rank)  # validates divisibility
        self.start, self.end = int(start), int(end)
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)

    def __iter__(self) -> Iterator[List[int]]:
        for it in range(self.start, self.end):
            yield batch_positions(it, self.batch_size, self.world_size, self.rank)

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def collate(items: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack stream items into ``images (B, 3, S, S)``, ``masks (B, S, S)`` long,
    ``labels (B, N_fg)``, ``indices (B,)``, ``positions (B,)``."""
    return {"images": torch.stack([it["image"] for it in items]),
            "masks": torch.stack([it["mask"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]),
            "indices": torch.tensor([it["index"] for it in items]),
            "positions": torch.tensor([it["position"] for it in items])}
