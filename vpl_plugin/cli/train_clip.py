"""``vpl train-clip``: train the demo CLIP on the synthetic world."""

from __future__ import annotations

import argparse
from typing import Any

from vpl_plugin._cli_common import EXIT_OK, UsageError
from vpl_plugin.cli.arguments import FORMATTER
from vpl_plugin.cli.options import add_config_options, config_values

NAME = "train-clip"
#: ``--out`` is one file (held locked while the command runs)
OUTPUT_IS_FOLDER = False


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl train-clip`` to the sub-command parsers."""
    p = subparsers.add_parser(
        NAME, help="train the demo CLIP on the synthetic world",
        description="Train the demo CLIP (OpenAI's architecture, 64x64 images, patch 8) "
                    "from scratch on the synthetic world; resumable. The shipped "
                    "checkpoint is reproduced by the defaults.", formatter_class=FORMATTER,
        epilog="examples:\n  vpl train-clip --out demo_clip.pt\n"
               "  vpl train-clip --out demo_clip.pt --device cuda --steps 6000 --batch-size 512 --workers 14")
    p.add_argument("--out", required=True, metavar="PATH.pt",
                   help="checkpoint to write (fp16 state dict, loads with clip.model.build_model); the "
                        "resumable training state goes to PATH.pt.train.pt, the curve to PATH.pt.curve.json")
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig

    add_config_options(p, DemoTrainConfig, ["steps", "batch_size", "lr", "seed"])
    add_config_options(p, DemoCLIPConfig, ["vision_width", "vision_layers", "patch_size"])
    add_config_options(p, DemoTrainConfig, ["select_every", "select_scenes"])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="data-loader processes that draw the scenes ahead of the optimiser; they change "
                        "the speed, never the weights (default 0: in this process; on a GPU use about "
                        "the number of CPU cores)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over instead of continuing from PATH.pt.train.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace) -> Any:
    """``(DemoCLIPConfig, DemoTrainConfig)`` of the flags; a refused value is a usage error."""
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig

    if args.vision_width <= 0 or args.vision_width % 64:
        raise UsageError(f"--vision-width must be a positive multiple of 64 (CLIP's loader infers "
                         f"64-wide heads), got {args.vision_width}.")
    if args.vision_layers <= 0:
        raise UsageError(f"--vision-layers must be positive, got {args.vision_layers}.")
    side = DemoCLIPConfig.image_resolution
    if args.patch_size <= 0 or side % args.patch_size or side // args.patch_size < 8:
        raise UsageError(f"--patch-size must divide the {side}-pixel scenes into a grid of at least 8x8 tokens "
                         f"(1, 2, 4 or 8), got {args.patch_size}.")
    arch = DemoCLIPConfig(**config_values(DemoCLIPConfig, args))
    for flag, value, least in (("--select-every", args.select_every, 0), ("--select-scenes", args.select_scenes, 1),
                               ("--workers", args.workers, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}.")
    try:
        config = DemoTrainConfig(**config_values(DemoTrainConfig, args))
    except ValueError as e:
        raise UsageError(f"vpl train-clip: {e}") from None
    return arch, config


def run(args: argparse.Namespace) -> int:
    """Run ``vpl train-clip``; returns the exit status."""
    from vpl_plugin.demo.train_clip import train_demo_clip

    arch, config = _settings(args)
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
