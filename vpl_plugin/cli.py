"""The ``vpl`` command (also ``python -m vpl_plugin``).

Stages, each resumable and each writing its resolved configuration beside its outputs::

    vpl cams    -> CAM_DIR/<id>.npy       (CLIP-ES or CLIP-CPAL CAMs, text or vision prototypes)
    vpl learn   -> PROTOTYPES.pt          (VPL phase 1: vision prototypes from text CAMs)
    vpl masks   -> MASK_DIR/<id>.png      (dense CRF pseudo masks, 255 = ignore)
    vpl eval    -> mIoU of CAMs or masks  (upstream eval_cam.py semantics)
    vpl train   -> OUT/segmenter.pt       (VPL phase 2: decoder on frozen CLIP, CE + RSC)
    vpl segment -> OUT/<id>.png           (phase-2 inference: multi-scale + flip, optional CRF)
    vpl reproduce table1                  (the paper's Table 1 in one command, VOC or COCO)
    vpl demo    -> the embedded default: CLIP-ES vs CLIP-ES + VPL on the synthetic world
    vpl train-clip / random-clip          (the demo CLIP / a random-weight CLIP checkpoint)

`vpl cams`, `vpl segment` and `vpl train` run under torchrun too (list sharding; DDP).

Recommended VPL configuration (measured on the demo world, see README): learn with
`--pooling region --tau 0.1`, then `vpl cams --prototypes P --map-mode dense`. The
paper-literal configuration is the default of every flag (phase 2: tau_RSC 0.07, see README).

Exit status: 0 every image processed; 3 some images skipped (the summary names them and why);
2 nothing could run (bad arguments, or an input refused: missing or unsafe model, bad dataset
file, output in use by another run); 1 a run stopped on an unexpected error (one line names it;
-v prints the traceback); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from vpl_plugin._version import __version__
from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS

from vpl_plugin._cli_common import (  # noqa: F401 - EXIT_* and UsageError are part of this module's API
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ParseError,
    UsageError,
    VplArgumentParser,
    finite_float,
    max_pixels_arg,
    max_tokens_arg,
    nonnegative_int,
    positive_float,
    positive_int,
    tau_arg,
)

log = logging.getLogger("vpl_plugin")

_EPILOG_CAMS = """examples:
  # CLIP-ES CAMs with text prototypes on VOC train
  vpl cams --clip ViT-B/16 --root VOC2012 --split-file train.txt --out cams_text
  # the same with learned vision prototypes (VPL)
  vpl cams --clip ViT-B/16 --root VOC2012 --split-file train.txt --prototypes vpl.pt --out cams_vpl
  # CLIP-CPAL (reconstruction): pass 1 over the same list builds CAM_DIR/cpal_bank.pt, then the CAMs
  vpl cams --adapter clip-cpal --clip ViT-B/16 --root VOC2012 --split-file train.txt --out cams_cpal
  # CLIP-CPAL + VPL, reusing (or saving) a context bank made with the same prototypes
  vpl cams --adapter clip-cpal --prototypes vpl.pt --cpal-bank bank_vpl.pt ... --out cams_cpal_vpl
A rerun skips images whose CAM file exists; outputs are written atomically.
Several processes (GPUs, or CPU processes with gloo) share the list under torchrun; rank 0 writes
the configuration and the merged summary:
  torchrun --nproc_per_node 4 -m vpl_plugin cams --device cuda --clip ViT-B/16 --root VOC2012 \\
      --split-file train_aug.txt --out cams_text"""

_EPILOG_LEARN = """examples:
  vpl learn --clip ViT-B/16 --root VOC2012 --split-file train_aug.txt --out vpl.pt
  vpl learn ... --tau 0.03 --lr 10 --iters 3000 --phi 0.4          (the paper's values)
  vpl learn ... --tau clip --iters 0                                  (identity: text CAMs)
  vpl learn ... --pooling region --tau 0.1    (recommended; use with `vpl cams --map-mode dense`)
The learning pass computes text GradCAMs, seeds them at --phi, builds target distributions and
runs projected gradient descent on the unit sphere from the text prototypes."""

_EPILOG_MASKS = """examples:
  vpl masks --cams cams_vpl --root VOC2012 --split-file train.txt --out pseudo --crf
Pixels whose CRF confidence is below --conf are 255 (ignored when training a segmenter)."""

_EPILOG_EVAL = """examples:
  vpl eval --cams cams_vpl --gt-root VOC2012/SegmentationClass --split-file train.txt
  vpl eval --masks pseudo --gt-root VOC2012/SegmentationClass --split-file train.txt --json r.json
--bg-threshold auto searches upstream's candidates: exponents 1, 2 for 'attn' keys (the default
attn_highres), 1..10 for other keys (e.g. --cam-key highres, the raw GradCAM of --save-gradcam);
a float < 1 is a constant background score, a float >= 1 an exponent of (1 - max CAM)."""


# -- argument helpers -------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of option values (keys = option names with '_' or '-'); each value "
                        "is checked like the flag; flags given on the command line override it")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images of the list")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--adapter", default="clip-es", help="pipeline adapter (default: clip-es)")
    g.add_argument("--clip", required=False, metavar="NAME_OR_PATH",
                   help="OpenAI CLIP model name (e.g. ViT-B/16; downloads on first use) or checkpoint "
                        "file (TorchScript archive or state dict)")
    g.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="label space and list format (default: voc; synthetic = the demo world's "
                        "VOC-layout export)")
    g.add_argument("--root", metavar="DATASET_DIR",
                   help="VOC: the VOC2012 folder (JPEGImages/, Annotations/, SegmentationClass/); "
                        "COCO: the folder holding train2014/")
    g.add_argument("--split-file", metavar="LIST.txt",
                   help="image list (VOC ids, or CLIP-ES COCO lines '<id> labels...'); default "
                        "ImageSets/Segmentation/train.txt under --root")
    g.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels: XML annotations, GT masks, or XML where present "
                        "else masks (default: auto)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more than N pixels (width x height), checked from the header before "
                        "decoding, with the file named (default 2097152, e.g. 2048x1024; 0 = no limit). "
                        "CLIP-ES memory grows with the square of the pixel count: with a ViT-B/16 on a "
                        "CPU about 0.65 GB at 640x640, 2.9 GB at 1000x1000, 12 GB at the default limit")
    g.add_argument("--trust-torchscript", action="store_true",
                   help="read a TorchScript --clip archive with torch.jit.load, which RUNS CODE STORED IN THE FILE "
                        "(it can write files or hang): only for an archive from a source you trust that the "
                        "default reader refuses. By default archives are read as data and nothing in them runs")
    g.add_argument("--fp16-compat", action="store_true",
                   help="reproduce upstream CLIP-ES's fp16 rounding (fp16-rounded weights and "
                        "positional table; fp16 model and GradCAM arithmetic on CUDA)")
    g.add_argument("--template", dest="templates", action="append", metavar="TEMPLATE",
                   help="prompt template with {} for the class name; repeat for an ensemble "
                        "(default: CLIP-ES's 'a clean origami {}.')")
    g.add_argument("--map-mode", default="gradcam", choices=["gradcam", "dense", "fused"],
                   help="map refined into CAMs: gradcam (CLIP-ES; with --prototypes the paper-literal "
                        "VPL), dense (per-token class posterior of the prototypes), fused (text "
                        "GradCAM x dense map)")
    g.add_argument("--box-threshold", type=finite_float, help="CAA box threshold (default 0.4 VOC, 0.7 COCO)")
    g.add_argument("--box-clip-fix", action="store_true",
                   help="fix upstream's box mask, which drops the last row and column; off = upstream "
                        "(docs/upstream_clip_es.md#box-mask-last-row-column)")


def _add_cpal(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP-CPAL (--adapter clip-cpal; a reconstruction, see docs/clip_cpal.md; "
                             "defaults = its documented interpretations)")
    g.add_argument("--cpal-bank", metavar="FILE",
                   help="context bank of pass 1: loaded when it exists (its settings must match), "
                        "else built over the same list and saved there (default: OUT/cpal_bank.pt)")
    g.add_argument("--cpal-features", choices=["ln1", "proj"],
                   help="dense features: last block's ln_1 tokens (default) or projected patch tokens")
    g.add_argument("--cpal-candidates", choices=["same", "all"],
                   help="neighbour candidates: the class's own context prototypes (default) or all "
                        "classes' (other classes' weights zeroed)")
    g.add_argument("--cpal-fusion", choices=["mean", "max"],
                   help="fused map: maxnorm((G + S) / 2) (default) or maxnorm(max(G, S))")
    g.add_argument("--cpal-m", type=positive_int, metavar="M", help="context prototypes per class (8; COCO 4)")
    g.add_argument("--cpal-k", type=positive_int, metavar="K", help="soft positive neighbours kept (3)")
    g.add_argument("--cpal-tau-s", type=finite_float, metavar="T", help="positive-score temperature (0.1)")
    g.add_argument("--cpal-gamma", type=finite_float, metavar="G", help="shift strength (0.5; 0 = no shift)")
    g.add_argument("--cpal-delta-p", type=finite_float, metavar="D", help="instance-prototype map threshold (0.4)")
    g.add_argument("--cpal-kmeans-iters", type=nonnegative_int, metavar="N", help="spherical k-means iterations (10)")
    g.add_argument("--cpal-kmeans-seed", type=int, metavar="S", help="k-means++ seed (0)")
    g.add_argument("--cpal-head", action="store_const", const=True, default=None,
                   help="the trained-head alternative (docs/clip_cpal.md): pass 1 trains a CAM head on the "
                        "frozen "
                        "dense features (keeps them all in memory) and pass 2 fuses CLIP-ES's map with "
                        "the head's PA-CAM")
    g.add_argument("--cpal-head-iters", type=nonnegative_int, metavar="N", help="head training steps (200)")
    g.add_argument("--cpal-head-lr", type=finite_float, metavar="LR", help="head learning rate, Adam (0.05)")
    g.add_argument("--cpal-head-lambda", type=finite_float, metavar="L",
                   help="weight of the self-supervised L_self term (0 = BCE only)")


_CPAL_FLAGS = {"cpal_features": "features", "cpal_candidates": "candidates", "cpal_fusion": "fusion",
               "cpal_m": "num_context", "cpal_k": "neighbours", "cpal_tau_s": "tau_s",
               "cpal_gamma": "gamma", "cpal_delta_p": "delta_p", "cpal_kmeans_iters": "kmeans_iters",
               "cpal_kmeans_seed": "kmeans_seed", "cpal_head": "head", "cpal_head_iters": "head_iters",
               "cpal_head_lr": "head_lr", "cpal_head_lambda": "head_lambda"}


def _build_parser() -> argparse.ArgumentParser:
    parser = VplArgumentParser(
        prog="vpl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vpl-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("cams", help="CLIP-ES / CLIP-CPAL CAMs with text or vision prototypes",
                       description="Generate CLIP-ES CAMs (GradCAM + attention-affinity refinement) "
                                   "in upstream's .npy format; --adapter clip-cpal adds the CLIP-CPAL "
                                   "reconstruction's context-prototype fusion before refinement.", epilog=_EPILOG_CAMS, formatter_class=fmt)
    _add_data(p)
    p.add_argument("--out", required=False, metavar="CAM_DIR", help="output folder of <id>.npy files")
    p.add_argument("--prototypes", metavar="PROTOTYPES.pt",
                   help="vision prototypes from `vpl learn` (default: CLIP-ES text prototypes)")
    p.add_argument("--save-gradcam", action="store_true",
                   help="also save the unrefined upsampled GradCAM under the key 'highres'")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="skip CAA refinement (attn_highres = upsampled GradCAM)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                   help="images of equal size per forward (default 1; use 8 or so on a GPU: same "
                        "CAMs within float rounding, fewer launches; slower on a CPU thread)")
    _add_cpal(p)
    _add_common(p)

    p = sub.add_parser("learn", help="VPL phase 1: learn vision prototypes",
                       description="Learn vision prototypes from text-prototype GradCAMs (VPL phase 1).",
                       epilog=_EPILOG_LEARN, formatter_class=fmt)
    _add_data(p)
    p.add_argument("--out", metavar="PROTOTYPES.pt", help="where to save the prototype set")
    p.add_argument("--iters", type=nonnegative_int, default=3000, help="gradient steps T_w (default 3000)")
    p.add_argument("--tau", default="0.03", type=tau_arg,
                   help="tau_I, the vision temperature (default 0.03); 'clip' = CLIP's own temperature")
    p.add_argument("--lr", type=positive_float, default=10.0, help="step size alpha (default 10)")
    p.add_argument("--phi", type=finite_float, default=0.4, help="seed threshold Phi on the GradCAM (0.4)")
    p.add_argument("--target-mode", default="seed_hardened",
                   choices=["seed_hardened", "inmap", "cam", "kl"],
                   help="target distribution: seed_hardened (default), inmap, cam, "
                        "kl (Eq. 7 literally); see docs/vpl.md#targets")
    p.add_argument("--candidates", default="image", choices=["image", "all"],
                   help="softmax candidates: the image's classes + background (default) or all")
    p.add_argument("--step-rule", default=None,
                   help="optimiser step rule (see learn_vision_prototypes; default: the converging rule; "
                        "'halving' = the paper-literal InMaP rule)")
    p.add_argument("--level", default="instance", choices=["instance", "class"],
                   help="instance-level (each pixel, default) or class-level (class centroids)")
    p.add_argument("--pooling", default="token", choices=["token", "region"],
                   help="learning rows: every patch token (the paper, default) or one pooled row per "
                        "seed region and one for the background (the project's recommended "
                        "configuration with --tau 0.1 and `vpl cams --map-mode dense`; see README)")
    p.add_argument("--seed-source", default="gradcam", choices=["gradcam", "refined"],
                   help="seeds from the raw GradCAM (default) or the CAA-refined map")
    p.add_argument("--chunk-size", type=positive_int, default=65536, help="pixels per gradient chunk")
    p.add_argument("--max-tokens", metavar="N",
                   help="learn from at most N rows (e.g. 1e7 for COCO): each image keeps N // images rows "
                        "drawn uniformly with --token-seed (default: every row; "
                        "docs/vpl.md#learning-set-size-and-memory)")
    p.add_argument("--token-seed", type=int, default=0, help="seed of the --max-tokens draw (default 0)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="per-image features and targets (<id>.npz; a rerun reuses them, so an "
                        "interrupted run resumes). Default: OUT without suffix + '.features/'")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="keep the learning set in memory only (nothing reused on rerun)")
    p.add_argument("--memmap", action="store_true", default=None,
                   help="stream features from memory-mapped files in the cache (default: automatic "
                        "above 2 GB of features, e.g. VOC train_aug)")
    _add_common(p)

    p = sub.add_parser("masks", help="CRF pseudo masks from CAMs",
                       description="Turn CAM files into VOC-palette pseudo-mask PNGs.",
                       epilog=_EPILOG_MASKS, formatter_class=fmt)
    p.add_argument("--cams", metavar="CAM_DIR", help="folder of <id>.npy CAM files")
    p.add_argument("--root", metavar="DATASET_DIR", help="dataset folder (images in JPEGImages/)")
    p.add_argument("--image-dir", metavar="DIR", help="image folder (default: ROOT/JPEGImages)")
    p.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="label space of the CAM files (default: voc): a CAM key outside its classes is "
                        "refused by name instead of becoming a label the dataset does not have")
    p.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more than N pixels (width x height), checked from the header before "
                        "decoding, with the file named (default 2097152, e.g. 2048x1024; 0 = no limit). "
                        "CLIP-ES memory grows with the square of the pixel count: with a ViT-B/16 on a "
                        "CPU about 0.65 GB at 640x640, 2.9 GB at 1000x1000, 12 GB at the default limit")
    p.add_argument("--split-file", metavar="LIST.txt", help="image list")
    p.add_argument("--out", metavar="MASK_DIR", help="output folder of <id>.png")
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
    _add_common(p)

    p = sub.add_parser("eval", help="mIoU of CAMs or pseudo masks",
                       description="Evaluate CAM files (with the background-threshold search of "
                                   "CLIP-ES's eval_cam.py) or mask PNGs against ground truth.",
                       epilog=_EPILOG_EVAL, formatter_class=fmt)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cams", metavar="CAM_DIR")
    src.add_argument("--masks", metavar="MASK_DIR")
    p.add_argument("--gt-root", metavar="MASK_GT_DIR", help="folder of ground-truth <id>.png")
    p.add_argument("--split-file", metavar="LIST.txt", help="image list")
    p.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"])
    p.add_argument("--bg-threshold", default="auto", help="auto | FLOAT (see below)")
    p.add_argument("--cam-key", default="attn_highres", help="key of the maps in the CAM files")
    p.add_argument("--json", metavar="RESULT.json", help="write the result as JSON")
    _add_common(p)

    p = sub.add_parser("demo", help="CLIP-ES vs CLIP-ES + VPL on the synthetic world (the embedded default)",
                       description="Run the embedded default: held-out synthetic scenes, the shipped demo "
                                   "CLIP, CLIP-ES with text and vision prototypes, CRF pseudo masks, "
                                   "controls and sweeps. Writes report.json, report.md and grid.png.",
                       formatter_class=fmt,
                       epilog="examples:\n  vpl demo --quick            (about 2 minutes on 2 CPU cores)\n"
                              "  vpl demo --out demo_out     (the full report)")
    p.add_argument("--quick", action="store_true", help="smaller splits and sweeps")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out)")
    p.add_argument("--clip", metavar="PATH", help="demo CLIP checkpoint (default: the shipped one)")
    p.add_argument("--cpal-studies", action="store_true",
                   help="also sweep CLIP-CPAL's interpretations and choose them on separate validation "
                        "scenes (several extra minutes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("train-clip", help="train the demo CLIP on the synthetic world",
                       description="Train the demo CLIP (OpenAI's architecture, 64x64 images, patch 8) "
                                   "from scratch on the synthetic world; resumable. The shipped "
                                   "checkpoint is reproduced by the defaults.", formatter_class=fmt,
                       epilog="examples:\n  vpl train-clip --out demo_clip.pt\n"
                              "  vpl train-clip --out demo_clip.pt --device cuda --steps 6000 --batch-size 512 --workers 14")
    p.add_argument("--out", required=True, metavar="PATH.pt",
                   help="checkpoint to write (fp16 state dict, loads with clip.model.build_model); the "
                        "resumable training state goes to PATH.pt.train.pt, the curve to PATH.pt.curve.json")
    p.add_argument("--steps", type=positive_int, default=2500, help="optimiser steps (default 2500)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="scenes per step; every caption of the same label set in the batch counts as a "
                        "positive (default 128)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="AdamW peak learning rate, cosine schedule after 100 warm-up steps (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="weight-initialisation seed; the batches depend on the step only (default 0)")
    p.add_argument("--vision-width", type=int, default=128, metavar="W",
                   help="ViT width, a multiple of 64 (default 128, the shipped model)")
    p.add_argument("--vision-layers", type=int, default=6, metavar="L", help="ViT depth (default 6)")
    p.add_argument("--patch-size", type=int, default=8, metavar="P",
                   help="ViT patch size: 8 gives the 64x64 scenes an 8x8 token grid, 4 a 16x16 grid at about "
                        "3x the time per step on a CPU (default 8; the shipped model uses 4)")
    p.add_argument("--select-every", type=int, default=0, metavar="N",
                   help="every N steps, score the model on held-out scenes of the training world (text "
                        "GradCAM seed mIoU, the demo's second gate) and save the best-scored state "
                        "instead of the last (default 0: the last)")
    p.add_argument("--select-scenes", type=int, default=300, metavar="N",
                   help="how many held-out scenes --select-every scores on (default 300)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="data-loader processes that draw the scenes ahead of the optimiser; they change "
                        "the speed, never the weights (default 0: in this process; on a GPU use about "
                        "the number of CPU cores)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over instead of continuing from PATH.pt.train.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("random-clip", help="write a random-weight OpenAI CLIP checkpoint (for trying the pipeline)",
                       description="Write a random-weight CLIP ViT checkpoint of the real architecture. "
                                   "Its CAMs are meaningless; it exercises the whole pipeline without "
                                   "downloads.")
    p.add_argument("--out", required=True, metavar="PATH.pt")
    p.add_argument("--arch", default="tiny", choices=["tiny", "ViT-B/16"],
                   help="tiny (fast, 64-d) or the real ViT-B/16 size (~600 MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchscript", action="store_true",
                   help="save as a TorchScript archive like OpenAI's released files")

    p = sub.add_parser(
        "train", help="VPL phase 2: train the segmentation decoder on pseudo masks",
        description="Train the phase-2 decoder (frozen CLIP encoder, frozen prototypes, CE + RSC loss) "
                    "on images and pseudo-mask PNGs (255 = ignore). SGD momentum 0.9, weight decay "
                    "1e-4, poly lr; random rescale, crop and flip. Writes OUT/last.pt (resumable "
                    "state, every --checkpoint-every iterations), OUT/segmenter.pt (for `vpl segment`), "
                    "OUT/curves.json and OUT/curves.png.",
        formatter_class=fmt, epilog="""examples:
  # the paper's recipe (30k iterations, batch 6, crop 448) on VOC train_aug pseudo masks
  vpl train --clip ViT-B/16 --root VOC2012 --split-file train_aug.txt --masks pseudo_vpl \\
      --prototypes vpl.pt --out runs/decoder --device cuda
  # the same on 6 GPUs, one image each (--batch-size is the global batch over all processes, so
  # 1, 2, 3 or 6 GPUs keep the paper's 6; 8 GPUs need --batch-size 8 or 16)
  torchrun --nproc_per_node 6 -m vpl_plugin train --clip ViT-B/16 --root VOC2012 \\
      --split-file train_aug.txt --masks pseudo_vpl --prototypes vpl.pt --out runs/decoder \\
      --device cuda
  # ablation rows: CE only (Table 3 row IV) and with validation mIoU curves
  vpl train ... --lambda-rsc 0 --out runs/ce_only --eval-every 2000 --val-split-file val.txt
  # the demo world (64x64 images, the shipped demo CLIP, patch 8)
  vpl train --dataset synthetic --clip vpl_plugin/demo/assets/demo_clip.pt --root world \\
      --split-file train.txt --masks world_masks --prototypes vpl.pt --out runs/demo --crop 64 --iters 1000
A rerun with the same --out resumes from OUT/last.pt and ends with the weights an uninterrupted run
would have (same settings required; --no-resume starts over). Under torchrun every process reads its
slice of the same global batch, BatchNorm and the loss use the whole global batch, and rank 0 writes
the files.""")
    g = p.add_argument_group("data and model")
    g.add_argument("--backbone", "--clip", dest="backbone", metavar="SPEC",
                   help="frozen encoder: OpenAI CLIP name or checkpoint (ViT-B/16, PATH.pt), "
                        "'clip:NAME_OR_PATH' or 'timm:MODEL'")
    g.add_argument("--trust-torchscript", action="store_true",
                   help="read a TorchScript CLIP archive (--clip, or the one recorded in the checkpoint) with torch.jit.load, which RUNS CODE STORED IN THE FILE "
                        "(it can write files or hang): only for an archive from a source you trust that the "
                        "default reader refuses. By default archives are read as data and nothing in them runs")
    g.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more than N pixels (width x height), checked from the header before "
                        "decoding, with the file named (default 2097152, e.g. 2048x1024; 0 = no limit). "
                        "CLIP-ES memory grows with the square of the pixel count: with a ViT-B/16 on a "
                        "CPU about 0.65 GB at 640x640, 2.9 GB at 1000x1000, 12 GB at the default limit")
    g.add_argument("--prototypes", metavar="PROTOTYPES.pt", help="prototype set from `vpl learn` (frozen)")
    g.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="label space and list format (default: voc)")
    g.add_argument("--root", metavar="DATASET_DIR", help="dataset folder (VOC: the VOC2012 folder)")
    g.add_argument("--split-file", metavar="LIST.txt", help="training image list (e.g. train_aug.txt)")
    g.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels: XML, GT mask, or XML where present (default auto)")
    g.add_argument("--masks", metavar="MASK_DIR", help="pseudo masks <id>.png from `vpl masks` (255 = ignore)")
    g.add_argument("--skip-missing", action="store_true",
                   help="train on the images that have a mask instead of stopping (exit status 3)")
    g.add_argument("--val-split-file", metavar="LIST.txt",
                   help="images with ground truth under ROOT for validation mIoU curves")
    g.add_argument("--val-limit", type=positive_int, metavar="N", help="validate on the first N images only")
    g.add_argument("--tau-seg", type=positive_float, metavar="T",
                   help="temperature of the mask logits (default: the prototype set's tau_I)")
    g.add_argument("--out", metavar="DIR", help="output folder")
    g = p.add_argument_group("optimisation (defaults: the paper; docs/vpl.md#training-recipe)")
    g.add_argument("--iters", type=nonnegative_int, default=30000, help="iterations (30000)")
    g.add_argument("--batch-size", type=positive_int, default=6,
                   help="global batch over all processes (6); a multiple of the process count")
    g.add_argument("--lr", type=positive_float, default=0.01, help="base learning rate, poly 0.9 decay (0.01)")
    g.add_argument("--momentum", type=finite_float, default=0.9)
    g.add_argument("--weight-decay", type=finite_float, default=1e-4)
    g.add_argument("--crop", type=positive_int, default=448, help="crop side, a multiple of the patch (448)")
    g.add_argument("--scale", type=positive_float, nargs=2, default=(0.5, 2.0), metavar=("LO", "HI"),
                   help="random rescale range (0.5 2.0)")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flip")
    g.add_argument("--lambda-ce", type=finite_float, default=1.0, help="CE weight (1)")
    g.add_argument("--lambda-rsc", type=finite_float, default=1.0, help="RSC weight (1; 0 = CE only)")
    g.add_argument("--tau-rsc", type=positive_float, default=0.07,
                   help="RSC temperature (0.07; the other reading of Eq. 13 is 0.01, which collapsed "
                        "training to all background on the demo world: docs/vpl.md#loss)")
    g.add_argument("--rsc-form", default="pairs", choices=["pairs", "class", "literal"],
                   help="RSC definition (default pairs; docs/vpl.md#loss)")
    g.add_argument("--checkpoint-every", type=positive_int, default=1000, metavar="N",
                   help="write OUT/last.pt every N iterations (1000) and at the end")
    g.add_argument("--eval-every", type=positive_int, metavar="N",
                   help="validation mIoU every N iterations (needs --val-split-file)")
    g.add_argument("--amp", dest="amp", action="store_true", default=True,
                   help="mixed precision on CUDA (default on; ignored on CPU)")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="full fp32 on CUDA")
    g.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"],
                   help="autocast dtype (bf16 default; fp16 adds a gradient scaler)")
    g.add_argument("--seed", type=int, default=0, help="decoder init, data order and augmentation (0)")
    g.add_argument("--workers", type=nonnegative_int, default=2, help="data-loading processes per rank (2)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over instead of resuming from OUT/last.pt")
    _add_common(p)

    p = sub.add_parser(
        "segment", help="VPL phase 2: segment images with a trained decoder",
        description="Segment the images of a list with a `vpl train` segmenter: softmax averaged over "
                    "scales and a horizontal flip (docs/vpl.md#inference), optional dense CRF on the RGB "
                    "image, "
                    "argmax. Writes OUT/<id>.png label maps (0 = background, c + 1 = class c; the "
                    "format of `vpl masks`, scored by `vpl eval --masks`), OUT/vpl_segment.yaml and "
                    "OUT/vpl_segment_summary.json.",
        formatter_class=fmt, epilog="""examples:
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
unless --use-image-labels is given.""")
    p.add_argument("--checkpoint", metavar="SEG.pt", help="segmenter written by `vpl train` (OUT/segmenter.pt)")
    p.add_argument("--backbone", "--clip", dest="backbone", metavar="SPEC",
                   help="frozen encoder instead of the one recorded in the checkpoint (same weights "
                        "required): OpenAI CLIP name or file, 'clip:NAME_OR_PATH' or 'timm:MODEL'")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="read a TorchScript CLIP archive (--clip, or the one recorded in the checkpoint) with torch.jit.load, which RUNS CODE STORED IN THE FILE "
                        "(it can write files or hang): only for an archive from a source you trust that the "
                        "default reader refuses. By default archives are read as data and nothing in them runs")
    p.add_argument("--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images with more than N pixels (width x height), checked from the header before "
                        "decoding, with the file named (default 2097152, e.g. 2048x1024; 0 = no limit). "
                        "CLIP-ES memory grows with the square of the pixel count: with a ViT-B/16 on a "
                        "CPU about 0.65 GB at 640x640, 2.9 GB at 1000x1000, 12 GB at the default limit")
    p.add_argument("--dataset", default="voc", choices=["voc", "coco", "synthetic"],
                   help="label space and list format (default: voc)")
    p.add_argument("--root", metavar="DATASET_DIR", help="dataset folder (VOC: the VOC2012 folder)")
    p.add_argument("--split-file", metavar="LIST.txt",
                   help="image list (default ImageSets/Segmentation/train.txt under --root)")
    p.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels, read only with --use-image-labels (default auto)")
    p.add_argument("--out", metavar="DIR", help="output folder of <id>.png")
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
    _add_common(p)

    from vpl_plugin import reproduce

    p = sub.add_parser("reproduce", help="reproduce the paper's Table 1 (seed and mask mIoU) in one command",
                       description="Chain cams -> learn -> cams -> masks -> eval for every Table 1 row whose "
                                   "adapter exists, under --out (one folder per stage, finished stages "
                                   "skipped on rerun), and print the measured mIoU beside the paper's.",
                       epilog=reproduce.EPILOG, formatter_class=fmt)
    reproduce.add_arguments(p)
    return parser


_REQUIRED = {
    "cams": ("clip", "root", "out"),
    "learn": ("clip", "root", "out"),
    "masks": ("cams", "root", "out"),
    "eval": ("gt_root", "split_file"),
}


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    if getattr(args, "config", None):
        args = _apply_config(parser, argv, args)
    missing = [k for k in _REQUIRED.get(args.command, ()) if getattr(args, k, None) in (None, "")]
    if args.command == "eval" and not (args.cams or args.masks):
        missing.append("cams or masks")
    if missing:
        raise UsageError(f"vpl {args.command}: missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                         + f" (see `vpl {args.command} --help`).")
    return args


class ConfigError(UsageError):
    """A --config value that its flag refuses."""


def _apply_config(parser: argparse.ArgumentParser, argv: List[str], args) -> argparse.Namespace:
    """defaults < YAML file < command-line flags.

    The file's values are turned into the flags they stand for and parsed with the command line,
    so each goes through its flag's own type, choices and checks; a flag given on the command line
    replaces the file's value (also for repeatable flags such as --template).
    """
    from vpl_plugin._yaml import YAMLFileError, read_yaml_mapping

    path = Path(args.config)
    try:
        values = read_yaml_mapping(path, what="--config")
    except YAMLFileError as err:
        raise UsageError(str(err)) from None
    sub = _subcommand_parser(parser, args.command)
    tokens = _config_tokens(sub, values, path, argv)
    at = argv.index(args.command) + 1
    try:
        return parser.parse_args(argv[:at] + tokens + argv[at:])
    except ParseError as err:  # the command line alone parsed, so the file's value is the culprit
        raise ConfigError(f"--config {path}: {err}") from None


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its sub-parsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[command]
    raise KeyError(command)


def _config_tokens(sub: argparse.ArgumentParser, values: Dict[str, Any], path: Path,
                   argv: Sequence[str]) -> List[str]:
    """The command-line tokens a --config mapping stands for (flags on ``argv`` win)."""
    by_dest: Dict[str, List[argparse.Action]] = {}
    for action in sub._actions:  # noqa: SLF001
        if action.option_strings and action.dest not in ("help", "config"):
            by_dest.setdefault(action.dest, []).append(action)
    unknown = sorted(k for k in values if k.replace("-", "_") not in by_dest)
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(by_dest)}.")
    given = {a.dest for a in sub._actions for flag in a.option_strings  # noqa: SLF001
             for token in argv if token == flag or token.startswith(flag + "=")}
    tokens: List[str] = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in given and value is not None:
            tokens += _tokens_for(by_dest[dest], value, f"--config {path}: {key}")
    return tokens


def _tokens_for(actions: List[argparse.Action], value: Any, where: str) -> List[str]:
    flag = max(actions[0].option_strings, key=len)
    if all(a.nargs == 0 for a in actions):  # on/off switches
        for action in actions:
            if isinstance(value, bool) and action.const is value:
                return [max(action.option_strings, key=len)]
        if value is False or value == actions[0].default:
            return []
        raise ConfigError(f"{where} must be true or false; got {value!r}.")
    if isinstance(value, dict):
        raise ConfigError(f"{where} must be a value or a list, not a mapping.")
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in items):
        raise ConfigError(f"{where}: nested lists are not option values; got {value!r}.")
    text = [_scalar_text(v) for v in items]
    nargs = actions[0].nargs
    if isinstance(actions[0], argparse._AppendAction):  # noqa: SLF001 - a repeatable flag
        return [t for v in text for t in (flag, v)]
    if isinstance(nargs, int):
        if len(text) != nargs:
            raise ConfigError(f"{where} takes {nargs} values; got {value!r}.")
        return [flag, *text]
    if len(text) != 1:
        raise ConfigError(f"{where} takes one value; got {value!r}.")
    return [flag, text[0]]


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # refused by numeric flags, kept by text flags
    return str(value)


def _write_config(path: Path, args: argparse.Namespace, extra: Optional[dict] = None) -> None:
    from vpl_plugin._io import write_text

    record = {k: v for k, v in sorted(vars(args).items()) if k not in ("config",)}
    record["vpl_plugin_version"] = __version__
    record["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if extra:
        record.update(extra)
    try:
        import yaml

        text = yaml.safe_dump(json.loads(json.dumps(record, default=str)), sort_keys=True)
    except ImportError:
        text = json.dumps(record, indent=2, default=str) + "\n"
    write_text(path, text)


# -- stages -----------------------------------------------------------------------------------------
def _dataset(args):
    from vpl_plugin.data.classes import get_class_spec

    spec = get_class_spec(args.dataset)
    if args.dataset in ("voc", "synthetic"):
        from vpl_plugin.data.voc import VOCDataset

        return VOCDataset(args.root, args.split_file, class_spec=spec, label_source=args.label_source,
                          max_pixels=args.max_pixels), spec
    from vpl_plugin.data.coco import COCODataset

    if not args.split_file:
        raise UsageError("--dataset coco needs --split-file (CLIP-ES list: '<id> l1 l2 ...').")
    return COCODataset(args.root, args.split_file, class_spec=spec, max_pixels=args.max_pixels), spec


def _describe_labels(dataset) -> dict:
    counts = getattr(dataset, "label_source_counts", None)
    if not counts:
        return {}
    print("image-level labels: " + ", ".join(f"{v} from {k}" for k, v in counts.items() if v))
    return {"label_sources": dict(counts)}


def _adapter(args, spec, prototypes=None):
    from vpl_plugin.adapters import create_adapter
    from vpl_plugin.backbones import load_clip

    encoder = load_clip(args.clip, args.device, fp16_compat=args.fp16_compat,
                        trust_torchscript=args.trust_torchscript)
    overrides = {"box_clip_fix": args.box_clip_fix, "map_mode": args.map_mode}
    if args.templates:
        bad = [t for t in args.templates if "{}" not in t]
        if bad:
            raise UsageError(f"--template needs a '{{}}' where the class name goes; got {bad}.")
        overrides["templates"] = tuple(args.templates)
    if args.box_threshold is not None:
        overrides["box_threshold"] = args.box_threshold
    for key in ("refine", "save_gradcam"):
        if hasattr(args, key):
            overrides[key] = getattr(args, key)
    overrides.update(_cpal_overrides(args))
    return create_adapter(args.adapter, encoder, spec, prototypes, **overrides)


def _cpal_overrides(args) -> Dict[str, Any]:
    """CLIP-CPAL settings given as --cpal-* flags; refused with another adapter."""
    given = {flag: getattr(args, flag) for flag in (*_CPAL_FLAGS, "cpal_bank")
             if getattr(args, flag, None) is not None}
    if given and args.adapter != "clip-cpal":
        raise UsageError(f"{', '.join('--' + f.replace('_', '-') for f in given)} only appl"
                         f"{'ies' if len(given) == 1 else 'y'} to --adapter clip-cpal (got --adapter "
                         f"{args.adapter}).")
    return {_CPAL_FLAGS[f]: v for f, v in given.items() if f in _CPAL_FLAGS}


def _cpal_bank(args, adapter, dataset, out: Path) -> None:
    """CLIP-CPAL pass 1: load --cpal-bank when it exists, else build it over the same list (resumable
    through FILE.partial) and save it. Under torch.distributed rank 0 builds it, the others load it."""
    if args.adapter != "clip-cpal":
        return
    from vpl_plugin import distributed
    from vpl_plugin.cpal import ContextBank, build_context_bank
    from vpl_plugin.pipeline import RunSummary

    path = Path(args.cpal_bank) if args.cpal_bank else out / "cpal_bank.pt"
    existed = path.is_file()
    if not existed and distributed.is_main():
        summary = RunSummary()
        bank = build_context_bank(adapter, dataset, limit=args.limit, progress=args.progress,
                                  partial=Path(f"{path}.partial"), summary=summary)
        if not bank.ids or bank.instances.shape[0] == 0:
            raise UsageError(f"CLIP-CPAL pass 1 found no instance prototype in {summary.total} images "
                             f"({len(summary.failed)} unreadable); check the list and the labels, or "
                             f"lower --cpal-delta-p (no map reached it).")
        bank.save(path)
        print(f"vpl cams: CLIP-CPAL context bank from {summary.line()}: "
              f"{bank.centres.shape[0]} context prototypes -> {path}")
    distributed.barrier()
    bank = ContextBank.load(path)
    adapter.set_bank(bank)
    if existed and distributed.is_main():
        print(f"vpl cams: CLIP-CPAL reuses the context bank {path} ({len(bank.ids)} images; delete it "
              f"to rebuild)")


def _report(summary, what: str, out: Path) -> int:
    print(f"vpl {what}: {summary.line()} -> {out}")
    if summary.total and len(summary.failed) == summary.total:
        print(f"error: every image failed; first: {summary.failed[0][0]}: {summary.failed[0][1]}",
              file=sys.stderr)
        return EXIT_USAGE
    for image_id, reason in summary.failed[:20]:
        print(f"  skipped {image_id}: {reason}", file=sys.stderr)
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more (see the summary JSON)", file=sys.stderr)
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def _gather_summary(summary, env, dataset, out: Path, command: str) -> int:
    """After a run that torchrun may have sharded: merge the ranks' summaries; rank 0 writes
    ``vpl_<command>_summary.json`` and prints the report. Returns the exit status."""
    from vpl_plugin import distributed
    from vpl_plugin._io import write_json
    from vpl_plugin.pipeline import merge_summaries

    distributed.barrier()
    parts = distributed.all_gather_object(summary)
    if env.distributed:
        summary = merge_summaries(parts, dataset.ids)
    code = _cams_status(summary)
    if env.is_main:
        record = summary.as_dict()
        if env.distributed:
            record["world_size"] = env.world_size
        write_json(out / f"vpl_{command}_summary.json", record)
        code = _report(summary, command, out)
    distributed.barrier()
    return code


def _check_existing_cams(out: Path, args, adapter_config: dict) -> None:
    """Refuse to resume into a CAM folder written with other settings: its finished images would
    be kept as they are while the configuration file claimed the new settings."""
    cfg = out / "vpl_cams.yaml"
    if not cfg.is_file() or not any(out.glob("*.npy")):
        return
    from vpl_plugin._yaml import YAMLFileError, read_yaml_mapping

    try:
        old = read_yaml_mapping(cfg, what="the record of the CAMs already in --out,")
    except YAMLFileError as err:
        raise UsageError(f"{err} Without it the settings of the CAMs there are unknown, so a rerun cannot "
                         f"tell whether they match; use another --out, or delete {out} to start over.") from None
    then = old.get("adapter_config") or {}
    now = json.loads(json.dumps(adapter_config, default=str))
    diff = {k: (then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
    for k in ("prototypes", "clip", "split_file", "root"):
        a, b = old.get(k), getattr(args, k, None)
        if (a, b) != (None, None) and str(a) != str(b):
            diff[k] = (a, b)
    if diff:
        text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"{out} already holds CAMs made with other settings ({text}); a rerun skips finished "
                         f"images, so they would stay as they are. Use another --out, or delete {out} to "
                         f"start over.")


def cmd_cams(args) -> int:
    from vpl_plugin import distributed
    from vpl_plugin.pipeline import generate_cams
    from vpl_plugin.prototypes import PrototypeSet

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    dataset, spec = _dataset(args)
    prototypes = PrototypeSet.load(args.prototypes) if args.prototypes else None
    # under torchrun each rank takes every WORLD_SIZE-th image; rank 0 writes config and summary
    owns_group = not distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    try:
        adapter = _adapter(args, spec, prototypes)
        out = Path(args.out)
        _check_existing_cams(out, args, adapter.describe())
        _cpal_bank(args, adapter, dataset, out)
        if env.is_main:
            _write_config(out / "vpl_cams.yaml", args, {"adapter_config": adapter.describe(),
                                                        **_describe_labels(dataset)})
        summary = generate_cams(adapter, dataset, out, limit=args.limit,
                                progress=args.progress and env.is_main, rank=env.rank,
                                world_size=env.world_size, batch_size=args.batch_size)
        return _gather_summary(summary, env, dataset, out, "cams")
    finally:
        if env.distributed and owns_group:
            distributed.destroy()


def _cams_status(summary) -> int:
    """The exit status :func:`_report` gives ``summary``, without printing (ranks other than 0)."""
    if summary.total and len(summary.failed) == summary.total:
        return EXIT_USAGE
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def cmd_learn(args) -> int:
    from contextlib import nullcontext

    from vpl_plugin._lock import output_lock

    max_tokens = max_tokens_arg(args.max_tokens)
    dataset, spec = _dataset(args)
    adapter = _adapter(args, spec)
    out = Path(args.out)
    cache = None
    if args.cache:
        cache = Path(args.cache_dir) if args.cache_dir else out.with_name(out.stem + ".features")
    with (output_lock(cache, f"vpl learn --out {out}") if cache is not None else nullcontext()):
        # the cache (and its memory-mapped features) is this run's until the prototypes are saved
        return _learn(args, adapter, dataset, out, cache, max_tokens)


def _learn(args, adapter, dataset, out: Path, cache: Optional[Path], max_tokens: Optional[int]) -> int:
    from vpl_plugin._io import write_json
    from vpl_plugin.pipeline import RunSummary, collect_learning_set, learn_from_dataset

    tau: Any = args.tau if args.tau == "clip" else float(args.tau)  # checked by tau_arg
    summary = RunSummary()
    lset = collect_learning_set(adapter, dataset, phi=args.phi, target_mode=args.target_mode,
                                candidates=args.candidates, seed_source=args.seed_source,
                                limit=args.limit, progress=args.progress, summary=summary,
                                cache_dir=cache, memmap=args.memmap, pooling=args.pooling,
                                max_tokens=max_tokens, token_seed=args.token_seed)
    budget = f", at most {max_tokens} by --max-tokens" if max_tokens is not None else ""
    print(f"vpl learn: features of {len(lset.ids)} images ({lset.num_pixels} pixels{budget}); "
          f"{len(summary.failed)} skipped")
    ps, history = learn_from_dataset(
        adapter, lset, tau=tau, lr=args.lr, iters=args.iters, step_rule=args.step_rule,
        level=args.level, chunk_size=args.chunk_size, device=args.device, progress=args.progress,
        provenance={"checkpoint": str(args.clip), "phi": args.phi, "target_mode": args.target_mode,
                    "pooling": args.pooling, "max_tokens": max_tokens, "token_seed": args.token_seed,
                    "candidates": args.candidates, "seed_source": args.seed_source,
                    "dataset": args.dataset, "split_file": str(args.split_file)})
    ps.save(out)
    base = out.with_suffix("")
    _write_config(Path(f"{base}.yaml"), args, _describe_labels(dataset))
    write_json(Path(f"{base}.history.json"), {"summary": summary.as_dict(),
                                               **{k: v for k, v in history.items()}})
    losses = history.get("loss") or [float("nan")]
    print(f"vpl learn: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses) - 1} steps "
          f"(tau_I {ps.tau:.4g}); saved {out}")
    return _report(summary, "learn", out)


def _ids(args, root: Optional[Path]) -> List[str]:
    from vpl_plugin.data.voc import read_split

    split = args.split_file
    if split is None and root is not None:
        split = root / "ImageSets" / "Segmentation" / "train.txt"
    if split is None:
        raise UsageError("--split-file is required.")
    path = Path(split)
    if not path.is_file() and root is not None:
        for cand in (root / split, root / "ImageSets" / "Segmentation" / split):
            if cand.is_file():
                path = cand
                break
    return read_split(path)


def cmd_masks(args) -> int:
    from vpl_plugin._io import write_json
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.pipeline import RunSummary
    from vpl_plugin.pseudo_masks import make_pseudo_masks

    root = Path(args.root)
    ids = _ids(args, root)
    if args.limit is not None:
        ids = ids[: args.limit]
    image_dir = Path(args.image_dir) if args.image_dir else root / "JPEGImages"
    out = Path(args.out)
    _write_config(out / "vpl_masks.yaml", args)
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
    return _report(summary, "masks", out)


def cmd_eval(args) -> int:
    from vpl_plugin._io import write_json
    from vpl_plugin.data.classes import get_class_spec
    from vpl_plugin.metrics import evaluate_cams, evaluate_masks

    spec = get_class_spec(args.dataset)
    ids = _ids(args, None)
    if args.limit is not None:
        ids = ids[: args.limit]
    names = ("background",) + tuple(spec.names)
    if args.cams:
        thr: Any = args.bg_threshold
        if thr != "auto":
            try:
                thr = float(thr)
            except ValueError:
                raise UsageError(f"--bg-threshold must be 'auto' or a number; got {thr!r}.") from None
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
    for item in (result.get("missing") or [])[:10]:
        print(f"  missing: {item}", file=sys.stderr)


def cmd_reproduce(args) -> int:
    from vpl_plugin.reproduce import run

    return run(args)


def cmd_random_clip(args) -> int:
    from vpl_plugin.backbones import build_random_clip, save_checkpoint

    sizes = {} if args.arch == "tiny" else dict(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, patch_size=16,
        transformer_width=512, transformer_heads=8, transformer_layers=12)
    model = build_random_clip(seed=args.seed, **sizes)
    out = Path(args.out)
    save_checkpoint(model, out, torchscript=args.torchscript)
    print(f"vpl random-clip: wrote a random-weight {args.arch} CLIP to {out}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from vpl_plugin.demo.report import run_demo

    run_demo(Path(args.out), clip=args.clip, quick=args.quick, device=args.device, cpal_studies=args.cpal_studies)
    return EXIT_OK


def cmd_train_clip(args) -> int:
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, TrainConfig, train_demo_clip

    if args.vision_width <= 0 or args.vision_width % 64:
        raise UsageError(f"--vision-width must be a positive multiple of 64 (CLIP's loader infers "
                         f"64-wide heads), got {args.vision_width}.")
    if args.vision_layers <= 0:
        raise UsageError(f"--vision-layers must be positive, got {args.vision_layers}.")
    side = DemoCLIPConfig.image_resolution
    if args.patch_size <= 0 or side % args.patch_size or side // args.patch_size < 8:
        raise UsageError(f"--patch-size must divide the {side}-pixel scenes into a grid of at least 8x8 tokens "
                         f"(1, 2, 4 or 8), got {args.patch_size}.")
    arch = DemoCLIPConfig(vision_width=args.vision_width, vision_layers=args.vision_layers,
                          patch_size=args.patch_size)
    for flag, value, least in (("--select-every", args.select_every, 0), ("--select-scenes", args.select_scenes, 1),
                               ("--workers", args.workers, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}.")
    try:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             select_every=args.select_every, select_scenes=args.select_scenes)
    except ValueError as e:
        raise UsageError(f"vpl train-clip: {e}") from None
    record = train_demo_clip(args.out, arch=arch, config=config, device=args.device, resume=args.resume,
                             progress=args.progress, workers=args.workers)
    last = record["curve"][-1] if record["curve"] else {}
    chosen = ""
    if record["selection"]:
        best = max(record["selection"], key=lambda s: s["text_gradcam_seed_miou"])
        chosen = (f"; kept step {record['selected_step']} (text GradCAM seed mIoU "
                  f"{best['text_gradcam_seed_miou']:.1f} on {config.select_scenes} selection scenes)")
    print(f"vpl train-clip: {config.steps} steps, final loss {last.get('loss', float('nan')):.4f}, "
          f"{record['seconds']:.0f} s on {args.device}; saved {args.out}{chosen}")
    return EXIT_OK


def cmd_train(args) -> int:
    import torch

    from vpl_plugin import distributed
    from vpl_plugin.phase2.backbones import create_backbone
    from vpl_plugin.phase2.data import PseudoMaskDataset
    from vpl_plugin.phase2.decoder import DecoderConfig, build_segmenter
    from vpl_plugin.phase2.losses import Phase2Loss
    from vpl_plugin.phase2.train import TrainConfig, train_segmenter
    from vpl_plugin.prototypes import PrototypeSet

    missing = [f for f in ("backbone", "root", "masks", "prototypes", "out") if not getattr(args, f)]
    if missing:
        raise UsageError("vpl train: missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                         + " (see `vpl train --help`).")
    if args.eval_every and not args.val_split_file:
        raise UsageError("--eval-every needs --val-split-file (images with ground truth under --root).")
    try:
        config = TrainConfig(iterations=args.iters, batch_size=args.batch_size, lr=args.lr,
                             momentum=args.momentum, weight_decay=args.weight_decay, crop=args.crop,
                             scale_range=tuple(args.scale), flip=args.flip,
                             checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                             eval_limit=args.val_limit, amp=args.amp, amp_dtype=args.amp_dtype,
                             seed=args.seed, num_workers=args.workers)
        loss = Phase2Loss(lambda_ce=args.lambda_ce, lambda_rsc=args.lambda_rsc, tau_rsc=args.tau_rsc,
                          rsc_form=args.rsc_form)
    except ValueError as err:
        raise UsageError(str(err)) from None
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    env = distributed.init_distributed(args.device)
    if not env.is_main:
        logging.getLogger("vpl_plugin").setLevel(logging.WARNING)
    device = args.device
    if str(device).startswith("cuda") and env.distributed:
        device = f"cuda:{env.local_rank}"
    try:
        samples, _ = _dataset(args)
        data = PseudoMaskDataset(samples, args.masks, skip_missing=args.skip_missing, limit=args.limit)
        val = None
        if args.val_split_file:
            val, _ = _dataset(argparse.Namespace(**{**vars(args), "split_file": args.val_split_file}))
        prototypes = PrototypeSet.load(args.prototypes)
        if prototypes.num_fg != data.num_fg:
            raise UsageError(f"--prototypes has {prototypes.num_fg} foreground classes but --dataset "
                             f"{args.dataset} has {data.num_fg}.")
        torch.manual_seed(args.seed)  # the decoder's initial weights (DDP copies rank 0's anyway)
        decoder_config = DecoderConfig(tau_seg=args.tau_seg)
        model = build_segmenter(create_backbone(args.backbone, device, trust_torchscript=args.trust_torchscript),
                                prototypes, decoder_config)
        out = Path(args.out)
        if env.is_main:
            _write_config(out / "vpl_train.yaml", args, {
                "train_config": config.to_dict(), "decoder_config": decoder_config.to_dict(),
                "world_size": env.world_size, "images": len(data), "skipped": len(data.skipped)})
        record = train_segmenter(model, data, out, config=config, loss=loss, val_dataset=val,
                                 device=device, resume=args.resume, progress=args.progress)
    finally:
        if owns_group:
            distributed.destroy()
    if env.is_main:
        final = record["final"]
        val_text = f", val mIoU {100 * record['val']['miou']:.2f}" if record.get("val") else ""
        print(f"vpl train: {record['iteration']} iterations on {len(data)} images "
              f"({env.world_size} process{'es' if env.world_size > 1 else ''}), final loss "
              f"{final['loss']:.4f} (ce {final['ce']:.4f}, rsc {final['rsc']:.4f}){val_text}, "
              f"{record['seconds']:.0f} s; saved {record['paths'].get('segmenter', out)}")
        for image_id, reason in data.skipped[:20]:
            print(f"  skipped {image_id}: {reason}", file=sys.stderr)
    return EXIT_PARTIAL if data.skipped else EXIT_OK


def cmd_segment(args) -> int:
    from vpl_plugin import distributed
    from vpl_plugin.phase2.backbones import create_backbone
    from vpl_plugin.phase2.decoder import load_segmenter
    from vpl_plugin.phase2.segment import segment_dataset

    missing = [f for f in ("checkpoint", "root", "out") if not getattr(args, f)]
    if missing:
        raise UsageError("vpl segment: missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                         + " (see `vpl segment --help`).")
    try:
        scales = tuple(float(v) for v in str(args.scales).split(",") if v.strip())
    except ValueError:
        scales = ()
    if not scales or any(not (v > 0) for v in scales):
        raise UsageError(f"--scales must be comma-separated positive numbers (e.g. 0.75,1,1.25); "
                         f"got {args.scales!r}.")
    dataset, spec = _dataset(args)
    # under torchrun each rank takes every WORLD_SIZE-th image; rank 0 writes config and summary
    owns_group = not distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    device = args.device
    if str(device).startswith("cuda") and env.distributed:
        device = f"cuda:{env.local_rank}"
    try:
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
            _write_config(out / "vpl_segment.yaml", args, {
                "scales_resolved": list(scales), "decoder_config": model.config.to_dict(),
                "tau_seg": model.tau_seg, "class_names": list(model.class_names),
                "world_size": env.world_size})
        summary = segment_dataset(model, dataset, out, scales=scales, flip=args.flip, crf=args.crf,
                                  limit=args.limit, progress=args.progress and env.is_main,
                                  use_image_labels=args.use_image_labels, palette=args.palette,
                                  rank=env.rank, world_size=env.world_size)
        code = _gather_summary(summary, env, dataset, out, "segment")
    finally:
        if env.distributed and owns_group:
            distributed.destroy()
    return code


_COMMANDS = {"demo": cmd_demo, "train-clip": cmd_train_clip, "cams": cmd_cams, "learn": cmd_learn, "masks": cmd_masks, "eval": cmd_eval,
             "random-clip": cmd_random_clip, "reproduce": cmd_reproduce, "train": cmd_train,
             "segment": cmd_segment}


#: commands that write a shared output, and whether it is a folder (True) or a file (False): each
#: run holds that output's lock (see vpl_plugin._lock) so that a second writer is refused
_OUTPUTS = {"cams": True, "learn": False, "masks": True, "train": True, "segment": True,
            "reproduce": True, "demo": True, "train-clip": False}


def _check_output(args) -> None:
    """Refuse an --out of the wrong kind before any work is done."""
    folder, out = _OUTPUTS.get(args.command), getattr(args, "out", None)
    if folder is None or not out:
        return
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, but vpl {args.command} writes a folder of files; "
                         f"give a folder (it is created when missing).")
    if not folder and out.is_dir():
        raise UsageError(f"--out {out} is a folder, but vpl {args.command} writes one file; give a file "
                         f"name, e.g. {out / 'vpl.pt'}.")
    if args.command == "learn":
        base = out.with_suffix("")
        beside = [Path(f"{base}.yaml"), Path(f"{base}.history.json")]
        if getattr(args, "cache", False) and not getattr(args, "cache_dir", None):
            beside.append(out.with_name(out.stem + ".features"))
        if out in beside:
            raise UsageError(f"--out {out}: vpl learn also writes {', '.join(str(b) for b in beside)} beside "
                             f"the prototypes, and one of them is --out itself; name the prototype file "
                             f"{base}.pt.")


@contextmanager
def _output_lock(args, argv: Optional[Sequence[str]]) -> Iterator[None]:
    """Hold the lock of the command's output while it runs (see :data:`_OUTPUTS`)."""
    from vpl_plugin._lock import output_lock

    folder, out = _OUTPUTS.get(args.command), getattr(args, "out", None)
    if folder is None or not out or getattr(args, "dry_run", False):
        yield
        return
    words = list(sys.argv[1:] if argv is None else argv)
    command = "vpl " + " ".join(str(w) for w in words)
    with output_lock(out, command[:300], folder=folder):
        yield


def _error_line(err: BaseException) -> str:
    """One line naming what failed (the file, where an OS error knows it)."""
    text = " ".join(str(err).split()) or type(err).__name__
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError) and filename and str(filename) not in text:
        text = f"{filename}: {text}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``vpl`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Every failure ends as one line on stderr that names the file or option and the problem (the
    traceback too with ``-v``); the exit status says what kind (see the module docstring).
    """
    try:
        args = _parse(argv)
    except ParseError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as err:  # --help, --version
        return int(err.code or 0)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_output(args)
        with _output_lock(args, argv):
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the last resort: one line, never a bare traceback
        from vpl_plugin._lock import OutputLocked

        if verbose:
            traceback.print_exc()
        refused = isinstance(err, (UsageError, OutputLocked, ValueError, FileNotFoundError,
                                   PermissionError, IsADirectoryError, NotADirectoryError, ImportError))
        if refused:
            print(f"error: {_error_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        hint = "" if verbose else " (run with -v for the traceback)"
        print(f"error: {type(err).__name__}: {_error_line(err)}{hint}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
