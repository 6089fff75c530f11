"""CRF pseudo masks in parallel over images: speed-up of `make_pseudo_masks` with a worker pool.

Real VOC images from the shared subset (or VPL_VOC_ROOT) with CAMs made from their ground-truth
masks (blurred one-hot maps, so the CRF has realistic work); the same images with 1 worker
(baseline, measured in the same run) and with every core. Outputs must be byte-identical.
Writes benchmarks/results/crf_parallel.{json,md}.

    python benchmarks/bench_crf.py [--images 24]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import voc_root, write_results
from vpl_plugin.data.cam_files import write_cam_file
from vpl_plugin.pseudo_masks import load_label_png, make_pseudo_masks


def main() -> None:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args()
    root = voc_root()
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()[: args.images]
    work = Path(tempfile.mkdtemp(prefix="vpl_crf_"))
    for i in ids:
        gt = load_label_png(root / "SegmentationClass" / f"{i}.png")
        keys = np.array(sorted(set(np.unique(gt)) - {0, 255}), dtype=np.int64) - 1
        cams = [cv2.GaussianBlur((gt == k + 1).astype(np.float32), (0, 0), 12) for k in keys]
        cams = np.stack(cams) if cams else np.zeros((0,) + gt.shape, np.float32)
        cams = cams / np.maximum(cams.max(axis=(1, 2), keepdims=True), 1e-6)
        write_cam_file(work / "cams" / f"{i}.npy", {"keys": keys, "attn_highres": cams.astype(np.float16)})
    cores = os.cpu_count() or 1
    timings = {}
    for workers in (1, cores):
        out = work / f"masks_{workers}"
        t0 = time.perf_counter()
        make_pseudo_masks(work / "cams", root / "JPEGImages", ids, out, workers=workers, progress=False)
        timings[workers] = time.perf_counter() - t0
    same = all((work / "masks_1" / f"{i}.png").read_bytes() == (work / f"masks_{cores}" / f"{i}.png").read_bytes()
               for i in ids)
    speedup = timings[1] / timings[cores]
    result = {"images": len(ids), "cores": cores, "seconds": timings, "speedup": speedup,
              "efficiency": speedup / cores, "identical_outputs": same}
    write_results("crf_parallel", result, [
        ["workers", "seconds", "images/s"],
        *[[str(w), f"{t:.2f}", f"{len(ids) / t:.2f}"] for w, t in timings.items()],
        ["speed-up", f"{speedup:.2f}x on {cores} cores", f"identical outputs: {same}"],
    ])


if __name__ == "__main__":
    main()
