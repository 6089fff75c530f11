"""Flags that several ``vpl`` commands share (one definition each)."""

from __future__ import annotations

import argparse
from typing import Any

from vpl_plugin._cli_common import add_numerics_flags, max_pixels_arg, positive_int
from vpl_plugin.adapters import CLIPCPALConfig, list_adapters
from vpl_plugin.adapters.clip_cpal import CPAL_FIELDS
from vpl_plugin.adapters.clip_es import CLIPESConfig
from vpl_plugin.cli.options import add_config_options
from vpl_plugin.data.classes import DATASET_NAMES
from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS

__all__ = ["DATASETS", "FORMATTER", "TRUST_TORCHSCRIPT_HELP", "TRUST_TORCHSCRIPT_RECORDED_HELP", "add_common",
           "add_cpal", "add_data", "add_max_pixels"]

#: the ``--dataset`` choices
DATASETS = list(DATASET_NAMES)
FORMATTER = argparse.RawDescriptionHelpFormatter

_TRUST_TAIL = ("with torch.jit.load, which RUNS CODE STORED IN THE FILE (it can write files or hang): only "
               "for an archive from a source you trust that the default reader refuses. By default "
               "archives are read as data and nothing in them runs")
#: ``--trust-torchscript`` of the commands that read ``--clip``
TRUST_TORCHSCRIPT_HELP = "read a TorchScript --clip archive " + _TRUST_TAIL
#: ``--trust-torchscript`` of the phase-2 commands (the CLIP may be the one a checkpoint records)
TRUST_TORCHSCRIPT_RECORDED_HELP = ("read a TorchScript CLIP archive (--clip, or the one recorded in the "
                                   "checkpoint) " + _TRUST_TAIL)


def add_max_pixels(container: Any) -> None:
    """``--max-pixels`` with its full help (cams, learn, masks, train, segment)."""
    container.add_argument(
        "--max-pixels", type=max_pixels_arg, default=DEFAULT_MAX_PIXELS, metavar="N",
        help="refuse images with more than N pixels (width x height), checked from the header before "
             "decoding, with the file named (default 2097152, e.g. 2048x1024; 0 = no limit). "
             "CLIP-ES memory grows with the square of the pixel count: with a ViT-B/16 on a "
             "CPU about 0.65 GB at 640x640, 2.9 GB at 1000x1000, 12 GB at the default limit")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--limit``, ``--no-progress``, ``-v``."""
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of option values (keys = option names with '_' or '-'); each value "
                        "is checked like the flag; flags given on the command line override it")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images of the list")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_data(p: argparse.ArgumentParser) -> None:
    """The "data and model" group of ``vpl cams`` and ``vpl learn``."""
    g = p.add_argument_group("data and model")
    g.add_argument("--adapter", default="clip-es", choices=list_adapters(),
                   help="pipeline adapter (default: clip-es)")
    g.add_argument("--clip", required=True, metavar="NAME_OR_PATH",
                   help="OpenAI CLIP model name (e.g. ViT-B/16; downloads on first use) or checkpoint "
                        "file (TorchScript archive or state dict)")
    g.add_argument("--dataset", default="voc", choices=DATASETS,
                   help="label space and list format (default: voc; synthetic = the demo world's "
                        "VOC-layout export)")
    g.add_argument("--root", required=True, metavar="DATASET_DIR",
                   help="VOC: the VOC2012 folder (JPEGImages/, Annotations/, SegmentationClass/); "
                        "COCO: the folder holding train2014/")
    g.add_argument("--split-file", metavar="LIST.txt",
                   help="image list (VOC ids, or CLIP-ES COCO lines '<id> labels...'); default "
                        "ImageSets/Segmentation/train.txt under --root")
    g.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels: XML annotations, GT masks, or XML where present "
                        "else masks (default: auto)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    add_max_pixels(g)
    g.add_argument("--trust-torchscript", action="store_true", help=TRUST_TORCHSCRIPT_HELP)
    add_numerics_flags(g)
    g.add_argument("--template", dest="templates", action="append", metavar="TEMPLATE",
                   help="prompt template with {} for the class name; repeat for an ensemble "
                        "(default: CLIP-ES's 'a clean origami {}.')")
    add_config_options(g, CLIPESConfig, ["map_mode", "box_threshold", "box_clip_fix"])

def add_cpal(p: argparse.ArgumentParser) -> None:
    """The CLIP-CPAL group of ``vpl cams``: ``--cpal-bank`` and a flag per CPAL field of
    :class:`~vpl_plugin.adapters.CLIPCPALConfig` (generated from its metadata)."""
    g = p.add_argument_group("CLIP-CPAL (--adapter clip-cpal; a reconstruction, see docs/clip_cpal.md; "
                             "defaults = its documented interpretations)")
    g.add_argument("--cpal-bank", metavar="FILE",
                   help="context bank of pass 1: loaded when it exists (its settings must match), "
                        "else built over the same list and saved there (default: OUT/cpal_bank.pt)")
    add_config_options(g, CLIPCPALConfig, CPAL_FIELDS, given_only=True)
