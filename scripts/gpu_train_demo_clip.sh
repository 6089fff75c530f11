#!/usr/bin/env bash
# The GPU path of the demo CLIP: train the demo CLIP with the GPU recipe in one device call (sized
# for one
# H100/H200 inside 9 minutes), scoring the second gate every 250 steps on held-out scenes of the
# training world and keeping the best-scored state.
# Here, first:   bash scripts/prepare_device.sh            (wheels into .device/)
# Device call:   command "bash scripts/gpu_train_demo_clip.sh", carry [".device"], timeout_s 600
# Back here:     $OUT holds demo_clip.pt (16 MB), demo_clip.pt.curve.json and log.txt; then
#                vpl demo --clip <that folder>/demo_clip.pt --out demo_out_gpu
# A run cut by LIMIT resumes on the same warm machine (the training state stays in runs/gpu/);
# whatever happens, the best (or last) saved state is exported to $OUT/demo_clip.pt.
# The shipped CPU recipe with another seed, on the GPU: STEPS=2500 BATCH=128 SEED=1 (same batches).
# CPU dry run:   DEVICE=cpu STEPS=4 BATCH=8 WORKERS=2 SELECT=2 OUT=/tmp/dry bash scripts/gpu_train_demo_clip.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu/out}"; DEVICE="${DEVICE:-cuda}"; STEPS="${STEPS:-6000}"; BATCH="${BATCH:-512}"
WORKERS="${WORKERS:-14}"; SELECT="${SELECT:-250}"; LIMIT="${LIMIT:-520}"; PATCH="${PATCH:-4}"
SEED="${SEED:-0}"
mkdir -p "$OUT" runs/gpu
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
source scripts/device_env.sh
timeout "$LIMIT" python3 -m vpl_plugin train-clip --out runs/gpu/demo_clip.pt --device "$DEVICE" \
    --steps "$STEPS" --batch-size "$BATCH" --workers "$WORKERS" --select-every "$SELECT" --patch-size "$PATCH" \
    --seed "$SEED" --no-progress
echo "train-clip: exit $?"
python3 - "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
from vpl_plugin.demo.train_clip import export_training_state
out, run = Path(sys.argv[1]), Path("runs/gpu")
if (run / "demo_clip.pt").exists() and (run / "demo_clip.pt.curve.json").exists():
    for name in ("demo_clip.pt", "demo_clip.pt.curve.json"):
        shutil.copy(run / name, out / name)
    print("finished run: copied", [p.name for p in out.iterdir()])
elif (run / "demo_clip.pt.train.pt").exists():
    print("unfinished run: exported", export_training_state(run / "demo_clip.pt.train.pt", out / "demo_clip.pt"))
else:
    print("no training state written")
PY
