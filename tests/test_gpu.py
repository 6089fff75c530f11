"""CUDA paths against the CPU float32 results (run by benchmarks/gpu_all.sh on a GPU machine;
skipped with the reason on machines without CUDA, such as CI)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_all.sh)")]


@pytest.fixture(scope="module")
def cuda_encoder(tiny_clip):
    from vpl_plugin.backbones import CLIPDense

    return CLIPDense(copy.deepcopy(tiny_clip).cuda(), device="cuda")


def test_cuda_adapter_equals_the_cpu_adapter(tiny_encoder, cuda_encoder, voc_image):
    from vpl_plugin.adapters import CLIPESAdapter

    labels = [0, 14]
    cpu = CLIPESAdapter(tiny_encoder)(voc_image, labels)
    gpu = CLIPESAdapter(cuda_encoder)(voc_image, labels)
    np.testing.assert_allclose(gpu.cams.cpu().numpy(), cpu.cams.numpy(), atol=1e-4, rtol=0)
    diff = np.abs(gpu.attn_highres.astype(np.float32) - cpu.attn_highres.astype(np.float32))
    assert diff.max() <= 2e-3


def test_cuda_multi_image_batch_equals_per_image_calls(cuda_encoder):
    from vpl_plugin.cam import batch_image_gradcams, image_gradcams

    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 96)
    d = cuda_encoder.embed_dim
    protos = [torch.nn.functional.normalize(torch.randn(3 + i, d), dim=1) for i in range(4)]
    targets = [[0], [0, 1], [], [0, 1, 2]]
    scales = [cuda_encoder.logit_scale] * 4
    batch = batch_image_gradcams(cuda_encoder, images, protos, targets, scales)
    for i in range(4):
        for backward in ("batched", "shared"):
            single = image_gradcams(cuda_encoder, images[i], protos[i], targets[i], scales[i], backward=backward)
            torch.testing.assert_close(batch[i].cams, single.cams, atol=1e-4, rtol=0)


def test_fp16_compat_on_cuda_stays_close_to_fp32(tiny_clip, voc_image):
    """Upstream's GPU path (fp16 model, fp16 GradCAM arithmetic): seeds agree with fp32 on almost
    every pixel (an approximation test; the exact reference is upstream's own GPU run)."""
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense, build_clip_from_state_dict

    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    half = CLIPDense(build_clip_from_state_dict(state, round_weights=True).cuda(), fp16_compat=True, device="cuda")
    assert half.half
    full = CLIPDense(copy.deepcopy(tiny_clip))
    labels = [0, 14]
    a = CLIPESAdapter(half)(voc_image, labels).attn_highres.astype(np.float32)
    b = CLIPESAdapter(full)(voc_image, labels).attn_highres.astype(np.float32)
    assert np.isfinite(a).all()
    agree = (a.argmax(0) == b.argmax(0)).mean()
    assert agree >= 0.95, f"fp16 and fp32 seeds agree on only {agree:.3f} of the pixels"


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
