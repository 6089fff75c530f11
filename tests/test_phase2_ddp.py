"""Multi-process phase-2 training on CPU (gloo, 2 processes): DDP steps equal single-process steps
on the same global batch (global-batch BatchNorm, loss on the gathered global batch), up to float
rounding (reductions run in another order): weights agree within 1e-5 relative.

Both tests start processes that import torch and timm (about 10-30 s on a shared 2-core machine),
so they are marked slow: `pytest -m slow tests/test_phase2_ddp.py`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phase2_helpers import export_world, random_prototypes, small_segmenter

pytest.importorskip("timm", reason="the phase-2 decoder needs timm (pip install 'vpl-plugin[decoder]')")

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config():
    from vpl_plugin.phase2.train import TrainConfig

    # batch 4 = 2 images per rank; two steps so the second one sees momentum and updated BN stats
    return TrainConfig(iterations=2, batch_size=4, crop=32, checkpoint_every=100, log_every=1,
                       num_workers=0, seed=0)


def _dataset(root: Path):
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.phase2.data import PseudoMaskDataset

    return PseudoMaskDataset(VOCDataset(root, "train.txt", class_spec=SYNTHETIC), root / "SegmentationClass")


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vpl_plugin import distributed
    from vpl_plugin.phase2.train import train_segmenter

    try:
        # rank 1 starts from other weights: DDP must give every rank rank 0's
        model = small_segmenter(seed=rank)
        train_segmenter(model, _dataset(Path(root)), out, config=_config(), progress=False)
        if rank == 1:  # the replicas stay identical
            torch.save(model.decoder_state_dict(), Path(out) / "rank1.pt")
    finally:
        distributed.destroy()


def _decoder(path: Path):
    from vpl_plugin.phase2 import read_segmenter_checkpoint

    return read_segmenter_checkpoint(path)["decoder"]


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].float(), expected[key].float(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_ddp_steps_equal_the_single_process_steps(tmp_path):
    import torch.multiprocessing as mp

    from vpl_plugin.phase2.train import train_segmenter

    root = export_world(tmp_path / "world", train=8, val=0)
    torch.multiprocessing.set_sharing_strategy("file_system")
    mp.spawn(_worker, args=(_free_port(), str(root), str(tmp_path / "ddp")), nprocs=WORLD, join=True)

    single = small_segmenter(seed=0)
    record = train_segmenter(single, _dataset(root), tmp_path / "single", config=_config(), progress=False)
    expected = single.decoder_state_dict()
    _assert_same(_decoder(tmp_path / "ddp" / "segmenter.pt"), expected)
    _assert_same(torch.load(tmp_path / "ddp" / "rank1.pt"), expected)
    import json

    ddp_curve = json.loads((tmp_path / "ddp" / "curves.json").read_text())["train"]
    assert [p["loss"] for p in ddp_curve] == pytest.approx([p["loss"] for p in record["curves"]["train"]],
                                                           rel=1e-5)
    assert record["curves"]["train"][0]["rsc"] > 0  # RSC contrasted regions of both ranks


@pytest.mark.slow
def test_torchrun_cli_equals_single_process_cli(tmp_path):
    """`torchrun --nproc_per_node 2 -m vpl_plugin train` (gloo) ends with the single-process weights."""
    pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
    from conftest import TINY_CLIP
    from vpl_plugin.backbones import build_random_clip, save_checkpoint
    from vpl_plugin.cli import main

    root = export_world(tmp_path / "world", train=8, val=0)
    save_checkpoint(build_random_clip(seed=0, **TINY_CLIP), tmp_path / "clip.pt")
    random_prototypes(dim=TINY_CLIP["embed_dim"]).save(tmp_path / "protos.pt")

    def argv(out):
        return ["train", "--dataset", "synthetic", "--clip", str(tmp_path / "clip.pt"), "--root", str(root),
                "--split-file", "train.txt", "--masks", str(root / "SegmentationClass"),
                "--prototypes", str(tmp_path / "protos.pt"), "--out", str(out), "--crop", "32",
                "--iters", "2", "--batch-size", "4", "--workers", "0", "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={WORLD}", "-m", "vpl_plugin", *argv(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 processes)" in run.stdout
    assert main(argv(tmp_path / "single")) == 0
    _assert_same(_decoder(tmp_path / "ddp" / "segmenter.pt"), _decoder(tmp_path / "single" / "segmenter.pt"))
