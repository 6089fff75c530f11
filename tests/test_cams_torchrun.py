"""`vpl cams` under torchrun: two CPU processes (gloo) share the list and write what one process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from voc_helpers import FOUR_IDS, copy_voc_layout  # noqa: E402

from vpl_plugin.cli import EXIT_PARTIAL  # noqa: E402
from vpl_plugin.pipeline import RunSummary, merge_summaries  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_merge_summaries_orders_failures_like_one_process():
    ids = ["a", "b", "c", "d", "e"]
    rank0 = RunSummary(total=3, done=1, skipped_existing=1, failed=[("e", "gone")], seconds=1.5)
    rank1 = RunSummary(total=2, done=1, failed=[("b", "bad")], seconds=2.5)
    merged = merge_summaries([rank0, rank1], ids)
    assert (merged.total, merged.done, merged.skipped_existing, merged.seconds) == (5, 2, 1, 2.5)
    assert merged.failed == [("b", "bad"), ("e", "gone")]


@pytest.mark.slow
def test_two_gloo_ranks_write_the_files_of_one_process(voc_root, tiny_checkpoint, tmp_path):
    root = copy_voc_layout(voc_root, tmp_path / "data")
    # five lines, one of them unusable: the failure must be reported once, in list order
    split = root / "ImageSets/Segmentation/train.txt"
    split.write_text("\n".join(FOUR_IDS[:2] + ["no_such_image"] + FOUR_IDS[2:]) + "\n")
    common = ["cams", "--clip", str(tiny_checkpoint), "--root", str(root), "--split-file", str(split),
              "--no-progress"]

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # torchrun's per-rank default; the one-process run uses the same

    def run(prefix, out):
        return subprocess.run([sys.executable, *prefix, "-m", "vpl_plugin", *common, "--out", str(out)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    one, two = tmp_path / "one", tmp_path / "two"
    single = run([], one)
    assert single.returncode == EXIT_PARTIAL, single.stderr[-3000:]
    proc = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())], two)
    # every rank exits 3 (one image skipped); torchrun reports that as a failed job
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]

    npy_one = sorted(p.name for p in one.glob("*.npy"))
    assert npy_one == sorted(f"{i}.npy" for i in FOUR_IDS)
    assert sorted(p.name for p in two.glob("*.npy")) == npy_one
    for name in npy_one:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name

    s1 = json.loads((one / "vpl_cams_summary.json").read_text())
    s2 = json.loads((two / "vpl_cams_summary.json").read_text())
    assert s2.pop("world_size") == 2
    for key in ("total", "done", "skipped_existing", "failed"):
        assert s2[key] == s1[key], key
    assert [f["id"] for f in s2["failed"]] == ["no_such_image"]
    assert not list(two.glob("*rank*"))  # one summary, written by rank 0
    assert proc.stdout.count("vpl cams:") == 1  # rank 0 reports, once
