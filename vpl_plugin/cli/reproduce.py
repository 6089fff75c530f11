"""``vpl reproduce table1``: the VPL paper's Table 1 (seed and pseudo-mask mIoU) in one command.

The work is :func:`vpl_plugin.reproduce.run`; this module gives it its flags and a stage runner
that runs the ``cams``, ``learn``, ``masks`` and ``eval`` commands exactly as ``vpl`` does.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from vpl_plugin._cli_common import (add_numerics_flags, finite_float, max_pixels_arg, nonnegative_int, positive_float,
                                     positive_int, tau_arg, unit_float)
from vpl_plugin.cli import cams, evaluate, learn, masks
from vpl_plugin.cli.app import run_argv
from vpl_plugin.cli.arguments import DATASETS, FORMATTER, TRUST_TORCHSCRIPT_HELP
from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS

NAME = "reproduce"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True

#: the commands a Table 1 stage runs
STAGE_COMMANDS = (cams, learn, masks, evaluate)

EPILOG = """examples:
  # check everything first (layout, lists, checkpoint, disk, projected time); exit 2 lists what is missing
  vpl reproduce table1 --voc-root VOCdevkit/VOC2012 --clip ViT-B/16 --dry-run
  # the paper's setting: seeds/masks on train, prototypes learned on train_aug (SBD list)
  vpl reproduce table1 --voc-root VOCdevkit/VOC2012 --clip ViT-B/16 --device cuda --out t1
  # rerun the same command after an interruption: finished stages are skipped, the rest resumes
  # a quick look without SBD: learn on train itself, 100 images
  vpl reproduce table1 --voc-root VOC2012 --clip ViT-B-16.pt --learn-split train --limit 100
  # the project's recommended VPL configuration instead of the paper-literal one
  vpl reproduce table1 ... --pooling region --tau 0.1 --map-mode dense --out t1_recommended
  # meaningful numbers on CPU in minutes: the synthetic world and the shipped demo CLIP
  vpl reproduce table1 --dataset synthetic --voc-root syn --clip vpl_plugin/demo/assets/demo_clip.pt \\
      --split val --learn-split train --template "a photo of a {}."
  # COCO 2014 (train2014/, val2014/, SegmentationClass/, coco14/train.txt from CLIP-ES): seeds and
  # masks on train, prototypes from at most 1e7 train tokens; check first, as always
  vpl reproduce table1 --coco-root coco2014 --clip ViT-B/16 --dry-run
  vpl reproduce table1 --coco-root coco2014 --clip ViT-B/16 --device cuda --out t1_coco

The CLIP-CPAL rows run the project's reconstruction of CPAL (unreleased code; docs/clip_cpal.md,
adapters/clip_cpal/README.md); --no-cpal skips them. The paper has no COCO seed or mask numbers:
the COCO table prints "n/a" in the paper columns.
Exit status: 0 all done; 3 some images skipped (the stage summaries name them); 2 missing inputs."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl reproduce`` to the sub-command parsers."""
    p = subparsers.add_parser(
        NAME, help="reproduce the paper's Table 1 (seed and mask mIoU) in one command",
        description="Chain cams -> learn -> cams -> masks -> eval for every Table 1 row whose "
                    "adapter exists, under --out (one folder per stage, finished stages "
                    "skipped on rerun), and print the measured mIoU beside the paper's.",
        epilog=EPILOG, formatter_class=FORMATTER)
    _add_data(p)
    _add_learning(p)
    p.add_argument("--no-cpal", dest="cpal", action="store_false",
                   help="skip the CLIP-CPAL rows (the reconstruction of docs/clip_cpal.md; each of its rows "
                        "runs a bank pass and a CAM pass over --split)")
    p.add_argument("--no-projection", dest="project", action="store_false",
                   help="do not time a few images per stage before the run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", choices=["table1"], help="what to reproduce (table1: seed and mask mIoU)")
    p.add_argument("--voc-root", metavar="DIR",
                   help="the VOC2012 folder (JPEGImages/, Annotations/, SegmentationClass[Aug]/, "
                        "ImageSets/Segmentation/); with --dataset synthetic the export folder")
    p.add_argument("--coco-root", metavar="DIR",
                   help="run the COCO 2014 variant instead: the folder holding train2014/, val2014/, "
                        "SegmentationClass/ and the CLIP-ES lists (coco14/train.txt, coco14/val.txt)")
    p.add_argument("--clip", metavar="NAME_OR_PATH",
                   help="OpenAI CLIP model name (ViT-B/16, downloaded on first use) or checkpoint file")
    p.add_argument("--dataset", default="voc", choices=[d for d in DATASETS if d != "coco"],
                   help="voc (default) or synthetic (the demo world's VOC export; use with "
                        "--template 'a photo of a {}.' and the demo CLIP)")
    p.add_argument("--split", default="train",
                   help="list the seeds and masks are made and evaluated on (default: train, "
                        "as Table 1); a name under ImageSets/Segmentation/ or a file")
    p.add_argument("--learn-split", default=None,
                   help="list the vision prototypes are learned on (default: train_aug on VOC, as the "
                        "paper; train on COCO)")
    p.add_argument("--max-tokens", metavar="N",
                   help="learn from at most N patch tokens, an equal count per image drawn with a fixed "
                        "seed (default: every token on VOC, 1e7 on COCO; "
                        "docs/vpl.md#learning-set-size-and-memory)")
    p.add_argument("--out", default="reproduce_table1", metavar="DIR",
                   help="folder of every stage's outputs and table1.json/.md (default: reproduce_table1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more than N pixels, checked before decoding (default 2097152; 0 = no "
                        "limit; see vpl cams --help for what raising it costs)")
    p.add_argument("--trust-torchscript", action="store_true", help=TRUST_TORCHSCRIPT_HELP)
    add_numerics_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check dataset layout, lists, checkpoint and disk; project the run time; run nothing")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images of each list")
    p.add_argument("--workers", type=positive_int, default=1, help="processes for the CRF stage (default 1)")
    p.add_argument("--template", dest="templates", action="append", metavar="TEMPLATE",
                   help="prompt template (repeatable; default CLIP-ES's 'a clean origami {}.')")


def _add_learning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=nonnegative_int, default=3000, help="prototype-learning steps (paper: 3000)")
    p.add_argument("--tau", default="0.03", type=tau_arg, help="vision temperature tau_I (paper: 0.03)")
    p.add_argument("--lr", type=positive_float, default=10.0, help="step size (paper: 10)")
    p.add_argument("--phi", type=finite_float, default=0.4, help="seed threshold Phi (paper: 0.4)")
    p.add_argument("--pooling", default="token", choices=["token", "region"],
                   help="learning rows: token (the paper, default) or region (the project's recommended "
                        "configuration with --tau 0.1 --map-mode dense; see README)")
    p.add_argument("--map-mode", default="gradcam", choices=["gradcam", "dense", "fused"],
                   help="map of the VPL CAMs: gradcam (the paper, default), dense or fused (see vpl cams)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="VPL rows without CAA refinement (the recommended configuration, with --pooling "
                        "region --tau 0.1 --map-mode dense); their CAMs are scored with background "
                        "exponents 1..10")
    p.add_argument("--mask-conf", type=unit_float, default=0.0, metavar="C",
                   help="CRF confidence below which a pseudo-mask pixel is 255 (default 0: every pixel "
                        "labelled and scored, as upstream's eval_cam_with_crf.py --eval_only scores the "
                        "paper's mask column; 0.95 gives the masks to train a segmenter on)")


def run_stage(argv: Sequence[str]) -> int:
    """Run one stage's ``vpl`` command line (``cams``, ``learn``, ``masks`` or ``eval``) as ``vpl``
    would; returns its exit status."""
    return run_argv(argv, STAGE_COMMANDS)


def run(args: argparse.Namespace) -> int:
    """Run ``vpl reproduce``; returns the exit status."""
    from vpl_plugin.reproduce import run as run_table1

    return run_table1(args, run_stage)
