"""``vpl learn``: VPL phase 1, vision prototypes from text-prototype GradCAMs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, Optional

from vpl_plugin._cli_common import UsageError, finite_float, max_tokens_arg, nonnegative_int, positive_float, \
    positive_int, tau_arg
from vpl_plugin.cli.arguments import FORMATTER, add_common, add_data
from vpl_plugin.cli.shared import create_adapter_from_args, create_dataset, describe_labels, report, \
    summary_status, write_config

NAME = "learn"
#: ``--out`` is one file (held locked while the command runs)
OUTPUT_IS_FOLDER = False

EPILOG = """examples:
  vpl learn --clip ViT-B/16 --root VOC2012 --split-file train_aug.txt --out vpl.pt
  vpl learn ... --tau 0.03 --lr 10 --iters 3000 --phi 0.4          (the paper's values)
  vpl learn ... --tau clip --iters 0                                  (identity: text CAMs)
  vpl learn ... --pooling region --tau 0.1    (recommended; use with `vpl cams --map-mode dense`)
The learning pass computes text GradCAMs, seeds them at --phi, builds target distributions and
runs projected gradient descent on the unit sphere from the text prototypes.
Several processes (GPUs, or CPU processes with gloo) share the learning pass under torchrun: each
computes the features of every N-th image into the one feature cache, then takes every N-th
--chunk-size chunk of the whole set; every pass gathers the chunks' sums and adds them in order, so
the prototypes are bit for bit those of one process with the same thread count (with --no-cache
each keeps its images' rows: equal within float rounding). Rank 0 writes the files:
  torchrun --nproc_per_node 4 -m vpl_plugin learn --device cuda --clip ViT-B/16 --root VOC2012 \\
      --split-file train_aug.txt --out vpl.pt --pooling region --tau 0.1"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vpl learn`` to the sub-command parsers."""
    p = subparsers.add_parser(NAME, help="VPL phase 1: learn vision prototypes",
                              description="Learn vision prototypes from text-prototype GradCAMs (VPL phase 1).",
                              epilog=EPILOG, formatter_class=FORMATTER)
    add_data(p)
    p.add_argument("--out", required=True, metavar="PROTOTYPES.pt", help="where to save the prototype set")
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
    add_common(p)
    return p


def check_output(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that one of the files written beside the prototypes would overwrite."""
    out = Path(args.out)
    base = out.with_suffix("")
    beside = [Path(f"{base}.yaml"), Path(f"{base}.history.json")]
    if getattr(args, "cache", False) and not getattr(args, "cache_dir", None):
        beside.append(out.with_name(out.stem + ".features"))
    if out in beside:
        raise UsageError(f"--out {out}: vpl learn also writes {', '.join(str(b) for b in beside)} beside "
                         f"the prototypes, and one of them is --out itself; name the prototype file "
                         f"{base}.pt.")


def run(args: argparse.Namespace) -> int:
    """Run ``vpl learn``; returns the exit status."""
    from contextlib import nullcontext

    from vpl_plugin import distributed
    from vpl_plugin._lock import output_lock

    max_tokens = max_tokens_arg(args.max_tokens)
    dataset, spec = create_dataset(args)
    # under torchrun each rank computes the features of every WORLD_SIZE-th image, all ranks learn
    # together (loss and gradient summed over ranks each pass) and rank 0 writes the files
    owns_group = not distributed.is_initialized()
    env = distributed.init_distributed(args.device)
    try:
        adapter = create_adapter_from_args(args, spec)
        out = Path(args.out)
        cache = None
        if args.cache:
            cache = Path(args.cache_dir) if args.cache_dir else out.with_name(out.stem + ".features")
        with (output_lock(cache, f"vpl learn --out {out}") if cache is not None else nullcontext()):
            # the cache (and its memory-mapped features) is this run's until the prototypes are saved;
            # the lock holder has removed a killed run's temporary files before any rank writes there
            distributed.barrier()
            return _learn(args, adapter, dataset, out, cache, max_tokens, env)
    finally:
        if env.distributed and owns_group:
            distributed.destroy()


def _learn(args: argparse.Namespace, adapter: Any, dataset: Any, out: Path, cache: Optional[Path],
           max_tokens: Optional[int], env: Any) -> int:
    from vpl_plugin import distributed
    from vpl_plugin.pipeline import RunSummary, collect_learning_set, learn_from_dataset, merge_summaries
    from vpl_plugin.prototypes import ChunkShare

    tau: Any = args.tau if args.tau == "clip" else float(args.tau)  # checked by tau_arg
    summary = RunSummary()
    cpu_start = time.process_time()
    lset = collect_learning_set(adapter, dataset, phi=args.phi, target_mode=args.target_mode,
                                candidates=args.candidates, seed_source=args.seed_source,
                                limit=args.limit, progress=args.progress and env.is_main, summary=summary,
                                cache_dir=cache, memmap=args.memmap, pooling=args.pooling,
                                max_tokens=max_tokens, token_seed=args.token_seed, rank=env.rank,
                                world_size=env.world_size,
                                chunk_size=args.chunk_size if env.distributed and cache is not None else None)
    parts = distributed.all_gather_object((summary, len(lset.ids), lset.num_pixels))
    images, pixels = sum(p[1] for p in parts), sum(p[2] for p in parts)
    share = reduce_sum = None
    if lset.chunk_size is not None:  # each rank holds chunks of the whole set: one process's sums
        share = ChunkShare(env.rank, env.world_size, distributed.all_gather_tensor)
        images, pixels = lset.total_images, lset.total_pixels
    elif env.distributed:  # --no-cache: each rank holds its images' rows; sums within float rounding
        reduce_sum = distributed.all_reduce_sum
    if env.distributed:
        summary = merge_summaries([p[0] for p in parts], dataset.ids)
    budget = f", at most {max_tokens} by --max-tokens" if max_tokens is not None else ""
    shared = f" over {env.world_size} processes" if env.distributed else ""
    if env.is_main:
        print(f"vpl learn: features of {images} images ({pixels} pixels{budget}){shared}; "
              f"{len(summary.failed)} skipped")
    started, cpu_features = time.time(), time.process_time() - cpu_start
    ps, history = learn_from_dataset(
        adapter, lset, tau=tau, lr=args.lr, iters=args.iters, step_rule=args.step_rule,
        level=args.level, chunk_size=args.chunk_size, device=args.device,
        progress=args.progress and env.is_main,
        reduce_sum=reduce_sum, share=share,
        provenance={"checkpoint": str(args.clip), "phi": args.phi, "target_mode": args.target_mode,
                    "pooling": args.pooling, "max_tokens": max_tokens, "token_seed": args.token_seed,
                    "candidates": args.candidates, "seed_source": args.seed_source,
                    "dataset": args.dataset, "split_file": str(args.split_file)})
    history["learning_seconds"] = round(time.time() - started, 3)
    history["cpu_seconds"] = {"features": round(cpu_features, 3),  # this process's CPU time
                              "learning": round(time.process_time() - cpu_start - cpu_features, 3)}
    if not env.is_main:
        distributed.barrier()  # rank 0 writes the files
        return summary_status(summary)
    return _save(args, ps, history, summary, dataset, out, env)


def _save(args: argparse.Namespace, ps: Any, history: Dict[str, Any], summary: Any, dataset: Any, out: Path,
          env: Any) -> int:
    """Rank 0: write the prototypes, configuration and history; print the report."""
    from vpl_plugin import distributed
    from vpl_plugin._io import write_json

    ps.save(out)
    base = out.with_suffix("")
    write_config(Path(f"{base}.yaml"), args, describe_labels(dataset))
    write_json(Path(f"{base}.history.json"), {"summary": summary.as_dict(), "world_size": env.world_size,
                                               **{k: v for k, v in history.items()}})
    losses = history.get("loss") or [float("nan")]
    print(f"vpl learn: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {len(losses) - 1} steps "
          f"(tau_I {ps.tau:.4g}); saved {out}")
    code = report(summary, "learn", out)
    distributed.barrier()
    return code
