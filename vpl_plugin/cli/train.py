"""``vpl train``: VPL phase 2, the segmentation decoder on pseudo masks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from vpl_plugin._cli_common import EXIT_OK, EXIT_PARTIAL, UsageError, add_numerics_flags, finite_float, \
    positive_float
from vpl_plugin.cli.arguments import DATASETS, FORMATTER, TRUST_TORCHSCRIPT_RECORDED_HELP, add_common, \
    add_max_pixels
from vpl_plugin.cli.options import add_config_options, config_values
from vpl_plugin.cli.shared import create_dataset, write_config
from vpl_plugin.phase2.train import TrainConfig

NAME = "train"
#: ``--out`` is a folder (held locked while the command runs)
OUTPUT_IS_FOLDER = True

EPILOG = """examples:
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
the files."""

DESCRIPTION = ("Train the phase-2 decoder (frozen CLIP encoder, frozen prototypes, CE + RSC loss) "
               "on images and pseudo-mask PNGs (255 = ignore). SGD momentum 0.9, weight decay "
               "1e-4, poly lr; random rescale, crop and flip. Writes OUT/last.pt (resumable "
               "state, every --checkpoint-every iterations), OUT/segmenter.pt (for `vpl segment`), "
               "OUT/curves.json and OUT/curves.png.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl train`` to the sub-command parsers (optimisation flags: :class:`TrainConfig`'s)."""
    p = subparsers.add_parser(NAME, help="VPL phase 2: train the segmentation decoder on pseudo masks",
                              description=DESCRIPTION, formatter_class=FORMATTER, epilog=EPILOG)
    _add_data_group(p)
    g = p.add_argument_group("optimisation (defaults: the paper; docs/vpl.md#training-recipe)")
    add_config_options(g, TrainConfig, ["iterations", "batch_size", "lr", "momentum", "weight_decay", "crop",
                                        "scale_range", "flip"])
    g.add_argument("--lambda-ce", type=finite_float, default=1.0, help="CE weight (1)")
    g.add_argument("--lambda-rsc", type=finite_float, default=1.0, help="RSC weight (1; 0 = CE only)")
    g.add_argument("--tau-rsc", type=positive_float, default=0.07,
                   help="RSC temperature (0.07; the other reading of Eq. 13 is 0.01, which collapsed "
                        "training to all background on the demo world: docs/vpl.md#loss)")
    g.add_argument("--rsc-form", default="pairs", choices=["pairs", "class", "literal"],
                   help="RSC definition (default pairs; docs/vpl.md#loss)")
    add_config_options(g, TrainConfig, ["checkpoint_every", "eval_every", "amp", "amp_dtype", "seed",
                                        "num_workers"])
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over instead of resuming from OUT/last.pt")
    add_common(p)
    return p


def _add_data_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--backbone", "--clip", dest="backbone", required=True, metavar="SPEC",
                   help="frozen encoder: OpenAI CLIP name or checkpoint (ViT-B/16, PATH.pt), "
                        "'clip:NAME_OR_PATH' or 'timm:MODEL'")
    g.add_argument("--trust-torchscript", action="store_true", help=TRUST_TORCHSCRIPT_RECORDED_HELP)
    add_max_pixels(g)
    g.add_argument("--prototypes", required=True, metavar="PROTOTYPES.pt",
                   help="prototype set from `vpl learn` (frozen)")
    g.add_argument("--dataset", default="voc", choices=DATASETS, help="label space and list format (default: voc)")
    g.add_argument("--root", required=True, metavar="DATASET_DIR", help="dataset folder (VOC: the VOC2012 folder)")
    g.add_argument("--split-file", metavar="LIST.txt", help="training image list (e.g. train_aug.txt)")
    g.add_argument("--label-source", default="auto", choices=["auto", "xml", "mask"],
                   help="VOC image-level labels: XML, GT mask, or XML where present (default auto)")
    add_numerics_flags(g, alias=False, subnormals=False)
    g.add_argument("--masks", required=True, metavar="MASK_DIR",
                   help="pseudo masks <id>.png from `vpl masks` (255 = ignore)")
    g.add_argument("--skip-missing", action="store_true",
                   help="train on the images that have a mask instead of stopping (exit status 3)")
    g.add_argument("--val-split-file", metavar="LIST.txt",
                   help="images with ground truth under ROOT for validation mIoU curves")
    add_config_options(g, TrainConfig, ["eval_limit"])
    g.add_argument("--tau-seg", type=positive_float, metavar="T",
                   help="temperature of the mask logits (default: the prototype set's tau_I)")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder")


def _settings(args: argparse.Namespace) -> Any:
    """``(TrainConfig, Phase2Loss)`` of the flags; a refused value is a usage error."""
    from vpl_plugin.phase2.losses import Phase2Loss

    if args.eval_every and not args.val_split_file:
        raise UsageError("--eval-every needs --val-split-file (images with ground truth under --root).")
    try:
        config = TrainConfig(**config_values(TrainConfig, args))
        loss = Phase2Loss(lambda_ce=args.lambda_ce, lambda_rsc=args.lambda_rsc, tau_rsc=args.tau_rsc,
                          rsc_form=args.rsc_form)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return config, loss


def run(args: argparse.Namespace) -> int:
    """Run ``vpl train``; returns the exit status."""
    import torch

    from vpl_plugin import distributed

    config, loss = _settings(args)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    env = distributed.init_distributed(args.device)
    if not env.is_main:
        logging.getLogger("vpl_plugin").setLevel(logging.WARNING)
    device = args.device
    if str(device).startswith("cuda") and env.distributed:
        device = f"cuda:{env.local_rank}"
    try:
        data, record = _train(args, config, loss, env, device)
    finally:
        if owns_group:
            distributed.destroy()
    if env.is_main:
        final = record["final"]
        val_text = f", val mIoU {100 * record['val']['miou']:.2f}" if record.get("val") else ""
        print(f"vpl train: {record['iteration']} iterations on {len(data)} images "
              f"({env.world_size} process{'es' if env.world_size > 1 else ''}), final loss "
              f"{final['loss']:.4f} (ce {final['ce']:.4f}, rsc {final['rsc']:.4f}){val_text}, "
              f"{record['seconds']:.0f} s; saved {record['paths'].get('segmenter', Path(args.out))}")
        for image_id, reason in data.skipped[:20]:
            print(f"  skipped {image_id}: {reason}", file=sys.stderr)
    return EXIT_PARTIAL if data.skipped else EXIT_OK


def _train(args: argparse.Namespace, config: TrainConfig, loss: Any, env: Any, device: str) -> Any:
    """The data, the model and the training run; ``(training data, train_segmenter's record)``."""
    import torch

    from vpl_plugin.phase2.backbones import create_backbone
    from vpl_plugin.phase2.data import PseudoMaskDataset
    from vpl_plugin.phase2.decoder import DecoderConfig, build_segmenter
    from vpl_plugin.phase2.train import train_segmenter
    from vpl_plugin.prototypes import PrototypeSet

    samples, _ = create_dataset(args)
    data = PseudoMaskDataset(samples, args.masks, skip_missing=args.skip_missing, limit=args.limit)
    val = None
    if args.val_split_file:
        val, _ = create_dataset(argparse.Namespace(**{**vars(args), "split_file": args.val_split_file}))
    prototypes = PrototypeSet.load(args.prototypes)
    if prototypes.num_fg != data.num_fg:
        raise UsageError(f"--prototypes has {prototypes.num_fg} foreground classes but --dataset "
                         f"{args.dataset} has {data.num_fg}.")
    torch.manual_seed(args.seed)  # the decoder's initial weights (DDP copies rank 0's anyway)
    decoder_config = DecoderConfig(tau_seg=args.tau_seg)
    numerics = {"exact_fp32": True} if args.exact_fp32 else {}
    model = build_segmenter(create_backbone(args.backbone, device, trust_torchscript=args.trust_torchscript,
                                            **numerics), prototypes, decoder_config)
    out = Path(args.out)
    if env.is_main:
        write_config(out / "vpl_train.yaml", args, {
            "train_config": config.to_dict(), "decoder_config": decoder_config.to_dict(),
            "world_size": env.world_size, "images": len(data), "skipped": len(data.skipped)})
    record = train_segmenter(model, data, out, config=config, loss=loss, val_dataset=val,
                             device=device, resume=args.resume, progress=args.progress)
    return data, record
