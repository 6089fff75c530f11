"""Subnormal floats flushed to zero on the CPU while GradCAMs are computed
(docs/upstream_clip_es.md#subnormals): the thread mode, where it is on, and that the CAMs stay
within one fp16 step of IEEE arithmetic on a test bed that does produce subnormals."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vpl_plugin._subnormals import flushed_subnormals, flushing_subnormals

TINY = torch.finfo(torch.float32).tiny  # 1.18e-38, the smallest normal float32


def _times_one(value: float) -> float:
    """``value`` (a float32 subnormal) times one, computed by torch on this thread."""
    return (torch.tensor(value, dtype=torch.float32) * 1.0).item()


@pytest.fixture
def flushing_supported():
    with flushed_subnormals() as on:
        pass
    if not on:
        pytest.skip("this CPU has no flush-to-zero mode (torch.set_flush_denormal returned False)")


def test_flushing_is_on_inside_the_block_and_restored_after(flushing_supported):
    assert not flushing_subnormals()
    assert _times_one(1e-39) == pytest.approx(1e-39, rel=1e-5)  # IEEE: the subnormal survives
    with flushed_subnormals() as on:
        assert on and flushing_subnormals()
        assert _times_one(1e-39) == 0.0
        assert _times_one(2e-38) == pytest.approx(2e-38, rel=1e-6)  # a normal number is untouched
    assert not flushing_subnormals()
    assert _times_one(1e-39) == pytest.approx(1e-39, rel=1e-5)


def test_flushing_is_restored_when_the_block_raises(flushing_supported):
    with pytest.raises(RuntimeError, match="inside"):
        with flushed_subnormals():
            raise RuntimeError("inside")
    assert not flushing_subnormals()


def test_disabled_block_leaves_the_threads_mode_as_the_caller_set_it(flushing_supported):
    with flushed_subnormals(False) as on:
        assert not on and not flushing_subnormals()
    torch.set_flush_denormal(True)  # the caller's own choice survives both kinds of block
    try:
        with flushed_subnormals(False) as on:
            assert on
        with flushed_subnormals() as on:
            assert on
        assert flushing_subnormals()
    finally:
        torch.set_flush_denormal(False)
    assert not flushing_subnormals()


def _modes_seen(encoder, run) -> list:
    """The thread's flushing mode during ``run()`` at the attention forwards of the first and the
    last block (trunk, grad-enabled last block) and at the backward through the last block's MLP."""
    seen = []
    blocks = encoder.visual.transformer.resblocks
    def record(*_):
        seen.append(flushing_subnormals())
    handles = [blocks[0].attn.register_forward_hook(record), blocks[-1].attn.register_forward_hook(record),
               blocks[-1].mlp.register_full_backward_hook(record)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("flush", [True, False])
def test_gradcams_flush_on_the_cpu_unless_the_encoder_keeps_subnormals(tiny_clip, flushing_supported, flush):
    from vpl_plugin.backbones import CLIPDense
    from vpl_plugin.cam import batch_image_gradcams, flushes_subnormals, image_gradcams

    enc = CLIPDense(tiny_clip, flush_subnormals=flush)
    assert enc.flush_subnormals is flush and flushes_subnormals(enc) is flush
    protos = torch.nn.functional.normalize(torch.randn(4, enc.embed_dim, generator=torch.Generator().manual_seed(0)),
                                           dim=-1)
    image = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(1))
    seen = _modes_seen(enc, lambda: image_gradcams(enc, image, protos, [0, 1], enc.logit_scale))
    assert seen == [flush] * 4  # trunk, last block, one backward per class
    seen = _modes_seen(enc, lambda: batch_image_gradcams(enc, torch.stack([image, image]), [protos, protos],
                                                         [[0], [1]], [enc.logit_scale] * 2))
    assert seen == [flush] * 3  # trunk, last block, one backward for the batch
    assert not flushing_subnormals()  # restored for the caller


def test_an_encoder_without_the_attribute_is_not_flushed():
    from vpl_plugin.cam import flushes_subnormals

    class Other:
        device = torch.device("cpu")

    assert not flushes_subnormals(Other())


def test_cuda_encoders_are_not_flushed():
    """The switch concerns CPU arithmetic; a CUDA encoder's GradCAMs leave the host thread alone."""
    from vpl_plugin.cam import flushes_subnormals

    class OnCuda:
        device = torch.device("cuda")
        flush_subnormals = True

    assert not flushes_subnormals(OnCuda())


def _subnormal_share(encoder, image) -> float:
    """Share of the per-head attention probabilities of the trunk that are subnormal (IEEE)."""
    x, _ = encoder.preprocess(image)
    shares = []
    with torch.no_grad(), flushed_subnormals(False):
        h = encoder.embed(x[None])
        for block in encoder.visual.transformer.resblocks:
            y = block.ln_1(h)
            out, w = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
            shares.append(float(((w > 0) & (w < TINY)).float().mean()))
            h = h + out
            h = h + block.mlp(block.ln_2(h))
    return max(shares)


def test_flushed_cams_are_within_one_fp16_step_of_ieee_arithmetic_on_real_images(voc_root, flushing_supported):
    """On the peaked test bed (whose attention does produce subnormals) flushing moves the GradCAMs
    by at most 1e-5 and the saved maps by at most one fp16 step."""
    from peaked_models import PARITY_IMAGES, peaked_clip
    from PIL import Image

    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense

    model = peaked_clip()
    flushed, ieee = CLIPESAdapter(CLIPDense(model)), CLIPESAdapter(CLIPDense(model, flush_subnormals=False))
    shares = []
    for image_id, labels in PARITY_IMAGES.items():
        image = Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        shares.append(_subnormal_share(ieee.encoder, image))
        a, b = flushed(image, labels), ieee(image, labels)
        np.testing.assert_array_equal(a.keys, b.keys)
        assert float((a.cams - b.cams).abs().max()) <= 1e-5
        x, y = a.attn_highres.astype(np.float32), b.attn_highres.astype(np.float32)
        step = np.spacing(np.maximum(np.abs(a.attn_highres), np.abs(b.attn_highres))).astype(np.float32)
        assert np.all(np.abs(x - y) <= step)
    assert max(shares) > 0.01  # the comparison is not vacuous: the test bed has subnormals to flush


def test_keep_subnormals_reaches_the_encoders_of_cams_and_learn(voc_root, tiny_checkpoint, tmp_path, monkeypatch):
    """``--keep-subnormals`` builds the encoder with ``flush_subnormals=False``; the CAM folder
    records it, and a folder made with one setting resumes with the other (the outputs agree
    within one fp16 step, so no refusal)."""
    import yaml
    from voc_helpers import copy_voc_layout

    import vpl_plugin.backbones as backbones
    from vpl_plugin.cli import EXIT_OK, main

    seen = []
    real = backbones.load_clip

    def spy(*args, **kwargs):
        encoder = real(*args, **kwargs)
        seen.append(encoder.flush_subnormals)
        return encoder

    monkeypatch.setattr(backbones, "load_clip", spy)
    root = copy_voc_layout(voc_root, tmp_path / "voc")
    data = ["--clip", str(tiny_checkpoint), "--root", str(root), "--split-file", "train.txt", "--no-progress"]
    assert main(["cams", *data, "--out", str(tmp_path / "a"), "--limit", "1"]) == EXIT_OK
    assert main(["cams", *data, "--out", str(tmp_path / "b"), "--limit", "1", "--keep-subnormals"]) == EXIT_OK
    assert main(["learn", *data, "--out", str(tmp_path / "p.pt"), "--iters", "2", "--keep-subnormals"]) == EXIT_OK
    assert seen == [True, False, False]
    assert yaml.safe_load((tmp_path / "b" / "vpl_cams.yaml").read_text())["keep_subnormals"] is True
    assert main(["cams", *data, "--out", str(tmp_path / "a"), "--keep-subnormals"]) == EXIT_OK  # resumes
    assert len(list((tmp_path / "a").glob("*.npy"))) == 4


def test_reproduce_passes_keep_subnormals_to_the_clip_stages(voc_root, tiny_checkpoint, tmp_path):
    from voc_helpers import copy_voc_layout

    from vpl_plugin.cli import parse_args
    from vpl_plugin.reproduce import _stages, stage_keys

    root = copy_voc_layout(voc_root, tmp_path / "voc")
    base = ["reproduce", "table1", "--voc-root", str(root), "--clip", str(tiny_checkpoint), "--learn-split", "train"]
    kept = _stages(parse_args(base + ["--keep-subnormals"]), tmp_path)
    default = _stages(parse_args(base), tmp_path)
    clip_stages = [name for name, argv in kept if "--clip" in argv]
    assert clip_stages and all("--keep-subnormals" in argv for name, argv in kept if name in clip_stages)
    assert not any("--keep-subnormals" in argv for _, argv in default)
    before, after = stage_keys(default), stage_keys(kept)
    assert all(before[name] != after[name] for name in clip_stages)  # its outputs are not taken for the default's


def _probe_command(seen: list, offers_flag: bool):
    """A ``vpl`` sub-command that records the main thread's mode while it runs."""
    import types

    from vpl_plugin._cli_common import add_numerics_flags

    def add_parser(subparsers):
        p = subparsers.add_parser("probe")
        if offers_flag:
            add_numerics_flags(p, alias=False)
        return p

    def run(_args):
        seen.append(flushing_subnormals())
        return 0

    return types.SimpleNamespace(NAME="probe", OUTPUT_IS_FOLDER=None, add_parser=add_parser, run=run)


def test_commands_offering_keep_subnormals_run_flushed_from_their_start(flushing_supported):
    """The whole command runs flushed (so the threads it starts inherit the mode) unless given
    --keep-subnormals; a command without the flag (vpl train, vpl demo, ...) is left alone."""
    from vpl_plugin.cli.app import run_argv

    seen: list = []
    assert run_argv(["probe"], [_probe_command(seen, True)]) == 0
    assert run_argv(["probe", "--keep-subnormals"], [_probe_command(seen, True)]) == 0
    assert run_argv(["probe"], [_probe_command(seen, False)]) == 0
    assert seen == [True, False, False]
    assert not flushing_subnormals()


def test_threads_started_inside_the_block_inherit_the_mode(flushing_supported):
    """What the commands rely on, in a fresh process whose intra-op threads do not exist yet: a
    parallel product of subnormals is zero on every thread when the threads were started inside
    the block, and only then."""
    import subprocess
    import sys

    code = """
import numpy as np
import torch
from vpl_plugin._subnormals import flushed_subnormals
torch.set_num_threads(2)
x = torch.from_numpy(np.full(1 << 22, 1e-39, dtype=np.float32))  # no parallel region yet
def zeros():
    return int(((x * 1.0) == 0).sum())
if {inside}:
    with flushed_subnormals():
        print(zeros())
    print(zeros())
else:
    zeros()  # the threads start here, outside
    with flushed_subnormals():
        print(zeros())
    print(zeros())
"""
    n = 1 << 22

    def run(inside: bool):
        out = subprocess.run([sys.executable, "-c", code.format(inside=inside)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        return [int(v) for v in out.stdout.split()]

    flushed, after = run(True)
    assert flushed == n  # every thread flushed inside
    assert 0 < after < n  # afterwards the worker keeps the mode and the calling thread does not
    flushed, after = run(False)
    assert 0 < flushed < n and after == 0  # older workers keep IEEE subnormals
