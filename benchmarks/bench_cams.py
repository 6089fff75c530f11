"""CAM generation throughput on the CPU: vpl-plugin's CLIP-ES adapter against a faithful
one-image, one-backward-per-class re-statement of upstream CLIP-ES's loop (written below), on real
VOC images with a random-weight ViT-B/16 of the real size, one thread.

The baseline follows upstream's structure: one no-grad trunk pass per image, then for every class
the last block and head again with gradient, one backward, GradCAM, and the affinity
normalisation, symmetrisation and square recomputed per class. vpl-plugin runs the last block on
one copy per class and backpropagates once, and computes the class-independent affinity once.
Outputs must agree within 1e-3 (fp16 maps). Also reported: the share of the baseline's time that is
per-class work, and the ceiling it implies (the speed-up if all per-class work were free).
Writes benchmarks/results/cams_cpu.{json,md}.

    python benchmarks/bench_cams.py [--images 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import voc_root, write_results
from vpl_plugin.adapters import CLIPESAdapter
from vpl_plugin.backbones import CLIPDense, build_random_clip
from vpl_plugin.cam import affinity_transition, box_mask, gradcam, minmax_scale, prototype_probabilities, resize_maps
from vpl_plugin.data.voc import VOCDataset, load_image


def upstream_loop(adapter: CLIPESAdapter, image, labels, timings: dict) -> np.ndarray:
    """One image the way upstream CLIP-ES does it (per-class last block, backward and CAA)."""
    enc = adapter.encoder
    t0 = time.perf_counter()
    x, size = enc.preprocess(image)
    tokens, maps = enc.trunk(x[None], keep_attention=8)
    timings["trunk"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    text = adapter.text_prototypes
    stacked = adapter.stacked_prototypes(labels, text)
    scale = torch.tensor(text.logit_scale, dtype=torch.float32)
    grid = (x.shape[-2] // enc.patch_size, x.shape[-1] // enc.patch_size)
    out_maps = []
    attention = None
    for j in range(len(labels)):
        out = enc.last_block(tokens)  # the last block again for this class
        with torch.enable_grad():
            probs = prototype_probabilities(out.image_embedding, stacked, scale)
            (grad,) = torch.autograd.grad(probs[0, j], out.activation)
        cam = gradcam(out.activation, grad, grid)[0]
        if attention is None:
            attention = [m[:1] for m in maps] + [out.attention[:1].detach()]
        trans = affinity_transition(attention, 8, 3)  # recomputed per class, as upstream
        mask = torch.from_numpy(box_mask(cam, adapter.box_threshold)).reshape(1, -1)
        refined = ((trans * mask) @ cam.reshape(-1, 1)).reshape(1, *grid)
        out_maps.append(minmax_scale(refined)[0])
    result = resize_maps(torch.stack(out_maps), size).astype(np.float16)
    timings["per_class"] += time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_random_clip(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                              patch_size=16, transformer_width=512, transformer_heads=8, transformer_layers=12)
    adapter = CLIPESAdapter(CLIPDense(model))
    data = VOCDataset(voc_root(), "train.txt")
    # images with two or more classes first: that is where per-class work shows
    samples = [data[i] for i in range(len(data))]
    samples = sorted(samples, key=lambda s: -len(s.labels))[: args.images]
    images = [(load_image(s.image_path), list(s.labels)) for s in samples]
    adapter(images[0][0], images[0][1])  # warm-up
    timings = {"trunk": 0.0, "per_class": 0.0}
    t0 = time.perf_counter()
    base = [upstream_loop(adapter, im, lab, timings) for im, lab in images]
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = [adapter(im, lab).attn_highres for im, lab in images]
    t_ours = time.perf_counter() - t0
    diff = max(float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(base, ours))
    share = timings["per_class"] / (timings["trunk"] + timings["per_class"])
    classes = sum(len(lab) for _, lab in images)
    result = {"images": len(images), "classes": classes, "threads": args.threads,
              "baseline_seconds": t_base, "ours_seconds": t_ours, "speedup": t_base / t_ours,
              "per_class_share_of_baseline": share, "ceiling_if_per_class_work_were_free": 1 / (1 - share),
              "max_abs_diff_attn_highres": diff, "within_1e-3": diff <= 1e-3}
    write_results("cams_cpu", result, [
        ["measure", "value"],
        ["images (classes)", f"{len(images)} ({classes})"],
        ["upstream-style loop, s/image", f"{t_base / len(images):.2f}"],
        ["vpl-plugin adapter, s/image", f"{t_ours / len(images):.2f}"],
        ["speed-up", f"{t_base / t_ours:.2f}x"],
        ["per-class share of the baseline", f"{100 * share:.0f} %"],
        ["ceiling if per-class work were free", f"{1 / (1 - share):.2f}x"],
        ["max |difference| of attn_highres", f"{diff:.2e}"],
    ])


if __name__ == "__main__":
    main()
