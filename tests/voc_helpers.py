"""Small VOC layouts for tests, copied from the shared subset (never into the repository)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

FOUR_IDS = ["2007_000032", "2007_000039", "2007_000063", "2007_000068"]


def copy_voc_layout(voc_root: Path, dest: Path, ids: Sequence[str] = FOUR_IDS) -> Path:
    """``dest/VOC2012`` with JPEGImages, Annotations, SegmentationClass of ``ids`` and a train list."""
    root = dest / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(voc_root / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
        shutil.copy(voc_root / "Annotations" / f"{i}.xml", root / "Annotations")
        shutil.copy(voc_root / "SegmentationClass" / f"{i}.png", root / "SegmentationClass")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root
