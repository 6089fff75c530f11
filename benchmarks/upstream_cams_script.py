"""An upstream-interface CAM script, run as its own process by ``bench_cams_process.py``.

It has the structure and the command line of upstream CLIP-ES's ``generate_cams_voc12.py`` (one
worker, CPU), written from the published description of that script (docs/upstream_clip_es.md),
not copied from it, and imports nothing from vpl-plugin:

* ``clip.load(--model, device="cpu")`` (OpenAI CLIP's loader: a TorchScript try, then the state
  dict; ``build_model`` rounds the weights through fp16; the CPU model is cast back to fp32; every
  parameter requires grad, as upstream leaves it);
* the model wrapped in upstream's interface (``tests/clip_es_standin.py``) with the interpolated
  positional table stored in fp16, as upstream always does;
* text features once: ``'a clean origami {}.'`` for the 20 prompt names and the 25 background
  concepts, each encoded, L2-normalised, averaged over the one template and normalised again;
* per image: labels from the XML annotation in first-appearance order, the bicubic resize to
  multiples of 16 and CLIP normalisation (plus the flipped view upstream computes and discards),
  ``encode_image``, then per class the last block with gradient, a backward through a hooked
  ``ln_1`` and numpy GradCAM, and the affinity refinement recomputed per class
  (``tests/upstream_reference.per_class_loop``); ``np.save`` of ``{"keys", "attn_highres"}``.

    python benchmarks/upstream_cams_script.py --img_root VOC2012/JPEGImages \
        --split_file eight.txt --model vitb16.pt --cam_out_dir OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the stand-ins

import clip
from clip_es_standin import CLIPESStandIn
from PIL import Image
from upstream_reference import per_class_loop, preprocess

CLASS_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
NEW_CLASS_NAMES = ["aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat",
                   "chair seat", "cow", "diningtable", "dog", "horse", "motorbike",
                   "person with clothes,people,human", "pottedplant", "sheep", "sofa", "train",
                   "tvmonitor screen"]
BACKGROUND_CATEGORY = ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water",
                       "river", "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house",
                       "mountain", "ocean", "road", "rock", "street", "valley", "bridge", "sign"]


class UpstreamModel(CLIPESStandIn):
    """Upstream's interface with its positional table stored in fp16 (on every device)."""

    def _position_table(self, h: int, w: int) -> torch.Tensor:
        return super()._position_table(h, w).half()


def zeroshot_classifier(classnames, templates, model):
    """Text features ``(len(classnames), D)``, unit rows, as upstream computes them."""
    with torch.no_grad():
        weights = []
        for name in classnames:
            texts = clip.tokenize([t.format(name) for t in templates])
            emb = model.encode_text(texts)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            weights.append(emb / emb.norm())
        return torch.stack(weights, dim=1).t()


def xml_labels(path: Path):
    """Foreground indices (0..19) in first-appearance order of the annotation's objects."""
    labels = []
    for obj in ET.parse(path).getroot().findall("object"):
        idx = CLASS_NAMES.index(obj.find("name").text.strip())
        if idx not in labels:
            labels.append(idx)
    return labels


def perform(args, model, fg, bg, image_ids) -> None:
    ann_root = Path(args.img_root).parent / "Annotations"
    target_layer = model.visual.transformer.resblocks[-1].ln_1
    p = model.visual.conv1.kernel_size[0]
    t0 = time.perf_counter()
    for im in image_ids:
        labels = xml_labels(ann_root / im.replace("jpg", "xml"))
        x, (H, W), size = preprocess(Image.open(os.path.join(args.img_root, im)), p)
        torch.flip(x, [-1])  # upstream builds the flipped view too and never uses it
        image_features, attn_list = model.encode_image(x, H, W)
        text = torch.cat([fg[labels], bg], dim=0)
        _, highres = per_class_loop(model, lambda f=image_features, t=text: model.forward_last_layer(f, t),
                                    target_layer, labels, (H // p, W // p), size, attn_list)
        np.save(os.path.join(args.cam_out_dir, im.replace("jpg", "npy")),
                {"keys": np.array(labels, dtype=np.int64), "attn_highres": highres})
    print(f"perform: {len(image_ids)} images in {time.perf_counter() - t0:.2f} s")  # for the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img_root", required=True)
    ap.add_argument("--split_file", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cam_out_dir", required=True)
    args = ap.parse_args()
    image_ids = [f"{x}.jpg" for x in np.loadtxt(args.split_file, dtype=str, ndmin=1)]
    os.makedirs(args.cam_out_dir, exist_ok=True)
    base, _ = clip.load(args.model, device="cpu")
    model = UpstreamModel(base)
    bg = zeroshot_classifier(BACKGROUND_CATEGORY, ["a clean origami {}."], model)
    fg = zeroshot_classifier(NEW_CLASS_NAMES, ["a clean origami {}."], model)
    perform(args, model, fg, bg, image_ids)


if __name__ == "__main__":
    main()
