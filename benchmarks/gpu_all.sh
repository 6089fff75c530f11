#!/usr/bin/env bash
# Every GPU measurement of issue 6 in one prepared script, sized for one H100/H200 inside 9 minutes.
# Here, first:   bash scripts/prepare_device.sh        (wheels + a few VOC images into .device/)
# Device call:   command "bash benchmarks/gpu_all.sh", carry [".device"], timeout_s 600
# Results come back under $OUT (gpu.json, gpu.md, log.txt) and are also written to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl || exit 3
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# clip-anytorch imports pkg_resources, gone from setuptools >= 81: give it the one name it uses
python3 -c "import pkg_resources" 2>/dev/null || printf 'import packaging, packaging.version  # noqa\n' > /tmp/site/pkg_resources.py
export VPL_VOC_ROOT="$PWD/.device/voc/VOC2012"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, clip, vpl_plugin; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 3
# the GPU-marked tests first (CUDA fp16 path against the CPU float reference)
timeout 150 python3 -m pytest -q -m gpu tests -p no:cacheprovider || echo "gpu tests: exit $?"
timeout 360 python3 benchmarks/bench_gpu.py --images 48 --batch 8 --pixels 8000000 --iters 100 --out "$OUT" \
    || echo "bench_gpu: exit $?"
