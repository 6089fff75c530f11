"""``vpl eval``: mIoU of CAM files or label PNGs against ground truth."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict

from vpl_plugin._cli_common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError
from vpl_plugin.cli.arguments import DATASETS, FORMATTER, add_common
from vpl_plugin.cli.shared import read_ids

NAME = "eval"
#: writes no shared output (``--json`` is one small file, written atomically)
OUTPUT_IS_FOLDER = None

EPILOG = """examples:
  vpl eval --cams cams_vpl --gt-root VOC2012/SegmentationClass --split-file train.txt
  vpl eval --masks pseudo --gt-root VOC2012/SegmentationClass --split-file train.txt --json r.json
--bg-threshold auto searches upstream's candidates: exponents 1, 2 for 'attn' keys (the default
attn_highres), 1..10 for other keys (e.g. --cam-key highres, the raw GradCAM of --save-gradcam);
a float < 1 is a constant background score, a float >= 1 an exponent of (1 - max CAM); a comma
list (e.g. 1,2,3,4,5,6,7,8,9,10, the search the demo uses for maps without CAA refinement) searches
those values."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl eval`` to the sub-command parsers."""
    p = subparsers.add_parser(NAME, help="mIoU of CAMs or pseudo masks",
                              description="Evaluate CAM files (with the background-threshold search of "
                                          "CLIP-ES's eval_cam.py) or mask PNGs against ground truth.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cams", metavar="CAM_DIR")
    src.add_argument("--masks", metavar="MASK_DIR")
    p.add_argument("--gt-root", required=True, metavar="MASK_GT_DIR", help="folder of ground-truth <id>.png")
    p.add_argument("--split-file", required=True, metavar="LIST.txt", help="image list")
    p.add_argument("--dataset", default="voc", choices=DATASETS)
    p.add_argument("--bg-threshold", default="auto", help="auto | FLOAT | FLOAT,FLOAT,... (see below)")
    p.add_argument("--cam-key", default="attn_highres", help="key of the maps in the CAM files")
    p.add_argument("--json", metavar="RESULT.json", help="write the result as JSON")
    add_common(p)
    return p


def parse_bg_thresholds(text: str) -> Any:
    """``"auto"``, one number, or a list of numbers from ``--bg-threshold`` (their values are
    checked where they are used, by :func:`vpl_plugin.metrics.evaluate_cams`).

    >>> parse_bg_thresholds("auto"), parse_bg_thresholds("0.5"), parse_bg_thresholds("1, 2,3")
    ('auto', 0.5, [1.0, 2.0, 3.0])
    """
    if text == "auto":
        return text
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--bg-threshold must be 'auto', a number or a comma list of numbers; got {text!r}.") from None
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    """Run ``vpl eval``; returns the exit status."""
    from vpl_plugin._io import write_json
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.metrics import evaluate_cams, evaluate_masks

    spec = get_class_spec(args.dataset)
    ids = read_ids(args, None)
    if args.limit is not None:
        ids = ids[: args.limit]
    names = ("background",) + tuple(spec.names)
    if args.cams:
        thr = parse_bg_thresholds(args.bg_threshold)
        result = evaluate_cams(args.cams, args.gt_root, ids, num_classes=spec.num_classes,
                               bg_thresholds=thr, cam_key=args.cam_key, class_names=names,
                               progress=args.progress)
        source = {"cams": str(args.cams)}
    else:
        result = evaluate_masks(args.masks, args.gt_root, ids, num_classes=spec.num_classes,
                                class_names=names, progress=args.progress)
        source = {"masks": str(args.masks)}
    result = {**source, "gt_root": str(args.gt_root), "split_file": str(args.split_file),
              "images": len(ids), **result}
    _print_eval(result)
    if args.json:
        write_json(args.json, result)
    missing = result.get("missing") or []
    if ids and len(missing) == len(ids):
        print(f"error: none of the {len(ids)} images could be evaluated (first: {missing[0]}).",
              file=sys.stderr)
        return EXIT_USAGE
    return EXIT_PARTIAL if missing else EXIT_OK


def _print_eval(result: Dict[str, Any]) -> None:
    miou = result.get("miou")
    thr = result.get("best_threshold", result.get("threshold"))
    head = f"mIoU {100 * miou:.2f}" if miou is not None else "mIoU n/a"
    if thr is not None:
        head += f" (background threshold {thr}, {result.get('mode', '')} mode)"
    print(head + f" over {result['images'] - len(result.get('missing') or [])} images")
    per_class = result.get("per_class") or result.get("iou") or {}
    if isinstance(per_class, dict):
        for name, value in per_class.items():
            if value is not None and value == value:
                print(f"  {name:<14s} {100 * value:6.2f}")
    missing = result.get("missing") or []
    for item in missing[:10]:
        print(f"  missing: {item}", file=sys.stderr)
    if len(missing) > 10:
        print(f"  ... and {len(missing) - 10} more (--json FILE writes the full list)", file=sys.stderr)
