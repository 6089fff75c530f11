#!/usr/bin/env bash
# Every pending GPU measurement in one prepared script, sized for one H100/H200 inside 9 minutes.
# Here, first:   bash scripts/prepare_device.sh        (wheels + a few VOC images into .device/)
# Device call:   command "bash benchmarks/gpu_all.sh", carry [".device"], timeout_s 600
# Results come back under $OUT (gpu.json, gpu.md, log.txt) and are also written to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
source scripts/device_env.sh
export VPL_VOC_ROOT="$PWD/.device/voc/VOC2012"
# the GPU-marked tests first (CUDA fp16 path against the CPU float reference)
timeout 150 python3 -m pytest -q -m gpu tests -p no:cacheprovider || echo "gpu tests: exit $?"
timeout 360 python3 benchmarks/bench_gpu.py --images 48 --batch 8 --pixels 8000000 --iters 100 --out "$OUT" \
    || echo "bench_gpu: exit $?"
