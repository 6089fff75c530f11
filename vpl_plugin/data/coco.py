"""COCO 2014 as CLIP-ES reads it: image-level labels come from the split list itself.

A CLIP-ES COCO list line is ``<id> l1 l2 ...`` with 0-based class indices (0..79) in the order
CLIP-ES loops over them (``docs/upstream_clip_es.md#labels-and-class-order``). Upstream crashes on a
line without
labels; here such an image raises a :class:`~vpl_plugin.data.voc.DatasetError` when it is read,
so the CAM loop can skip it.

Example:
    >>> ds = COCODataset("coco2014", "coco14/train.txt", image_dir="train2014")  # doctest: +SKIP
    >>> ds[0].labels  # doctest: +SKIP
    (45, 49, 50)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from vpl_plugin.data.classes import COCO, ClassSpec
from vpl_plugin.data.voc import (
    DEFAULT_MAX_PIXELS,
    DatasetError,
    Sample,
    check_max_pixels,
    checked_id,
    ListDataset,
    read_list_lines,
    resolve_split_file,
)

__all__ = ["COCODataset", "coco_image_dir", "read_coco_split"]

IMAGE_DIRS = ("train2014", "val2014")


def read_coco_split(
    path: str | os.PathLike[str],
    class_spec: ClassSpec = COCO,
    *,
    allow_empty: bool = False,
) -> List[Tuple[str, Tuple[int, ...]]]:
    """Read a CLIP-ES COCO list: ``<id> l1 l2 ...`` per line.

    Args:
        path: the list file (blank lines and ``#`` comments are skipped; an id given as a path
            such as ``train2014/<id>.jpg`` is reduced to its stem).
        class_spec: the label space; labels must lie in ``0 .. len(class_spec.names) - 1``.
        allow_empty: keep lines without labels (with ``()``) instead of raising.

    Returns:
        ``(id, labels)`` per line; labels keep their first-appearance order, repeats dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file lists no image; a line's id cannot be a file name (see
            :func:`~vpl_plugin.data.voc.read_split`); a label is not an integer or is out of
            range; or (unless ``allow_empty``) lines carry no label (all such lines are named).
    """
    path = Path(path)
    n = len(class_spec.names)
    entries: List[Tuple[str, Tuple[int, ...]]] = []
    empty: List[str] = []
    for number, tokens in read_list_lines(path, "split file"):
        image_id = checked_id(path, number, tokens[0])
        labels: List[int] = []
        for token in tokens[1:]:
            try:
                label = int(token)
            except ValueError:
                raise DatasetError(
                    path, f"line {number} ({image_id}): label {token!r} is not an integer",
                    f"expected '<id> l1 l2 ...' with class indices 0..{n - 1}",
                ) from None
            if not 0 <= label < n:
                raise DatasetError(
                    path, f"line {number} ({image_id}): label {label} outside 0..{n - 1}",
                    f"labels are 0-based indices into the {n} {class_spec.name} classes",
                )
            if label not in labels:
                labels.append(label)
        if not labels:
            empty.append(f"line {number} ({image_id})")
        entries.append((image_id, tuple(labels)))
    if not entries:
        raise DatasetError(path, "split file lists no images",
                           "give a CLIP-ES list with one '<id> l1 l2 ...' line per image")
    if empty and not allow_empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DatasetError(
            path, f"{len(empty)} line(s) carry no image-level label: {shown}",
            "CLIP-ES needs at least one label per image; add labels or drop those lines",
        )
    return entries


def coco_image_dir(split_file: str | os.PathLike[str], first_id: str = "") -> str:
    """The image folder (``train2014`` or ``val2014``) a CLIP-ES COCO list refers to.

    COCO 2014 ids name their folder (``COCO_val2014_000000000042``); otherwise a list whose file
    name contains ``val`` (``val.txt``, ``minival.txt``) is read from ``val2014/``, any other from
    ``train2014/`` (CLIP-ES's ``coco14/train.txt`` and ``coco14/val.txt``).

    Example:
        >>> coco_image_dir("coco14/val.txt"), coco_image_dir("x.txt", "COCO_val2014_000000000042")
        ('val2014', 'val2014')
    """
    for name in IMAGE_DIRS:
        if first_id.startswith(f"COCO_{name}_"):
            return name
    return "val2014" if "val" in Path(split_file).name.lower() else "train2014"


class COCODataset(ListDataset):
    """COCO images of one CLIP-ES split list with their image-level labels (map-style).

    Args:
        root: the COCO folder; images are ``root/image_dir/<id>.jpg`` and ground-truth masks
            ``root/SegmentationClass/<id>.png`` (optional).
        split_file: a CLIP-ES list (see :func:`read_coco_split`); a relative path that does not
            exist from the current directory is also looked up under ``root``.
        image_dir: image folder under ``root`` (``train2014`` or ``val2014``, or an absolute
            path); ``"auto"`` (default) picks it from the list with :func:`coco_image_dir`.
        class_spec: the label space (default COCO, 80 classes).
        max_pixels: pixel limit of the images the dataset-level stages read
            (:func:`~vpl_plugin.data.voc.sample_image`); None: no limit.

    Raises:
        DatasetError: ``root/image_dir`` does not exist, or the list is malformed.
        FileNotFoundError: the split file does not exist.

    Reading a sample whose line has no label raises :class:`DatasetError` (upstream crashes).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split_file: str | os.PathLike[str],
        image_dir: str = "auto",
        *,
        class_spec: ClassSpec = COCO,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_pixels = check_max_pixels(max_pixels)
        self.root = Path(root).expanduser()
        self.class_spec = class_spec
        self.split_file = resolve_split_file(split_file, [self.root, self.root / "coco14"])
        entries = read_coco_split(self.split_file, class_spec, allow_empty=True)
        if image_dir == "auto":
            image_dir = coco_image_dir(self.split_file, entries[0][0] if entries else "")
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise DatasetError(
                self.image_dir, "COCO image folder does not exist",
                "a COCO root holds train2014/ and val2014/ with <id>.jpg (the COCO 2014 image archives "
                "train2014.zip / val2014.zip from cocodataset.org) and, optionally, "
                "SegmentationClass/<id>.png; pass image_dir= to name the image folder",
            )
        self.gt_dir = self.root / "SegmentationClass"
        if not entries:
            raise DatasetError(self.split_file, "split file lists no image ids")
        self._ids = [image_id for image_id, _ in entries]
        self._labels = [labels for _, labels in entries]
        self._cache: Dict[int, Sample] = {}

    def __repr__(self) -> str:
        return (f"COCODataset(root='{self.root}', split_file='{self.split_file}', "
                f"n={len(self)})")

    @property
    def label_source_counts(self) -> Dict[str, int]:
        """``{'list': n}``: every label comes from the split list (lines without one count as
        ``'missing'``)."""
        missing = sum(1 for labels in self._labels if not labels)
        return {"list": len(self._labels) - missing, "missing": missing}

    def _make_sample(self, index: int) -> Sample:
        image_id, labels = self._ids[index], self._labels[index]
        if not labels:
            raise DatasetError(
                self.split_file, f"image {image_id} has no image-level label in the split list",
                "upstream CLIP-ES crashes here; add labels or drop the line",
            )
        image_path = self.image_dir / f"{image_id}.jpg"
        if not image_path.is_file():
            raise DatasetError(image_path, "image file does not exist",
                               f"check image_dir, or drop '{image_id}' from the split list")
        gt_path = self.gt_dir / f"{image_id}.png"
        return Sample(
            id=image_id,
            image_path=image_path,
            labels=labels,
            label_source="list",
            gt_path=gt_path if gt_path.is_file() else None,
            size=None,
        )
