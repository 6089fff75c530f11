"""``vpl demo``: CLIP-ES against CLIP-ES + VPL on the synthetic world (the embedded default)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vpl_plugin._cli_common import EXIT_OK
from vpl_plugin.cli.arguments import FORMATTER

NAME = "demo"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl demo`` to the sub-command parsers."""
    p = subparsers.add_parser(
        NAME, help="CLIP-ES vs CLIP-ES + VPL on the synthetic world (the embedded default)",
        description="Run the embedded default: held-out synthetic scenes, the shipped demo "
                    "CLIP, CLIP-ES with text and vision prototypes, CRF pseudo masks, "
                    "controls and sweeps. Writes report.json, report.md and grid.png.",
        formatter_class=FORMATTER,
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
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``vpl demo``; returns the exit status."""
    from vpl_plugin.demo.report import run_demo

    run_demo(Path(args.out), clip=args.clip, quick=args.quick, device=args.device, cpal_studies=args.cpal_studies)
    return EXIT_OK
