"""Should the recommended VPL maps keep CLIP-ES's CAA refinement? A choice on validation scenes.

The demo's recommended VPL configuration (region-pooled learning, tau_I 0.1, dense map) keeps
CLIP-ES's CAA refinement, as CLIP-ES does. This script makes that one choice without the
evaluation scenes: it learns the recommended prototypes on the demo's learning split (image-level
labels only), then scores the text-prototype GradCAM and the recommended VPL dense map, each with
and without CAA, on the demo's **validation** scenes (world seed 7, scenes 20,000,000 onwards,
disjoint from the learning and evaluation splits; their masks are used for this choice only).
Rule, fixed before running it: the recommended VPL maps keep CAA unless dropping it raises their
validation seed mIoU; the text rows are reported for reference and choose nothing.

    python benchmarks/caa_choice_validation.py --clip CLIP.pt     # about 2-3 min on 2 cores

Writes benchmarks/results/caa_choice_validation_<checkpoint folder>_<stem>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", default=None, help="demo CLIP checkpoint (default: the shipped one)")
    parser.add_argument("--scenes", type=int, default=300, help="validation scenes (default 300)")
    args = parser.parse_args()

    from vpl_plugin.adapters.clip_es import CLIPESAdapter
    from vpl_plugin.backbones import TrunkCache, load_clip
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.demo import report as demo
    from vpl_plugin.demo.evaluation import evaluate_adapter
    from vpl_plugin.demo.learning import probe_scenes, recommended_prototypes

    start = time.time()
    cfg = demo.DemoConfig()
    ckpt = Path(args.clip) if args.clip else demo.DEFAULT_CHECKPOINT
    encoder = load_clip(str(ckpt), "cpu")
    encoder.trunk_cache = TrunkCache()
    cfg, world, train = demo.learning_split(encoder, cfg)
    val = world.batch(20_000_000, args.scenes)
    text_adapter = CLIPESAdapter(encoder, SYNTHETIC, templates=demo.DEMO_TEMPLATES)
    text = text_adapter.text_prototypes
    region = recommended_prototypes(probe_scenes(text_adapter, train), text, cfg.phi, cfg.lr, cfg.iters)

    rows, table = [], [["map", "CAA", "validation seed mIoU", "validation mask mIoU"]]
    for label, ps, mode in (("text prototypes, GradCAM", text, "gradcam"),
                            ("VPL recommended, dense map", region, "dense")):
        for refine in (True, False):
            ad = CLIPESAdapter(encoder, SYNTHETIC, prototypes=ps, templates=demo.DEMO_TEMPLATES, map_mode=mode,
                               refine=refine)
            ev = evaluate_adapter(ad, val)
            seed, mask = ev.seed, ev.mask
            rows.append({"map": label, "caa": refine, "seed_miou": round(100 * seed, 2),
                         "mask_miou": round(100 * mask, 2)})
            table.append([label, "on" if refine else "off", f"{100 * seed:.1f}", f"{100 * mask:.1f}"])
            print(f"{label:<28s} CAA {'on ' if refine else 'off'} seed {100 * seed:5.1f}  mask {100 * mask:5.1f}",
                  flush=True)
    vpl = {r["caa"]: r["seed_miou"] for r in rows if r["map"].startswith("VPL")}
    choice = "drop CAA" if vpl[False] > vpl[True] else "keep CAA"
    print(f"choice for the recommended VPL maps: {choice}", flush=True)
    result = {"checkpoint": str(ckpt), "train_scenes": cfg.train_scenes, "validation_scenes": args.scenes,
              "rows": rows, "choice": choice, "seconds": round(time.time() - start, 1),
              "command": f"python benchmarks/caa_choice_validation.py --clip {ckpt}"}
    write_results(f"caa_choice_validation_{ckpt.parent.name}_{ckpt.stem}", result, table)


if __name__ == "__main__":
    main()
