"""A stand-in for upstream CLIP-ES's modified CLIP model, written from the published description
(``docs/upstream_clip_es.md#the-image-forward``), not copied from CLIP-ES.

It shares the modules and parameters of an OpenAI ``clip.model.CLIP`` (same names: ``visual.conv1``,
``visual.transformer.resblocks[i].ln_1`` ..., ``logit_scale``) and adds upstream's interface:

* ``encode_image(image, H, W)`` -> tokens after the first ``L-1`` blocks ``(L, 1, width)`` (computed
  without gradient) and the list of their head-averaged attention maps ``(1, L, L)``;
* ``forward_last_layer(image_features, text_features)`` -> ``(probs (1, P), attn (1, L, L))``: the
  last block (with gradient), ``ln_post`` on all tokens, mean of the patch tokens, ``proj``, both
  sides L2-normalised, ``logit_scale.exp() * f`` times the text features, softmax.

The positional table is interpolated bilinearly to the token grid
(``docs/upstream_clip_es.md#positional-table``) and stored in fp16, as upstream does on every
device (``pos_fp16=False`` leaves out the cast). Calls of ``encode_image`` /
``forward_last_layer`` are counted (``calls``) so tests can check that the drop-in API never uses
them.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class CLIPESStandIn(nn.Module):
    """Upstream CLIP-ES's model interface over the modules of an OpenAI ``clip.model.CLIP``.

    Args:
        clip_model: a ``clip.model.CLIP`` ViT; its submodules and parameters are shared, so the
            stand-in's ``state_dict`` has CLIP's keys.
        pos_fp16: store the interpolated positional table in fp16 (upstream).
    """

    def __init__(self, clip_model: nn.Module, pos_fp16: bool = True) -> None:
        super().__init__()
        self.pos_fp16 = pos_fp16
        for name, child in clip_model.named_children():
            setattr(self, name, child)
        for name, param in clip_model.named_parameters(recurse=False):
            setattr(self, name, param)
        self.context_length = getattr(clip_model, "context_length", 77)
        self.calls = {"encode_image": 0, "forward_last_layer": 0}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def _position_table(self, h: int, w: int) -> torch.Tensor:
        pos = self.visual.positional_embedding
        g = int(round(math.sqrt(pos.shape[0] - 1)))
        patch = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)
        patch = patch.reshape(1, -1, h * w).permute(0, 2, 1)[0]
        table = torch.cat([pos[:1].float(), patch], dim=0)
        return table.half() if self.pos_fp16 else table

    @staticmethod
    def _run_block(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = block.ln_1(x)  # a module call: forward hooks on ln_1 (GradCAM's target) fire here
        a, attn = block.attn(y, y, y, need_weights=True, attn_mask=block.attn_mask)
        x = x + a
        x = x + block.mlp(block.ln_2(x))
        return x, attn

    def encode_image(self, image: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(1, 3, H, W)`` -> trunk tokens ``(L, 1, width)`` and ``L-1`` attention maps."""
        self.calls["encode_image"] += 1
        v = self.visual
        p = v.conv1.kernel_size[0]
        h, w = H // p, W // p
        x = v.conv1(image.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                            device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self._position_table(h, w).to(x.dtype)
        x = v.ln_pre(x).permute(1, 0, 2)
        maps = []
        with torch.no_grad():
            for block in v.transformer.resblocks[:-1]:
                x, attn = self._run_block(block, x)
                maps.append(attn)
        return x, maps

    def forward_last_layer(self, image_features: torch.Tensor,
                           text_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last block and head: ``(probs (1, P), attention (1, L, L))``."""
        self.calls["forward_last_layer"] += 1
        v = self.visual
        x, attn = self._run_block(v.transformer.resblocks[-1], image_features)
        x = v.ln_post(x.permute(1, 0, 2))
        f = x[:, 1:].mean(dim=1) @ v.proj
        f = f / f.norm(dim=-1, keepdim=True)
        t = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = (self.logit_scale.exp() * f) @ t.t()
        return logits.softmax(dim=-1), attn

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """OpenAI CLIP's text encoder (unchanged upstream)."""
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
