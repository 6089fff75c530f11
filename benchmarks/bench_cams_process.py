"""`vpl cams` against an upstream-interface script, each as a whole process (interpreter start,
imports, model loading, text features, the CAM loop, file writes), on the same images and weights at
upstream parity (``--fp16-compat``), CPU, one thread.

The baseline is ``benchmarks/upstream_cams_script.py`` (the command line and structure of upstream
CLIP-ES's ``generate_cams_voc12.py``, see its docstring). Runs alternate (upstream, ours, ours,
upstream, ...) into fresh output folders after one warm-up of each; the ratio is of the medians.
Wall time and CPU time (user + system, of the child process alone) are both reported: on a machine
shared with other work the CPU time is the steadier of the two, and the load average is recorded
before every run. Each process's own CAM-loop time (printed by both) splits the total into the loop
and everything else. Parity: the CAM files of the two must hold the same keys and maps within
``--tolerance``; every run of ours must write byte-identical files.

Weights: ``--clip`` or, by default, a random-weight ViT-B/16 written by ``vpl random-clip`` into a
temporary folder, with the query and key projections scaled by ``--qk-scale`` (8: peaked
attention, as in a trained CLIP; the refinement then has real dynamic range, which makes the parity
check meaningful). Images: the first ``--images`` ids of the VOC train list.
Writes benchmarks/results/cams_process.{json,md}.

    python benchmarks/bench_cams_process.py [--voc-root VOC2012] [--images 8] [--repeats 5]
        [--clip vitb16.pt] [--vpl-root CHECKOUT] [--name cams_process]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import voc_root, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOP_TIME = re.compile(r"in ([0-9.]+) s")


def make_checkpoint(folder: Path, qk_scale: float, env: dict[str, str]) -> Path:
    """A random ViT-B/16 from ``vpl random-clip`` with the q/k projections scaled by ``qk_scale``."""
    import torch

    path = folder / "vitb16.pt"
    subprocess.run([sys.executable, "-m", "vpl_plugin", "random-clip", "--arch", "ViT-B/16", "--out",
                    str(path)], check=True, env=env, stdout=subprocess.DEVNULL)
    if qk_scale != 1:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key, value in state.items():
            if key.startswith("visual.") and key.endswith("attn.in_proj_weight"):
                width = value.shape[1]
                value[: 2 * width] *= qk_scale
        torch.save(state, str(path))
    return path


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; wall seconds, the child's CPU seconds and peak RSS, its CAM-loop seconds."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    loop = [float(m) for m in LOOP_TIME.findall(out)]
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "max_rss_gb": usage.ru_maxrss / 1024 ** 2,
            "loop_wall": loop[-1] if loop else float("nan"), "load_before": load}


def digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of the ``.npy`` files in ``folder``."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.npy")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def parity(ours: Path, upstream: Path) -> float:
    """Largest |difference| of ``attn_highres`` over the images; raises if keys or files differ."""
    names = sorted(f.name for f in upstream.glob("*.npy"))
    if names != sorted(f.name for f in ours.glob("*.npy")):
        raise SystemExit(f"the two wrote different files: {names} against {sorted(os.listdir(ours))}")
    worst = 0.0
    for name in names:
        a = np.load(upstream / name, allow_pickle=True).item()
        b = np.load(ours / name, allow_pickle=True).item()
        if list(a["keys"]) != list(b["keys"]) or a["attn_highres"].shape != b["attn_highres"].shape:
            raise SystemExit(f"{name}: keys or shapes differ ({a['keys']} against {b['keys']})")
        diff = np.abs(a["attn_highres"].astype(np.float32) - b["attn_highres"].astype(np.float32))
        worst = max(worst, float(diff.max()))
    return worst


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(args, runs: dict[str, list[dict[str, float]]], diff: float, digests: set) -> None:
    up, ours = runs["upstream"], runs["ours"]
    ratio = {k: median(up, k) / median(ours, k) for k in ("wall", "cpu", "loop_wall")}
    outside = {name: statistics.median(r["wall"] - r["loop_wall"] for r in rs) for name, rs in runs.items()}
    loads = [r["load_before"] for rs in runs.values() for r in rs]
    result = {"images": args.images, "repeats": args.repeats, "vpl_root": str(args.vpl_root),
              "vpl_args": args.vpl_args, "runs": runs, "ratio_of_medians": ratio,
              "outside_loop_wall_median": outside, "max_abs_diff_attn_highres": diff,
              "within_tolerance": diff <= args.tolerance, "tolerance": args.tolerance,
              "ours_byte_identical_across_runs": len(digests) == 1, "ours_digest": sorted(digests),
              "load_average_before_runs": {"min": min(loads), "median": statistics.median(loads),
                                           "max": max(loads)}}
    write_results(args.name, result, [
        ["measure (median of runs)", "upstream-interface script", "vpl cams", "ratio"],
        ["process wall, s", f"{median(up, 'wall'):.2f}", f"{median(ours, 'wall'):.2f}", f"{ratio['wall']:.3f}x"],
        ["process CPU, s", f"{median(up, 'cpu'):.2f}", f"{median(ours, 'cpu'):.2f}", f"{ratio['cpu']:.3f}x"],
        ["CAM loop wall, s", f"{median(up, 'loop_wall'):.2f}", f"{median(ours, 'loop_wall'):.2f}",
         f"{ratio['loop_wall']:.3f}x"],
        ["outside the loop wall, s", f"{outside['upstream']:.2f}", f"{outside['ours']:.2f}", ""],
        ["peak RSS, GB", f"{median(up, 'max_rss_gb'):.2f}", f"{median(ours, 'max_rss_gb'):.2f}", ""],
        ["max |difference| of attn_highres", f"{diff:.2e}", "", ""],
        ["load average before runs (min-max)", f"{min(loads):.1f}-{max(loads):.1f}", "", ""],
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc-root", type=Path, default=None, help="VOC2012 folder (default: the shared subset)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clip", type=Path, help="checkpoint (default: a random ViT-B/16, see --qk-scale)")
    ap.add_argument("--qk-scale", type=float, default=8.0)
    ap.add_argument("--vpl-root", type=Path, default=REPO, help="checkout whose vpl_plugin is timed")
    ap.add_argument("--vpl-args", default="--fp16-compat", help="extra `vpl cams` flags (parity)")
    ap.add_argument("--tolerance", type=float, default=1e-2)
    ap.add_argument("--name", default="cams_process", help="results file name")
    args = ap.parse_args()
    root = args.voc_root or voc_root()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ours_env = {**env, "PYTHONPATH": str(args.vpl_root.resolve())}
    with tempfile.TemporaryDirectory(prefix="bench_cams_process_") as tmp:
        work = Path(tmp)
        clip = args.clip or make_checkpoint(work, args.qk_scale, ours_env)
        ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[: args.images]
        split = work / "ids.txt"
        split.write_text("\n".join(ids) + "\n")
        commands = {
            "upstream": lambda out: [sys.executable, str(HERE / "upstream_cams_script.py"), "--img_root",
                                     str(root / "JPEGImages"), "--split_file", str(split), "--model",
                                     str(clip), "--cam_out_dir", str(out)],
            "ours": lambda out: [sys.executable, "-m", "vpl_plugin", "cams", "--clip", str(clip), "--root",
                                 str(root), "--split-file", str(split), "--out", str(out), "--no-progress",
                                 *args.vpl_args.split()],
        }
        envs = {"upstream": env, "ours": ours_env}
        runs: dict[str, list[dict[str, float]]] = {"upstream": [], "ours": []}
        digests = set()
        for rep in range(args.repeats + 1):  # repeat 0 is the warm-up (page cache, bytecode)
            order = ["upstream", "ours"] if rep % 2 == 0 else ["ours", "upstream"]
            for name in order:
                out = work / f"{name}_{rep}"
                r = timed(commands[name](out), envs[name])
                print(f"run {rep} {name:9s} wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s  loop "
                      f"{r['loop_wall']:6.2f} s  load {r['load_before']:.1f}", flush=True)
                if rep:
                    runs[name].append(r)
                if name == "ours":
                    digests.add(digest(out))
        diff = parity(work / f"ours_{args.repeats}", work / f"upstream_{args.repeats}")
    summarise(args, runs, diff, digests)


if __name__ == "__main__":
    main()
