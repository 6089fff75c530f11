"""The demo's conclusions across demo CLIPs: the analysis fixed in `results/demo_robustness/PLAN.md`.

Input: one `vpl demo --clip CLIP --out DIR` folder per CLIP (the full demo, not `--quick`), each
holding `report.json` and `confusion.npz` (per-scene confusion matrices of every row). Output:
`benchmarks/results/demo_robustness.json` with, per CLIP, its gates and four rows (CLIP-ES, the
paper-literal VPL row, the best text-prototype row chosen per measure, the recommended VPL row),
seed and mask mIoU with 95 % bootstrap intervals over its evaluation scenes, and the two paired
gains (recommended VPL - best text row; paper-literal VPL - CLIP-ES); across CLIPs, the mean gain
with a two-level bootstrap interval, a Student-t interval over the per-CLIP gains, the smallest
gain, and whether the gain "holds across CLIPs" (every CLIP's paired interval above 0).

    python benchmarks/demo_robustness.py --run seed0=demo_seed0 --run seed1=demo_seed1 \
        --run seed2=demo_seed2 --out benchmarks/results/demo_robustness.json

With fewer than two CLIPs the across-CLIP part is written as null with the reason; with fewer than
the plan's three (``--planned``) the result is marked ``"complete": false`` and its across-CLIP
numbers are interim (the plan's claim rule applies to the full set only).

A run folder may hold ``clip.json`` (``{"checkpoint": NAME, "sha256": HEX, ...}``, written when the
folder is archived): it names the CLIP when the checkpoint itself is no longer on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from vpl_plugin._io import write_text
from vpl_plugin.bootstrap import bootstrap_miou, hierarchical_mean_difference, miou_of_sums, paired_bootstrap

RESAMPLES, SEED = 2000, 0
CLIP_ES = "CLIP-ES (text prototypes)"
PAPER_LITERAL = "CLIP-ES + VPL, paper-literal (halving, GradCAM)"
RECOMMENDED = "VPL region-pooled (tau_I 0.1), dense map, no CAA"
#: the text-prototype rows the plan names (the best of them is chosen per CLIP and per measure)
TEXT_ROWS = ("CLIP-ES (text prototypes)", "text prototypes, GradCAM, no CAA",
             "text prototypes, dense map (control)", "text prototypes, text GradCAM x dense (control)",
             "text shifted by the mean gap (Liang et al.)", "text prototypes with logit scale 1/tau_I only")
MEASURES = ("seed", "mask")


def load_run(folder: Path) -> Tuple[dict, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """``report.json`` and ``{row: (seed confusions (T, n, C, C), mask confusions (n, C, C))}``."""
    report_path, conf_path = folder / "report.json", folder / "confusion.npz"
    for p in (report_path, conf_path):
        if not p.is_file():
            raise SystemExit(f"{p}: missing; run `vpl demo --clip CLIP --out {folder}` (the full demo) first")
    report = json.loads(report_path.read_text())
    with np.load(conf_path, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        conf = {n: (data[f"row{i:02d}_seed"].astype(np.int64), data[f"row{i:02d}_mask"].astype(np.int64))
                for i, n in enumerate(names)}
    missing = [r for r in (CLIP_ES, PAPER_LITERAL, RECOMMENDED) if r not in conf]
    if missing:
        raise SystemExit(f"{conf_path}: rows {missing} missing; was this the full demo?")
    return report, conf


def point(conf: np.ndarray) -> float:
    """mIoU (points) of summed confusions; the best background exponent for ``(T, n, C, C)``."""
    sums = conf.sum(axis=-3)
    return float(100 * np.max(miou_of_sums(sums))) if conf.ndim == 4 else float(100 * miou_of_sums(sums))


def pick(conf: Dict[str, Tuple[np.ndarray, np.ndarray]], m: int, row: str) -> np.ndarray:
    return conf[row][m]


def per_clip(report: dict, conf: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """Gates, the four rows with intervals, and the two paired gains of one CLIP."""
    out: Dict[str, Any] = {"gates": report.get("gates"), "gates_passed": report.get("gates_passed"),
                           "rows": {}, "gains": {}}
    text = [r for r in TEXT_ROWS if r in conf]
    best = {meas: max(text, key=lambda r: point(pick(conf, m, r))) for m, meas in enumerate(MEASURES)}
    for label, rows in (("CLIP-ES", {meas: CLIP_ES for meas in MEASURES}),
                        ("paper-literal VPL", {meas: PAPER_LITERAL for meas in MEASURES}),
                        ("best text-prototype row", best),
                        ("recommended VPL", {meas: RECOMMENDED for meas in MEASURES})):
        entry = {}
        for m, meas in enumerate(MEASURES):
            r = bootstrap_miou(pick(conf, m, rows[meas]), resamples=RESAMPLES, seed=SEED)
            entry[meas] = {"row": rows[meas], "miou": 100 * r["miou"], "ci95": [100 * v for v in r["ci95"]]}
        out["rows"][label] = entry
    for gain, (a, b) in gain_pairs(best).items():
        out["gains"][gain] = {}
        for m, meas in enumerate(MEASURES):
            r = paired_bootstrap(pick(conf, m, a[meas]), pick(conf, m, b[meas]), resamples=RESAMPLES, seed=SEED)
            out["gains"][gain][meas] = {"difference": 100 * r["difference"], "ci95": [100 * v for v in r["ci95"]]}
    return out


def gain_pairs(best: Dict[str, str]) -> Dict[str, Tuple[Dict[str, str], Dict[str, str]]]:
    """The two gains of the plan: row a minus row b, per measure."""
    same = {meas: RECOMMENDED for meas in MEASURES}
    return {"recommended VPL - best text-prototype row": (same, best),
            "paper-literal VPL - CLIP-ES": ({meas: PAPER_LITERAL for meas in MEASURES},
                                            {meas: CLIP_ES for meas in MEASURES})}


def across(runs: Sequence[Tuple[str, Dict[str, Tuple[np.ndarray, np.ndarray]], Dict[str, Any]]]) -> Dict[str, Any]:
    """Mean gain over CLIPs with a two-level bootstrap and a t interval; whether it holds everywhere."""
    from scipy import stats  # only here: the t quantile

    out: Dict[str, Any] = {}
    for gain in ("recommended VPL - best text-prototype row", "paper-literal VPL - CLIP-ES"):
        out[gain] = {}
        for m, meas in enumerate(MEASURES):
            pairs = []
            for _, conf, clip in runs:
                rows = clip["rows"]
                a = rows["recommended VPL" if gain.startswith("recommended") else "paper-literal VPL"][meas]["row"]
                b = rows["best text-prototype row" if gain.startswith("recommended") else "CLIP-ES"][meas]["row"]
                pairs.append((pick(conf, m, a), pick(conf, m, b)))
            h = hierarchical_mean_difference(pairs, resamples=RESAMPLES, seed=SEED)
            per = np.array([clip["gains"][gain][meas]["difference"] for _, _, clip in runs])
            half = float(stats.t.ppf(0.975, len(per) - 1) * per.std(ddof=1) / np.sqrt(len(per)))
            lows = [clip["gains"][gain][meas]["ci95"][0] for _, _, clip in runs]
            out[gain][meas] = {"mean": 100 * h["mean"], "ci95": [100 * v for v in h["ci95"]],
                               "t_ci95": [float(per.mean()) - half, float(per.mean()) + half],
                               "per_clip": per.tolist(), "smallest": float(per.min()),
                               "holds_across_clips": bool(min(lows) > 0)}
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(folder: Path, report: dict) -> Dict[str, Any]:
    """The CLIP a run used: its path (inside the working directory) or name, and its sha256, taken
    from the checkpoint when it is on disk, else from the folder's ``clip.json``."""
    ckpt = Path(str(report.get("checkpoint", "")))
    if ckpt.is_file():
        inside = ckpt.resolve().is_relative_to(Path.cwd())
        return {"checkpoint": str(ckpt.resolve().relative_to(Path.cwd())) if inside else ckpt.name,
                "checkpoint_sha256": sha256(ckpt)}
    card = folder / "clip.json"
    if card.is_file():
        info = json.loads(card.read_text())
        return {"checkpoint": str(info.get("checkpoint", ckpt.name)), "checkpoint_sha256": info.get("sha256")}
    return {"checkpoint": ckpt.name, "checkpoint_sha256": None}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                    help="a CLIP's name and its `vpl demo` output folder (repeat per CLIP)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_robustness.json"))
    ap.add_argument("--planned", type=int, default=3, help="CLIPs the plan needs (default 3)")
    args = ap.parse_args(argv)
    runs: List[Tuple[str, Dict[str, Tuple[np.ndarray, np.ndarray]], Dict[str, Any]]] = []
    result: Dict[str, Any] = {"plan": "benchmarks/results/demo_robustness/PLAN.md", "resamples": RESAMPLES,
                              "seed": SEED, "clips": {}}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        if not folder:
            ap.error(f"--run {spec!r}: expected NAME=DIR")
        report, conf = load_run(Path(folder))
        clip = per_clip(report, conf)
        clip.update(checkpoint_identity(Path(folder), report))
        result["clips"][name] = clip
        runs.append((name, conf, clip))
        for label, gain in clip["gains"].items():
            print(f"{name}: {label}: " + ", ".join(
                f"{m} {g['difference']:+.1f} [{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]" for m, g in gain.items()))
    result["complete"] = len(runs) >= args.planned
    if not result["complete"]:
        result["interim_reason"] = (f"{len(runs)} of the {args.planned} planned CLIPs: across-CLIP numbers are "
                                    f"interim and no gain is said to hold across CLIPs")
    if len(runs) >= 2:
        result["across_clips"] = across(runs)
    else:
        result["across_clips"] = None
        result["across_clips_reason"] = f"{len(runs)} CLIP(s): the plan needs at least two more demo CLIPs"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
