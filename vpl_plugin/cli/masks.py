"""``vpl masks``: dense-CRF pseudo masks from CAM files."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vpl_plugin._cli_common import finite_float, positive_int
from vpl_plugin.cli.arguments import DATASETS, FORMATTER, add_common, add_max_pixels
from vpl_plugin.cli.shared import read_ids, report, write_config

NAME = "masks"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True

EPILOG = """examples:
  vpl masks --cams cams_vpl --root VOC2012 --split-file train.txt --out pseudo --crf
Pixels whose CRF confidence is below --conf are 255 (ignored when training a segmenter)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl masks`` to the sub-command parsers."""
    p = subparsers.add_parser(NAME, help="CRF pseudo masks from CAMs",
                              description="Turn CAM files into VOC-palette pseudo-mask PNGs.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("--cams", required=True, metavar="CAM_DIR", help="folder of <id>.npy CAM files")
    p.add_argument("--root", required=True, metavar="DATASET_DIR", help="dataset folder (images in JPEGImages/)")
    p.add_argument("--image-dir", metavar="DIR", help="image folder (default: ROOT/JPEGImages)")
    p.add_argument("--dataset", default="voc", choices=DATASETS,
                   help="label space of the CAM files (default: voc): a CAM key outside its classes is "
                        "refused by name instead of becoming a label the dataset does not have")
    add_max_pixels(p)
    p.add_argument("--split-file", metavar="LIST.txt", help="image list")
    p.add_argument("--out", required=True, metavar="MASK_DIR", help="output folder of <id>.png")
    p.add_argument("--crf", dest="crf", action="store_true", default=True,
                   help="dense CRF (default on, CLIP-ES parameters)")
    p.add_argument("--no-crf", dest="crf", action="store_false", help="argmax of the CAMs only")
    p.add_argument("--conf", type=finite_float, default=0.95,
                   help="pixels with CRF confidence below this become 255 (default 0.95)")
    p.add_argument("--crf-image", default="upstream_wrapped", choices=["upstream_wrapped", "rgb"],
                   help="image the bilateral kernel sees: upstream's uint8-wrapped mean-subtracted "
                        "BGR (default) or the plain RGB image (docs/upstream_clip_es.md#crf-image)")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel processes (default 1)")
    p.add_argument("--greyscale", dest="palette", action="store_false",
                   help="write L-mode PNGs like upstream's cv2.imwrite (for trainers that read masks "
                        "with cv2 in greyscale) instead of VOC-palette P-mode PNGs")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``vpl masks``; returns the exit status."""
    from vpl_plugin._io import write_json
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.pipeline import RunSummary
    from vpl_plugin.pseudo_masks import make_pseudo_masks

    root = Path(args.root)
    ids = read_ids(args, root)
    if args.limit is not None:
        ids = ids[: args.limit]
    image_dir = Path(args.image_dir) if args.image_dir else root / "JPEGImages"
    out = Path(args.out)
    write_config(out / "vpl_masks.yaml", args)
    start = time.time()
    result = make_pseudo_masks(args.cams, image_dir, ids, out, crf=args.crf, conf=args.conf,
                               crf_image_mode=args.crf_image, workers=args.workers,
                               palette=args.palette, progress=args.progress,
                               num_classes=get_class_spec(args.dataset).num_classes,
                               max_pixels=args.max_pixels)
    summary = RunSummary(total=len(ids), done=len(result.get("done", ())),
                         skipped_existing=len(result.get("skipped_existing", ())),
                         failed=[tuple(f) if not isinstance(f, dict) else (f.get("id"), f.get("reason"))
                                 for f in result.get("failed", [])],
                         seconds=time.time() - start)
    write_json(out / "vpl_masks_summary.json", summary.as_dict())
    return report(summary, "masks", out)
