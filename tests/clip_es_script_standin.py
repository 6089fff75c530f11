"""A stand-in for upstream CLIP-ES's ``generate_cams_voc12.py``, written from its published
description (``docs/upstream_clip_es.md``), not copied from CLIP-ES.

It keeps the parts of the script that ``adapters/clip_es/README.md`` tells users to edit, with the
same names and layout inside ``if __name__ == "__main__":`` (the ``parser.add_argument`` lines, the
two ``zeroshot_classifier`` lines, the ``perform`` / ``multiprocessing.spawn`` dispatch), so a test
can paste the README's lines into a copy of this file and run it as a subprocess. The model is
``clip_es_standin.CLIPESStandIn`` (upstream's ``encode_image`` / ``forward_last_layer``) over a CLIP
checkpoint file, loaded as ``clip.load`` does on a CPU; ``perform`` is upstream's per-class
GradCAM + CAA loop from ``upstream_reference.per_class_loop``. CPU only.

Usage (from anywhere; the script finds its helpers next to itself):
    python tests/clip_es_script_standin.py --img_root VOC2012/JPEGImages \\
        --split_file VOC2012/ImageSets/Segmentation/train.txt --cam_out_dir out --model clip.pt
"""

from __future__ import annotations

import argparse
import os

import clip
import numpy as np
import torch
from clip_es_standin import CLIPESStandIn
from PIL import Image
from torch import multiprocessing
from upstream_reference import per_class_loop, preprocess

from vpl_plugin.backbones.clip import load_state_dict_file
from vpl_plugin.data.classes import VOC
from vpl_plugin.data.voc import parse_voc_xml

new_class_names = list(VOC.prompt_names)
BACKGROUND_CATEGORY = list(VOC.background)


def zeroshot_classifier(classnames, templates, model):
    """Unit text features ``(N, D)``: per class, the mean of its unit prompt embeddings,
    renormalised."""
    with torch.no_grad():
        weights = []
        for name in classnames:
            texts = clip.tokenize([t.format(name) for t in templates])
            emb = model.encode_text(texts)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            weights.append(emb / emb.norm())
    return torch.stack(weights, dim=0)


def perform(process_id, dataset_list, args, model, bg_text_features, fg_text_features, cam):
    """Upstream's per-image loop over this worker's share of the list: labels from the XML,
    per-class GradCAM and CAA, ``<id>.npy`` with ``keys`` and ``attn_highres``."""
    voc_root = os.path.dirname(os.path.normpath(args.img_root))
    for im in dataset_list[process_id]:
        image_id = im[:-len(".jpg")]
        labels, _ = parse_voc_xml(os.path.join(voc_root, "Annotations", image_id + ".xml"))
        label_id_list = list(labels)
        image = Image.open(os.path.join(args.img_root, im))
        p = model.visual.conv1.kernel_size[0]
        x, (h, w), size = preprocess(image, p)
        image_features, attn_weight_list = model.encode_image(x, h, w)
        text_features_temp = torch.cat([fg_text_features[label_id_list], bg_text_features], dim=0)
        _, highres = per_class_loop(
            # upstream's shape: the closure is called within this iteration only
            model, lambda: model.forward_last_layer(image_features, text_features_temp), cam,  # noqa: B023
            label_id_list, (h // p, w // p), size, attn_weight_list, 0.4)
        np.save(os.path.join(args.cam_out_dir, im.replace("jpg", "npy")),
                {"keys": np.asarray(label_id_list, dtype=np.int64), "attn_highres": highres})


def split_dataset(dataset, n_splits):
    return [dataset[i::n_splits] for i in range(n_splits)]


def load_model(path):
    """The model as ``clip.load`` returns it on a CPU, behind upstream's interface."""
    state = load_state_dict_file(path)
    return CLIPESStandIn(clip.model.build_model(state).float())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument('--img_root', type=str, default='./VOC2012/JPEGImages')
    parser.add_argument('--split_file', type=str, default='./voc12/train.txt')
    parser.add_argument('--cam_out_dir', type=str, default='./output/cams')
    parser.add_argument('--model', type=str, default='./ViT-B-16.pt')
    parser.add_argument('--num_workers', type=int, default=1)
    args = parser.parse_args()

    train_list = np.loadtxt(args.split_file, dtype=str, ndmin=1)
    train_list = [x + '.jpg' for x in train_list]
    os.makedirs(args.cam_out_dir, exist_ok=True)

    model = load_model(args.model)
    bg_text_features = zeroshot_classifier(BACKGROUND_CATEGORY, ['a clean origami {}.'], model)#...
    fg_text_features = zeroshot_classifier(new_class_names, ['a clean origami {}.'], model)#...

    cam = model.visual.transformer.resblocks[-1].ln_1
    dataset_list = split_dataset(train_list, n_splits=args.num_workers)
    if args.num_workers == 1:
        perform(0, dataset_list, args, model, bg_text_features, fg_text_features, cam)
    else:
        multiprocessing.spawn(perform, nprocs=args.num_workers,
                              args=(dataset_list, args, model, bg_text_features, fg_text_features, cam))
