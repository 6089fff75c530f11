"""Random-weight CLIP ViTs with peaked attention, the test bed for CLIP-ES parity.

With plain random weights the attention of every block is nearly uniform, so the attention
affinity is close to constant and a comparison of refined maps tests little. Scaling the query
and key in-projection weights of the image encoder multiplies every attention logit by
``factor ** 2``: attention becomes peaked as in a trained CLIP and the refined maps have real
dynamic range (checked by :func:`refined_relative_range`).
"""

from __future__ import annotations

import torch

from vpl_plugin.backbones import build_random_clip
from vpl_plugin.cam import affinity_transition, box_mask

#: the tiny architecture of ``conftest.TINY_CLIP``
PEAKED_ARCH = dict(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=64, patch_size=16,
                   transformer_width=64, transformer_heads=1, transformer_layers=2)

#: VOC ids of the shared subset used by the parity tests, with their XML labels (0-based)
PARITY_IMAGES = {"2007_000032": [0, 14], "2007_000039": [19], "2007_000063": [11, 8],
                 "2007_000068": [2]}


def peaked_clip(seed: int = 0, factor: float = 8.0, **arch) -> torch.nn.Module:
    """A random CLIP ViT (fp32, exact weights) whose image-encoder q / k weights are scaled."""
    model = build_random_clip(seed=seed, **{**PEAKED_ARCH, **arch})
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            weight = block.attn.in_proj_weight
            width = weight.shape[1]
            weight[: 2 * width] *= factor
            if block.attn.in_proj_bias is not None:
                block.attn.in_proj_bias[: 2 * width] *= factor
    return model


def refined_relative_range(result, box_threshold: float = 0.4) -> float:
    """Smallest ``(max - min) / max|.|`` over the classes of CAA's refined map before its min-max
    normalisation, for an :func:`vpl_plugin.cam.image_gradcams` result."""
    transition = affinity_transition(result.attention)
    ranges = []
    for cam in result.cams:
        mask = torch.from_numpy(box_mask(cam, box_threshold))
        refined = transition @ (mask * cam).reshape(-1)
        ranges.append(float((refined.max() - refined.min()) / refined.abs().max()))
    return min(ranges)
