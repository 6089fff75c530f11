"""Small phase-2 fixtures shared by the training tests: a synthetic-world export whose ground-truth
masks stand in for pseudo masks, a tiny frozen conv backbone with the backbone protocol of
``vpl_plugin.phase2.backbones`` (no CLIP import), random prototypes and a small decoder."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from torch import nn

SMALL_DECODER = dict(proj_dim=16, dim=32, heads=2, depth=1, ffn_dim=64)


def export_world(root: Path, train: int = 12, val: int = 4, seed: int = 3) -> Path:
    """A VOC-layout synthetic world (64x64 scenes): ``train.txt``, ``val.txt``; masks in
    ``SegmentationClass`` (used as pseudo masks)."""
    from vpl_plugin.data.synthetic import SceneWorld, export_voc

    return export_voc(SceneWorld(seed=seed), root, {"train": (0, train), "val": (10_000, val)})


class PatchBackbone(nn.Module):
    """A frozen stand-in encoder: patchify (patch 8) then ``num_layers - 1`` 1x1 conv + tanh maps."""

    width = 16
    num_layers = 2
    patch_size = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Conv2d(3, self.width, self.patch_size, self.patch_size)
        self.mix = nn.ModuleList([nn.Conv2d(self.width, self.width, 1) for _ in range(self.num_layers - 1)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        t = self.proj(images)
        maps = [t]
        for m in self.mix:
            t = torch.tanh(m(t))
            maps.append(t)
        return maps


def random_prototypes(dim: int = 8, seed: int = 0):
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.prototypes import PrototypeSet

    g = torch.Generator().manual_seed(seed)
    n = len(SYNTHETIC.names) + len(SYNTHETIC.background)
    w = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return PrototypeSet(w, SYNTHETIC.names, SYNTHETIC.background, tau=0.1)


def small_segmenter(seed: int = 0):
    """A :class:`PrototypeSegmenter` on :class:`PatchBackbone` with a 1-layer decoder (seeded)."""
    from vpl_plugin.phase2 import DecoderConfig, build_segmenter

    torch.manual_seed(seed)
    return build_segmenter(PatchBackbone(), random_prototypes(), DecoderConfig(**SMALL_DECODER))
