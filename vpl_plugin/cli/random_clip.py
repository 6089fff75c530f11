"""``vpl random-clip``: a random-weight OpenAI CLIP checkpoint, to try the pipeline without downloads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vpl_plugin._cli_common import EXIT_OK

NAME = "random-clip"
#: ``--out`` is one file, written atomically; no lock
OUTPUT_IS_FOLDER = None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl random-clip`` to the sub-command parsers."""
    p = subparsers.add_parser(
        NAME, help="write a random-weight OpenAI CLIP checkpoint (for trying the pipeline)",
        description="Write a random-weight CLIP ViT checkpoint of the real architecture. "
                    "Its CAMs are meaningless; it exercises the whole pipeline without "
                    "downloads.")
    p.add_argument("--out", required=True, metavar="PATH.pt")
    p.add_argument("--arch", default="tiny", choices=["tiny", "ViT-B/16"],
                   help="tiny (fast, 64-d) or the real ViT-B/16 size (~600 MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchscript", action="store_true",
                   help="save as a TorchScript archive like OpenAI's released files")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``vpl random-clip``; returns the exit status."""
    from vpl_plugin.backbones import build_random_clip, save_checkpoint

    sizes = {} if args.arch == "tiny" else dict(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, patch_size=16,
        transformer_width=512, transformer_heads=8, transformer_layers=12)
    model = build_random_clip(seed=args.seed, **sizes)
    out = Path(args.out)
    save_checkpoint(model, out, torchscript=args.torchscript)
    print(f"vpl random-clip: wrote a random-weight {args.arch} CLIP to {out}")
    return EXIT_OK
