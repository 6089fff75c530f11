"""The GPU code paths: exercised on the CPU in every run (CPU section), then on CUDA against the
CPU results (GPU section, run by benchmarks/gpu_all.sh on a GPU machine; skipped with the reason
on machines without CUDA, such as CI).

The CPU section forces the branches a CUDA device takes (:func:`vpl_plugin.backbones.numerics_for`
with ``"cuda"``, :func:`vpl_plugin.cam.choose_backward` with ``"cuda"``, the phase-2 autocast
device types) so the dtype plumbing of the fp16 model, the batched per-class backward and autocast
run before anyone lends a GPU. What they cannot show: CUDA kernels' own fp16 accumulation, cuDNN /
cuBLAS choices, fp16 autocast with the gradient scaler, and device placement across processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_all.sh)")]


def gpu(test):
    """Mark a test GPU-only."""
    for mark in needs_cuda:
        test = mark(test)
    return test


# ------------------------------------------------------------------------------------------------
# CPU section: the CUDA branches on the CPU
# ------------------------------------------------------------------------------------------------

#: q / k scale of the half-path test bed: peaked attention, yet no fp16 attention column that
#: underflows to all zeros in the 3-block model (x8 gives such columns in fp16: see the note in
#: test_half_path_attention_underflow_gives_nan_like_upstream)
HALF_FACTOR = 4.0


def _cpu_half_dtype() -> torch.dtype:
    """fp16 where this torch build runs fp16 convolutions and matrix products on the CPU, else bf16."""
    try:
        x = torch.ones(1, 3, 4, 4, dtype=torch.float16)
        torch.nn.functional.conv2d(x, torch.ones(2, 3, 2, 2, dtype=torch.float16), stride=2)
        torch.ones(2, 3, dtype=torch.float16) @ torch.ones(3, 2, dtype=torch.float16)
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


HALF = _cpu_half_dtype()


@pytest.fixture(scope="module")
def half_setup():
    """``(model, CUDA-plan encoder on the CPU, default CPU encoder)`` of a peaked CLIP. The CUDA
    plan runs in fp16 (bf16 where this torch has no CPU fp16 kernels)."""
    import dataclasses

    from peaked_models import peaked_clip

    from vpl_plugin.backbones import CLIPDense, numerics_for

    model = peaked_clip(factor=HALF_FACTOR)
    plan = dataclasses.replace(numerics_for("cuda"), model_dtype=HALF)
    return model, CLIPDense(model, numerics=plan), CLIPDense(model)


def test_cuda_plan_is_upstreams_gpu_numerics():
    from vpl_plugin.backbones import numerics_for
    from vpl_plugin.cam import choose_backward

    cuda, cpu = numerics_for("cuda"), numerics_for("cpu")
    assert (cuda.model_dtype, cuda.half_arithmetic, cuda.round_weights, cuda.half_table) == (
        torch.float16, True, True, True)
    assert (cpu.model_dtype, cpu.half_arithmetic, cpu.round_weights, cpu.half_table) == (
        torch.float32, False, True, True)
    exact = numerics_for("cuda", exact_fp32=True)
    assert (exact.model_dtype, exact.half_arithmetic, exact.half_table) == (torch.float32, False, False)
    assert choose_backward("cuda") == "batched" and choose_backward(torch.device("cuda", 1)) == "batched"
    assert choose_backward("cpu") == "shared"


def test_half_model_path_runs_on_the_cpu_with_upstreams_dtypes(half_setup, voc_image):
    """The CUDA plan on the CPU: converted weights fp16 (layer norms, embeddings, logit scale
    fp32, as upstream's convert_weights), fp16 tokens and GradCAM target, the caller's model
    untouched; its seeds agree with the fp32 CPU path on almost every pixel."""
    from vpl_plugin.adapters import CLIPESAdapter

    model, half, full = half_setup
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model
    v = half.visual
    assert v.conv1.weight.dtype == v.proj.dtype == HALF
    assert v.transformer.resblocks[0].attn.in_proj_weight.dtype == HALF
    assert v.ln_pre.weight.dtype == v.class_embedding.dtype == half.model.logit_scale.dtype == torch.float32
    assert half.half_arithmetic and half.positional_embedding(3, 4).dtype == torch.float16
    x, _ = half.preprocess(voc_image)
    tokens, maps = half.trunk(x[None])
    assert tokens.dtype == HALF and maps[0].dtype == HALF
    out = half.last_block(tokens)
    assert out.activation.dtype == HALF and out.activation.requires_grad
    a = CLIPESAdapter(half)(voc_image, [0, 14])
    b = CLIPESAdapter(full)(voc_image, [0, 14])
    assert a.attn_highres.dtype == np.float16 and np.isfinite(a.attn_highres).all()
    agree = (a.attn_highres.argmax(0) == b.attn_highres.argmax(0)).mean()
    assert agree >= 0.95, agree  # measured 0.985
    assert float((a.cams - b.cams).abs().max()) < 0.2  # measured 0.09 (fp16 rounding of the path)


def test_half_gradcam_arithmetic_is_upstreams_numpy_fp16_arithmetic():
    """Upstream's GPU GradCAM: fp16 numpy arrays, mean of the gradient, fp16 products summed over
    the channels, ReLU, min-max twice in fp32. Known answer: a numpy re-statement."""
    from vpl_plugin.cam import gradcam

    g = torch.Generator().manual_seed(0)
    act = torch.randn(13, 3, 64, generator=g).half()
    grad = (torch.randn(13, 3, 64, generator=g) * 1e-3).half()
    ours = gradcam(act, grad, (3, 4), half_arithmetic=True).numpy()

    def scale(c):
        c = c - np.min(c)
        return c / (1e-7 + np.max(c))

    a = act[1:].permute(1, 2, 0).reshape(3, 64, 3, 4).numpy()
    gr = grad[1:].permute(1, 2, 0).reshape(3, 64, 3, 4).numpy()
    weights = np.mean(gr, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0).astype(np.float32)
    expected = np.stack([scale(scale(c)) for c in cam])
    assert weights.dtype == np.float16
    np.testing.assert_array_equal(ours, expected)
    fp32 = gradcam(act.float(), grad.float(), (3, 4)).numpy()
    assert np.abs(fp32 - expected).max() > 0  # the fp16 arithmetic is visible


@pytest.mark.parametrize("which", ["half", "full"])
def test_batched_backward_of_the_cuda_branch_equals_the_cpu_branch(half_setup, voc_image, which):
    """The per-class backward CUDA takes (k copies of the last block, one backward) gives the CPU
    branch's GradCAMs (one forward, k backward passes), in fp16 and in fp32; so does the
    multi-image batch."""
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.cam import batch_image_gradcams, choose_backward, image_gradcams

    _, half, full = half_setup
    enc = half if which == "half" else full
    text = CLIPESAdapter(enc).text_prototypes
    x, _ = enc.preprocess(voc_image)
    stacked = torch.cat([text.fg[[0, 14]], text.bg])
    gpu_branch = image_gradcams(enc, x, stacked, [0, 1], enc.logit_scale, backward=choose_backward("cuda"))
    cpu_branch = image_gradcams(enc, x, stacked, [0, 1], enc.logit_scale, backward=choose_backward("cpu"))
    tol = 1e-5 if which == "full" else 1e-3
    torch.testing.assert_close(gpu_branch.cams, cpu_branch.cams, atol=tol, rtol=0)
    torch.testing.assert_close(gpu_branch.probabilities, cpu_branch.probabilities, atol=tol, rtol=0)
    images = torch.stack([x, x.flip(-1)])
    batch = batch_image_gradcams(enc, images, [stacked, stacked[1:]], [[0, 1], [0]], [enc.logit_scale] * 2)
    torch.testing.assert_close(batch[0].cams, cpu_branch.cams, atol=tol, rtol=0)
    single = image_gradcams(enc, images[1], stacked[1:], [0], enc.logit_scale, backward="shared")
    torch.testing.assert_close(batch[1].cams, single.cams, atol=tol, rtol=0)


def test_half_path_attention_underflow_gives_nan_like_upstream(voc_image):
    """A known limit of upstream's fp16 path, reproduced: with very peaked attention (q / k x8 in
    this 3-block model) some patch receives no attention in fp16 in any kept block, the affinity
    has an all-zero column, and its Sinkhorn normalisation divides by zero."""
    from peaked_models import peaked_clip

    from vpl_plugin.backbones import CLIPDense, numerics_for
    from vpl_plugin.cam import affinity_transition

    if HALF != torch.float16:
        pytest.skip("this torch has no fp16 kernels on the CPU (the bf16 stand-in does not underflow alike)")
    enc = CLIPDense(peaked_clip(factor=8.0), numerics=numerics_for("cuda"))
    x, _ = enc.preprocess(voc_image)
    _, maps = enc.trunk(x[None])
    stacked = torch.stack([m[0, 1:, 1:] for m in maps]).float().mean(0)
    assert int((stacked.sum(0) == 0).sum()) > 0
    assert not torch.isfinite(affinity_transition([m[:1] for m in maps])).all()


def test_phase2_backbone_on_the_half_path_gives_fp32_maps(half_setup):
    from vpl_plugin.phase2.backbones import OpenAICLIPBackbone

    model, half, full = half_setup
    x = torch.randn(2, 3, 64, 96)
    a, b = OpenAICLIPBackbone(half)(x), OpenAICLIPBackbone(full)(x)
    assert len(a) == half.num_layers and all(m.dtype == torch.float32 for m in a)
    assert all(torch.isfinite(m).all() for m in a)
    rel = float((a[-1] - b[-1]).norm() / b[-1].norm())
    assert rel < 0.05, rel


def test_phase2_training_under_bf16_autocast_on_cpu_tracks_fp32(tmp_path, monkeypatch):
    """The autocast branch of `vpl train` (CUDA only by default) forced on the CPU in bf16: the
    forward really runs in bf16, the loss stays fp32 and the curve follows the fp32 run."""
    import math

    from phase2_helpers import export_world, small_segmenter

    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.phase2 import Phase2Loss
    from vpl_plugin.phase2 import train as train_module
    from vpl_plugin.phase2.data import PseudoMaskDataset
    from vpl_plugin.phase2.train import TrainConfig, amp_dtype_for, train_segmenter

    world = export_world(tmp_path / "world")
    data = PseudoMaskDataset(VOCDataset(world, "train.txt", class_spec=SYNTHETIC), world / "SegmentationClass")
    cfg = {amp: TrainConfig(iterations=6, batch_size=4, crop=32, lr=0.05, checkpoint_every=100, log_every=1,
                            num_workers=0, amp=amp, amp_dtype="bf16") for amp in (False, True)}
    assert amp_dtype_for(cfg[True], "cpu") is None  # off on a CPU by default
    monkeypatch.setattr(train_module, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))
    assert amp_dtype_for(cfg[True], "cpu") == torch.bfloat16
    losses, seen = {}, set()
    for amp in (False, True):
        model = small_segmenter()
        handles = [m.register_forward_hook(lambda _m, _i, out: seen.add((amp, out.dtype)))  # noqa: B023 (used in-loop)
                   for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        record = train_segmenter(model, data, tmp_path / f"run_{amp}", config=cfg[amp],
                                 loss=Phase2Loss(tau_rsc=0.1), device="cpu", progress=False, save_final=False)
        for h in handles:
            h.remove()
        losses[amp] = [p["loss"] for p in record["curves"]["train"]]
    assert (True, torch.bfloat16) in seen and (False, torch.bfloat16) not in seen
    assert all(math.isfinite(v) for v in losses[True])
    assert abs(losses[True][-1] - losses[False][-1]) <= 0.1 * abs(losses[False][-1]) + 0.05


# ------------------------------------------------------------------------------------------------
# GPU section: CUDA against the CPU
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_exact(tiny_clip):
    from vpl_plugin.backbones import CLIPDense

    return CLIPDense(tiny_clip, exact_fp32=True, device="cuda")


@gpu
def test_cuda_exact_fp32_adapter_equals_the_cpu_adapter(tiny_clip, cuda_exact, voc_image):
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense

    labels = [0, 14]
    cpu = CLIPESAdapter(CLIPDense(tiny_clip, exact_fp32=True))(voc_image, labels)
    gpu_out = CLIPESAdapter(cuda_exact)(voc_image, labels)
    np.testing.assert_allclose(gpu_out.cams.cpu().numpy(), cpu.cams.numpy(), atol=1e-4, rtol=0)
    diff = np.abs(gpu_out.attn_highres.astype(np.float32) - cpu.attn_highres.astype(np.float32))
    assert diff.max() <= 2e-3


@gpu
def test_cuda_multi_image_batch_equals_per_image_calls(cuda_exact):
    from vpl_plugin.cam import batch_image_gradcams, image_gradcams

    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 96)
    d = cuda_exact.embed_dim
    protos = [torch.nn.functional.normalize(torch.randn(3 + i, d), dim=1) for i in range(4)]
    targets = [[0], [0, 1], [], [0, 1, 2]]
    scales = [cuda_exact.logit_scale] * 4
    batch = batch_image_gradcams(cuda_exact, images, protos, targets, scales)
    for i in range(4):
        for backward in ("batched", "shared"):
            single = image_gradcams(cuda_exact, images[i], protos[i], targets[i], scales[i], backward=backward)
            torch.testing.assert_close(batch[i].cams, single.cams, atol=1e-4, rtol=0)


@gpu
def test_default_on_cuda_is_the_half_path_checked_on_the_cpu(half_setup, voc_image):
    """Upstream's GPU path (fp16 model, fp16 GradCAM arithmetic) is the CUDA default; it follows
    the same plan run on the CPU in the CPU section (fp16 kernels accumulate differently, so
    approximately) and agrees with fp32 on almost every seed pixel."""
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense

    model, half_cpu, full = half_setup
    cuda = CLIPDense(model, device="cuda")
    assert cuda.half_arithmetic and cuda.visual.conv1.weight.dtype == torch.float16
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stayed where it was
    labels = [0, 14]
    a = CLIPESAdapter(cuda)(voc_image, labels)
    b = CLIPESAdapter(half_cpu)(voc_image, labels)
    c = CLIPESAdapter(full)(voc_image, labels)
    assert np.isfinite(a.attn_highres).all()
    assert float((a.cams.cpu() - b.cams).abs().max()) < 0.05
    agree = (a.attn_highres.argmax(0) == c.attn_highres.argmax(0)).mean()
    assert agree >= 0.95, f"fp16 and fp32 seeds agree on only {agree:.3f} of the pixels"


@gpu
def test_learning_on_cuda_equals_cpu():
    from vpl_plugin.prototypes import learn_vision_prototypes

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5000, 32), dim=1)
    z = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    q = torch.softmax(x @ z.T / 0.01, dim=1)
    q = torch.nn.functional.one_hot(q.argmax(1), 6).float()
    for rule in ("halving", "bb"):
        cpu = learn_vision_prototypes(x, q, z, iters=30, step_rule=rule, chunk_size=1024)
        gpu = learn_vision_prototypes(x.cuda(), q.cuda(), z, iters=30, step_rule=rule, chunk_size=1024)
        torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)


@gpu
@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_phase2_training_with_autocast_on_cuda_tracks_fp32(tmp_path, amp_dtype):
    """A few decoder steps under bf16 / fp16 autocast (fp16 with the gradient scaler) stay finite
    and close to the fp32 run on the same batches."""
    import math

    from phase2_helpers import export_world, small_segmenter

    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.phase2 import Phase2Loss
    from vpl_plugin.phase2.data import PseudoMaskDataset
    from vpl_plugin.phase2.train import TrainConfig, train_segmenter

    world = export_world(tmp_path / "world")
    data = PseudoMaskDataset(VOCDataset(world, "train.txt", class_spec=SYNTHETIC), world / "SegmentationClass")
    losses = {}
    for amp in (False, True):
        cfg = TrainConfig(iterations=8, batch_size=4, crop=32, lr=0.05, checkpoint_every=100, log_every=1,
                          num_workers=0, amp=amp, amp_dtype=amp_dtype)
        record = train_segmenter(small_segmenter(), data, tmp_path / f"run_{amp}", config=cfg,
                                 loss=Phase2Loss(tau_rsc=0.1), device="cuda", progress=False, save_final=False)
        losses[amp] = [p["loss"] for p in record["curves"]["train"]]
    assert all(math.isfinite(v) for v in losses[True])
    assert abs(losses[True][-1] - losses[False][-1]) <= 0.1 * abs(losses[False][-1]) + 0.05
