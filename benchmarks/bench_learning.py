"""VPL phase-1 learning over memory-mapped features on the CPU: time per iteration against the
matrix-product roofline, and the memory it needs beyond the mapped file.

Builds a float16 feature file of K x 512 unit rows on disk (default K = 2,000,000, 2 GB; VOC
train_aug is about 8 million tokens), seed-hardened-style targets over 45 prototypes, then runs
`learn_vision_prototypes` with the paper-literal step rule (one pass over the data per
iteration) streaming 65,536-row chunks from the memmap. Baseline measured in the same run: the
same two K x 512 x 45 matrix products per iteration on an in-memory float32 copy of one chunk,
repeated over all chunks (the arithmetic the algorithm cannot avoid). Writes
benchmarks/results/learning_cpu.{json,md}.

    python benchmarks/bench_learning.py [--pixels 2000000] [--iters 3] [--dir /tmp/vpl_bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import PeakAnonMemory, write_results
from vpl_plugin.prototypes import learn_vision_prototypes


def make_files(folder: Path, k: int, d: int, n: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    feats = np.lib.format.open_memmap(folder / "features.npy", "w+", np.float16, (k, d))
    targets = np.lib.format.open_memmap(folder / "targets.npy", "w+", np.float32, (k, n))
    cands = np.lib.format.open_memmap(folder / "candidates.npy", "w+", np.bool_, (k, n))
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n, d)).astype(np.float32)
    step = 262_144
    for a in range(0, k, step):
        b = min(a + step, k)
        cls = rng.integers(0, n, b - a)
        x = centres[cls] + rng.standard_normal((b - a, d)).astype(np.float32)
        feats[a:b] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        q = np.zeros((b - a, n), np.float32)
        q[np.arange(b - a), cls] = 1.0
        targets[a:b] = q
        c = rng.random((b - a, n)) < 0.5
        c[np.arange(b - a), cls] = True
        cands[a:b] = c
    for arr in (feats, targets, cands):
        arr.flush()
    return centres


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=int, default=2_000_000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--dir", default="/tmp/vpl_bench_learning")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, n = 512, 45
    folder = Path(args.dir)
    t0 = time.perf_counter()
    centres = make_files(folder, args.pixels, d, n)
    build_s = time.perf_counter() - t0
    feats = np.load(folder / "features.npy", mmap_mode="r")
    targets = np.load(folder / "targets.npy", mmap_mode="r")
    cands = np.load(folder / "candidates.npy", mmap_mode="r")
    init = torch.nn.functional.normalize(torch.from_numpy(centres) + 0.5, dim=1)

    # warm the page cache so both measurements read from memory
    for a in range(0, args.pixels, args.chunk):
        np.asarray(feats[a:a + args.chunk]).sum()
    with PeakAnonMemory() as mem:
        t0 = time.perf_counter()
        _, hist = learn_vision_prototypes(feats, targets, init, cands, tau=0.03, lr=10, iters=args.iters,
                                          step_rule="halving", chunk_size=args.chunk, return_history=True)
        learn_s = time.perf_counter() - t0
    passes = hist["evaluations"][-1] if hist["evaluations"] else args.iters + 1
    per_pass = learn_s / passes

    # roofline: the two products per pass over the same chunks, data already in float32 memory
    x = torch.from_numpy(np.asarray(feats[: args.chunk], dtype=np.float32))
    w = init.clone()
    chunks = -(-args.pixels // args.chunk)
    t0 = time.perf_counter()
    for _ in range(chunks):
        s = x @ w.T
        _ = s.T @ x
    roof_s = time.perf_counter() - t0
    ratio = per_pass / roof_s
    result = {"pixels": args.pixels, "dim": d, "prototypes": n, "chunk": args.chunk, "iters": args.iters,
              "passes": passes, "seconds_per_pass": per_pass, "roofline_seconds_per_pass": roof_s,
              "ratio_to_roofline": ratio, "peak_anon_memory_added_gb": mem.added_gb,
              "feature_file_gb": (folder / "features.npy").stat().st_size / 1024 ** 3,
              "build_files_seconds": build_s, "loss": [hist["loss"][0], hist["loss"][-1]]}
    write_results("learning_cpu", result, [
        ["measure", "value"],
        ["pixels x dim (features file)", f"{args.pixels:,} x {d} fp16 ({result['feature_file_gb']:.2f} GB)"],
        ["seconds per pass (one iteration)", f"{per_pass:.2f}"],
        ["roofline: 2 matrix products per pass", f"{roof_s:.2f}"],
        ["ratio to roofline", f"{ratio:.2f}x"],
        ["peak memory beyond the mapped file", f"{mem.added_gb:.2f} GB"],
        ["projected 3000 iterations at 8M pixels (halving: 1 pass each)",
         f"{per_pass * (8e6 / args.pixels) * 3000 / 3600:.1f} h"],
    ])


if __name__ == "__main__":
    main()
