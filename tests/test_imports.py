"""The core imports with torch and numpy alone; optional packages fail with the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vpl_plugin._imports import require

BLOCK = """
import sys
for name in ("clip", "cv2", "PIL", "pydensecrf", "matplotlib", "yaml", "timm"):
    sys.modules[name] = None  # importing it now raises ImportError
import vpl_plugin, vpl_plugin.prototypes, vpl_plugin.metrics, vpl_plugin.cli
import torch
x = torch.nn.functional.normalize(torch.randn(50, 4), dim=-1)
w = vpl_plugin.learn_vision_prototypes(x, torch.softmax(torch.randn(50, 3), -1), torch.eye(3, 4), iters=3)
print(tuple(w.shape))
try:
    vpl_plugin.build_random_clip()
except ImportError as err:
    print("ERR", err)
"""


def test_core_imports_without_optional_packages():
    proc = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(3, 4)" in proc.stdout
    assert "pip install 'vpl-plugin[clip]'" in proc.stdout


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"vpl-plugin\[crf\]"):
        require_missing = dict(sys.modules)
        sys.modules["pydensecrf.densecrf"] = None
        try:
            require("pydensecrf.densecrf")
        finally:
            sys.modules.clear()
            sys.modules.update(require_missing)
