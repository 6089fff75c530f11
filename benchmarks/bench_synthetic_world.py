"""Scene generation speed of the synthetic world against its 1 ms-per-scene budget.

Baseline measured in the same run: a plain numpy pass that only allocates and writes a 64x64x3
image and mask per scene (the floor of any generator), so the ratio shows what the drawing costs.
Writes benchmarks/results/synthetic_world.json and .md.

    python benchmarks/bench_synthetic_world.py [--scenes 2000]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from vpl_plugin.data.synthetic import SceneWorld


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=2000)
    args = ap.parse_args()
    world = SceneWorld(seed=0)
    world.scene(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(args.scenes):
        world.scene(i)
    per_scene = (time.perf_counter() - t0) / args.scenes
    t0 = time.perf_counter()
    for i in range(args.scenes):
        rng = np.random.default_rng([0, i])
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3, dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[rng.integers(0, 64), :] = 1
    floor = (time.perf_counter() - t0) / args.scenes
    result = {"scenes": args.scenes, "ms_per_scene": 1e3 * per_scene, "floor_ms_per_scene": 1e3 * floor,
              "ratio_to_floor": per_scene / floor, "budget_ms": 1.0, "fraction_of_budget": per_scene / 1e-3,
              "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "synthetic_world.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ("| measure | value |\n|---|---:|\n"
          f"| ms per 64x64 scene | {result['ms_per_scene']:.3f} |\n"
          f"| floor (allocate + fill) ms | {result['floor_ms_per_scene']:.3f} |\n"
          f"| ratio to floor | {result['ratio_to_floor']:.1f}x |\n"
          f"| fraction of the 1 ms budget | {result['fraction_of_budget']:.2f} |\n")
    (out / "synthetic_world.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
