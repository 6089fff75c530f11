"""What `vpl learn` costs a CPU-only user on VOC train_aug (10,582 images), projected from measured
runs of the real command on scaled-down lists.

For each configuration (the default: token pooling, tau_I 0.03, the `bb` step rule that stops once
converged; and the recommended `--pooling region --tau 0.1`) and each list size (default the first
5, 10 and 20 images of the VOC subset's train list), with a random-weight CLIP ViT-B/16 of the real
size (`vpl random-clip --arch ViT-B/16`):

1. the feature pass: `vpl learn ... --iters 0 --memmap --cache-dir C` (text GradCAMs, seeds,
   targets; the learning set assembled into memory-mapped files as it is above 2 GB, which is the
   case at train_aug scale with token pooling). The lists are prefixes of each other and share one
   cache per configuration, so each run computes only the images the previous size lacked; the
   per-image cost is fitted on those new images.
2. the learning loop: the same command with the default `--iters 3000` (the cache is reused, so
   this run's feature pass only reads it back); the learning seconds, passes over the data and the
   stop reason come from the run's history file.

Each run is a separate process, timed by wall clock and by its CPU time (user + system; on a
dedicated core the wall time, and much less disturbed by other work on a shared machine: the
projection uses it); its memory is sampled from
``/proc/<pid>/status`` (peak ``RssAnon``, the memory the run needs, and peak ``VmRSS``, which also
counts resident pages of the memory-mapped files: page cache the system can reclaim).

Projection: feature-pass CPU time ``a + b * images`` (least squares over the runs); learning time
= CPU seconds per pass per row (from the largest run) x the rows train_aug would give (rows per image
measured) x the passes of the largest run (the `bb` rule's pass count is a property of the problem,
not of its size; the cap of 3000 iterations is reported too); memory: peak RssAnon fitted linearly
in the rows, and the sizes of the memory-mapped files. Random weights give meaningless CAMs but the
real arithmetic; a trained CLIP may need another number of passes. Writes
benchmarks/results/project_learn.json and prints the projection.

    OMP_NUM_THREADS=1 python benchmarks/project_learn.py [--sizes 5 10 20] [--work /tmp/vpl_project_learn]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from _common import RESULTS, machine, voc_root

REPO = Path(__file__).resolve().parents[1]
TRAIN_AUG = 10_582
CONFIGS: Dict[str, List[str]] = {
    "token_bb": [],  # the defaults: token pooling, tau_I 0.03, bb rule, 3000-iteration cap
    "region_tau0.1": ["--pooling", "region", "--tau", "0.1"],
}


def _status_kb(pid: int) -> Dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def run_measured(argv: Sequence[str], log: Path) -> Dict[str, float]:
    """Run ``argv`` to completion: its wall and CPU seconds (user + system, from the kernel's
    accounting of the child) and its peak RssAnon / VmRSS (GB, sampled every 50 ms)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    peak = {"RssAnon": 0, "VmRSS": 0}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status_kb(proc.pid).items():
                    peak[key] = max(peak[key], value)
                time.sleep(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}; see {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_anon_gb": peak["RssAnon"] / 1024 ** 2, "vm_rss_gb": peak["VmRSS"] / 1024 ** 2}


def fit_line(x: Sequence[float], y: Sequence[float], *, growing: bool = False) -> Dict[str, float]:
    """Least-squares ``y = a + b x``; ``growing``: a slope below 0 (memory that only looks like it
    shrinks, sampling noise) is taken as 0 and ``a`` as the largest measurement."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    if growing and b < 0:
        return {"a": float(max(y)), "b": 0.0}
    return {"a": float(a), "b": float(b)}


def _files_gb(cache: Path) -> float:
    return sum((cache / n).stat().st_size for n in ("features.npy", "targets.npy", "candidates.npy")
               if (cache / n).exists()) / 1024 ** 3


def measure_config(name: str, flags: List[str], sizes: List[int], ids: List[str], ckpt: Path,
                   work: Path) -> List[dict]:
    cache = work / f"cache_{name}"
    rows: List[dict] = []
    previous = 0
    for n in sizes:
        split = work / f"list_{n}.txt"
        split.write_text("\n".join(ids[:n]) + "\n")
        out = work / f"{name}_{n}.pt"
        base = [sys.executable, "-m", "vpl_plugin", "learn", "--clip", str(ckpt), "--root", str(voc_root()),
                "--split-file", str(split), "--out", str(out), "--cache-dir", str(cache), "--memmap",
                "--no-progress", *flags]
        feat = run_measured([*base, "--iters", "0"], work / f"{name}_{n}_features.log")
        hist = json.loads(out.with_suffix(".history.json").read_text())
        feat["collect_s"] = hist["summary"]["seconds"]
        feat["collect_cpu_s"] = hist["cpu_seconds"]["features"]
        feat["new_images"] = n - previous
        learn = run_measured(base, work / f"{name}_{n}_learn.log")
        hist = json.loads(out.with_suffix(".history.json").read_text())
        meta = torch.load(out, weights_only=True)["provenance"]
        learn.update(learning_s=hist["learning_seconds"], learning_cpu_s=hist["cpu_seconds"]["learning"],
                     iterations=hist["iterations"],
                     passes=hist["evaluations"][-1] if hist["evaluations"] else 1, stopped=hist["stopped"])
        rows.append({"images": n, "rows": meta["pixels"], "memmap_gb": _files_gb(cache), "features": feat,
                     "learning": learn})
        rows[-1]["cache_npz_gb"] = sum(p.stat().st_size for p in cache.glob("*.npz")) / 1024 ** 3
        print(f"{name} {n} images: {meta['pixels']} rows; feature run {feat['cpu_s']:.1f} CPU s "
              f"({feat['wall_s']:.1f} s wall, {feat['new_images']} new images), "
              f"{feat['rss_anon_gb']:.2f} GB anon; learning {learn['learning_cpu_s']:.1f} CPU s "
              f"({learn['learning_s']:.1f} s wall), {learn['passes']} passes ({learn['stopped']}), "
              f"{learn['rss_anon_gb']:.2f} GB anon", flush=True)
        previous = n
    return rows


# Anonymous memory that grows with the rows (the feature files themselves are memory-mapped):
# the seeds (int64, once as per-image pieces and once concatenated) in every run, and in the
# learning loop the working set of one chunk, which the small runs here never fill (their sets are
# one short chunk): 0.46 GB for a full 65,536 x 512 chunk with 45 prototypes (measured:
# benchmarks/bench_learning.py, NOTES.md), i.e. about 7.5 kB per chunk row.
SEED_BYTES_PER_ROW = 16
CHUNK_BYTES_PER_ROW = 0.46 * 1024 ** 3 / 65536
CHUNK_ROWS = 65536


def project(rows: List[dict], target: int, feature_runs: Optional[List[dict]] = None) -> dict:
    """Feature pass, learning loop and memory at ``target`` images from the measured runs.

    Times: CPU seconds, what a dedicated core takes as wall time (the measuring machine may be
    shared). The feature pass is fitted as ``a + b * images`` over ``feature_runs`` (default: this
    configuration's runs; the configurations do the same work per image). Memory is not fitted:
    the peaks of these runs are set by the largest image and the model, not by the list length
    (a straight line through them extrapolates sampling noise), so the projection is the largest
    measured peak plus what grows with the rows (see ``SEED_BYTES_PER_ROW``)."""
    runs = feature_runs or rows
    feat = fit_line([r["features"]["new_images"] for r in runs], [r["features"]["cpu_s"] for r in runs])
    last = rows[-1]
    rows_per_image = last["rows"] / last["images"]
    target_rows = rows_per_image * target
    per_pass_row = last["learning"]["learning_cpu_s"] / max(last["learning"]["passes"], 1) / last["rows"]
    passes = last["learning"]["passes"]
    cap_passes = passes / max(last["learning"]["iterations"], 1) * 3000
    grown = (target_rows - last["rows"]) * SEED_BYTES_PER_ROW / 1024 ** 3
    chunk = (min(target_rows, CHUNK_ROWS) - min(last["rows"], CHUNK_ROWS)) * CHUNK_BYTES_PER_ROW / 1024 ** 3
    mm = fit_line([r["rows"] for r in rows], [r["memmap_gb"] for r in rows], growing=True)
    npz = [r.get("cache_npz_gb") for r in rows]
    return {
        "images": target, "rows_per_image": rows_per_image, "rows": target_rows,
        "feature_fit_s": feat, "feature_pass_h": (feat["a"] + feat["b"] * target) / 3600,
        "feature_cpu_s_per_image": feat["b"],
        "seconds_per_pass": per_pass_row * target_rows, "passes_measured": passes,
        "learning_h": per_pass_row * target_rows * passes / 3600,
        "learning_h_at_3000_iterations": per_pass_row * target_rows * cap_passes / 3600,
        "feature_pass_rss_anon_gb": max(r["features"]["rss_anon_gb"] for r in rows) + grown,
        "learning_rss_anon_gb": max(r["learning"]["rss_anon_gb"] for r in rows) + grown + chunk,
        "memmap_files_gb": mm["b"] * target_rows,
        "cache_npz_gb": (npz[-1] / last["rows"] * target_rows) if npz[-1] else None,
    }


def reproject(path: Path, target: Optional[int] = None) -> dict:
    """Recompute the projections of a results file (e.g. after changing the model above)."""
    result = json.loads(path.read_text())
    result["target_images"] = target or result["target_images"]
    pooled = [r for entry in result["configs"].values() for r in entry["runs"]]
    for entry in result["configs"].values():
        entry["projection"] = project(entry["runs"], result["target_images"], pooled)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20],
                        help="list sizes (default 5 10 20: about 15 min on a loaded 2-core machine; "
                             "20 40 80 on a quiet one)")
    parser.add_argument("--target", type=int, default=TRAIN_AUG, help="images to project to (train_aug)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vpl_project_learn"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reproject", action="store_true",
                        help="only recompute and print the projection of results/project_learn.json")
    args = parser.parse_args(argv)
    if args.reproject:
        print_projection(reproject(RESULTS / "project_learn.json", args.target))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "vitb16_random.pt"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "vpl_plugin", "random-clip", "--arch", "ViT-B/16", "--out",
                        str(ckpt)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    ids = (voc_root() / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    sizes = sorted(args.sizes)
    if sizes[-1] > len(ids):
        raise SystemExit(f"the train list has {len(ids)} images; --sizes asks for {sizes[-1]}")
    start = time.time()
    result: dict = {"sizes": sizes, "target_images": args.target,
                    "threads": os.environ.get("OMP_NUM_THREADS"), "configs": {}}
    for name in args.configs:
        rows = measure_config(name, CONFIGS[name], sizes, ids, ckpt, args.work)
        result["configs"][name] = {"flags": CONFIGS[name], "runs": rows}
    result["benchmark_seconds"] = time.time() - start
    result["machine"] = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "project_learn.json").write_text(json.dumps(result, indent=2) + "\n")
    print_projection(reproject(RESULTS / "project_learn.json"))


def print_projection(result: dict) -> None:
    print(f"\nprojection to {result['target_images']} images (one CPU process, "
          f"{result['threads'] or 'default'} thread(s)):")
    for name, entry in result["configs"].items():
        p = entry["projection"]
        print(f"  {name:14s} feature pass {p['feature_pass_h']:.1f} h "
              f"({p['feature_cpu_s_per_image']:.2f} s per image), peak "
              f"{p['feature_pass_rss_anon_gb']:.2f} GB; learning {p['learning_h']:.2f} h "
              f"({p['passes_measured']} passes of {p['seconds_per_pass']:.1f} s; "
              f"{p['learning_h_at_3000_iterations']:.1f} h at 3000 iterations), peak "
              f"{p['learning_rss_anon_gb']:.2f} GB + {p['memmap_files_gb']:.1f} GB memory-mapped files "
              f"({p['rows']:.3g} rows; per-image cache {p['cache_npz_gb'] or 0:.1f} GB)")


if __name__ == "__main__":
    main()
