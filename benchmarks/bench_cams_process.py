"""`vpl cams` against an upstream-interface script, each as a whole process (interpreter start,
imports, model loading, text features, the CAM loop, file writes), on the same images and weights at
upstream parity (the default numerics; ``--vpl-args`` passes ``--fp16-compat``, its accepted alias,
unless told otherwise, e.g. ``--vpl-args "--fp16-compat --keep-subnormals"``), CPU, one thread.

The baseline is ``benchmarks/upstream_cams_script.py`` (the command line and structure of upstream
CLIP-ES's ``generate_cams_voc12.py``, see its docstring). Runs alternate (upstream, ours, ours,
upstream, ...) into fresh output folders after one warm-up of each; the ratio is of the medians.
With ``--baseline-root`` a second checkout of vpl-plugin (e.g. the code before a change) runs as a
third contestant in the same rotation, so before and after are measured under the same load. Each
checkout runs from its own root (``python -m`` imports from the working folder first), and a child
that imports ``vpl_plugin`` from elsewhere stops the benchmark.
Wall time and CPU time (user + system, of the child process alone) are both reported: on a machine
shared with other work the CPU time is the steadier of the two, and the load average is recorded
before every run. Each process's own CAM-loop time (printed by both) splits the total into the loop
and everything else. Parity: the CAM files of the two must hold the same keys and maps within
``--tolerance``; every run of ours must write byte-identical files.

Weights: ``--clip`` or, by default, a random-weight ViT-B/16 written by ``vpl random-clip`` into a
temporary folder, with the query and key projections scaled by ``--qk-scale`` (8: peaked
attention, as in a trained CLIP; the refinement then has real dynamic range, which makes the parity
check meaningful). Images: the first ``--images`` ids of the VOC train list (``--select first``)
or the ``--images`` with the most classes (``--select most-classes``, as ``bench_cams.py`` picks
them; per-class work is where the two differ most).
With ``--upstream-script`` another script with that command line runs as the baseline, from its
own folder (so upstream's original ``generate_cams_voc12.py`` imports the ``clip`` package of its
checkout); ``--upstream-args`` adds its extra flags. Its CAM-loop time is reported only if it
prints ``in N s``. As published, upstream's script picks its device in ``perform`` as
``cuda:{process_id % torch.cuda.device_count()}``, which divides by zero on a machine without a GPU:
for a CPU timing that one device string has to read ``cpu`` (the arithmetic is unchanged); it also
imports ``ttach`` and ``lxml``.
Writes benchmarks/results/NAME.{json,md} (``--name``, default ``cams_process``).

    python benchmarks/bench_cams_process.py [--voc-root VOC2012] [--images 8] [--repeats 5]
        [--select first|most-classes] [--clip vitb16.pt] [--vpl-root CHECKOUT]
        [--baseline-root OLD_CHECKOUT] [--upstream-script generate_cams_voc12.py]
        [--upstream-args "..."] [--name cams_process]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
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


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, float]:
    """Run ``cmd``; wall seconds, the child's CPU seconds and peak RSS, its CAM-loop seconds."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def pick_images(root: Path, count: int, select: str) -> list[str]:
    """The first ``count`` annotated ids of the train list, or the ``count`` with the most distinct
    object classes in their annotations (ties in list order)."""
    ids = [i for i in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
           if (root / "Annotations" / f"{i}.xml").is_file()]  # the upstream script reads the XML
    if select == "first":
        return ids[:count]

    def classes(i: str) -> int:
        objects = ET.parse(root / "Annotations" / f"{i}.xml").getroot().findall("object")
        return len({o.findtext("name", "").strip() for o in objects})

    return sorted(ids, key=lambda i: -classes(i))[:count]


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(args, ids: list[str], runs: dict[str, list[dict[str, float]]], diff: dict[str, float],
              digests: dict[str, set]) -> None:
    up = runs["upstream"]
    ratio = {f"{name}_{k}": median(up, k) / median(rs, k)
             for name, rs in runs.items() if name != "upstream" for k in ("wall", "cpu", "loop_wall")}
    outside = {name: statistics.median(r["wall"] - r["loop_wall"] for r in rs) for name, rs in runs.items()}
    loads = [r["load_before"] for rs in runs.values() for r in rs]
    result = {"images": args.images, "select": args.select, "image_ids": ids, "repeats": args.repeats,
              "vpl_root": str(args.vpl_root), "baseline_root": str(args.baseline_root or ""),
              "upstream_script": str(args.upstream_script), "upstream_args": args.upstream_args,
              "vpl_args": args.vpl_args, "runs": runs, "ratio_upstream_over": ratio,
              "outside_loop_wall_median": outside, "max_abs_diff_attn_highres": diff["ours"],
              "within_tolerance": diff["ours"] <= args.tolerance, "tolerance": args.tolerance,
              "max_abs_diff_attn_highres_of": diff,
              "ours_byte_identical_across_runs": len(digests["ours"]) == 1,
              "byte_identical_across_runs": {k: len(v) == 1 for k, v in digests.items()},
              "digests": {k: sorted(v) for k, v in digests.items()},
              "load_average_before_runs": {"min": min(loads), "median": statistics.median(loads),
                                           "max": max(loads)}}
    table = [["contestant (median of runs)", "process wall, s", "process CPU, s", "CAM loop wall, s",
              "outside the loop wall, s", "peak RSS, GB", "upstream / this: wall, CPU, loop"]]
    for name, rs in runs.items():
        table.append([name, f"{median(rs, 'wall'):.2f}", f"{median(rs, 'cpu'):.2f}",
                      f"{median(rs, 'loop_wall'):.2f}", f"{outside[name]:.2f}",
                      f"{median(rs, 'max_rss_gb'):.2f}",
                      "" if name == "upstream" else " / ".join(
                          f"{ratio[f'{name}_{k}']:.3f}x" for k in ("wall", "cpu", "loop_wall"))])
    differences = "; ".join(f"{name} - upstream {d:.2e}" for name, d in diff.items())
    identical = ", ".join(f"{name} {len(d) == 1}" for name, d in digests.items())
    table.append([f"max abs difference of attn_highres: {differences}; byte-identical across runs: {identical}; "
                  f"load average before runs {min(loads):.1f}-{max(loads):.1f}", "", "", "", "", "", ""])
    write_results(args.name, result, table)


def commands(args, root: Path, split: Path, clip: Path) -> dict:
    script = args.upstream_script.resolve()
    upstream = [sys.executable, str(script), "--img_root", str(root / "JPEGImages"), "--split_file", str(split),
                "--model", str(clip), *args.upstream_args.split(), "--cam_out_dir"]
    ours = [sys.executable, "-m", "vpl_plugin", "cams", "--clip", str(clip), "--root", str(root),
            "--split-file", str(split), "--no-progress", *args.vpl_args.split(), "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # `python -m` puts its working folder first on sys.path: each checkout runs from its own root
    roots = {"ours": args.vpl_root.resolve()}
    if args.baseline_root:
        roots["baseline"] = args.baseline_root.resolve()
    out = {"upstream": (upstream, env, script.parent)}
    for name, root_dir in roots.items():
        child_env = {**env, "PYTHONPATH": str(root_dir)}
        check_imported_from(root_dir, child_env)
        out[name] = (ours, child_env, root_dir)
    return out


def check_imported_from(root_dir: Path, env: dict[str, str]) -> None:
    """Refuse to time a checkout whose ``vpl_plugin`` is not the one the child process imports."""
    child = subprocess.run([sys.executable, "-c", "import vpl_plugin; print(vpl_plugin.__file__)"], env=env,
                           cwd=root_dir, capture_output=True, text=True)
    found = child.stdout.strip() if child.returncode == 0 else "nowhere (the import failed)"
    if child.returncode != 0 or not Path(found).resolve().is_relative_to(root_dir):
        raise SystemExit(f"a process started in {root_dir} imports vpl_plugin from {found}, not from that "
                         f"checkout; give the folder that holds its vpl_plugin/.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc-root", type=Path, default=None, help="VOC2012 folder (default: the shared subset)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--select", choices=["first", "most-classes"], default="first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (page cache)")
    ap.add_argument("--clip", type=Path, help="checkpoint (default: a random ViT-B/16, see --qk-scale)")
    ap.add_argument("--qk-scale", type=float, default=8.0)
    ap.add_argument("--vpl-root", type=Path, default=REPO, help="checkout whose vpl_plugin is timed")
    ap.add_argument("--baseline-root", type=Path, help="another checkout, timed as a third contestant")
    ap.add_argument("--upstream-script", type=Path, default=HERE / "upstream_cams_script.py",
                    help="the baseline script (default: the upstream-interface script here)")
    ap.add_argument("--upstream-args", default="", help="extra flags of the baseline script")
    ap.add_argument("--vpl-args", default="--fp16-compat", help="extra `vpl cams` flags (parity)")
    ap.add_argument("--tolerance", type=float, default=1e-2)
    ap.add_argument("--name", default="cams_process", help="results file name")
    args = ap.parse_args()
    root = args.voc_root or voc_root()
    with tempfile.TemporaryDirectory(prefix="bench_cams_process_") as tmp:
        work = Path(tmp)
        base_env = {**os.environ, "PYTHONPATH": str(args.vpl_root.resolve())}
        clip = args.clip or make_checkpoint(work, args.qk_scale, base_env)
        ids = pick_images(root, args.images, args.select)
        split = work / "ids.txt"
        split.write_text("\n".join(ids) + "\n")
        cmds = commands(args, root, split, clip)
        names = list(cmds)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        digests: dict[str, set] = {name: set() for name in names if name != "upstream"}
        for rep in range(args.warmup + args.repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
            for name in order:
                out = work / f"{name}_{rep}"
                cmd, env, cwd = cmds[name]
                r = timed([*cmd, str(out)], env, cwd)
                print(f"run {rep} {name:9s} wall {r['wall']:6.2f} s  cpu {r['cpu']:6.2f} s  loop "
                      f"{r['loop_wall']:6.2f} s  load {r['load_before']:.1f}", flush=True)
                if rep >= args.warmup:
                    runs[name].append(r)
                if name != "upstream":
                    digests[name].add(digest(out))
                if rep < args.warmup + args.repeats - 1:
                    shutil.rmtree(out)
        last = args.warmup + args.repeats - 1
        diff = {name: parity(work / f"{name}_{last}", work / f"upstream_{last}") for name in digests}
    summarise(args, ids, runs, diff, digests)


if __name__ == "__main__":
    main()
