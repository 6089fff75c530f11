#!/usr/bin/env bash
# Install vpl-plugin and everything it needs on a fresh machine (measured set-up of this project).
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build from the index, and a
# torchvision beside torch 2.13 fails to import.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install --quiet torch==2.14.1 torchvision==0.29.1
$PY -m pip install --quiet "setuptools<81" clip-anytorch pydensecrf2 opencv-python-headless timm
$PY -m pip install --quiet -e ".[dev]"
$PY -c "import torch, clip, cv2, matplotlib, pydensecrf.densecrf, vpl_plugin; print('vpl-plugin', vpl_plugin.__version__, 'with torch', torch.__version__)" 2>&1 | grep -v -i "pkg_resources\|from pkg_resources"
