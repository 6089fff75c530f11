"""``vpl segment``: phase-2 inference with a trained decoder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Tuple

from vpl_plugin._cli_common import UsageError
from vpl_plugin.cli.arguments import DATASETS, FORMATTER, TRUST_TORCHSCRIPT_RECORDED_HELP, add_common, \
    add_max_pixels
from vpl_plugin.cli.shared import create_dataset, gather_summary, write_config

NAME = "segment"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True

log = logging.getLogger("vpl_plugin")

DESCRIPTION = ("Segment the images of a list with a `vpl train` segmenter: softmax averaged over "
               "scales and a horizontal flip (docs/vpl.md#inference), optional dense CRF on the RGB "
               "image, "
               "argmax. Writes OUT/<id>.png label maps (0 = background, c + 1 = class c; the "
               "format of `vpl masks`, scored by `vpl eval --masks`), OUT/vpl_segment.yaml and "
               "OUT/vpl_segment_summary.json.")

EPILOG = """examples:
  # VOC val with the paper's inference (scales 0.75/1/1.25, flip, CRF), then its mIoU
  vpl segment --checkpoint runs/decoder/segmenter.pt --root VOC2012 --split-file val.txt \\
      --out seg_val --crf --device cuda
  vpl eval --masks seg_val --gt-root VOC2012/SegmentationClass --split-file val.txt
  # the CLIP checkpoint moved since training: name it again
  vpl segment --checkpoint segmenter.pt --clip /data/ViT-B-16.pt --root VOC2012 --out seg_val
  # 4 GPUs share the list (rank 0 writes the configuration and the merged summary)
  torchrun --nproc_per_node 4 -m vpl_plugin segment --checkpoint segmenter.pt --root VOC2012 \\
      --split-file val.txt --out seg_val --crf --device cuda
A rerun skips images whose PNG exists; PNGs are written atomically. No image-level labels are used
unless --use-image-labels is given."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl segment`` to the sub-command parsers."""
    p = subparsers.add_parser(NAME, help="VPL phase 2: segment images with a trained decoder",
                              description=DESCRIPTION, formatter_class=FORMATTER, epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="SEG.pt",
                   help="segmenter written by `vpl train` (OUT/segmenter.pt)")
    p.add_argument("--backbone", "--clip", dest="backbone", metavar="SPEC",
                   help="frozen encoder instead of the one recorded in the checkpoint (same weights "
                        "required): OpenAI CLIP name or file, 'clip:NAME_OR_PATH' or 'timm:MODEL'")
    p.add_argument("--trust-torchscript", action="store_true", help=TRUST_TORCHSCRIPT_RECORDED_HELP)
    add_max_pixels(p)
    p.add_argument("--dataset", default="voc", choices=DATASETS, help="label space and list format (default: voc)")
    p.add_argument("--root", required=True, metavar="DATASET_DIR", help="dataset folder (VOC: the VOC2012 folder)")
    p.add_argument("--split-file", metavar="LIST.txt",
                   help="image list (default ImageSets/Segmentation/train.txt under --root)")
    p.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels, read only with --use-image-labels (default auto)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of <id>.png")
    p.add_argument("--scales", default="0.75,1,1.25", metavar="S1,S2,...",
                   help="comma-separated resize factors (default 0.75,1,1.25)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip pass")
    p.add_argument("--crf", action="store_true",
                   help="dense CRF (CLIP-ES parameters, 10 iterations, RGB image) before the argmax")
    p.add_argument("--use-image-labels", action="store_true",
                   help="restrict each image to its image-level classes (an oracle; not inference)")
    p.add_argument("--greyscale", dest="palette", action="store_false",
                   help="L-mode PNGs instead of VOC-palette P-mode PNGs")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    add_common(p)
    return p


def _scales(text: str) -> Tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        scales = ()
    if not scales or any(not (v > 0) for v in scales):
        raise UsageError(f"--scales must be comma-separated positive numbers (e.g. 0.75,1,1.25); "
                         f"got {text!r}.")
    return scales


def run(args: argparse.Namespace) -> int:
    """Run ``vpl segment``; returns the exit status."""
    from vpl_plugin import distributed

    scales = _scales(args.scales)
    dataset, spec = create_dataset(args)
    # under torchrun each rank takes every WORLD_SIZE-th image; rank 0 writes config and summary
    owns_group = not distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    device = args.device
    if str(device).startswith("cuda") and env.distributed:
        device = f"cuda:{env.local_rank}"
    try:
        return _segment(args, scales, dataset, spec, env, device)
    finally:
        if env.distributed and owns_group:
            distributed.destroy()


def _segment(args: argparse.Namespace, scales: Tuple[float, ...], dataset: Any, spec: Any, env: Any,
             device: str) -> int:
    from vpl_plugin.phase2.backbones import create_backbone
    from vpl_plugin.phase2.decoder import load_segmenter
    from vpl_plugin.phase2.segment import segment_dataset

    trust = args.trust_torchscript
    backbone = create_backbone(args.backbone, device, trust_torchscript=trust) if args.backbone else None
    model = load_segmenter(args.checkpoint, backbone=backbone, map_location=device, trust_torchscript=trust)
    if model.num_fg != len(spec.names):
        raise UsageError(f"the segmenter in {args.checkpoint} has {model.num_fg} foreground classes "
                         f"but --dataset {args.dataset} has {len(spec.names)}; pass the dataset it "
                         "was trained for.")
    if tuple(model.class_names) != tuple(spec.names) and env.is_main:
        log.warning("the segmenter's class names differ from --dataset %s's; labels follow the "
                    "segmenter's order: %s", args.dataset, ", ".join(model.class_names))
    out = Path(args.out)
    if env.is_main:
        write_config(out / "vpl_segment.yaml", args, {
            "scales_resolved": list(scales), "decoder_config": model.config.to_dict(),
            "tau_seg": model.tau_seg, "class_names": list(model.class_names),
            "world_size": env.world_size})
    summary = segment_dataset(model, dataset, out, scales=scales, flip=args.flip, crf=args.crf,
                              limit=args.limit, progress=args.progress and env.is_main,
                              use_image_labels=args.use_image_labels, palette=args.palette,
                              rank=env.rank, world_size=env.world_size)
    return gather_summary(summary, env, dataset, out, "segment")
