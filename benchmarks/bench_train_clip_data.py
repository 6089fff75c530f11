"""How fast `vpl train-clip --workers N` draws training batches, against drawing them in process.

On a GPU the demo CLIP's step is a few tens of milliseconds, so the scenes (about 0.5 ms each,
512 per batch) must come from data-loader workers for a 6,000-step run to fit in minutes. This
script times the batch stream of `vpl_plugin.demo.train_clip` for steps 0..B-1 with 0 workers
(the baseline, in this process) and with N workers, checks that both streams are identical, and
prints the ratio.

    python benchmarks/bench_train_clip_data.py                       # batch 512, 12 batches, 2 workers
    python benchmarks/bench_train_clip_data.py --workers 14 --batches 60   # on a 16-core machine

Writes benchmarks/results/train_clip_data.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from vpl_plugin.data.synthetic import SceneWorld
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig, _batch, _batches

    torch.set_num_threads(1)
    world = SceneWorld(seed=DemoTrainConfig().world_seed)
    config = DemoTrainConfig(steps=args.batches, batch_size=args.batch_size)
    context = DemoCLIPConfig().context_length
    _batch(world, args.batches, args.batch_size, context)  # warm-up: the tokenizer loads once, before forking
    seconds, streams = {}, {}
    for workers in (0, args.workers):
        start = time.perf_counter()
        streams[workers] = list(_batches(world, 0, config, context, workers, pin=False))
        seconds[workers] = time.perf_counter() - start
    same = all(torch.equal(a, b) for x, y in zip(streams[0], streams[args.workers]) for a, b in zip(x, y))
    if not same:
        raise SystemExit("the batch streams differ between 0 and N workers")
    per = {w: 1000 * s / args.batches for w, s in seconds.items()}
    ratio = seconds[0] / seconds[args.workers]
    result = {"batch_size": args.batch_size, "batches": args.batches, "workers": args.workers,
              "ms_per_batch": per, "speedup": round(ratio, 2), "identical_batches": same,
              "command": " ".join(["python", "benchmarks/bench_train_clip_data.py", *sys.argv[1:]])}
    write_results("train_clip_data", result, [
        ["data loading", "ms per batch", "ratio"],
        ["in process (0 workers, baseline)", f"{per[0]:.0f}", "1.00x"],
        [f"{args.workers} workers", f"{per[args.workers]:.0f}", f"{ratio:.2f}x"],
    ])


if __name__ == "__main__":
    main()
