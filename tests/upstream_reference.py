"""A slow, literal re-statement of upstream CLIP-ES's CAM loop, written from its
description (``docs/upstream_clip_es.md#how-upstream-computes-a-cam``), used as the oracle the
package is compared against.

One image, one last-block forward and one backward *per class*, the GradCAM target captured by a
forward hook on the last block's ``ln_1`` with a tensor hook for its gradient (as
pytorch-grad-cam does), numpy GradCAM arithmetic, the affinity recomputed per class with its
columns masked, and ``cv2`` for contours and resizing. Nothing here is shared with the package.
"""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _scale(img, target_size=None):
    img = img - np.min(img)
    img = img / (1e-7 + np.max(img))
    if target_size is not None:
        img = cv2.resize(img, target_size)
    return img


def _box_mask(cam, thr):
    gray = np.uint8(cam * 255)
    h, w = gray.shape
    _, binary = cv2.threshold(gray, int(thr * np.max(gray)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    mask = np.zeros((h, w), dtype=np.float32)
    if not contours:
        return mask
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        x1, y1 = min(x + bw, w - 1), min(y + bh, h - 1)
        mask[y:y1, x:x1] = 1
    return mask


def preprocess(image: Image.Image, patch: int):
    """Upstream's no-crop preprocessing: ``(1, 3, H, W)``, ``(H, W)`` padded and ``(w0, h0)``."""
    w0, h0 = image.size
    H, W = math.ceil(h0 / patch) * patch, math.ceil(w0 / patch) * patch
    arr = np.asarray(image.resize((W, H), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(((arr - MEAN) / STD).transpose(2, 0, 1)).unsqueeze(0)
    return x, (H, W), (w0, h0)


def per_class_loop(model, run_last_layer, target_layer, labels, grid, size, trunk_attention,
                   box_thr=0.4, layers=8):
    """Upstream's loop over the classes of one image.

    For every class: ``run_last_layer()`` (the last block and head, returning ``(probs (1, P),
    attn_last)``) with a forward hook on ``target_layer`` and a tensor hook for its gradient, one
    backward of the class probability, numpy GradCAM normalised twice; the affinity from the last
    ``layers`` attention maps at the first class; CAA with the affinity normalisation recomputed
    per class; min-max and ``cv2.resize`` to ``size = (w0, h0)``.

    Returns:
        ``(gradcams (k, h, w) float32, attn_highres (k, h0, w0) float16)``.
    """
    h, w = grid
    gradcams, highres = [], []
    affinity = None
    for j, _label in enumerate(labels):
        store = {}

        # upstream's shape: the hook is registered, used and removed within this iteration
        def hook(_module, _inp, out):
            store["act"] = out  # noqa: B023
            out.register_hook(lambda grad: store.__setitem__("grad", grad))  # noqa: B023

        handle = target_layer.register_forward_hook(hook)
        try:
            probs, attn_last = run_last_layer()
            model.zero_grad()
            probs[0, j].backward(retain_graph=True)
        finally:
            handle.remove()
        act = store["act"][1:].permute(1, 0, 2).reshape(1, h, w, -1).permute(0, 3, 1, 2)
        grad = store["grad"][1:].permute(1, 0, 2).reshape(1, h, w, -1).permute(0, 3, 1, 2)
        act, grad = act.detach().numpy(), grad.detach().numpy()
        weights = np.mean(grad, axis=(2, 3))
        cam = (weights[:, :, None, None] * act).sum(axis=1)
        cam = np.maximum(cam, 0).astype(np.float32)
        cam = _scale(cam[0])
        cam = _scale(cam)
        gradcams.append(cam)
        if j == 0:
            maps = [m[:, 1:, 1:] for m in list(trunk_attention) + [attn_last.detach()]]
            affinity = torch.stack(maps, dim=0)[-layers:].mean(dim=0)[0].float()
        mask = torch.from_numpy(_box_mask(cam, box_thr)).reshape(1, -1)
        trans = affinity / affinity.sum(dim=0, keepdim=True)
        trans = trans / trans.sum(dim=1, keepdim=True)
        for _ in range(2):
            trans = trans / trans.sum(dim=0, keepdim=True)
            trans = trans / trans.sum(dim=1, keepdim=True)
        trans = (trans + trans.t()) / 2
        trans = torch.matmul(trans, trans)
        trans = trans * mask
        refined = torch.matmul(trans, torch.from_numpy(cam).reshape(-1, 1)).reshape(h, w)
        highres.append(_scale(refined.numpy().astype(np.float32), size))
    return np.stack(gradcams), np.stack(highres).astype(np.float16)


def reference_cams(model, image: Image.Image, prototypes_fg, prototypes_bg, labels, logit_scale,
                   box_thr=0.4, layers=8, return_gradcams=False, pos_fp16=False, pos_ulp_shift=0):
    """Upstream-style CAMs of one image. ``model`` is a ``clip.model.CLIP`` (fp32, CPU).

    ``pos_fp16``: store the interpolated positional table in fp16 before adding it, as upstream
    always does (its CPU path: fp16-rounded weights from ``build_model`` plus this cast).
    ``pos_ulp_shift``: move every entry of the fp16 table this many fp16 steps up (a deliberate
    error, to show that a comparison with this oracle is sensitive to the table)."""
    model = copy.deepcopy(model).float().eval()
    visual = model.visual
    blocks = visual.transformer.resblocks
    for p in blocks[-1].ln_1.parameters():
        p.requires_grad_(True)
    p_size = visual.conv1.kernel_size[0]
    x, (H, W), size = preprocess(image, p_size)
    h, w = H // p_size, W // p_size

    x = visual.conv1(x).reshape(1, visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1)
    pos = visual.positional_embedding
    g = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    table = torch.cat([pos[:1], grid.reshape(1, -1, h * w).permute(0, 2, 1)[0]])
    if pos_fp16:
        table = table.half()
    for _ in range(pos_ulp_shift):
        table = torch.nextafter(table.half(), torch.full_like(table.half(), float("inf")))
    x = x + table.to(x.dtype)[None]
    x = visual.ln_pre(x).permute(1, 0, 2)
    attn_list = []
    with torch.no_grad():
        for blk in blocks[:-1]:
            y = blk.ln_1(x)
            a, attn = blk.attn(y, y, y, need_weights=True, attn_mask=None)
            attn_list.append(attn)
            x = x + a
            x = x + blk.mlp(blk.ln_2(x))

    text = torch.cat([prototypes_fg[list(labels)], prototypes_bg], dim=0).float()

    def run_last_layer():
        blk = blocks[-1]
        y = blk.ln_1(x)
        a, attn12 = blk.attn(y, y, y, need_weights=True, attn_mask=None)
        z = x + a
        z = z + blk.mlp(blk.ln_2(z))
        z = visual.ln_post(z.permute(1, 0, 2))
        f = z[:, 1:].mean(dim=1) @ visual.proj
        f = f / f.norm(dim=-1, keepdim=True)
        t = text / text.norm(dim=-1, keepdim=True)
        return ((logit_scale * f) @ t.t()).softmax(dim=-1), attn12

    gradcams, highres = per_class_loop(model, run_last_layer, blocks[-1].ln_1, labels, (h, w), size,
                                       attn_list, box_thr, layers)
    out = {"keys": np.array(list(labels), dtype=np.int64), "attn_highres": highres}
    if return_gradcams:
        out["gradcams"] = gradcams
    return out
