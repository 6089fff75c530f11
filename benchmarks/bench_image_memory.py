"""Peak memory of one image's CLIP-ES CAMs against the image's pixel count (CPU).

Each size runs in a fresh subprocess (``ru_maxrss`` is a high-water mark that never goes down):
it builds a random-weight CLIP of ViT-B/16's size and the ``clip-es`` adapter, records
``ru_maxrss`` (the model alone), then computes the CAMs of one random RGB image of that size with
two classes and records ``ru_maxrss`` again. The difference is what the image costs. Used to choose
``DEFAULT_MAX_PIXELS`` of :func:`vpl_plugin.data.voc.load_image` and the help of ``--max-pixels``.
Writes benchmarks/results/image_memory.{json,md}.

    python benchmarks/bench_image_memory.py [--sizes 500x375 1000x1000 1500x1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import write_results

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from PIL import Image
from vpl_plugin.adapters import create_adapter
from vpl_plugin.backbones import CLIPDense, build_random_clip
from vpl_plugin.data.classes import VOC

def rss():  # Linux: kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

width, height = int(sys.argv[1]), int(sys.argv[2])
model = build_random_clip(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                          patch_size=16, transformer_width=512, transformer_heads=8,
                          transformer_layers=12)
adapter = create_adapter("clip-es", CLIPDense(model), VOC)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
adapter(Image.new("RGB", (64, 64)), [0])  # warm-up: lazy tables and allocator pools
base = rss()
t0 = time.perf_counter()
adapter(image, [0, 14])
print(json.dumps({"base": base, "peak": rss(), "seconds": time.perf_counter() - t0}))
"""


def measure(width: int, height: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height), str(threads)],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(width=width, height=height, pixels=width * height,
               tokens=-(-width // 16) * -(-height // 16))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["500x375", "1000x1000", "1500x1500"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        t0 = time.perf_counter()
        rows.append(measure(width, height, args.threads))
        print(f"{size}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    gb = 1024 ** 3
    table = [["image", "pixels", "tokens", "model alone (GB)", "peak (GB)", "image's share (GB)",
              "CAM time (s)"]]
    for r in rows:
        table.append([f"{r['width']}x{r['height']}", f"{r['pixels']:,}", f"{r['tokens']:,}",
                      f"{r['base'] / gb:.2f}", f"{r['peak'] / gb:.2f}",
                      f"{(r['peak'] - r['base']) / gb:.2f}", f"{r['seconds']:.1f}"])
    write_results("image_memory", {"rows": rows, "threads": args.threads}, table)


if __name__ == "__main__":
    main()
