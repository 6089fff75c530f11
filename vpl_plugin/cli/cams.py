"""``vpl cams``: CLIP-ES / CLIP-CPAL CAMs with text or vision prototypes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vpl_plugin._cli_common import UsageError, numerics_resume_hint, positive_int
from vpl_plugin.adapters.clip_es import CLIPESConfig
from vpl_plugin.cli.arguments import FORMATTER, add_common, add_cpal, add_data
from vpl_plugin.cli.options import add_config_options
from vpl_plugin.cli.shared import (create_adapter_from_args, create_dataset, describe_labels, gather_summary,
                                   write_config)

NAME = "cams"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True

EPILOG = """examples:
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl cams`` to the sub-command parsers."""
    p = subparsers.add_parser(
        NAME, help="CLIP-ES / CLIP-CPAL CAMs with text or vision prototypes",
        description="Generate CLIP-ES CAMs (GradCAM + attention-affinity refinement) "
                    "in upstream's .npy format; --adapter clip-cpal adds the CLIP-CPAL "
                    "reconstruction's context-prototype fusion before refinement.",
        epilog=EPILOG, formatter_class=FORMATTER)
    add_data(p)
    p.add_argument("--out", required=True, metavar="CAM_DIR", help="output folder of <id>.npy files")
    p.add_argument("--prototypes", metavar="PROTOTYPES.pt",
                   help="vision prototypes from `vpl learn` (default: CLIP-ES text prototypes)")
    add_config_options(p, CLIPESConfig, ["save_gradcam", "refine"])
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                   help="images of equal size per forward (default 1; use 8 or so on a GPU: same "
                        "CAMs within float rounding, fewer launches; slower on a CPU thread)")
    add_cpal(p)
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``vpl cams``; returns the exit status."""
    from vpl_plugin import distributed
    from vpl_plugin.pipeline import generate_cams
    from vpl_plugin.prototypes import PrototypeSet

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    dataset, spec = create_dataset(args)
    prototypes = PrototypeSet.load(args.prototypes) if args.prototypes else None
    # under torchrun each rank takes every WORLD_SIZE-th image; rank 0 writes config and summary
    owns_group = not distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    try:
        adapter = create_adapter_from_args(args, spec, prototypes)
        out = Path(args.out)
        _check_existing_cams(out, args, adapter.describe())
        _cpal_bank(args, adapter, dataset, out)
        if env.is_main:
            write_config(out / "vpl_cams.yaml", args, {"adapter_config": adapter.describe(),
                                                       **describe_labels(dataset)})
        summary = generate_cams(adapter, dataset, out, limit=args.limit,
                                progress=args.progress and env.is_main, rank=env.rank,
                                world_size=env.world_size, batch_size=args.batch_size)
        return gather_summary(summary, env, dataset, out, "cams")
    finally:
        if env.distributed and owns_group:
            distributed.destroy()


def _cpal_bank(args: argparse.Namespace, adapter: Any, dataset: Any, out: Path) -> None:
    """CLIP-CPAL pass 1: load --cpal-bank when it exists, else build it over the same list (resumable
    through FILE.partial) and save it. Under torch.distributed rank 0 builds it, the others load it."""
    if args.adapter != "clip-cpal":
        return
    from vpl_plugin import distributed
    from vpl_plugin.adapters.cpal_bank import build_context_bank
    from vpl_plugin.cpal import ContextBank
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


def _check_existing_cams(out: Path, args: argparse.Namespace, adapter_config: dict) -> None:
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
                         f"images, so they would stay as they are. {numerics_resume_hint(then, now)}Use another "
                         f"--out, or delete {out} to start over.")
