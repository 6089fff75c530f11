"""What the ``vpl`` commands share when they run: the dataset and adapter of the data flags, the
recorded configuration, the summary report and its exit status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from vpl_plugin._cli_common import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, FP16_COMPAT_CONFLICT, UsageError
from vpl_plugin._version import __version__
from vpl_plugin.adapters import CLIPCPALConfig
from vpl_plugin.adapters.clip_cpal import CPAL_FIELDS
from vpl_plugin.adapters.clip_es import CLIPESConfig
from vpl_plugin.cli.options import config_values, option_dest, options_of

__all__ = ["clip_es_overrides", "cpal_overrides", "create_dataset", "create_adapter_from_args", "describe_labels",
           "gather_summary", "read_ids", "report", "summary_status", "write_config"]


def write_config(path: Path, args: argparse.Namespace, extra: Optional[dict] = None) -> None:
    """Record the command's resolved options (and ``extra``) as YAML (JSON without PyYAML)."""
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


def create_dataset(args: argparse.Namespace) -> Tuple[Any, Any]:
    """``(dataset, label space)`` of ``--dataset``, ``--root``, ``--split-file`` (and for VOC
    ``--label-source``), images refused above ``--max-pixels``."""
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


def describe_labels(dataset: Any) -> dict:
    """Print where the image-level labels came from; the record for the configuration file."""
    counts = getattr(dataset, "label_source_counts", None)
    if not counts:
        return {}
    print("image-level labels: " + ", ".join(f"{v} from {k}" for k, v in counts.items() if v))
    return {"label_sources": dict(counts)}


def create_adapter_from_args(args: argparse.Namespace, spec: Any, prototypes: Any = None) -> Any:
    """The ``--adapter`` of the data flags on the ``--clip`` encoder."""
    from vpl_plugin.adapters import create_adapter
    from vpl_plugin.backbones import load_clip

    if args.fp16_compat and args.exact_fp32:
        raise UsageError(FP16_COMPAT_CONFLICT)
    encoder = load_clip(args.clip, args.device, exact_fp32=args.exact_fp32,
                        trust_torchscript=args.trust_torchscript,
                        flush_subnormals=not getattr(args, "keep_subnormals", False))
    overrides = clip_es_overrides(args)
    overrides.update(cpal_overrides(args))
    return create_adapter(args.adapter, encoder, spec, prototypes, **overrides)


def clip_es_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """:class:`~vpl_plugin.adapters.clip_es.CLIPESConfig` fields from the flags this command has
    (generated from the fields' metadata), plus ``--template``; ``--box-threshold`` only when given
    (else the dataset's)."""
    present = [n for n, o in options_of(CLIPESConfig).items() if hasattr(args, option_dest(o))]
    overrides: Dict[str, Any] = config_values(CLIPESConfig, args, present)
    if overrides.get("box_threshold") is None:
        overrides.pop("box_threshold", None)
    if args.templates:
        bad = [t for t in args.templates if "{}" not in t]
        if bad:
            raise UsageError(f"--template needs a '{{}}' where the class name goes; got {bad}.")
        overrides["templates"] = tuple(args.templates)
    return overrides


def cpal_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """:class:`~vpl_plugin.adapters.CLIPCPALConfig` fields given as ``--cpal-*`` flags; refused
    with another adapter (as is ``--cpal-bank``)."""
    given = config_values(CLIPCPALConfig, args, CPAL_FIELDS, given_only=True)
    flags = [options_of(CLIPCPALConfig)[name].flag for name in given]
    if getattr(args, "cpal_bank", None) is not None:
        flags.append("--cpal-bank")
    if flags and args.adapter != "clip-cpal":
        raise UsageError(f"{', '.join(flags)} only appl{'ies' if len(flags) == 1 else 'y'} to --adapter "
                         f"clip-cpal (got --adapter {args.adapter}).")
    return given


def report(summary: Any, what: str, out: Path) -> int:
    """Print the run's summary line and its skipped images; the exit status."""
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


def summary_status(summary: Any) -> int:
    """The exit status :func:`report` gives ``summary``, without printing (ranks other than 0)."""
    if summary.total and len(summary.failed) == summary.total:
        return EXIT_USAGE
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def gather_summary(summary: Any, env: Any, dataset: Any, out: Path, command: str) -> int:
    """After a run that torchrun may have sharded: merge the ranks' summaries; rank 0 writes
    ``vpl_<command>_summary.json`` and prints the report. Returns the exit status."""
    from vpl_plugin import distributed
    from vpl_plugin._io import write_json
    from vpl_plugin.pipeline import merge_summaries

    distributed.barrier()
    parts = distributed.all_gather_object(summary)
    if env.distributed:
        summary = merge_summaries(parts, dataset.ids)
    code = summary_status(summary)
    if env.is_main:
        record = summary.as_dict()
        if env.distributed:
            record["world_size"] = env.world_size
        write_json(out / f"vpl_{command}_summary.json", record)
        code = report(summary, command, out)
    distributed.barrier()
    return code


def read_ids(args: argparse.Namespace, root: Optional[Path]) -> List[str]:
    """The image ids of ``--split-file`` (looked up under ``root`` too; default: VOC's train list)."""
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

