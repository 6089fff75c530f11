"""VPL as a drop-in for an existing CLIP-ES script, on a stand-in of upstream's model (CPU only).

What an upstream ``generate_cams_voc12.py`` user adds (see ``adapters/clip_es/README.md``):

    dp = learn_vision_prototypes_for(model, fg_text_features, bg_text_features, samples)
    fg_text_features, bg_text_features = dp.fg, dp.bg
    with use_logit_scale(model, dp.logit_scale):
        ...  # the unchanged GradCAM loop

and, for the configuration the project recommends (region pooling at tau_I 0.1, the dense
per-token map, no refinement), one call per image that returns upstream's ``.npy`` dict:

    dp = learn_vision_prototypes_for(model, fg_text_features, bg_text_features, samples,
                                     tau=0.1, pooling="region")
    np.save(path, dense_cams_for(model, image_path, label_id_list, dp))

Here ``model`` is ``tests/clip_es_standin.CLIPESStandIn`` (upstream's interface: ``encode_image(image,
H, W)`` and ``forward_last_layer``, fp16 positional table) over a *random-weight* tiny CLIP loaded as
``clip.load`` loads it, and the images are 4 real VOC images of the shared subset. No numerics flag
is involved: the drop-in computes with upstream's numerics by default. Random weights: the numbers show what the drop-in changes, not
whether VPL helps.

Usage:
    python examples/clip_es_dropin.py [--voc-root VOC2012] [--iters 50]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the stand-in lives with the tests

from clip_es_standin import CLIPESStandIn  # noqa: E402

from vpl_plugin.adapters import text_prototype_set  # noqa: E402
from vpl_plugin.backbones import CLIPDense, build_random_clip  # noqa: E402
from vpl_plugin.data.classes import VOC  # noqa: E402
from vpl_plugin.data.voc import VOCDataset  # noqa: E402
from vpl_plugin.dropin import (  # noqa: E402
    check_imports,
    dense_cams_for,
    learn_vision_prototypes_for,
    use_logit_scale,
)

IDS = ["2007_000032", "2007_000039", "2007_000063", "2007_000068"]


def find_voc_root(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("VPL_VOC_ROOT"):
        return Path(os.environ["VPL_VOC_ROOT"])
    for folder in (HERE, *HERE.parents):
        cand = folder / "shared" / "data" / "voc2012_subset" / "VOC2012"
        if (cand / "JPEGImages").is_dir():
            return cand
    sys.exit("No VOC data found: pass --voc-root /path/to/VOC2012 or set VPL_VOC_ROOT.")


def preprocess(path):
    """Upstream's resize (bicubic, to multiples of 16), RGB conversion and CLIP normalisation."""
    from PIL import Image

    image = Image.open(path)
    w0, h0 = image.size
    H, W = int(np.ceil(h0 / 16) * 16), int(np.ceil(w0 / 16) * 16)
    arr = np.asarray(image.resize((W, H), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1))[None], H, W


def script_gradcams(model, image_path, fg, bg, labels):
    """Upstream's per-class GradCAM (hook on resblocks[-1].ln_1): raw maps and class probabilities."""
    x, H, W = preprocess(image_path)
    tokens, _ = model.encode_image(x, H, W)
    text = torch.cat([fg[labels], bg], dim=0)
    layer = model.visual.transformer.resblocks[-1].ln_1
    cams, probs_out = [], None
    for j in range(len(labels)):
        store = {}

        def hook(_m, _i, out):
            store["a"] = out
            out.register_hook(lambda g: store.__setitem__("g", g))

        handle = layer.register_forward_hook(hook)
        try:
            probs, _ = model.forward_last_layer(tokens, text)
            model.zero_grad()
            probs[0, j].backward(retain_graph=True)
        finally:
            handle.remove()
        a, g = store["a"][1:, 0].detach(), store["g"][1:, 0]
        cam = (g.mean(dim=0) * a).sum(dim=-1).clamp_min(0)
        cam = cam - cam.min()
        cams.append((cam / (1e-7 + cam.max())).reshape(H // 16, W // 16))
        probs_out = probs[0, : len(labels)].detach()
    return torch.stack(cams), probs_out


def fmt(values) -> str:
    """``[0.123, 0.456]`` of a tensor or array."""
    return "[" + ", ".join(f"{v:.3f}" for v in np.asarray(values).tolist()) + "]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc-root", help="VOC2012 folder (default: the shared subset or $VPL_VOC_ROOT)")
    ap.add_argument("--iters", type=int, default=50, help="VPL iterations (paper: 3000)")
    ap.add_argument("--tau", type=float, default=0.03, help="tau_I (paper: 0.03)")
    args = ap.parse_args()

    root = find_voc_root(args.voc_root)
    voc = VOCDataset(root, root / "ImageSets" / "Segmentation" / "train.txt")
    ids = [i for i in IDS if i in set(voc.ids)] or voc.ids[:4]
    picked = [voc[voc.ids.index(i)] for i in ids]
    samples = [(s.image_path, list(s.labels)) for s in picked]

    import clip.model

    exact = build_random_clip(seed=0)  # random weights: a pipeline check, not a VPL result
    # as clip.load returns it on a CPU: build_model's fp16-rounded weights, cast to fp32, requiring grad
    base = clip.model.build_model({k: v.clone() for k, v in exact.state_dict().items()}).float()
    for p in base.parameters():
        p.requires_grad_(True)
    model = CLIPESStandIn(base)
    text = text_prototype_set(CLIPDense(base), VOC)  # what upstream's zeroshot_classifier builds
    fg_text_features, bg_text_features = text.fg.clone(), text.bg.clone()
    print("loaded modules:", check_imports())

    # --- the drop-in, as in an upstream script ---
    dp = learn_vision_prototypes_for(model, fg_text_features, bg_text_features, samples,
                                     tau=args.tau, iters=args.iters, progress=False)
    loss = dp.history.get("loss") or [float("nan")]
    print(f"learned on {len(samples)} images: loss {loss[0]:.4f} -> {loss[-1]:.4f}")
    print(f"logit scale: text {model.logit_scale.exp().item():.4f} -> vision {dp.logit_scale:.4f}")
    cos_fg = (torch.nn.functional.normalize(fg_text_features, dim=1) * dp.fg.float()).sum(1)
    cos_bg = (torch.nn.functional.normalize(bg_text_features, dim=1) * dp.bg.float()).sum(1)
    print(f"prototype moved: cos(text, vision) fg mean {cos_fg.mean():.4f} (min {cos_fg.min():.4f}), "
          f"bg mean {cos_bg.mean():.4f}; shapes {tuple(dp.fg.shape)} {tuple(dp.bg.shape)}, "
          f"dtype {dp.fg.dtype}")

    for image_id, (path, labels) in zip(ids, samples):
        cams_t, p_t = script_gradcams(model, path, fg_text_features, bg_text_features, labels)
        with use_logit_scale(model, dp.logit_scale):
            cams_v, p_v = script_gradcams(model, path, dp.fg, dp.bg, labels)
        names = [VOC.names[c] for c in labels]
        change = (cams_v - cams_t).abs().flatten(1).mean(1)
        print(f"{image_id} {names}: class prob text {fmt(p_t)} -> vision {fmt(p_v)}; "
              f"mean |GradCAM change| {fmt(change)}")

    # --- the recommended configuration: region pooling at tau_I 0.1, dense map, no refinement ---
    rec = learn_vision_prototypes_for(model, fg_text_features, bg_text_features, samples, tau=0.1,
                                      pooling="region", iters=args.iters, progress=False)
    for image_id, (path, labels) in zip(ids, samples):
        out = dense_cams_for(model, path, labels, rec)  # what np.save writes as <id>.npy
        area = (out["attn_highres"].astype(np.float32) >= 0.4).mean(axis=(1, 2))
        print(f"{image_id}: recommended maps {out['attn_highres'].dtype} "
              f"{tuple(out['attn_highres'].shape)}, keys {out['keys'].tolist()}, "
              f"area >= 0.4 {fmt(area)}")
    print(f"model logit scale restored: {model.logit_scale.exp().item():.4f}; "
          f"model.encode_image calls by the drop-in: 0 (the loop above made "
          f"{model.calls['encode_image']})")


if __name__ == "__main__":
    main()
