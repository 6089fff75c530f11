"""Phase-2 training: augmentation, the deterministic batch stream, the poly schedule, resume
equality, curves and `vpl train` (docs/vpl.md#training-recipe)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from phase2_helpers import export_world, random_prototypes, small_segmenter

pytest.importorskip("timm", reason="the phase-2 decoder needs timm (pip install 'vpl-plugin[decoder]')")

from vpl_plugin.backbones.clip import CLIP_MEAN  # noqa: E402
from vpl_plugin.data.synthetic import SYNTHETIC  # noqa: E402
from vpl_plugin.data.voc import VOCDataset  # noqa: E402
from vpl_plugin.phase2.data import (PseudoMaskDataset, TrainStream, augment_pair,  # noqa: E402
                                    batch_positions, collate, normalize_image, stream_index)
from vpl_plugin.phase2.train import TrainConfig, load_train_state, poly_lr, train_segmenter  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return export_world(tmp_path_factory.mktemp("p2world") / "world")


@pytest.fixture(scope="module")
def dataset(world):
    return PseudoMaskDataset(VOCDataset(world, "train.txt", class_spec=SYNTHETIC), world / "SegmentationClass")


def _coded_pair(h=20, w=28, seed=0):
    """An image whose red channel encodes the mask (20 * class) and a mask of blocks (no 255)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 5, size=(h // 4 + 1, w // 4 + 1))
    mask = np.kron(blocks, np.ones((4, 4), np.int64))[:h, :w].astype(np.uint8)
    image = np.stack([mask * 20, np.full_like(mask, 7), np.arange(w, dtype=np.uint8)[None].repeat(h, 0)], -1)
    return image.astype(np.uint8), mask


# -- schedule and configuration -------------------------------------------------------------------
def test_poly_lr_values():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-12)
    assert poly_lr(0.01, 99, 100) == pytest.approx(0.01 * 0.01 ** 0.9, rel=1e-12)
    assert poly_lr(0.01, 100, 100) == 0.0
    values = [poly_lr(0.01, t, 30000) for t in range(0, 30000, 1000)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="iteration"):
        poly_lr(0.01, 101, 100)


def test_train_config_spec_defaults():
    c = TrainConfig()
    assert (c.iterations, c.batch_size, c.lr, c.poly_power, c.momentum, c.weight_decay, c.crop) == \
        (30000, 6, 0.01, 0.9, 0.9, 1e-4, 448)
    assert c.scale_range == (0.5, 2.0) and c.flip and c.amp
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainConfig(amp_dtype="fp8")
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(crop=0)


# -- augmentation -----------------------------------------------------------------------------------
def test_augment_keeps_mask_and_image_aligned_under_crop_and_flip():
    image, mask = _coded_pair(40, 52)
    flips = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out_img, out_mask = augment_pair(image, mask, rng, crop=32, scale_range=(1.0, 1.0))
        assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        valid = out_mask != 255
        assert valid.all()  # the image is larger than the crop: no padding
        np.testing.assert_array_equal(out_img[..., 0][valid], out_mask[valid].astype(np.float32) * 20)
        # the blue channel holds the column index: increasing = not flipped
        flips.add(bool(out_img[0, 1, 2] < out_img[0, 0, 2]))
    assert flips == {True, False}


def test_augment_flip_is_the_mirror_of_the_unflipped_crop():
    image, mask = _coded_pair(40, 52)
    for seed in range(10):
        a_img, a_mask = augment_pair(image, mask, np.random.default_rng(seed), crop=24)
        b_img, b_mask = augment_pair(image, mask, np.random.default_rng(seed), crop=24, flip=False)
        same = np.array_equal(a_mask, b_mask) and np.array_equal(a_img, b_img)
        mirrored = np.array_equal(a_mask, b_mask[:, ::-1]) and np.array_equal(a_img, b_img[:, ::-1])
        assert same or mirrored


def test_augment_pads_image_with_mean_and_mask_with_255():
    image, mask = _coded_pair(10, 12)
    out_img, out_mask = augment_pair(image, mask, np.random.default_rng(0), crop=32,
                                     scale_range=(1.0, 1.0), flip=False)
    assert int((out_mask != 255).sum()) == 10 * 12  # every original pixel kept, the rest ignored
    pad = out_mask == 255
    np.testing.assert_allclose(out_img[pad], np.broadcast_to(np.array(CLIP_MEAN) * 255, (int(pad.sum()), 3)),
                               rtol=1e-6)
    assert normalize_image(out_img)[:, torch.from_numpy(pad)].abs().max() < 1e-5  # mean -> 0


def test_augment_rescale_keeps_object_edges_aligned():
    image = np.zeros((40, 52, 3), np.uint8)
    mask = np.zeros((40, 52), np.uint8)
    image[10:26, 14:41] = 250
    mask[10:26, 14:41] = 3
    for scale in (0.5, 0.75, 1.5, 2.0):
        for seed in range(4):
            out_img, out_mask = augment_pair(image, mask, np.random.default_rng(seed), crop=112,
                                             scale_range=(scale, scale))
            obj = np.argwhere(out_mask == 3)
            bright = np.argwhere((out_img[..., 0] > 125) & (out_mask != 255))
            # nearest (mask) and bilinear (image) put the object's edges within one pixel
            assert np.abs(obj.min(0) - bright.min(0)).max() <= 1
            assert np.abs(obj.max(0) - bright.max(0)).max() <= 1
            assert abs(len(obj) - round(16 * 27 * scale * scale)) <= 2 * (16 + 27) * scale + 4
            nh, nw = round(40 * scale), round(52 * scale)
            assert int((out_mask != 255).sum()) == nh * nw  # the whole image, padded with 255


# -- the deterministic stream -------------------------------------------------------------------------
def test_stream_is_deterministic_and_epochs_are_permutations(dataset):
    n = len(dataset)
    assert sorted(stream_index(p, n, 0) for p in range(n)) == list(range(n))
    assert sorted(stream_index(p, n, 0) for p in range(n, 2 * n)) == list(range(n))
    assert [stream_index(p, n, 0) for p in range(n)] != [stream_index(p, n, 1) for p in range(n)]
    a = TrainStream(dataset, crop=32, seed=5)
    b = TrainStream(dataset, crop=32, seed=5)
    for p in (7, 0, 31, 7):  # any order of access
        x, y = a[p], b[p]
        assert x["index"] == y["index"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["labels"], torch.from_numpy(dataset.labels(x["index"])))
    assert not torch.equal(a[3]["image"], TrainStream(dataset, crop=32, seed=6)[3]["image"])


def test_rank_slices_make_up_the_global_batch():
    for it in (0, 3):
        whole = batch_positions(it, 6)
        assert batch_positions(it, 6, 2, 0) + batch_positions(it, 6, 2, 1) == whole
        assert sum((batch_positions(it, 6, 3, r) for r in range(3)), []) == whole
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        batch_positions(0, 6, 4, 0)


def test_collate_shapes(dataset):
    stream = TrainStream(dataset, crop=32)
    batch = collate([stream[p] for p in batch_positions(1, 3)])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["masks"].shape == (3, 32, 32) and batch["masks"].dtype == torch.int64
    assert batch["labels"].shape == (3, len(SYNTHETIC.names))
    assert batch["positions"].tolist() == [3, 4, 5]


def test_missing_masks_are_named(world, tmp_path):
    samples = VOCDataset(world, "train.txt", class_spec=SYNTHETIC)
    few = tmp_path / "masks"
    few.mkdir()
    for image_id in samples.ids[:3]:
        (few / f"{image_id}.png").write_bytes((world / "SegmentationClass" / f"{image_id}.png").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{len(samples) - 3} of {len(samples)} images"):
        PseudoMaskDataset(samples, few)
    assert len(PseudoMaskDataset(samples, few, skip_missing=True)) == 3


# -- training, resume, curves --------------------------------------------------------------------------
def _config(**kw):
    base = dict(iterations=6, batch_size=2, crop=32, checkpoint_every=100, log_every=2, num_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def _decoder(model):
    return {k: v.clone() for k, v in model.decoder_state_dict().items()}


@pytest.mark.parametrize("rsc_form", ["pairs", "literal"])  # literal draws from the global RNG
def test_resume_after_a_kill_equals_the_uninterrupted_run(dataset, tmp_path, rsc_form):
    from vpl_plugin.phase2 import Phase2Loss

    def loss():
        return Phase2Loss(rsc_form=rsc_form, tau_rsc=0.1)

    full = small_segmenter()
    record = train_segmenter(full, dataset, tmp_path / "full", config=_config(batch_size=4), loss=loss(),
                             progress=False)
    expected = _decoder(full)

    class Killed(Exception):
        pass

    def kill(iteration, values):
        if iteration == 5:  # after the checkpoint of iteration 4, before the end
            raise Killed

    with pytest.raises(Killed):
        train_segmenter(small_segmenter(), dataset, tmp_path / "cut", config=_config(batch_size=4, checkpoint_every=2),
                        loss=loss(), progress=False, on_step=kill)
    assert load_train_state(tmp_path / "cut" / "last.pt")["iteration"] == 4
    resumed = small_segmenter(seed=123)  # other initial weights: everything must come from last.pt
    again = train_segmenter(resumed, dataset, tmp_path / "cut", config=_config(batch_size=4, checkpoint_every=2),
                            loss=loss(), progress=False)
    assert again["iteration"] == 6
    got = _decoder(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key  # bit-exact on CPU
    losses = [p["loss"] for p in record["curves"]["train"]]
    assert [p["loss"] for p in again["curves"]["train"]] == pytest.approx(losses, abs=1e-6)
    assert [p["iteration"] for p in again["curves"]["train"]] == [2, 4, 6]


def test_resume_refuses_other_settings_and_no_resume_starts_over(dataset, tmp_path):
    train_segmenter(small_segmenter(), dataset, tmp_path, config=_config(iterations=2), progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_segmenter(small_segmenter(), dataset, tmp_path, config=_config(iterations=2, lr=0.1),
                        progress=False)
    record = train_segmenter(small_segmenter(), dataset, tmp_path, config=_config(iterations=2, lr=0.1),
                             progress=False, resume=False)
    assert record["iteration"] == 2
    # the same settings but another prototype set or decoder: refused too
    from phase2_helpers import PatchBackbone, SMALL_DECODER
    from vpl_plugin.phase2 import DecoderConfig, build_segmenter

    other = build_segmenter(PatchBackbone(), random_prototypes(seed=1), DecoderConfig(**SMALL_DECODER))
    with pytest.raises(ValueError, match="model prototypes"):
        train_segmenter(other, dataset, tmp_path, config=_config(iterations=3, lr=0.1), progress=False)
    wider = build_segmenter(PatchBackbone(), random_prototypes(), DecoderConfig(**{**SMALL_DECODER, "dim": 64}))
    with pytest.raises(ValueError, match="model decoder"):
        train_segmenter(wider, dataset, tmp_path, config=_config(iterations=3, lr=0.1), progress=False)


def test_outputs_curves_and_segmenter(dataset, world, tmp_path):
    from vpl_plugin.phase2 import load_segmenter, read_segmenter_checkpoint
    from phase2_helpers import PatchBackbone

    val = VOCDataset(world, "val.txt", class_spec=SYNTHETIC)
    model = small_segmenter()
    record = train_segmenter(model, dataset, tmp_path, config=_config(iterations=4, eval_every=2),
                             val_dataset=val, progress=False)
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert [p["iteration"] for p in curves["train"]] == [2, 4]
    assert set(curves["train"][0]) >= {"loss", "ce", "rsc", "lr", "seconds"}
    assert curves["train"][0]["loss"] == pytest.approx(curves["train"][0]["ce"] + curves["train"][0]["rsc"])
    assert [p["iteration"] for p in curves["val"]] == [2, 4]
    assert 0 <= curves["val"][-1]["miou"] <= 1 and record["val"]["miou"] == curves["val"][-1]["miou"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    loaded = load_segmenter(tmp_path / "segmenter.pt", backbone=PatchBackbone())
    extra = read_segmenter_checkpoint(tmp_path / "segmenter.pt")["extra"]
    assert extra["iteration"] == 4 and extra["train_config"]["crop"] == 32
    for key, value in model.decoder_state_dict().items():
        assert torch.equal(loaded.decoder_state_dict()[key], value)


def test_training_reduces_the_loss(dataset, tmp_path):
    from vpl_plugin.phase2 import Phase2Loss

    record = train_segmenter(small_segmenter(), dataset, tmp_path,
                             config=_config(iterations=24, batch_size=4, lr=0.05, log_every=8),
                             loss=Phase2Loss(lambda_rsc=0.0), progress=False, save_final=False)
    ce = [p["ce"] for p in record["curves"]["train"]]
    assert ce[-1] < ce[0]
    assert all(math.isfinite(v) for v in ce)


def test_global_batchnorm_is_batchnorm_in_one_process():
    from vpl_plugin.phase2.train import GlobalBatchNorm, _restore_batchnorm, convert_global_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ref.load_state_dict(net.state_dict())
    keys = list(net.state_dict())
    swapped = convert_global_batchnorm(net)
    assert isinstance(net[1], GlobalBatchNorm) and list(net.state_dict()) == keys
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(net(x), ref(x))
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)
    _restore_batchnorm(swapped)
    assert type(net[1]) is torch.nn.BatchNorm2d
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)


def test_crop_must_be_a_multiple_of_the_patch(dataset, tmp_path):
    with pytest.raises(ValueError, match="multiple of the backbone's patch size"):
        train_segmenter(small_segmenter(), dataset, tmp_path, config=_config(crop=30), progress=False)


# -- the command -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(world, tmp_path_factory):
    """A tiny OpenAI-CLIP checkpoint (patch 16) and a 32-d prototype set for `vpl train`."""
    pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
    from vpl_plugin.backbones import build_random_clip, save_checkpoint

    from conftest import TINY_CLIP

    folder = tmp_path_factory.mktemp("p2cli")
    save_checkpoint(build_random_clip(seed=0, **TINY_CLIP), folder / "clip.pt")
    random_prototypes(dim=TINY_CLIP["embed_dim"]).save(folder / "protos.pt")
    return folder


def _train_argv(world, inputs, out, *extra):
    return ["train", "--dataset", "synthetic", "--clip", str(inputs / "clip.pt"), "--root", str(world),
            "--split-file", "train.txt", "--masks", str(world / "SegmentationClass"),
            "--prototypes", str(inputs / "protos.pt"), "--out", str(out), "--crop", "32",
            "--iters", "3", "--batch-size", "2", "--workers", "0", "--no-progress", *extra]


def test_cli_train_writes_outputs_and_resumes(world, cli_inputs, tmp_path, capsys):
    from vpl_plugin.cli import main

    out = tmp_path / "run"
    assert main(_train_argv(world, cli_inputs, out, "--checkpoint-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "vpl train: 3 iterations" in printed and "final loss" in printed
    for name in ("last.pt", "segmenter.pt", "curves.json", "curves.png", "vpl_train.yaml"):
        assert (out / name).is_file(), name
    state = load_train_state(out / "last.pt")
    assert state["iteration"] == 3 and state["config"]["crop"] == 32
    assert main(_train_argv(world, cli_inputs, out, "--checkpoint-every", "2")) == 0  # finished: no-op
    assert main(_train_argv(world, cli_inputs, out, "--lr", "0.5")) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err


def test_cli_train_run_of_the_former_exact_fp32_default_resumes_only_with_exact_fp32(world, cli_inputs, tmp_path,
                                                                                      capsys):
    """`vpl train`'s OpenAI CLIP follows upstream's numerics by default; a state written before
    that default (backbone in exact fp32, no numerics recorded) is refused naming --exact-fp32,
    and `--exact-fp32` continues it."""
    import torch

    from vpl_plugin.cli import main

    out = tmp_path / "run"
    assert main(_train_argv(world, cli_inputs, out, "--exact-fp32", "--checkpoint-every", "2")) == 0
    state = load_train_state(out / "last.pt")
    assert state["model"]["backbone_numerics"] == "exact-fp32"
    del state["model"]["backbone_numerics"]  # the state as earlier versions wrote it
    torch.save(state, out / "last.pt")
    capsys.readouterr()
    assert main(_train_argv(world, cli_inputs, out)) == 2
    err = capsys.readouterr().err
    assert "model backbone" in err and "vpl train --exact-fp32` continues it" in err
    assert main(_train_argv(world, cli_inputs, out, "--exact-fp32")) == 0  # the same run: accepted
    assert "other settings" not in capsys.readouterr().err


def test_cli_train_usage_errors(world, cli_inputs, tmp_path, capsys):
    from vpl_plugin.cli import main

    assert main(["train", "--root", str(world)]) == 2
    assert "required: --backbone/--clip" in capsys.readouterr().err
    assert main(_train_argv(world, cli_inputs, tmp_path, "--batch-size", "0")) == 2
    assert main(_train_argv(world, cli_inputs, tmp_path, "--eval-every", "2")) == 2
    assert "--val-split-file" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    assert "torchrun --nproc_per_node" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_resume_after_sigkill_equals_the_uninterrupted_run(world, cli_inputs, tmp_path):
    """A real kill: `python -m vpl_plugin train` is SIGKILLed after its first checkpoint; the rerun
    resumes from OUT/last.pt and ends with the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from vpl_plugin.phase2 import read_segmenter_checkpoint

    # every run in a subprocess with the same thread count: float reductions then agree bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = _train_argv(world, cli_inputs, tmp_path / "killed", "--iters", "40", "--checkpoint-every", "5")

    def run(args):
        return subprocess.run([sys.executable, "-m", "vpl_plugin", *args], env=env, capture_output=True,
                              text=True, timeout=600).returncode

    proc = subprocess.Popen([sys.executable, "-m", "vpl_plugin", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "segmenter.pt").exists(), "finished before the kill"
    killed_at = load_train_state(state)["iteration"]
    assert 5 <= killed_at < 40
    assert run(argv) == 0
    assert run(_train_argv(world, cli_inputs, tmp_path / "full", "--iters", "40", "--checkpoint-every", "5")) == 0
    got = read_segmenter_checkpoint(tmp_path / "killed" / "segmenter.pt")["decoder"]
    expected = read_segmenter_checkpoint(tmp_path / "full" / "segmenter.pt")["decoder"]
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
