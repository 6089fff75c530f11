"""Class names, CLIP-ES prompt names and background concept lists for VOC and COCO.

The prompt names (with synonyms inserted verbatim, commas included) and background lists are those
of upstream CLIP-ES (``docs/upstream_clip_es.md#text-prototypes``), including COCO's ``sknowboard``
typo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

CLIP_ES_TEMPLATE = "a clean origami {}."

VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_PROMPT_NAMES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor screen",
)
VOC_BACKGROUND: Tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)

COCO_PROMPT_NAMES: Tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird avian", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack,bag", "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee", "skis",
    "sknowboard", "sports ball", "kite", "baseball bat", "glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen",
    "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hairdrier,blowdrier", "toothbrush",
)
COCO_BACKGROUND: Tuple[str, ...] = tuple(b for b in VOC_BACKGROUND if b not in ("keyboard", "sign"))


@dataclass(frozen=True)
class ClassSpec:
    """The label space of a dataset as CLIP-ES sees it.

    Attributes:
        names: foreground class names as they appear in annotations (index = class id - 1 in
            segmentation masks, where 0 is background).
        prompt_names: the strings inserted into the prompt template, one per foreground class.
        background: background concept names (CLIP-ES's extra softmax columns).
        box_threshold: the CAA box threshold (0.4 VOC, 0.7 COCO).
    """

    name: str
    names: Tuple[str, ...]
    prompt_names: Tuple[str, ...]
    background: Tuple[str, ...]
    box_threshold: float = 0.4
    templates: Tuple[str, ...] = field(default=(CLIP_ES_TEMPLATE,))

    def __post_init__(self) -> None:
        if len(self.names) != len(self.prompt_names):
            raise ValueError(
                f"ClassSpec {self.name!r}: {len(self.names)} class names but "
                f"{len(self.prompt_names)} prompt names; give one prompt name per class."
            )

    @property
    def num_classes(self) -> int:
        """Number of segmentation labels including background (VOC: 21)."""
        return len(self.names) + 1

    @property
    def num_prototypes(self) -> int:
        """Number of prototypes: foreground classes plus background concepts (VOC: 45)."""
        return len(self.names) + len(self.background)


VOC = ClassSpec("voc", VOC_CLASSES, VOC_PROMPT_NAMES, VOC_BACKGROUND, box_threshold=0.4)
COCO = ClassSpec(
    "coco",
    tuple(n.split(",")[0].replace(" avian", "").replace(" seat", "").replace(" screen", "")
          .replace(" with clothes", "") for n in COCO_PROMPT_NAMES),
    COCO_PROMPT_NAMES,
    COCO_BACKGROUND,
    box_threshold=0.7,
)


SYNTHETIC_THINGS: Tuple[str, ...] = ("boat", "train", "cow", "bird", "car", "sheep", "plane", "bottle", "chair",
                                     "dog")
SYNTHETIC_STUFF: Tuple[str, ...] = ("grass", "water", "sand", "sky", "road")
SYNTHETIC = ClassSpec("synthetic", SYNTHETIC_THINGS, SYNTHETIC_THINGS, SYNTHETIC_STUFF, box_threshold=0.4)
"""The label space of the demo world (:mod:`vpl_plugin.data.synthetic`): 10 things (labels 1..10
in masks), 5 background concepts."""

#: the label spaces :func:`get_class_spec` knows (the ``--dataset`` choices of the ``vpl`` command)
DATASET_NAMES = ("voc", "coco", "synthetic")


def get_class_spec(name: str) -> ClassSpec:
    """Return the :class:`ClassSpec` of ``'voc'``, ``'coco'`` or ``'synthetic'`` (the demo world)."""
    specs = {"voc": VOC, "coco": COCO, "synthetic": SYNTHETIC}
    if name not in specs:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(specs)}.")
    return specs[name]
