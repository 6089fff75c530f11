"""Pending GPU measurements, each a ratio against a baseline measured in the same run.

* ``cams``: CAM throughput (text prototypes, with affinity refinement) on real VOC images with a
  random-weight ViT-B/16 of the real size: the upstream-style one-image, one-backward-per-class
  loop (``bench_cams.upstream_loop``) against vpl-plugin's adapter one image at a time and in
  batches of equally sized images (``CLIPESAdapter.call_batch``). fp32 outputs must agree within
  1e-3; bf16 / fp16 autocast of the batched path is reported with its error against fp32.
* ``learning``: VPL phase-1 learning over ``--pixels`` x 512 features resident on the GPU (VOC
  train_aug is about 8 million tokens), paper-literal step rule, time per iteration against the
  same two matrix products per pass (the roofline of the algorithm), measured in the same run.
* ``projection``: wall time for VOC train_aug (10,582 images) and COCO train (82,081) from the
  measured per-image CAM rate and per-iteration learning time.

Writes benchmarks/results/gpu.{json,md} (or --out DIR). Prepared to run inside 9 minutes on one
H100/H200 through ``benchmarks/gpu_all.sh``.

    python benchmarks/bench_gpu.py [--images 32] [--batch 8] [--pixels 8000000] [--iters 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import voc_root, write_results  # noqa: E402
from bench_cams import upstream_loop  # noqa: E402
from vpl_plugin.adapters import CLIPESAdapter  # noqa: E402
from vpl_plugin.backbones import CLIPDense, build_random_clip  # noqa: E402
from vpl_plugin.data.voc import VOCDataset, load_image  # noqa: E402
from vpl_plugin.prototypes import learn_vision_prototypes  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _vit_b16(device: str) -> CLIPDense:
    model = build_random_clip(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                              patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12)
    # the encoder's device must be named: CLIPDense(model.to("cuda")) alone would run on the CPU.
    # Default numerics: upstream's (fp16 model and fp16 GradCAM arithmetic on CUDA)
    return CLIPDense(model, device=device)


def _max_diff(a, b) -> float:
    return max(float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()) for x, y in zip(a, b))


def bench_cams(args, device: str) -> dict:
    adapter = CLIPESAdapter(_vit_b16(device))
    data = VOCDataset(voc_root(), "train.txt")
    n = min(args.images, len(data))
    samples = [data[i] for i in range(n)]
    images = [(load_image(s.image_path), list(s.labels)) for s in samples]
    # group equal sizes (VOC has few distinct sizes), as generate_cams does
    groups = defaultdict(list)
    for im, lab in images:
        groups[im.size].append((im, lab))
    ordered = [item for g in groups.values() for item in g]
    batches = [g[i:i + args.batch] for g in groups.values() for i in range(0, len(g), args.batch)]
    for im, lab in ordered[:2]:  # warm-up (kernels, cuDNN autotune, allocator)
        adapter(im, lab)
        upstream_loop(adapter, im, lab, defaultdict(float))
    adapter.call_batch([b[0] for b in batches[0]], [b[1] for b in batches[0]])

    def timed(fn):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        return out, time.perf_counter() - t0

    timings = defaultdict(float)
    base, t_base = timed(lambda: [upstream_loop(adapter, im, lab, timings) for im, lab in ordered])
    single, t_single = timed(lambda: [adapter(im, lab).attn_highres for im, lab in ordered])
    batched, t_batch = timed(lambda: [o.attn_highres for b in batches
                                      for o in adapter.call_batch([x[0] for x in b], [x[1] for x in b])])
    result = {"images": n, "classes": sum(len(lab) for _, lab in ordered), "distinct_sizes": len(groups),
              "batch": args.batch, "upstream_loop_s_per_image": t_base / n,
              "adapter_single_s_per_image": t_single / n, "adapter_batched_s_per_image": t_batch / n,
              "speedup_single": t_base / t_single, "speedup_batched": t_base / t_batch,
              "max_abs_diff_single_fp32": _max_diff(base, single),
              "max_abs_diff_batched_fp32": _max_diff(base, batched)}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.autocast("cuda", dtype=dt):
            amp, t_amp = timed(lambda: [o.attn_highres for b in batches
                                        for o in adapter.call_batch([x[0] for x in b], [x[1] for x in b])])
        result[f"speedup_batched_{name}"] = t_base / t_amp
        result[f"max_abs_diff_batched_{name}_vs_fp32"] = _max_diff(batched, amp)
        result[f"mean_abs_diff_batched_{name}_vs_fp32"] = float(np.mean(
            [np.abs(x.astype(np.float32) - y.astype(np.float32)).mean() for x, y in zip(batched, amp)]))
    return result


def bench_learning(args, device: str) -> dict:
    d, n = 512, 45
    g = torch.Generator(device=device).manual_seed(0)  # generated where it is used (8M x 512)
    centres = torch.randn(n, d, generator=g, device=device)
    cls = torch.randint(0, n, (args.pixels,), generator=g, device=device)
    feats = torch.empty(args.pixels, d, dtype=torch.float16, device=device)
    step = 1 << 20
    for a in range(0, args.pixels, step):
        b = min(a + step, args.pixels)
        x = centres[cls[a:b]] + torch.randn(b - a, d, generator=g, device=device)
        feats[a:b] = torch.nn.functional.normalize(x, dim=1).to(torch.float16)
    targets = torch.nn.functional.one_hot(cls, n).to(torch.float16)
    init = torch.nn.functional.normalize(centres.cpu() + 0.5, dim=1)
    chunk = args.pixels  # resident: one chunk per pass
    learn_vision_prototypes(feats[:chunk // 8], targets[:chunk // 8], init, tau=0.03, lr=10, iters=2,
                            step_rule="halving", chunk_size=chunk, device=device)  # warm-up
    _sync()
    t0 = time.perf_counter()
    _, hist = learn_vision_prototypes(feats, targets, init, tau=0.03, lr=10, iters=args.iters,
                                      step_rule="halving", chunk_size=chunk, device=device,
                                      return_history=True)
    _sync()
    learn_s = time.perf_counter() - t0
    passes = hist["evaluations"][-1]
    per_pass = learn_s / passes
    w = init.to(device)
    reps = 20
    for _ in range(3):
        s = feats.float() @ w.T
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        x = feats.float()  # the cast the algorithm also pays
        s = x @ w.T
        _ = s.T @ x
    _sync()
    roof = (time.perf_counter() - t0) / reps
    return {"pixels": args.pixels, "dim": d, "prototypes": n, "iters": args.iters, "passes": passes,
            "seconds_per_pass": per_pass, "roofline_seconds_per_pass": roof, "ratio_to_roofline": per_pass / roof,
            "projected_3000_iterations_s": per_pass * 3000,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1024 ** 3 if device == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pixels", type=int, default=8_000_000)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--only", choices=["cams", "learning"], default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also copy the result files here (e.g. $OUT)")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if args.only in (None, "cams"):
        result["cams"] = bench_cams(args, args.device)
        print(json.dumps(result["cams"], indent=1), flush=True)
    if args.only in (None, "learning"):
        result["learning"] = bench_learning(args, args.device)
        print(json.dumps(result["learning"], indent=1), flush=True)
    table = [["measure", "value"], ["device", result["device"]]]
    if "cams" in result:
        c = result["cams"]
        rate = c["adapter_batched_s_per_image"]
        result["projection"] = {"voc_train_aug_cams_h": 10582 * rate * 2 / 3600,  # text + vision passes
                                "coco_train_cams_h": 82081 * rate * 2 / 3600}
        table += [["upstream-style loop, s/image", f"{c['upstream_loop_s_per_image']:.3f}"],
                  ["adapter, one image at a time", f"{c['speedup_single']:.2f}x"],
                  [f"adapter, batches of {c['batch']} equal-size images", f"{c['speedup_batched']:.2f}x"],
                  ["max |diff| fp32 (single / batched)",
                   f"{c['max_abs_diff_single_fp32']:.1e} / {c['max_abs_diff_batched_fp32']:.1e}"],
                  ["bf16 autocast: speed-up / max |diff| vs fp32",
                   f"{c['speedup_batched_bf16']:.2f}x / {c['max_abs_diff_batched_bf16_vs_fp32']:.2e}"],
                  ["fp16 autocast: speed-up / max |diff| vs fp32",
                   f"{c['speedup_batched_fp16']:.2f}x / {c['max_abs_diff_batched_fp16_vs_fp32']:.2e}"],
                  ["projected CAMs (text + VPL), VOC train_aug", f"{result['projection']['voc_train_aug_cams_h']:.2f} h"],
                  ["projected CAMs (text + VPL), COCO train", f"{result['projection']['coco_train_cams_h']:.2f} h"]]
    if "learning" in result:
        lr_ = result["learning"]
        table += [[f"learning, {lr_['pixels']:,} x 512 resident: s/iteration", f"{lr_['seconds_per_pass']:.4f}"],
                  ["roofline (2 products per pass), s", f"{lr_['roofline_seconds_per_pass']:.4f}"],
                  ["ratio to roofline", f"{lr_['ratio_to_roofline']:.2f}x"],
                  ["projected 3000 iterations", f"{lr_['projected_3000_iterations_s']:.0f} s"]]
    write_results("gpu", result, table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        here = Path(__file__).resolve().parent / "results"
        for ext in ("json", "md"):
            (Path(args.out) / f"gpu.{ext}").write_text((here / f"gpu.{ext}").read_text())


if __name__ == "__main__":
    main()
