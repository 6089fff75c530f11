"""The example scripts run as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_learning_example_shrinks_the_gap():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "learn_prototypes_custom.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [row for row in proc.stdout.splitlines() if row.startswith("modality gap")][0]
    text_gap, vision_gap = (float(v) for v in line.replace("->", " ").split()[-3::2])
    assert vision_gap < text_gap


def test_voc_pipeline_example_writes_its_table(voc_root, tmp_path):
    pytest.importorskip("pydensecrf", reason="pydensecrf2 is needed for CRF pseudo masks")
    pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "voc_subset_pipeline.py"), "--voc-root", str(voc_root),
                           "--limit", "4", "--iters", "20", "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((out / "table1.json").read_text())
    assert set(table["rows"]) == {"text", "vpl"} and table["random_clip"] is True
    assert "| CLIP-ES + VPL |" in (out / "table1.md").read_text()
