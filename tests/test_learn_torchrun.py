"""`vpl learn` under torchrun: two CPU processes (gloo) share the feature pass and the learning and
write the prototypes of one process, bit for bit (with the feature cache); a run whose rank is
killed in the feature pass resumes to the same prototypes.

Every test starts processes that import torch and CLIP (10-30 s each on a shared 2-core machine),
so they are marked slow: `pytest -m slow tests/test_learn_torchrun.py`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from voc_helpers import copy_voc_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGES = 12
CONFIGS = {  # flags, and a --chunk-size that cuts the set into several chunks
    "token": ["--chunk-size", "1000"],
    "region": ["--pooling", "region", "--tau", "0.1", "--chunk-size", "7"],
    "max_tokens": ["--max-tokens", "2000", "--memmap", "--chunk-size", "300"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # torchrun's per-rank default; the one-process run uses the same
    return env


def _torchrun() -> List[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


@pytest.fixture(scope="module")
def voc12(voc_root, tmp_path_factory) -> Path:
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:IMAGES]
    return copy_voc_layout(voc_root, tmp_path_factory.mktemp("voc12"), ids)


def _command(root: Path, checkpoint: Path, out: Path, flags: List[str]) -> List[str]:
    return ["-m", "vpl_plugin", "learn", "--clip", str(checkpoint), "--root", str(root), "--split-file",
            str(root / "ImageSets/Segmentation/train.txt"), "--no-progress", "--out", str(out), *flags]


def _run(prefix: List[str], command: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, *command], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _prototypes(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def one_process(voc12, tiny_checkpoint, tmp_path_factory):
    """Prototypes of one process for each configuration (computed when first asked for)."""
    folder = tmp_path_factory.mktemp("one")
    done = {}

    def get(name: str) -> Path:
        if name not in done:
            out = folder / name / "p.pt"
            proc = _run([], _command(voc12, tiny_checkpoint, out, CONFIGS[name]), folder)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[name] = out
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_gloo_ranks_learn_the_prototypes_of_one_process(name, voc12, tiny_checkpoint, tmp_path,
                                                             one_process):
    out = tmp_path / "p.pt"
    proc = _run(_torchrun(), _command(voc12, tiny_checkpoint, out, CONFIGS[name]), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _prototypes(one_process(name)), _prototypes(out)
    assert torch.equal(two["prototypes"], one["prototypes"])  # bit for bit, not just close
    for key in ("images", "pixels", "final_loss", "initial_loss", "max_tokens"):
        assert two["provenance"][key] == one["provenance"][key], key
    assert two["provenance"]["images"] == IMAGES
    h1 = json.loads(one_process(name).with_suffix(".history.json").read_text())
    h2 = json.loads(out.with_suffix(".history.json").read_text())
    assert h2["loss"] == h1["loss"] and h2["world_size"] == 2 and len(h2["loss"]) > 10
    assert h2["summary"]["done"] == IMAGES and h2["summary"]["total"] == IMAGES
    # one feature cache serves both ranks: one record per image, written once
    cache = tmp_path / "p.features"
    assert len(list(cache.glob("*.npz"))) == IMAGES
    if "--memmap" in CONFIGS[name]:  # each rank maps its own share
        assert sorted(p.name for p in cache.glob("features*.npy")) == [
            "features.rank0-of-2.npy", "features.rank1-of-2.npy"]
    assert proc.stdout.count("vpl learn: loss") == 1  # rank 0 reports, once
    assert not list(tmp_path.glob("*rank*"))


@pytest.mark.slow
def test_without_the_cache_ranks_sum_their_images_within_float_rounding(voc12, tiny_checkpoint, tmp_path):
    """--no-cache: each rank learns on its own images' rows and the sums are added over ranks, in
    another order than one process adds them (the step rule then amplifies rounding with the
    iterations, so this compares after a few)."""
    flags = ["--no-cache", "--iters", "8"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert _run([], _command(voc12, tiny_checkpoint, one, flags), tmp_path).returncode == 0
    proc = _run(_torchrun(), _command(voc12, tiny_checkpoint, two, flags), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1, w2 = _prototypes(one), _prototypes(two)
    torch.testing.assert_close(w2["prototypes"], w1["prototypes"], rtol=0, atol=1e-5)
    assert w2["provenance"]["pixels"] == w1["provenance"]["pixels"]
    assert w2["provenance"]["final_loss"] == pytest.approx(w1["provenance"]["final_loss"], rel=1e-5)


def _descendants(pid: int) -> List[int]:
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(launcher: int, rank: int) -> Optional[int]:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_rank_killed_in_the_feature_pass_resumes_to_the_same_prototypes(voc12, tiny_checkpoint, tmp_path,
                                                                          one_process):
    out = tmp_path / "p.pt"
    cache = tmp_path / "p.features"
    command = _command(voc12, tiny_checkpoint, out, CONFIGS["token"])
    launcher = subprocess.Popen([sys.executable, *_torchrun(), *command], env=_env(), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(cache.glob("*.npz")) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        rank1 = _rank_pid(launcher.pid, 1)
        assert rank1 is not None, "rank 1 not found"
        os.kill(rank1, signal.SIGSTOP)  # freeze it mid pass, look, then kill it
        ids = (voc12 / "ImageSets/Segmentation/train.txt").read_text().split()
        rank1_done = [i for i in ids[1::2] if (cache / f"{i}.npz").exists()]
        assert len(rank1_done) < len(ids[1::2]), "rank 1 had finished its images: nothing to resume"
        os.kill(rank1, signal.SIGKILL)
        log, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, log[-3000:]
    assert not out.exists()
    # finished records only: a writer killed mid write leaves a hidden ``.<id>.*.tmp.npz`` beside them
    before = len([p for p in cache.glob("*.npz") if ".tmp" not in p.name])
    assert 0 < before < IMAGES

    proc = _run(_torchrun(), command, tmp_path)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(out.with_suffix(".history.json").read_text())
    assert history["summary"]["skipped_existing"] == before  # finished images were not recomputed
    assert history["summary"]["done"] == IMAGES - before
    assert torch.equal(_prototypes(out)["prototypes"], _prototypes(one_process("token"))["prototypes"])
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # a killed writer's leftovers went
