#!/usr/bin/env bash
# One further demo CLIP of the robustness study (benchmarks/results/demo_robustness/PLAN.md):
# train it with the shipped recipe and the given seed, run the full demo with it, archive the demo
# folder under benchmarks/results/demo_robustness/seedN/ and rerun the across-CLIP analysis.
#
#   bash scripts/demo_robustness_seed.sh 2
#
# Everything runs from the code of the study's pinned commit (a detached worktree under runs/),
# whatever main holds now, as the plan requires. About 1 h 45 min of training on 2 CPU cores
# (two threads; keep the machine otherwise idle), then about 8 min of demo. Rerunning the same
# command resumes an interrupted training from its state (runs/robust/clip_seedN.pt.train.pt).
# With a CLIP trained elsewhere (e.g. on a GPU: STEPS=2500 BATCH=128 SEED=N bash
# scripts/gpu_train_demo_clip.sh), put it at runs/robust/clip_seedN.pt first: training is skipped.
set -euo pipefail
SEED="${1:?usage: bash scripts/demo_robustness_seed.sh SEED (1 or 2)}"
PINNED=d551b6475ea9e4fcdcb1ff7844fdeda7c0ca52b5
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CODE="$ROOT/runs/code-${PINNED:0:7}"
RUN="$ROOT/runs/robust"
ARCHIVE="$ROOT/benchmarks/results/demo_robustness"
CLIP="$RUN/clip_seed$SEED.pt"
mkdir -p "$RUN"
[ -d "$CODE" ] || { git -C "$ROOT" worktree prune; git -C "$ROOT" worktree add --detach "$CODE" "$PINNED"; }
cd "$CODE"  # python puts the working folder first on its path: the pinned package, not main's
export PYTHONPATH="$CODE" PYTHONWARNINGS="ignore::UserWarning:clip.clip,ignore::FutureWarning"
python3 -c "import vpl_plugin, sys; sys.exit(0 if vpl_plugin.__file__.startswith('$CODE') else 'not the pinned code')"
if [ -f "$CLIP.curve.json" ] || { [ -f "$CLIP" ] && [ ! -f "$CLIP.train.pt" ]; }; then
    echo "using the trained $CLIP"
else
    python3 -m vpl_plugin train-clip --out "$CLIP" --patch-size 4 --select-every 250 --seed "$SEED"
fi
python3 -m vpl_plugin demo --clip "$CLIP" --out "$RUN/demo_seed$SEED"
mkdir -p "$ARCHIVE/seed$SEED"
cp "$RUN/demo_seed$SEED"/{report.json,report.md,confusion.npz} "$ARCHIVE/seed$SEED/"
[ -f "$CLIP.curve.json" ] && cp "$CLIP.curve.json" "$ARCHIVE/seed$SEED/curve.json"
python3 - "$(sha256sum "$CLIP" | cut -d' ' -f1)" "$SEED" "$PINNED" "$ARCHIVE/seed$SEED/clip.json" <<'PY'
import json, sys
sha, seed, commit, out = sys.argv[1:]
json.dump({"checkpoint": f"clip_seed{seed}.pt", "sha256": sha,
           "trained_by": f"vpl train-clip --out clip_seed{seed}.pt --patch-size 4 --select-every 250 --seed {seed}",
           "demo": f"vpl demo --clip clip_seed{seed}.pt --out DIR", "code_commit": commit},
          open(out, "w"), indent=1)
PY
runs=()
for d in "$ARCHIVE"/seed*/; do runs+=(--run "$(basename "$d")=$d"); done
cd "$ROOT" && unset PYTHONPATH
python3 benchmarks/demo_robustness.py "${runs[@]}"
