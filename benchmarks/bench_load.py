"""Model loading alone: upstream's ``clip.load`` against ``vpl_plugin``'s ``load_clip``, CPU.

Each measurement is a fresh process that imports torch, clip and vpl-plugin, then times one load
of a random-weight ViT-B/16 in CPU seconds (``time.process_time``, steady on a shared machine)
and wall seconds. Two file formats: a plain ``torch.save`` state dict (``vpl random-clip``, fp32)
and a traced TorchScript archive with fp16 weights and the three integer buffers, the container
of OpenAI's released files (``clip.load`` runs ``torch.jit.load`` on it; ``load_clip`` reads it
as data). Both loaders give the fp16-rounded fp32 model upstream uses on a CPU. Contestants run
in rotation; the ratio is of the medians.

    python benchmarks/bench_load.py [--repeats 5] [--name load]

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from _common import write_results

REPO = Path(__file__).resolve().parent.parent
TIMER = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
c0 = time.process_time()
import torch, clip
from vpl_plugin.backbones.clip import load_clip
c1, w1 = time.process_time(), time.perf_counter()
if sys.argv[1] == "upstream":
    clip.load(sys.argv[2], device="cpu")
else:
    load_clip(sys.argv[2], device="cpu")
print(json.dumps({"imports_cpu": c1 - c0, "load_cpu": time.process_time() - c1,
                  "load_wall": time.perf_counter() - w1}))
"""


def make_files(folder: Path) -> dict:
    """A plain state dict and a traced OpenAI-style archive of the same random ViT-B/16."""
    import torch
    import clip.model as clip_model

    plain = folder / "vitb16.pt"
    subprocess.run([sys.executable, "-m", "vpl_plugin", "random-clip", "--arch", "ViT-B/16", "--out", str(plain)],
                   check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    model = clip_model.build_model(torch.load(str(plain), map_location="cpu", weights_only=True)).float().eval()
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    clip_model.convert_weights(model)  # fp16 conv / linear / projections, as OpenAI's files store them
    inputs = (torch.zeros(1, 3, 224, 224, dtype=torch.float16), torch.zeros(1, 77, dtype=torch.long))
    traced = folder / "vitb16_traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, inputs, check_trace=False).save(str(traced))
    return {"state dict (fp32)": plain, "traced archive (fp16, OpenAI's container)": traced}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="load")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        files = make_files(Path(tmp))
        runs: dict = {(f, who): [] for f in files for who in ("upstream", "ours")}
        for rep in range(args.repeats):
            for (fmt, who) in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                out = subprocess.run([sys.executable, "-c", TIMER, who, str(files[fmt])], env=env, cwd=tmp,
                                     check=True, capture_output=True, text=True).stdout
                runs[(fmt, who)].append(json.loads(out.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("imports_cpu", "load_cpu", "load_wall")}
           for k, v in runs.items()}
    table = [["file", "loader", "load CPU, s (median)", "load wall, s", "imports CPU, s", "upstream / ours (CPU)"]]
    result: dict = {"repeats": args.repeats, "threads": 1, "runs": {f"{f} | {w}": v for (f, w), v in runs.items()},
                    "medians": {f"{f} | {w}": v for (f, w), v in med.items()}, "ratio_cpu": {}}
    for fmt in files:
        ratio = med[(fmt, "upstream")]["load_cpu"] / med[(fmt, "ours")]["load_cpu"]
        result["ratio_cpu"][fmt] = ratio
        for who, label in (("upstream", "clip.load"), ("ours", "load_clip")):
            m = med[(fmt, who)]
            table.append([fmt, label, f"{m['load_cpu']:.2f}", f"{m['load_wall']:.2f}", f"{m['imports_cpu']:.2f}",
                          f"{ratio:.2f}x" if who == "ours" else ""])
    write_results(args.name, result, table)


if __name__ == "__main__":
    main()
