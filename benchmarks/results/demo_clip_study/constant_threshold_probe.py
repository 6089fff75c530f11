"""Diagnostic: the second gate's map (text GradCAM, no CAA) scored with upstream's constant-background
search (eval_cam.py with --cam_eval_thres < 1: 0.05..0.60) on the demo's 300 evaluation scenes."""
import torch

torch.set_num_threads(1)
from vpl_plugin.adapters.clip_es import CLIPESAdapter
from vpl_plugin.backbones import load_clip
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld
from vpl_plugin.demo import report as demo
from vpl_plugin.demo.evaluation import pil_image
from vpl_plugin.metrics import MeanIoU, auto_thresholds, cams_to_label
enc = load_clip(str(demo.DEFAULT_CHECKPOINT), "cpu")
test = SceneWorld(seed=7).batch(10_000_000, 300)
ad = CLIPESAdapter(enc, SYNTHETIC, templates=demo.DEMO_TEMPLATES, refine=False)
ths = auto_thresholds("constant")
ms = {t: MeanIoU(SYNTHETIC.num_classes) for t in ths}
for sc in test:
    out = ad(pil_image(sc.image), list(sc.labels))
    for t, m in ms.items():
        m.update(cams_to_label(out.attn_highres, out.keys, t, "constant"), sc.mask)
print({t: round(100 * m.compute()["miou"], 1) for t, m in ms.items()})
