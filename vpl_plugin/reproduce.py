"""``vpl reproduce table1``: the paper's Table 1 (seed and pseudo-mask mIoU) with one command.

For every row of :data:`TABLE1_ROWS` whose adapter is registered, the ``vpl`` stages are chained
through the stage runner the CLI passes (its own ``cams``/``learn``/``masks``/``eval`` commands),
each stage in its own folder under ``--out``::

    text_cams/        vpl cams  (text prototypes) on --split
    prototypes/       vpl learn (vision prototypes) on --learn-split  -> prototypes/vpl.pt
    vpl_cams/         vpl cams  --prototypes prototypes/vpl.pt on --split
    text_masks/       vpl masks (dense CRF) of text_cams
    vpl_masks/        vpl masks (dense CRF) of vpl_cams
    eval_<name>/      vpl eval of each CAM and mask folder -> result.json
    table1.json, table1.md

With ``--coco-root`` the same stages run on COCO 2014 (``--dataset coco``: CLIP-ES's list format
``<id> l1 l2 ...``, box threshold 0.7, 81-class evaluation against ``SegmentationClass/``, at most
1e7 learning tokens drawn per image with a fixed seed). The paper reports no COCO seed or pseudo-mask
numbers, so the COCO table shows "paper: n/a" beside the measured ones.

A stage records ``reproduce_stage.json`` (its argument list and key) before it writes anything and
its exit status when it finishes; a rerun with the same arguments skips a finished stage, and a
stage started with other settings is moved aside as ``NAME.old-<time>``. Stages are also resumable per image, so an interrupted
stage continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vpl_plugin._cli_common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, FP16_COMPAT_CONFLICT, UsageError, \
    max_tokens_arg

#: runs one stage's ``vpl`` command line (``["cams", "--clip", ...]``) and returns its exit status;
#: the CLI passes the runner of its own commands (:func:`vpl_plugin.cli.reproduce.run_stage`)
StageRunner = Callable[[Sequence[str]], int]

@dataclass(frozen=True)
class Table1Row:
    """One row of Table 1 and the stages that measure it.

    Attributes:
        name: the row as the paper names it (``"CLIP-ES + VPL"``).
        adapter: the ``vpl cams --adapter`` of its CAMs.
        prefix: its stages' name prefix: ``<prefix>_cams``, ``<prefix>_masks`` and their
            ``eval_...`` stages.
        vision: its CAMs use the learned vision prototypes (``--prototypes``, ``--map-mode``).
        paper_seed, paper_mask: seed and pseudo-mask mIoU on VOC12 train in the paper's Table 1.
        paper_coco_val_segmentation: COCO val segmentation mIoU after phase 2 / DeepLab, the only
            COCO number the papers give (not a seed or mask mIoU, so shown as context only).
    """

    name: str
    adapter: str
    prefix: str
    vision: bool
    paper_seed: float
    paper_mask: float
    paper_coco_val_segmentation: float

    @property
    def cams_stage(self) -> str:
        """The stage (and folder) of the row's CAMs."""
        return f"{self.prefix}_cams"

    @property
    def masks_stage(self) -> str:
        """The stage (and folder) of the row's pseudo masks."""
        return f"{self.prefix}_masks"

    def cams_flags(self, prototypes: Path, map_mode: str, refine: bool = True) -> Tuple[List[Any], List[Any]]:
        """The row's own ``vpl cams`` flags: ``(before --split-file, after it)``; ``refine=False``
        drops the CAA refinement of the vision-prototype rows (the recommended configuration)."""
        adapter = [] if self.adapter == DEFAULT_ADAPTER else ["--adapter", self.adapter]
        vision = ["--prototypes", prototypes, "--map-mode", map_mode] if self.vision else []
        if self.vision and not refine:
            vision.append("--no-refine")
        return adapter, vision


DEFAULT_ADAPTER = "clip-es"
#: background exponents searched for maps without CAA refinement (upstream's search for its raw
#: GradCAM type; the demo scores its rows without CAA the same way)
UNREFINED_SEARCH = "1,2,3,4,5,6,7,8,9,10"
#: the rows, in the paper's order (every adapter here is chained; --no-cpal drops clip-cpal's rows)
TABLE1_ROWS: Tuple[Table1Row, ...] = (
    Table1Row("CLIP-ES", "clip-es", "text", False, 70.8, 75.0, 45.4),
    Table1Row("CLIP-ES + VPL", "clip-es", "vpl", True, 76.3, 78.4, 49.2),
    Table1Row("CLIP-CPAL", "clip-cpal", "cpal", False, 71.9, 75.8, 46.8),
    Table1Row("CLIP-CPAL + VPL", "clip-cpal", "cpal_vpl", True, 77.8, 80.1, 49.8),
)
#: the adapter whose rows ``--no-cpal`` skips
CPAL_ADAPTER = "clip-cpal"
# at most 1e7 learning tokens on COCO (docs/vpl.md#learning-set-size-and-memory)
COCO_MAX_TOKENS = 10_000_000
# passes over the learning set per step of the default "bb" rule (prototypes.py: at most 400
# passes for 300 iterations in its measurements); the paper's "halving" rule makes exactly one
BB_PASSES_PER_STEP = 1.33
STAGE_MARKER = "reproduce_stage.json"
SAMPLE_IMAGES = 3

_WHERE = {
    "JPEGImages": "the PASCAL VOC 2012 trainval archive (VOCtrainval_11-May-2012.tar, "
                  "host.robots.ox.ac.uk/pascal/VOC/voc2012/); --voc-root is its VOCdevkit/VOC2012 folder",
    "Annotations": "the PASCAL VOC 2012 trainval archive (same as JPEGImages/); the image-level "
                   "labels are read from these XML files as upstream CLIP-ES does",
    "SegmentationClass": "the PASCAL VOC 2012 trainval archive (ground truth for the 2913 "
                         "segmentation trainval images); or SegmentationClassAug/ (SBD-augmented "
                         "masks, 12031 PNGs, distributed with SBD-based WSSS code bases)",
    "train.txt": "the PASCAL VOC 2012 archive (ImageSets/Segmentation/train.txt, 1464 ids)",
    "val.txt": "the PASCAL VOC 2012 archive (ImageSets/Segmentation/val.txt, 1449 ids)",
    "train_aug.txt": "SBD (the 10582-image augmented training set); the CLIP-ES repository ships it "
                     "as voc12/train_aug.txt - copy it to ImageSets/Segmentation/train_aug.txt",
}
_WHERE_COCO = {
    "train2014": "the COCO 2014 train images (train2014.zip, 82,783 JPEGs, cocodataset.org); unpack it "
                 "so that --coco-root/train2014/<id>.jpg exists",
    "val2014": "the COCO 2014 val images (val2014.zip, 40,504 JPEGs, cocodataset.org); unpack it so "
               "that --coco-root/val2014/<id>.jpg exists",
    "SegmentationClass": "COCO ground truth as one class-index PNG per image (<id>.png: 0 background, "
                         "k+1 for the k-th of the 80 categories in COCO category-id order, which is "
                         "CLIP-ES's order, 255 ignored); make them from the 2014 instance annotations "
                         "(annotations_trainval2014.zip, cocodataset.org) with pycocotools' annToMask, "
                         "or take the PNGs that WSSS code bases for COCO distribute",
    "train.txt": "the CLIP-ES repository's coco14/train.txt (82,081 lines '<id> l1 l2 ...' with 0-based "
                 "class indices); copy it to --coco-root/coco14/train.txt",
    "val.txt": "the CLIP-ES repository's coco14/val.txt (same format); copy it to --coco-root/coco14/val.txt",
}
_WHERE_SYNTHETIC = ("the synthetic world's export: python -c \"from vpl_plugin.data.synthetic import "
                    "SceneWorld, export_voc; export_voc(SceneWorld(seed=7), 'syn', "
                    "{'train': (0, 64), 'val': (10_000_000, 32)})\"")


# -- checks -----------------------------------------------------------------------------------------
def resolve(args: argparse.Namespace) -> None:
    """Fill in what depends on the dataset: ``args.root``, ``args.dataset`` (``coco`` with
    ``--coco-root``), ``args.learn_split`` and ``args.max_tokens`` (validated)."""

    if getattr(args, "_resolved", False):
        return
    coco_root = getattr(args, "coco_root", None)
    if coco_root and args.voc_root:
        raise UsageError(f"give --voc-root or --coco-root, not both (got --voc-root {args.voc_root} and "
                         f"--coco-root {coco_root}); run the two variants as two commands with different --out.")
    if coco_root:
        if args.dataset == "synthetic":
            raise UsageError("--dataset synthetic reads a VOC-layout export: use --voc-root with it, "
                             f"not --coco-root ({coco_root}).")
        args.dataset = "coco"
    args.root = coco_root or args.voc_root
    coco = args.dataset == "coco"
    if args.learn_split is None:
        args.learn_split = "train" if coco else "train_aug"
    budget = max_tokens_arg(getattr(args, "max_tokens", None))
    args.max_tokens = budget if budget is not None else (COCO_MAX_TOKENS if coco else None)
    args._resolved = True


def _list_path(root: Path, split: str, dataset: str = "voc") -> Path:
    given = Path(split)
    if given.suffix == ".txt" and given.is_file():
        return given
    name = split if split.endswith(".txt") else f"{split}.txt"
    if dataset == "coco":  # CLIP-ES keeps its COCO lists in coco14/; a list beside the folders works too
        for candidate in (root / "coco14" / name, root / name):
            if candidate.is_file():
                return candidate
        return root / "coco14" / name
    return root / "ImageSets" / "Segmentation" / name


def _gt_dir(root: Path, dataset: str = "voc") -> Path:
    aug = root / "SegmentationClassAug"
    return aug if aug.is_dir() and dataset != "coco" else root / "SegmentationClass"


def _image_dir(root: Path, list_path: Path, dataset: str) -> Path:
    """Folder of the list's images: JPEGImages/ (VOC) or train2014/ / val2014/ (COCO)."""
    if dataset != "coco":
        return root / "JPEGImages"
    from vpl_plugin.data.coco import coco_image_dir
    from vpl_plugin.data.voc import read_split

    ids = read_split(list_path) if list_path.is_file() else []
    return root / coco_image_dir(list_path, ids[0] if ids else "")


def _where(key: str, dataset: str) -> str:
    if dataset == "synthetic":
        return _WHERE_SYNTHETIC
    if dataset == "coco":
        return _WHERE_COCO.get(key, "a CLIP-ES COCO list ('<id> l1 l2 ...' per line, 0-based class "
                                    "indices), e.g. a subset of the CLIP-ES repository's coco14/train.txt")
    return _WHERE.get(key, _WHERE["train_aug.txt"] if "aug" in key else
                      "ImageSets/Segmentation/ of the VOC 2012 archive, or write the list yourself "
                      "(one image id per line)")


def _check_list(ds, flag: str, path: Path, limit: Optional[int], missing: List[str], notes: List[str]) -> None:
    """Validate the images of a dataset list (the first ``limit`` only) into ``missing`` / ``notes``."""
    ids = ds.ids[:limit] if limit else ds.ids
    if limit:
        ds._ids = list(ids)  # noqa: SLF001 - validate only what will run
    problems = ds.validate()
    notes.append(f"{flag} {path.name}: {len(ids)} images" + (f", {len(problems)} unusable" if problems else ""))
    for image_id, msg in problems[:10]:
        missing.append(f"{flag} image {image_id}: {msg}")
    if len(problems) > 10:
        missing.append(f"{flag}: ... and {len(problems) - 10} more unusable images")


def _check_ground_truth(root: Path, path: Path, args, missing: List[str]) -> None:
    from vpl_plugin.data.voc import read_split

    gt = _gt_dir(root, args.dataset)
    no_gt = [i for i in read_split(path)[: args.limit or None] if not (gt / f"{i}.png").is_file()]
    if gt.is_dir() and no_gt:
        missing.append(f"{len(no_gt)} image(s) of {path.name} have no ground truth in {gt}/ "
                       f"(first: {no_gt[0]}); get it from {_where('SegmentationClass', args.dataset)}")


def check_layout(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """``(missing, notes)``: each missing item with where users usually get it; notes are informative."""
    resolve(args)
    if args.dataset == "coco":
        return check_coco_layout(args)
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.data.voc import DatasetError, VOCDataset

    missing: List[str] = []
    notes: List[str] = []
    if not args.voc_root:
        return ["--voc-root not given (the VOC2012 folder), or --coco-root for COCO"], notes
    root = Path(args.voc_root).expanduser()
    if not root.is_dir():
        return [f"{root}: no such folder; get it from {_where('JPEGImages', args.dataset)}"], notes
    for sub in ("JPEGImages", "Annotations"):
        if not (root / sub).is_dir():
            missing.append(f"{root / sub}/ is missing; get it from {_where(sub, args.dataset)}")
    if not (root / "SegmentationClass").is_dir() and not (root / "SegmentationClassAug").is_dir():
        missing.append(f"{root}/SegmentationClass/ (or SegmentationClassAug/) is missing: no ground "
                       f"truth to evaluate against; get it from {_where('SegmentationClass', args.dataset)}")
    elif not (root / "SegmentationClassAug").is_dir() and args.dataset == "voc":
        notes.append("note: SegmentationClassAug/ absent: evaluating against SegmentationClass/ (enough for "
                     "Table 1 on train; SBD's SegmentationClassAug is only needed for other lists)")
    spec = get_class_spec(args.dataset)
    lists = {"--split": args.split, "--learn-split": args.learn_split}
    for flag, split in lists.items():
        path = _list_path(root, split)
        if not path.is_file():
            missing.append(f"{flag} list {path} is missing; get it from {_where(Path(path).name, args.dataset)}")
            continue
        try:
            ds = VOCDataset(root, path, class_spec=spec)
        except (DatasetError, FileNotFoundError, ValueError) as err:
            missing.append(f"{flag} list {path}: {err}")
            continue
        _check_list(ds, flag, path, args.limit, missing, notes)
        if flag == "--split":
            _check_ground_truth(root, path, args, missing)
    return missing, notes


def check_coco_layout(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """The COCO 2014 layout upstream CLIP-ES reads: ``train2014/`` and ``val2014/`` images, the
    CLIP-ES lists (``coco14/<split>.txt``, ``<id> l1 l2 ...``) and ``SegmentationClass/<id>.png``
    ground truth. Returns ``(missing, notes)`` like :func:`check_layout`."""
    from vpl_plugin.data.coco import COCODataset
    from vpl_plugin.data.voc import DatasetError

    missing: List[str] = []
    notes: List[str] = []
    root = Path(args.root).expanduser()
    if not root.is_dir():
        return [f"--coco-root {root}: no such folder; it holds train2014/ ({_where('train2014', 'coco')}), "
                f"SegmentationClass/ and coco14/train.txt"], notes
    if not (root / "SegmentationClass").is_dir():
        missing.append(f"{root}/SegmentationClass/ is missing: no ground truth to evaluate against; "
                       f"get it from {_where('SegmentationClass', 'coco')}")
    checked_dirs = set()
    for flag, split in {"--split": args.split, "--learn-split": args.learn_split}.items():
        path = _list_path(root, split, "coco")
        images = _image_dir(root, path, "coco")
        if not path.is_file():
            missing.append(f"{flag} list {path} is missing (also looked for {root / Path(path).name}); "
                           f"get it from {_where(Path(path).name, 'coco')}")
            if not images.is_dir() and images not in checked_dirs:
                missing.append(f"{images}/ is missing (the images of {flag} {path.name}); get it from "
                               f"{_where(images.name, 'coco')}")
            checked_dirs.add(images)
            continue
        if not images.is_dir():
            if images not in checked_dirs:
                missing.append(f"{images}/ is missing (the images of {flag} {path.name}); get it from "
                               f"{_where(images.name, 'coco')}")
            checked_dirs.add(images)
            continue
        try:
            ds = COCODataset(root, path, image_dir=images.name)
        except (DatasetError, FileNotFoundError, ValueError) as err:
            missing.append(f"{flag} list {path}: {err}")
            continue
        notes.append(f"{flag} {path.name}: images from {images.name}/")
        _check_list(ds, flag, path, args.limit, missing, notes)
        if flag == "--split":
            _check_ground_truth(root, path, args, missing)
    if args.max_tokens is not None:
        notes.append(f"prototype learning: at most {args.max_tokens:.3g} tokens (--max-tokens), an equal "
                     "count per image, fixed seed")
    return missing, notes


def _named_geometry(name: str) -> Dict[str, int]:
    """Embedding width and patch size of an OpenAI model name (``ViT-B/16`` -> 512, 16)."""
    patch = int(name.rsplit("/", 1)[1]) if "/" in name and name.rsplit("/", 1)[1].isdigit() else 16
    return {"dim": 768 if name.startswith("ViT-L") else 512, "patch": patch}


def check_checkpoint(args: argparse.Namespace) -> Tuple[List[str], List[str], Optional[Dict[str, int]]]:
    """``(missing, notes, geometry)`` for ``--clip``; geometry: ``{"dim": embedding width, "patch":
    patch size}`` (None when the checkpoint is unusable)."""
    import os

    if not args.clip:
        return ["--clip not given (ViT-B/16 or a checkpoint file)"], [], None
    if os.path.isfile(args.clip):
        try:
            from vpl_plugin.backbones import load_clip

            enc = load_clip(str(args.clip), "cpu", trust_torchscript=args.trust_torchscript)
        except Exception as err:  # noqa: BLE001 - any load failure is reported
            return [f"--clip {args.clip}: exists but cannot be loaded ({err})"], [], None
        geometry = {"dim": int(enc.embed_dim), "patch": int(enc.patch_size)}
        return [], [f"checkpoint {args.clip}: loadable (embedding {geometry['dim']}, patch "
                    f"{geometry['patch']})"], geometry
    try:
        import clip
    except ImportError:
        return [f"--clip {args.clip}: not a file, and the OpenAI CLIP code is not installed "
                "(pip install clip-anytorch)"], [], None

    if args.clip in clip.available_models():
        url = clip.clip._MODELS[args.clip]  # noqa: SLF001
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return [], [f"checkpoint {args.clip}: cached at {cached}"], _named_geometry(args.clip)
        return [], [f"checkpoint {args.clip}: not cached; would download it (~335 MB for ViT-B/16) "
                    f"into {cached.parent} on first use (needs internet; offline, copy OpenAI's "
                    f"{os.path.basename(url)} here or pass its path)"], _named_geometry(args.clip)
    return [f"--clip {args.clip}: neither a file nor an OpenAI CLIP model name "
            f"({', '.join(clip.available_models())}); OpenAI's ViT-B/16 is what the paper uses"], [], None


def _checkpoint_local(clip_arg: str) -> bool:
    """The checkpoint is a file, or an OpenAI model name already in the download cache."""
    import os

    if os.path.isfile(clip_arg):
        return True
    try:
        import clip
    except ImportError:
        return False
    url = clip.clip._MODELS.get(clip_arg)  # noqa: SLF001
    return bool(url) and (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)).is_file()


def _image_stats(args, list_path: Path, sample: int = 20) -> Tuple[float, float, List[Tuple[int, int]]]:
    """Mean pixels, mean classes per image and the ``(width, height)`` of the first ``sample``
    readable images of a list."""
    import re

    from vpl_plugin.data.voc import DatasetError, read_image_header, read_split

    root = Path(args.root)
    sample = min(sample, args.limit) if args.limit else sample
    ids = read_split(list_path)[:sample] if list_path.is_file() else []
    image_dir = _image_dir(root, list_path, args.dataset)
    labels: Dict[str, int] = {}
    if args.dataset == "coco" and list_path.is_file():
        from vpl_plugin.data.coco import read_coco_split

        try:
            labels = {i: len(lab) for i, lab in read_coco_split(list_path, allow_empty=True)[:sample]}
        except ValueError:
            labels = {}
    hw, classes, sizes = [], [], []
    for i in ids:
        try:
            (width, height), _ = read_image_header(image_dir / f"{i}.jpg", max_pixels=None)
        except DatasetError:
            continue
        hw.append(width * height)
        sizes.append((int(width), int(height)))
        if args.dataset == "coco":
            classes.append(labels.get(i) or 1)
            continue
        xml = root / "Annotations" / f"{i}.xml"
        if xml.is_file():
            classes.append(len(set(re.findall(r"<name>([^<]+)</name>", xml.read_text(errors="ignore")))) or 1)
    pixels = sum(hw) / len(hw) if hw else 500 * 375
    per_img_classes = sum(classes) / len(classes) if classes else 1.5
    return pixels, per_img_classes, sizes


def _list_sizes(args) -> Dict[str, int]:
    from vpl_plugin.data.voc import read_split

    root = Path(args.root)
    n = {}
    for key, split in (("split", args.split), ("learn", args.learn_split)):
        path = _list_path(root, split, args.dataset)
        ids = read_split(path) if path.is_file() else []
        n[key] = min(len(ids), args.limit) if args.limit else len(ids)
    return n


def _learning_tokens(args, n_learn: int, sizes: Sequence[Tuple[int, int]], patch: int) -> int:
    """Tokens the learning set will hold: the mean token grid ``ceil(H/patch) * ceil(W/patch)`` of
    the sampled image ``sizes`` (each capped at ``--max-tokens // images``) times the images."""
    cap = args.max_tokens // n_learn if args.max_tokens is not None and n_learn else None
    grids = [math.ceil(h / patch) * math.ceil(w / patch) for w, h in sizes] or [(500 // patch) * (375 // patch)]
    if cap is not None:
        grids = [min(g, cap) for g in grids]
    return int(round(n_learn * sum(grids) / len(grids)))


def estimate_disk(args: argparse.Namespace, geometry: Optional[Dict[str, int]]) -> Tuple[int, str]:
    """Bytes the run will write (rough), and a one-line breakdown.

    CAM files ~ H*W*2 bytes (float16) per class per image, once per row (text, VPL, CPAL, CPAL + VPL;
    two without the CPAL rows); the feature cache of
    the learning pass ~ tokens * (2 dim + 5 N) bytes (float16 features, float32 targets, candidate
    flags; tokens = H/patch * W/patch per image, capped by --max-tokens); masks ~ H*W/8.
    """
    from vpl_plugin.data.classes import get_class_spec

    resolve(args)
    root = Path(args.root)
    n = _list_sizes(args)
    pixels, per_img_classes, _ = _image_stats(args, _list_path(root, args.split, args.dataset))
    geometry = geometry or _named_geometry("ViT-B/16")
    dim, patch = geometry["dim"], geometry["patch"]
    spec = get_class_spec(args.dataset)
    protos = len(spec.names) + len(spec.background)
    _, _, sizes = _image_stats(args, _list_path(root, args.learn_split, args.dataset))
    tokens = _learning_tokens(args, n["learn"], sizes, patch)
    rows = len(rows_to_run(args))  # CAM / mask folders: one per row
    cams = int(rows * n["split"] * pixels * 2 * per_img_classes)
    cache = int(tokens * (2 * dim + 5 * protos))
    masks = int(rows * n["split"] * pixels / 8)
    total = cams + cache + masks
    line = (f"CAMs {_size(cams)} ({rows} x {n['split']} images x {pixels:.0f} px x 2 B x "
            f"{per_img_classes:.1f} classes) + feature cache {_size(cache)} ({tokens} tokens x "
            f"({dim} x 2 B + {protos} x 5 B)) + masks {_size(masks)}")
    return total, line


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1024 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"  # pragma: no cover


def _free_bytes(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# -- stages -----------------------------------------------------------------------------------------
def rows_to_run(args: argparse.Namespace) -> Tuple[Table1Row, ...]:
    """The rows this run chains (all, or without CLIP-CPAL's with ``--no-cpal``)."""
    return tuple(r for r in TABLE1_ROWS if getattr(args, "cpal", True) or r.adapter != CPAL_ADAPTER)


def _stages(args, out: Path) -> List[Tuple[str, List[str]]]:
    """``[(stage name, vpl argument list)]`` in running order: each row's CAMs (the vision
    prototypes learned before the first row that uses them; a CLIP-CPAL row's ``vpl cams`` runs
    its bank pass and its CAM pass), then each row's masks, then the evaluation of every CAM
    folder and every mask folder."""
    resolve(args)
    root = Path(args.root)
    split = _list_path(root, args.split, args.dataset)
    gt = _gt_dir(root, args.dataset)
    pixels = ["--max-pixels", args.max_pixels or 0]
    if getattr(args, "fp16_compat", False) and getattr(args, "exact_fp32", False):
        raise UsageError(FP16_COMPAT_CONFLICT)
    data = ["--clip", args.clip, "--dataset", args.dataset, "--root", root, "--device", args.device,
            *pixels, *(["--trust-torchscript"] if args.trust_torchscript else []),
            *(["--exact-fp32"] if getattr(args, "exact_fp32", False) else []),
            *(["--keep-subnormals"] if getattr(args, "keep_subnormals", False) else [])]
    for t in args.templates or ():
        data += ["--template", t]
    common = [] if args.progress else ["--no-progress"]
    if args.limit:
        common += ["--limit", args.limit]
    protos = out / "prototypes" / "vpl.pt"
    rows = rows_to_run(args)
    stages: List[Tuple[str, List[Any]]] = []
    for row in rows:
        if row.vision and not any(name == "prototypes" for name, _ in stages):
            stages.append(("prototypes", _learn_argv(args, data, root, protos, common)))
        adapter, vision = row.cams_flags(protos, args.map_mode, refine=getattr(args, "refine", True))
        stages.append((row.cams_stage, ["cams", *data, *adapter, "--split-file", split, *vision,
                                        "--out", out / row.cams_stage, *common]))
    image_dir = ["--image-dir", _image_dir(root, split, args.dataset)] if args.dataset == "coco" else []
    for row in rows:
        stages.append((row.masks_stage, ["masks", "--cams", out / row.cams_stage, "--root", root, *image_dir,
                                         "--split-file", split, "--out", out / row.masks_stage,
                                         "--dataset", args.dataset, *pixels, "--workers", args.workers,
                                         *_conf_flags(args), *common]))
    evaluated = [(r.cams_stage, "--cams") for r in rows] + [(r.masks_stage, "--masks") for r in rows]
    unrefined = {r.cams_stage for r in rows if r.vision and not getattr(args, "refine", True)}
    for name, flag in evaluated:
        search = ["--bg-threshold", UNREFINED_SEARCH] if name in unrefined else []
        stages.append((f"eval_{name}", ["eval", flag, out / name, "--dataset", args.dataset,
                                        "--gt-root", gt, "--split-file", split, *search,
                                        "--json", out / f"eval_{name}" / "result.json", *common]))
    return [(name, [str(a) for a in argv]) for name, argv in stages]


def _conf_flags(args) -> List[Any]:
    """``vpl masks --conf`` of the table's mask column (0 = upstream's ``--eval_only`` scoring, the
    default; earlier versions wrote 0.95 masks and left the default flag out of the stage key)."""
    conf = float(getattr(args, "mask_conf", 0.0))
    return [] if conf == 0.95 else ["--conf", conf]


def _learn_argv(args, data: List[Any], root: Path, protos: Path, common: List[Any]) -> List[Any]:
    learn = _list_path(root, args.learn_split, args.dataset)
    return ["learn", *data, "--split-file", learn, "--out", protos, "--iters", args.iters,
            "--tau", args.tau, "--lr", args.lr, "--phi", args.phi, "--pooling", args.pooling,
            *(["--max-tokens", args.max_tokens] if args.max_tokens is not None else []), *common]


def _stage_dir(out: Path, name: str) -> Path:
    return out / name


def _stage_inputs(rows: Sequence[Table1Row]) -> Dict[str, Tuple[str, ...]]:
    """The stages each stage reads (their keys are part of its key)."""
    inputs: Dict[str, Tuple[str, ...]] = {}
    for row in rows:
        if row.vision:
            inputs[row.cams_stage] = ("prototypes",)
        inputs[row.masks_stage] = (row.cams_stage,)
        inputs[f"eval_{row.cams_stage}"] = (row.cams_stage,)
        inputs[f"eval_{row.masks_stage}"] = (row.masks_stage,)
    return inputs


_DEPENDS = _stage_inputs(TABLE1_ROWS)


# flags that change how a stage runs, not what it writes: left out of the stage keys
_NO_OUTPUT_FLAGS = {"--no-progress": 0, "--workers": 1}


def _output_args(argv: List[str]) -> List[str]:
    """The arguments that decide a stage's outputs. A stage that loads CLIP with upstream's numerics
    (the default) gets a marker, and ``--exact-fp32`` is left out: keys of runs made before
    upstream's numerics became the default (exact fp32 then) still match under ``--exact-fp32``,
    and a default run sets their outputs aside instead of reusing them."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in _NO_OUTPUT_FLAGS:
            skip = _NO_OUTPUT_FLAGS[a]
        elif a != "--exact-fp32":
            out.append(a)
    if "--clip" in argv and "--exact-fp32" not in argv:
        out.append("numerics=upstream")
    return out


def stage_keys(stages: List[Tuple[str, List[str]]]) -> Dict[str, str]:
    """A key per stage from its arguments and its inputs' keys: a changed upstream stage changes it."""
    import hashlib

    keys: Dict[str, str] = {}
    for name, argv in stages:
        payload = json.dumps([_output_args(argv), [keys[d] for d in _DEPENDS.get(name, ())]])
        keys[name] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return keys


def _marker(out: Path, name: str) -> Optional[dict]:
    path = _stage_dir(out, name) / STAGE_MARKER
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _stage_done(out: Path, name: str, key: str) -> bool:
    record = _marker(out, name)
    return record is not None and record.get("key") == key and record.get("exit") == 0


def _set_aside_if_stale(out: Path, name: str, key: str) -> None:
    """A stage finished earlier with other settings (or other inputs): keep it as NAME.old-TIME and
    start afresh, since its per-image files would otherwise be reused."""
    record = _marker(out, name)
    if record is None or record.get("key") == key:
        return
    folder = _stage_dir(out, name)
    aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    folder.rename(aside)
    print(f"[{name}] settings or inputs changed since the last run; previous outputs moved to {aside}")


def _mark_started(out: Path, name: str, argv: List[str], key: str) -> None:
    """Set a stale stage aside, then record the key before anything is written, so that files of
    an interrupted stage are set aside too when a rerun has other settings."""
    from vpl_plugin._io import write_json

    _set_aside_if_stale(out, name, key)
    _stage_dir(out, name).mkdir(parents=True, exist_ok=True)
    if _marker(out, name) is None:
        write_json(_stage_dir(out, name) / STAGE_MARKER, {"argv": argv, "key": key, "exit": None})


def _run_stage(out: Path, name: str, argv: List[str], key: str, runner: StageRunner) -> Tuple[int, float]:
    from vpl_plugin._io import write_json

    _mark_started(out, name, argv, key)
    start = time.time()
    code = runner(argv)
    seconds = time.time() - start
    if code == 0:
        write_json(_stage_dir(out, name) / STAGE_MARKER,
                   {"argv": argv, "key": key, "exit": code, "seconds": round(seconds, 2),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return code, seconds


def time_learning_pass(rows: int, dim: int, num_prototypes: int, *, device: str = "cpu",
                       chunk_size: int = 65536, repeats: int = 3) -> float:
    """Seconds of one pass of :func:`~vpl_plugin.prototypes.learn_vision_prototypes` over ``rows``
    in-memory rows of width ``dim`` against ``num_prototypes`` prototypes.

    Times the paper's "halving" rule (exactly one pass per iteration) at ``1`` and ``1 + repeats``
    iterations on random unit rows and returns the difference per iteration, so set-up costs
    drop out. The time of a pass grows linearly with the rows beyond one chunk.
    """
    import torch

    from vpl_plugin.prototypes import learn_vision_prototypes

    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    z = torch.nn.functional.normalize(torch.randn(num_prototypes, dim, generator=gen), dim=1)
    cand = torch.rand(rows, num_prototypes, generator=gen) < 0.3
    cand[:, 0] = True
    q = torch.softmax(torch.randn(rows, num_prototypes, generator=gen).masked_fill(~cand, float("-inf")), dim=1)
    seconds = []
    for iters in (1, 1 + repeats):
        start = time.perf_counter()
        learn_vision_prototypes(x, q, z, cand, iters=iters, step_rule="halving", chunk_size=chunk_size,
                                device=device)
        seconds.append(time.perf_counter() - start)
    return max(seconds[1] - seconds[0], 1e-9) / repeats


def _seconds_per_image(runner: StageRunner, argv: List[str], k: int) -> Optional[float]:
    """Seconds per image of a stage: one warm-up image, then the next k - 1 timed (k = 1: the one)."""
    import contextlib
    import io

    base = list(argv)
    if "--limit" in base:
        i = base.index("--limit")
        del base[i:i + 2]
    if "--no-progress" not in base:
        base.append("--no-progress")
    summary = Path(base[base.index("--out") + 1]) / f"vpl_{base[0]}_summary.json"
    rate = None
    for n in sorted({1, k}):
        with contextlib.redirect_stdout(io.StringIO()):
            code = runner(base + ["--limit", str(n)])
        if code not in (0, 3) or not summary.is_file():
            return None
        rec = json.loads(summary.read_text())
        if rec.get("done"):
            rate = rec["seconds"] / rec["done"]
    return rate


def project_time(args: argparse.Namespace, work: Path, geometry: Optional[Dict[str, int]] = None, *,
                 runner: StageRunner) -> Optional[Dict[str, Any]]:
    """Time ``SAMPLE_IMAGES`` images of the CAM and CRF stages (outputs in ``work``, reusable) and
    multiply by the list sizes; project the prototype steps from the time of one pass over a
    random in-memory chunk of the learning set's width (:func:`time_learning_pass`) times the
    number of chunks, steps and passes per step. ``runner`` runs the sampled stages. Returns None
    when the sample could not run."""
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.data.voc import read_split

    resolve(args)
    root = Path(args.root)
    k = min(SAMPLE_IMAGES, args.limit) if args.limit else SAMPLE_IMAGES
    n_split = len(read_split(_list_path(root, args.split, args.dataset)))
    n_learn = len(read_split(_list_path(root, args.learn_split, args.dataset)))
    if args.limit:
        n_split, n_learn = min(n_split, args.limit), min(n_learn, args.limit)
    stages = dict(_stages(args, work))
    cam_rate = _seconds_per_image(runner, stages["text_cams"], k)
    mask_rate = _seconds_per_image(runner, stages["text_masks"], k) if cam_rate is not None else None
    if cam_rate is None or mask_rate is None:
        return None
    geometry = geometry or _named_geometry("ViT-B/16")
    spec = get_class_spec(args.dataset)
    protos = len(spec.names) + len(spec.background)
    _, _, sizes = _image_stats(args, _list_path(root, args.learn_split, args.dataset))
    tokens = _learning_tokens(args, n_learn, sizes, geometry["patch"])
    chunk = 65536
    probe_rows = max(1, min(tokens, chunk))
    pass_seconds = time_learning_pass(probe_rows, geometry["dim"], protos, device=args.device, chunk_size=chunk)
    passes = args.iters * BB_PASSES_PER_STEP
    learn_seconds = pass_seconds * (max(tokens, 1) / probe_rows) * passes
    per_stage = {"text_cams": cam_rate * n_split, "prototypes (features)": cam_rate * n_learn,
                 "prototypes (steps)": learn_seconds,
                 "vpl_cams": cam_rate * n_split, "masks (CRF)": 2 * mask_rate * n_split}
    if getattr(args, "cpal", True):  # bank pass + CAM pass per CLIP-CPAL row (the bank step is small)
        per_stage["cpal_cams (2 rows x 2 passes)"] = 4 * cam_rate * n_split
        per_stage["masks (CRF)"] = 4 * mask_rate * n_split
    return {"sample_images": k, "cam_seconds_per_image": round(cam_rate, 3),
            "crf_seconds_per_image": round(mask_rate, 3), "images": {"split": n_split, "learn": n_learn},
            "learning": {"tokens": tokens, "max_tokens": args.max_tokens, "steps": args.iters,
                         "passes_per_step": BB_PASSES_PER_STEP, "probe_rows": probe_rows,
                         "seconds_per_pass_of_probe": round(pass_seconds, 5),
                         "dim": geometry["dim"], "prototypes": protos},
            "stages": {k2: round(v, 1) for k2, v in per_stage.items()},
            "total_seconds": round(sum(per_stage.values()), 1)}


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _print_projection(proj: Optional[Dict[str, Any]], args) -> None:
    if proj is None:
        print("projected run time: n/a (the timing sample could not run)")
        return
    print(f"projected run time: {_hms(proj['total_seconds'])} on {args.device} "
          f"(measured on {proj['sample_images']} images: CAMs {proj['cam_seconds_per_image']:.2f} s/image, "
          f"CRF {proj['crf_seconds_per_image']:.2f} s/image; {proj['images']['split']} images in "
          f"--split, {proj['images']['learn']} in --learn-split; evaluation not projected)")
    lr = proj.get("learning")
    if lr:
        budget = f", capped by --max-tokens {lr['max_tokens']:.3g}" if lr["max_tokens"] is not None else ""
        print(f"  prototype steps: {lr['steps']} steps x {lr['passes_per_step']} passes x "
              f"{lr['tokens']} tokens{budget}, from {lr['seconds_per_pass_of_probe'] * 1000:.1f} ms per pass "
              f"over {lr['probe_rows']} in-memory rows (a memory-mapped set streams from disk: slower)")
    for name, sec in proj["stages"].items():
        print(f"  {name:<22s} {_hms(sec)}")


# -- table ------------------------------------------------------------------------------------------
def _miou(path: Path) -> Optional[float]:
    try:
        value = json.loads(path.read_text()).get("miou")
    except (OSError, ValueError):
        return None
    return None if value is None else round(100 * float(value), 2)


def build_table(out: Path, available: Sequence[str], dataset: str = "voc",
                skipped: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """One record per Table 1 row: the paper's values (None on COCO: the paper gives none), the
    measured mIoU from the eval stages and the differences. ``available``: the registered
    adapters; ``skipped``: names of rows this run left out."""
    records = []
    for row in TABLE1_ROWS:
        p_seed, p_mask = (None, None) if dataset == "coco" else (row.paper_seed, row.paper_mask)
        rec: Dict[str, Any] = {"row": row.name, "adapter": row.adapter, "paper_seed": p_seed,
                               "paper_mask": p_mask}
        if dataset == "coco":
            rec["paper_coco_val_segmentation"] = row.paper_coco_val_segmentation
        if row.adapter not in available or row.name in skipped:
            note = "adapter not available yet" if row.adapter not in available else "skipped (--no-cpal)"
            rec.update(available=False, note=note, seed=None, mask=None, diff_seed=None, diff_mask=None)
        else:
            seed = _miou(out / f"eval_{row.cams_stage}" / "result.json")
            mask = _miou(out / f"eval_{row.masks_stage}" / "result.json")
            rec.update(available=True, seed=seed, mask=mask,
                       diff_seed=None if seed is None or p_seed is None else round(seed - p_seed, 2),
                       diff_mask=None if mask is None or p_mask is None else round(mask - p_mask, 2))
        records.append(rec)
    return records


def _fmt(v: Optional[float], sign: bool = False, none: str = "-") -> str:
    if v is None:
        return none
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of :func:`build_table`'s rows ("n/a" where the paper gives no value)."""
    head = "| row | paper seed | paper mask | measured seed | measured mask | diff seed | diff mask |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = f"{_fmt(r['paper_seed'], none='n/a')} | {_fmt(r['paper_mask'], none='n/a')}"
        if not r["available"]:
            lines.append(f"| {r['row']} | {paper} | {r['note']} | | | |")
        else:
            lines.append(f"| {r['row']} | {paper} | {_fmt(r['seed'])} | {_fmt(r['mask'])} | "
                         f"{_fmt(r['diff_seed'], True)} | {_fmt(r['diff_mask'], True)} |")
    return "\n".join(lines)


COCO_NOTE = ("The papers give no COCO seed or pseudo-mask mIoU (Table 1 is VOC train), hence \"n/a\". "
             "Their only COCO numbers are val segmentation mIoU after training a segmenter on the masks, "
             "not comparable with these columns: CLIP-ES 45.4 -> +VPL 49.2, CLIP-CPAL 46.8 -> +VPL 49.8 "
             "(VPL and CPAL papers).")


# -- command ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace, runner: StageRunner) -> int:
    """Body of ``vpl reproduce table1``; ``runner`` runs each stage's ``vpl`` command line.
    Returns the exit status."""
    from vpl_plugin.adapters import list_adapters

    resolve(args)
    out = Path(args.out)
    available = list_adapters()
    _print_header(args, out, available)
    missing, geometry = _check_inputs(args, out)
    if missing:
        print(f"missing ({len(missing)}):")
        for m in missing:
            print(f"  - {m}")
        print("nothing was run." if args.dry_run else "fix these first (see `vpl reproduce --help`).")
        return EXIT_USAGE
    stages = _stages(args, out)
    keys = stage_keys(stages)
    pending = [name for name, argv in stages if not _stage_done(out, name, keys[name])]
    proj = _projection(args, out, geometry, stages, keys, pending, runner)
    if args.dry_run:
        print(f"ready: {len(pending)} of {len(stages)} stages to run "
              f"({', '.join(pending) if pending else 'none'}).")
        return EXIT_OK
    status, timings = _run_stages(out, stages, keys, pending, runner)
    if status == EXIT_USAGE:
        return status
    rows = build_table(out, available, args.dataset,
                       skipped=[r.name for r in TABLE1_ROWS if r not in rows_to_run(args)])
    _write_table(args, out, rows, timings, proj)
    return status


def _print_header(args, out: Path, available: Sequence[str]) -> None:
    coco = args.dataset == "coco"
    print(f"vpl reproduce table1: {args.dataset} at {args.root}, CLIP {args.clip}, seeds/masks on "
          f"--split {args.split}, prototypes learned on --learn-split {args.learn_split}"
          + (f" (at most {args.max_tokens:.3g} tokens)" if args.max_tokens is not None else "") + f", out {out}")
    for row in TABLE1_ROWS:
        if row.adapter not in available:
            paper = "paper: n/a on COCO" if coco else f"paper: seed {row.paper_seed}, mask {row.paper_mask}"
            print(f"  {row.name}: adapter not available yet ({paper})")


def _check_inputs(args, out: Path) -> Tuple[List[str], Optional[Dict[str, int]]]:
    """Check layout, lists, checkpoint and disk; print the notes. ``(missing, geometry)``."""
    missing, notes = check_layout(args)
    ck_missing, ck_notes, geometry = check_checkpoint(args)
    missing += ck_missing
    notes += ck_notes
    if args.root and Path(args.root).is_dir():
        need, line = estimate_disk(args, geometry)
        free = _free_bytes(out)
        notes.append(f"disk: about {_size(need)} needed ({line}); {_size(free)} free under {out}")
        if need > free:
            missing.append(f"disk: about {_size(need)} needed under {out}, only {_size(free)} free")
    for n in notes:
        print(f"  {n}" if n.startswith("note:") else f"  ok: {n}")
    return missing, geometry


def _projection(args, out: Path, geometry: Optional[Dict[str, int]], stages: List[Tuple[str, List[str]]],
                keys: Dict[str, str], pending: List[str], runner: StageRunner) -> Optional[Dict[str, Any]]:
    """Time a few images and print the projected run time (unless --no-projection)."""
    proj = None
    if not (args.project and (args.dry_run or pending)):
        return proj
    if args.dry_run and not _checkpoint_local(args.clip):
        print("projected run time: n/a until the checkpoint is downloaded (a dry run downloads "
              "nothing); rerun the dry run afterwards")
    elif args.dry_run:
        with tempfile.TemporaryDirectory(prefix="vpl_reproduce_") as tmp:
            proj = project_time(args, Path(tmp), geometry, runner=runner)
    elif "text_cams" in pending and "text_masks" in pending:
        for name in ("text_cams", "text_masks"):
            _mark_started(out, name, dict(stages)[name], keys[name])
        proj = project_time(args, out, geometry, runner=runner)  # the sampled images are reused by the run
    if proj is not None or (args.dry_run and _checkpoint_local(args.clip)):
        _print_projection(proj, args)
    return proj


def _run_stages(out: Path, stages: List[Tuple[str, List[str]]], keys: Dict[str, str], pending: List[str],
                runner: StageRunner) -> Tuple[int, Dict[str, Any]]:
    """Run the pending stages in order: ``(exit status, seconds per stage)``; a failed stage
    stops the run with status 2."""
    status = EXIT_OK
    timings: Dict[str, Any] = {}
    for name, argv in stages:
        if name not in pending:
            print(f"[{name}] finished before; skipped (delete {out / name / STAGE_MARKER} to redo)")
            timings[name] = "reused"
            continue
        print(f"[{name}] vpl {' '.join(argv)}")
        code, seconds = _run_stage(out, name, argv, keys[name], runner)
        timings[name] = round(seconds, 1)
        if code == EXIT_PARTIAL:
            status = EXIT_PARTIAL
            print(f"[{name}] some images were skipped (see its summary); continuing", file=sys.stderr)
        elif code != EXIT_OK:
            print(f"error: stage {name} failed (exit {code}); fix it and rerun - finished stages "
                  "are kept", file=sys.stderr)
            return EXIT_USAGE, timings
    return status, timings


def _write_table(args, out: Path, rows: List[Dict[str, Any]], timings: Dict[str, Any],
                 proj: Optional[Dict[str, Any]]) -> None:
    """Print the table; write table1.json and table1.md."""
    from vpl_plugin._io import write_json, write_text

    coco = args.dataset == "coco"
    table = format_table(rows)
    print(table)
    if coco:
        print(COCO_NOTE)
    record = {"table": "table1", "rows": rows, "dataset": args.dataset, "root": str(args.root),
              "voc_root": None if coco else str(args.voc_root),
              "coco_root": str(args.root) if coco else None, "max_tokens": args.max_tokens,
              "clip": str(args.clip), "split": args.split, "learn_split": args.learn_split,
              "limit": args.limit, "learning": {"iters": args.iters, "tau": args.tau, "lr": args.lr,
                                                "phi": args.phi, "pooling": args.pooling,
                                                "map_mode": args.map_mode},
              "templates": args.templates, "stage_seconds": timings, "projection": proj,
              "paper": ({r.name: {"seed": None, "mask": None,
                                  "coco_val_segmentation": r.paper_coco_val_segmentation}
                         for r in TABLE1_ROWS} if coco else
                        {r.name: {"seed": r.paper_seed, "mask": r.paper_mask} for r in TABLE1_ROWS}),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(out / "table1.json", record)
    md = (f"# Table 1 reproduction\n\nseed and pseudo-mask mIoU (%) on `{args.split}` of {args.dataset} "
          f"(`{args.root}`), CLIP `{args.clip}`, prototypes learned on `{args.learn_split}` "
          f"(tau {args.tau}, lr {args.lr}, {args.iters} steps, phi {args.phi}"
          + (f", at most {args.max_tokens:.3g} tokens" if args.max_tokens is not None else "") + ")"
          + (f", first {args.limit} images of each list" if args.limit else "") + ".\n\n" + table + "\n"
          + (f"\n{COCO_NOTE}\n" if coco else ""))
    write_text(out / "table1.md", md)
    print(f"wrote {out / 'table1.json'} and {out / 'table1.md'}")
