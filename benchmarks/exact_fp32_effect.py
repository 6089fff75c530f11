"""What ``--exact-fp32`` changes: `vpl cams` with the default (upstream CLIP-ES's numerics) and with
``--exact-fp32`` on the same real VOC images and the same weights, then `vpl eval` (upstream's
background-threshold search) on both.

The weights are a random-weight CLIP of the real architecture whose image-encoder query / key
in-projection weights are scaled (x8 by default), so attention is peaked as in a trained CLIP and
CAA's refinement has real dynamic range (the repository's parity test bed, tests/peaked_models.py).
Plain random weights give nearly uniform attention and hide the difference. Reports the largest
and mean per-pixel difference of the refined maps (``attn_highres``) and both mIoUs.
Writes benchmarks/results/exact_fp32_effect.{json,md}.

    python benchmarks/exact_fp32_effect.py [--arch vit-b16|tiny] [--images 8] [--factor 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import voc_root, write_results
from vpl_plugin.backbones import build_random_clip, save_checkpoint
from vpl_plugin.cli import main

ARCHS = {
    "vit-b16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, patch_size=16,
                    transformer_width=512, transformer_heads=8, transformer_layers=12),
    "tiny": dict(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=64, patch_size=16,
                 transformer_width=64, transformer_heads=1, transformer_layers=2),
}


def peaked_checkpoint(path: Path, arch: str, factor: float, seed: int = 0) -> None:
    """Save a random CLIP (exact fp32 values) with its image encoder's q / k weights scaled."""
    model = build_random_clip(seed=seed, **ARCHS[arch])
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            width = block.attn.in_proj_weight.shape[1]
            block.attn.in_proj_weight[: 2 * width] *= factor
            block.attn.in_proj_bias[: 2 * width] *= factor
    save_checkpoint(model, path)


def run(args: argparse.Namespace) -> dict:
    root = voc_root()
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[: args.images]
    work = Path(tempfile.mkdtemp(prefix="exact_fp32_effect_"))
    split = work / "list.txt"
    split.write_text("\n".join(ids) + "\n")
    ckpt = work / "peaked.pt"
    peaked_checkpoint(ckpt, args.arch, args.factor)
    data = ["--clip", str(ckpt), "--root", str(root), "--split-file", str(split), "--no-progress"]
    miou = {}
    for mode, extra in (("default", []), ("exact_fp32", ["--exact-fp32"])):
        assert main(["cams", *data, "--out", str(work / mode), *extra]) == 0
        out = work / f"{mode}.json"
        assert main(["eval", "--cams", str(work / mode), "--gt-root", str(root / "SegmentationClass"),
                     "--split-file", str(split), "--no-progress", "--json", str(out)]) == 0
        miou[mode] = json.loads(out.read_text())
    largest, means = 0.0, []
    for i in ids:
        a = np.load(work / "default" / f"{i}.npy", allow_pickle=True).item()["attn_highres"].astype(np.float32)
        b = np.load(work / "exact_fp32" / f"{i}.npy", allow_pickle=True).item()["attn_highres"].astype(np.float32)
        largest = max(largest, float(np.abs(a - b).max()))
        means.append(float(np.abs(a - b).mean()))
    return {"arch": args.arch, "factor": args.factor, "images": ids, "max_abs_diff": largest,
            "mean_abs_diff": float(np.mean(means)),
            "miou_default": float(miou["default"]["miou"]), "miou_exact_fp32": float(miou["exact_fp32"]["miou"]),
            "threshold_default": miou["default"].get("best_threshold"),
            "threshold_exact_fp32": miou["exact_fp32"].get("best_threshold")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit-b16", choices=sorted(ARCHS))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


if __name__ == "__main__":
    a = parse_args()
    torch.set_num_threads(a.threads)
    r = run(a)
    delta = 100 * (r["miou_exact_fp32"] - r["miou_default"])
    write_results(f"exact_fp32_effect_{a.arch}", r, [
        ["weights", "images", "max |diff| per pixel", "mean |diff|", "mIoU default", "mIoU --exact-fp32", "change"],
        [f"random {a.arch}, q/k x{a.factor:g}", str(len(r["images"])), f"{r['max_abs_diff']:.3f}",
         f"{r['mean_abs_diff']:.4f}", f"{100 * r['miou_default']:.2f}", f"{100 * r['miou_exact_fp32']:.2f}",
         f"{delta:+.2f} points"]])
