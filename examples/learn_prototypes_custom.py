"""VPL phase 1 in your own code: learn vision prototypes from pixel features and text CAMs.

Runs on the CPU in seconds with made-up features that have a modality gap (text prototypes sit
apart from the image features). Replace `features`, `cams` and `text` with your own:
unit-norm pixel features (n_i, D) per image, per-class CAMs (k_i, n_i) in [0, 1] and the (N, D)
text prototypes (foreground classes first, then background concepts).
"""

import torch

from vpl_plugin import build_targets, learn_vision_prototypes, modality_gap, seeds_from_cams

torch.manual_seed(0)
D, num_fg, num_bg = 32, 3, 2
centres = torch.nn.functional.normalize(torch.randn(num_fg + num_bg, D), dim=1)
gap = torch.nn.functional.normalize(torch.randn(D), dim=0)
text = torch.nn.functional.normalize(centres + 0.8 * gap, dim=1)  # text prototypes, off by a gap

features, targets, candidates, seeds = [], [], [], []
for image in range(40):
    cls = int(torch.randint(num_fg, (1,)))
    bg = num_fg + int(torch.randint(num_bg, (1,)))
    n = 64
    is_fg = torch.rand(n) < 0.4
    x = torch.where(is_fg[:, None], centres[cls], centres[bg]) + 0.3 * torch.randn(n, D)
    x = torch.nn.functional.normalize(x, dim=1)
    cam = (is_fg.float() * 0.8 + 0.2 * torch.rand(n))[None]  # a noisy CAM of the image's class
    q, cand = build_targets(x, text, cam, torch.tensor([cls]), num_fg, phi=0.4, tau_text=0.01)
    features.append(x), targets.append(q), candidates.append(cand)
    seeds.append(torch.where(seeds_from_cams(cam, 0.4) >= 0, cls, -1))

W, history = learn_vision_prototypes(features, targets, text, candidates, tau=0.03, lr=10, iters=300,
                                     return_history=True)
X, S = torch.cat(features), torch.cat(seeds)
print(f"loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f} in {len(history['loss']) - 1} steps "
      f"({history['stopped']})")
print(f"modality gap on foreground seeds: text {modality_gap(X, S, text):.3f} -> vision {modality_gap(X, S, W):.3f}")
