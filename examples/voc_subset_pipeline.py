"""The whole CLIP-ES (+VPL) pipeline on real VOC images, through the `vpl` command, in one script.

Runs, in order: text-prototype CAMs, VPL prototype learning, vision-prototype CAMs, CRF pseudo
masks for both, and evaluation, then prints a Table-1-style comparison and writes it as JSON and
Markdown. Every stage is resumable: rerun the script and finished work is reused.

Without ``--clip`` it uses a *random-weight* CLIP ViT built here (pretrained weights cannot be
downloaded on every machine): the numbers then only show that the pipeline runs end to end, not
what VPL does. Pass OpenAI's ``ViT-B-16.pt`` and a VOC2012 folder to get meaningful numbers.

Usage:
    python examples/voc_subset_pipeline.py                        # shared VOC subset, random CLIP
    python examples/voc_subset_pipeline.py --clip ViT-B-16.pt --voc-root VOC2012 --limit 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vpl_plugin.cli import main as vpl


def find_voc_root(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("VPL_VOC_ROOT"):
        return Path(os.environ["VPL_VOC_ROOT"])
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        cand = folder / "shared" / "data" / "voc2012_subset" / "VOC2012"
        if (cand / "JPEGImages").is_dir():
            return cand
    sys.exit("No VOC data found: pass --voc-root /path/to/VOC2012 or set VPL_VOC_ROOT.")


def run(argv) -> None:
    argv = [str(a) for a in argv]
    print("$ vpl " + " ".join(argv), flush=True)
    code = vpl(argv)
    if code not in (0, 3):
        sys.exit(f"stage failed with exit status {code}: vpl {' '.join(argv)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc-root", help="VOC2012 folder (default: the shared subset or $VPL_VOC_ROOT)")
    ap.add_argument("--clip", help="CLIP checkpoint or model name (default: a random-weight tiny CLIP)")
    ap.add_argument("--split", default="train", help="list under ImageSets/Segmentation (default train)")
    ap.add_argument("--limit", type=int, default=80, help="images to use (0 = all; default 80)")
    ap.add_argument("--iters", type=int, default=3000, help="VPL iterations (default 3000)")
    ap.add_argument("--tau", default="0.03", help="tau_I (default 0.03)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2, help="CRF processes (default 2)")
    ap.add_argument("--out", default="demo_out/voc_subset", help="output folder")
    args = ap.parse_args()

    root = find_voc_root(args.voc_root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = args.clip
    if clip is None:
        clip = out / "random_tiny_clip.pt"
        if not clip.exists():
            run(["random-clip", "--out", clip, "--arch", "tiny", "--seed", "0"])
        print("NOTE: random-weight CLIP: these numbers check the pipeline, they say nothing about VPL.")
    split = root / "ImageSets" / "Segmentation" / f"{args.split}.txt"
    limit = [] if args.limit == 0 else ["--limit", args.limit]
    data = ["--clip", clip, "--root", root, "--split-file", split, "--device", args.device, *limit]
    gt = root / "SegmentationClass"

    rows = {}
    run(["cams", *data, "--out", out / "cams_text"])
    run(["learn", *data, "--out", out / "vpl.pt", "--iters", args.iters, "--tau", args.tau])
    run(["cams", *data, "--out", out / "cams_vpl", "--prototypes", out / "vpl.pt"])
    for name in ("text", "vpl"):
        run(["masks", "--cams", out / f"cams_{name}", "--root", root, "--split-file", split,
             "--out", out / f"masks_{name}", "--workers", args.workers, *limit])
        run(["eval", "--cams", out / f"cams_{name}", "--gt-root", gt, "--split-file", split,
             "--json", out / f"eval_cams_{name}.json", *limit])
        run(["eval", "--masks", out / f"masks_{name}", "--gt-root", gt, "--split-file", split,
             "--json", out / f"eval_masks_{name}.json", *limit])
        seed = json.loads((out / f"eval_cams_{name}.json").read_text())
        mask = json.loads((out / f"eval_masks_{name}.json").read_text())
        rows[name] = {"seed_miou": 100 * seed["miou"], "mask_miou": 100 * mask["miou"],
                      "bg_threshold": seed.get("best_threshold")}

    table = ["| method | seed mIoU | pseudo-mask mIoU |", "|---|---:|---:|"]
    for name, label in (("text", "CLIP-ES (text prototypes)"), ("vpl", "CLIP-ES + VPL")):
        table.append(f"| {label} | {rows[name]['seed_miou']:.1f} | {rows[name]['mask_miou']:.1f} |")
    note = ("random-weight CLIP: pipeline check only" if args.clip is None else f"CLIP: {args.clip}")
    text = f"VOC {args.split} ({args.limit or 'all'} images), {note}\n\n" + "\n".join(table) + "\n"
    (out / "table1.md").write_text(text)
    (out / "table1.json").write_text(json.dumps({"rows": rows, "clip": str(clip), "random_clip": args.clip is None,
                                                 "voc_root": str(root), "limit": args.limit}, indent=2))
    print("\n" + text)
    print(f"results: {out / 'table1.md'}, {out / 'table1.json'}")


if __name__ == "__main__":
    main()
