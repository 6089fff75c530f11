"""VPL Table 3 (rows I-VI) style ablation on the demo world, on CPU, through the `vpl` command.

Rows (mIoU on the held-out evaluation scenes of the synthetic world, world seed 7 as `vpl demo`):

    I    text prototypes: CLIP-ES CAM seeds (`vpl cams`, GradCAM + CAA)
    II   vision prototypes: VPL CAM seeds (recommended configuration: region-pooled learning at
         tau_I 0.1, dense map)
    III  II + CRF: pseudo masks (`vpl masks`, CLIP-ES CRF, confidence 0.95 -> ignored in scoring)
    IV   decoder trained with L_CE on the VPL pseudo masks of the training scenes (`vpl train
         --lambda-rsc 0`), `vpl segment` without CRF
    V    decoder trained with L_CE + L_RSC (`vpl train`), `vpl segment` without CRF
    VI   V + CRF (`vpl segment --crf`)

Everything runs in-process through `vpl_plugin.cli.main`; the commands are recorded with their
wall time. The paper's rows (VOC val, ViT-B/16, 30k iterations on 8 GPUs) are printed beside for
orientation only: this is another world, a 16 MB CLIP and a few hundred CPU iterations.

    python benchmarks/phase2_demo_ablation.py                       # ~10 min on 2 cores
    python benchmarks/phase2_demo_ablation.py --quick               # smoke run (~2 min)
    python benchmarks/phase2_demo_ablation.py --iters 3000 --train-scenes 2000   # longer

Writes benchmarks/results/phase2_ablation.json and .md (the --quick run writes
phase2_ablation_quick.*), and keeps the intermediate folders under --work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from vpl_plugin.cli import main as vpl  # noqa: E402
from vpl_plugin.data.synthetic import SceneWorld, export_voc  # noqa: E402

DEMO_CLIP = Path(__file__).resolve().parents[1] / "vpl_plugin" / "demo" / "assets" / "demo_clip.pt"
TEMPLATE = "a photo of a {}."  # the demo's prompt (vpl_plugin.demo.report.DEMO_TEMPLATES)
PAPER = {"I": 63.3, "II": 68.2, "III": 71.3, "III_all": None, "IV": 75.5, "IV_crf": None, "V": 77.2,
         "VI": 78.5}


class Runner:
    """Runs `vpl` commands in-process, records each command line and its wall time.

    Every `vpl` stage skips finished outputs, so a rerun (e.g. with another --rsc-tau) only computes
    what is new; the time of a step that completed before is the time it took then (``work/steps.json``,
    marked ``"reused": true``).
    """

    def __init__(self, work: Path) -> None:
        self.steps: List[Dict[str, Any]] = []
        self.log = work / "steps.json"
        self.done = {s["command"]: s for s in json.loads(self.log.read_text())} if self.log.exists() else {}

    def __call__(self, name: str, *argv: str, allow: tuple = (0,)) -> float:
        line = "vpl " + " ".join(shlex.quote(str(a)) for a in argv)
        print(f"\n[{name}] {line}", flush=True)
        t0 = time.perf_counter()
        code = vpl([str(a) for a in argv])
        seconds = time.perf_counter() - t0
        if code not in allow:
            raise SystemExit(f"step {name!r} failed with exit status {code}: {line}")
        before = self.done.get(line)
        step = {"step": name, "command": line, "seconds": round(seconds, 1), "exit": code}
        if before is not None:
            step.update(seconds=before["seconds"], reused=True)
        self.steps.append(step)
        self.done[line] = step
        self.log.write_text(json.dumps(list(self.done.values()), indent=1) + "\n")
        print(f"[{name}] {seconds:.1f} s", flush=True)
        return seconds


def _miou(path: Path) -> float:
    return 100.0 * json.loads(path.read_text())["miou"]


def run(work: Path, *, train_scenes: int, eval_scenes: int, iters: int, crop: int, batch: int,
        world_seed: int, clip: Path, progress: bool, segment_flags: Optional[List[str]] = None,
        rsc_taus: Sequence[float] = ()) -> Dict[str, Any]:
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    run_ = Runner(work)
    root = work / "world"
    t0 = time.perf_counter()
    export_voc(SceneWorld(seed=world_seed), root, {"train": (0, train_scenes),
                                                   "val": (10_000_000, eval_scenes)})
    export_s = time.perf_counter() - t0
    gt = root / "SegmentationClass"
    quiet = [] if progress else ["--no-progress"]
    data = ["--dataset", "synthetic", "--clip", clip, "--root", root, "--template", TEMPLATE]
    ev = ["eval", "--dataset", "synthetic", "--gt-root", gt, *quiet]

    # phase 1: vision prototypes (recommended configuration) on the training scenes' labels
    run_("learn", "learn", *data, "--split-file", "train.txt", "--out", work / "vpl.pt",
         "--pooling", "region", "--tau", "0.1", *quiet)
    # rows I-III on the evaluation scenes
    run_("cams text (val)", "cams", *data, "--split-file", "val.txt", "--out", work / "cams_text_val", *quiet)
    run_("eval I", *ev, "--cams", work / "cams_text_val", "--split-file", root / "ImageSets/Segmentation/val.txt",
         "--json", work / "I.json")
    run_("cams VPL (val)", "cams", *data, "--split-file", "val.txt", "--prototypes", work / "vpl.pt",
         "--map-mode", "dense", "--out", work / "cams_vpl_val", *quiet)
    run_("eval II", *ev, "--cams", work / "cams_vpl_val", "--split-file", root / "ImageSets/Segmentation/val.txt",
         "--json", work / "II.json")
    run_("masks (val)", "masks", "--cams", work / "cams_vpl_val", "--root", root, "--split-file",
         root / "ImageSets/Segmentation/val.txt", "--out", work / "masks_val", *quiet)
    run_("eval III", *ev, "--masks", work / "masks_val", "--split-file", root / "ImageSets/Segmentation/val.txt",
         "--json", work / "III.json")
    # the same CRF masks without the confidence filter: every pixel labelled, as the decoder rows
    run_("masks (val, all pixels)", "masks", "--cams", work / "cams_vpl_val", "--root", root, "--split-file",
         root / "ImageSets/Segmentation/val.txt", "--conf", 0, "--out", work / "masks_val_all", *quiet)
    run_("eval III all", *ev, "--masks", work / "masks_val_all", "--split-file",
         root / "ImageSets/Segmentation/val.txt", "--json", work / "III_all.json")
    # pseudo masks of the training scenes (phase 1e) and their quality
    run_("cams VPL (train)", "cams", *data, "--split-file", "train.txt", "--prototypes", work / "vpl.pt",
         "--map-mode", "dense", "--out", work / "cams_vpl_train", *quiet)
    run_("masks (train)", "masks", "--cams", work / "cams_vpl_train", "--root", root, "--split-file",
         root / "ImageSets/Segmentation/train.txt", "--out", work / "pseudo_train", *quiet)
    run_("eval pseudo (train)", *ev, "--masks", work / "pseudo_train", "--split-file",
         root / "ImageSets/Segmentation/train.txt", "--json", work / "pseudo_train.json")

    # phase 2: the decoder, CE only and CE + RSC, same seed and schedule
    train_common = ["train", "--dataset", "synthetic", "--clip", clip, "--root", root, "--split-file",
                    "train.txt", "--masks", work / "pseudo_train", "--prototypes", work / "vpl.pt",
                    "--crop", crop, "--iters", iters, "--batch-size", batch, "--checkpoint-every",
                    max(1, iters // 4), "--workers", 0, "--seed", 0, "--val-split-file", "val.txt",
                    "--eval-every", max(1, iters // 6), "--val-limit", min(100, eval_scenes), *quiet]
    run_("train CE", *train_common, "--lambda-rsc", 0, "--out", work / "dec_ce")
    # rows V-VI: the literal reading of Eq. 13 (tau_RSC 0.01), stated explicitly because `vpl train`
    # defaults to 0.07 (0.01 collapsed to all background on this world; README, phase 2)
    run_("train CE+RSC", *train_common, "--tau-rsc", 0.01, "--out", work / "dec_ce_rsc")
    seg = ["segment", "--root", root, "--split-file", "val.txt", "--dataset", "synthetic",
           *(segment_flags or []), *quiet]
    run_("segment IV", *seg, "--checkpoint", work / "dec_ce" / "segmenter.pt", "--out", work / "seg_IV")
    run_("segment V", *seg, "--checkpoint", work / "dec_ce_rsc" / "segmenter.pt", "--out", work / "seg_V")
    run_("segment VI", *seg, "--checkpoint", work / "dec_ce_rsc" / "segmenter.pt", "--crf",
         "--out", work / "seg_VI")
    # not in the paper's table: CE only + CRF, to separate what RSC adds from what the CRF adds
    run_("segment IV+CRF", *seg, "--checkpoint", work / "dec_ce" / "segmenter.pt", "--crf",
         "--out", work / "seg_IV_crf")
    extra_rows = []
    for tau in rsc_taus:  # sensitivity of rows V-VI to the RSC temperature (docs/vpl.md#loss)
        tag = f"tau{tau:g}"
        run_(f"train CE+RSC {tag}", *train_common, "--tau-rsc", tau, "--out", work / f"dec_ce_rsc_{tag}")
        ckpt = work / f"dec_ce_rsc_{tag}" / "segmenter.pt"
        run_(f"segment V {tag}", *seg, "--checkpoint", ckpt, "--out", work / f"seg_V_{tag}")
        run_(f"segment VI {tag}", *seg, "--checkpoint", ckpt, "--crf", "--out", work / f"seg_VI_{tag}")
        extra_rows += [(f"V_{tag}", f"+ decoder, L_CE + L_RSC, tau_RSC {tau:g}"),
                       (f"VI_{tag}", f"V (tau_RSC {tau:g}) + CRF")]
    for row in ("IV", "IV_crf", "V", "VI", *(r for r, _ in extra_rows)):
        run_(f"eval {row}", *ev, "--masks", work / f"seg_{row}", "--split-file",
             root / "ImageSets/Segmentation/val.txt", "--json", work / f"{row}.json")

    names = {
        "I": "text prototypes (CLIP-ES seeds)",
        "II": "vision prototypes (VPL seeds; region-pooled, tau_I 0.1, dense map)",
        "III": "II + CRF (pseudo masks; confidence < 0.95 left out of the score)",
        "III_all": "II + CRF, every pixel scored (no confidence filter)",
        "IV": "+ decoder, L_CE",
        "IV_crf": "IV + CRF (not a paper row)",
        "V": "+ decoder, L_CE + L_RSC",
        "VI": "V + CRF",
    }
    names.update(dict(extra_rows))
    rows = [{"row": r, "name": names[r], "miou": round(_miou(work / f"{r}.json"), 2),
             "paper_voc_val": PAPER.get(r)} for r in names]
    curves = {}
    for tag in ("dec_ce", "dec_ce_rsc", *(f"dec_ce_rsc_{r[2:]}" for r, _ in extra_rows if r.startswith("V_"))):
        c = json.loads((work / tag / "curves.json").read_text())
        curves[tag] = {"first": c["train"][0], "last": c["train"][-1],
                       "val_miou_single_scale": [(p["iteration"], round(100 * p["miou"], 2)) for p in c["val"]]}
    return {
        "rows": rows,
        "pseudo_masks_train_miou": round(_miou(work / "pseudo_train.json"), 2),
        "settings": {"world_seed": world_seed, "train_scenes": train_scenes, "eval_scenes": eval_scenes,
                     "iters": iters, "crop": crop, "batch_size": batch, "clip": str(clip),
                     "torch_threads": torch.get_num_threads(), "segment_flags": segment_flags or []},
        "curves": curves,
        "export_seconds": round(export_s, 1),
        "steps": run_.steps,
        "this_invocation_seconds": round(time.perf_counter() - start, 1),
        "total_seconds": round(export_s + sum(st["seconds"] for st in run_.steps), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/phase2_ablation"), help="intermediate files")
    ap.add_argument("--train-scenes", type=int, default=1000)
    ap.add_argument("--eval-scenes", type=int, default=300)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--clip", type=Path, default=DEMO_CLIP)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for 64x64 scenes)")
    ap.add_argument("--quick", action="store_true", help="200/100 scenes, 100 iterations")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--rsc-tau", type=float, action="append", default=[], metavar="TAU",
                    help="also train CE + RSC with this RSC temperature (rows V-VI again; repeat)")
    ap.add_argument("--segment-flag", action="append", default=[], metavar="FLAG",
                    help="extra flag for `vpl segment` (repeat), e.g. --segment-flag=--no-flip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_scenes, args.eval_scenes, args.iters = 200, 100, 100
    result = run(args.work, train_scenes=args.train_scenes, eval_scenes=args.eval_scenes, iters=args.iters,
                 crop=args.crop, batch=args.batch_size, world_seed=args.world_seed, clip=args.clip,
                 progress=args.progress, segment_flags=args.segment_flag, rsc_taus=args.rsc_tau)
    result["command"] = "python benchmarks/phase2_demo_ablation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = [["row", "setting", "mIoU (demo world)", "paper (VOC val)"]]
    table += [[r["row"].replace("_all", " (all pixels)").replace("_tau", " tau ").replace("_crf", " + CRF"),
               r["name"], f"{r['miou']:.1f}",
               "-" if r["paper_voc_val"] is None else f"{r['paper_voc_val']:.1f}"] for r in result["rows"]]
    table.append(["-", "pseudo masks of the training scenes (decoder targets)",
                  f"{result['pseudo_masks_train_miou']:.1f}", "-"])
    write_results("phase2_ablation_quick" if args.quick else "phase2_ablation", result, table)
    for step in result["steps"]:
        print(f"{step['seconds']:8.1f} s  {step['step']}")
    print(f"total {result['total_seconds']:.0f} s (sum of the steps' first executions; this invocation "
          f"{result['this_invocation_seconds']:.0f} s); command: {result['command']}")


if __name__ == "__main__":
    main()
