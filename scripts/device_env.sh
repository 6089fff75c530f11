# Sourced by the prepared device scripts (benchmarks/gpu_all.sh, scripts/gpu_train_demo_clip.sh) from
# the repository root: installs the carried wheels (.device/wheels, from scripts/prepare_device.sh)
# into /tmp/site, puts this checkout and them on PYTHONPATH, and checks that torch, clip and
# vpl_plugin import. Exits 3 when that fails.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl || exit 3
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# clip-anytorch imports pkg_resources, gone from setuptools >= 81: give it the one name it uses
python3 -c "import pkg_resources" 2>/dev/null || printf 'import packaging, packaging.version  # noqa\n' > /tmp/site/pkg_resources.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU dry run?)"
python3 -c "import torch, clip, vpl_plugin; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 3
