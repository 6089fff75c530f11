"""GradCAM, box mask and CAA refinement, against naive loops and the upstream-style oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.cam import (  # noqa: E402
    affinity_transition,
    box_mask,
    gradcam,
    batch_image_gradcams,
    image_gradcams,
    minmax_scale,
    prototype_probabilities,
    refine_cams,
)


def _protos(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_double_minmax_leaves_the_maximum_just_below_one():
    x = torch.rand(3, 5, 7) * 10
    once = minmax_scale(x)
    twice = minmax_scale(once)
    assert torch.all(once.amax(dim=(1, 2)) == 1.0)  # one pass reaches 1 for a large range
    assert torch.all(twice.amax(dim=(1, 2)) < 1.0)
    assert torch.all((twice * 255).to(torch.uint8).amax(dim=(1, 2)) == 254)
    assert torch.all(minmax_scale(torch.zeros(1, 2, 2)) == 0)


@pytest.mark.parametrize("backward", ["batched", "shared"])
def test_batched_gradcam_equals_one_backward_per_class(tiny_encoder, backward):
    torch.manual_seed(0)
    image = torch.randn(3, 48, 80)
    protos = _protos(7, tiny_encoder.embed_dim)
    scale = tiny_encoder.logit_scale
    batched = image_gradcams(tiny_encoder, image, protos, [0, 1, 2], scale, backward=backward)
    tokens, _ = tiny_encoder.trunk(image[None])
    for j in range(3):
        out = tiny_encoder.last_block(tokens)
        with torch.enable_grad():
            probs = prototype_probabilities(out.image_embedding, protos, scale)
            (grad,) = torch.autograd.grad(probs[0, j], out.activation)
        single = gradcam(out.activation, grad, (3, 5))[0]
        torch.testing.assert_close(batched.cams[j], single, rtol=0, atol=1e-5)
    assert batched.cams.shape == (3, 3, 5)
    assert batched.features.shape == (15, tiny_encoder.embed_dim)
    torch.testing.assert_close(batched.features.norm(dim=-1), torch.ones(15))
    torch.testing.assert_close(batched.probabilities.sum(), torch.tensor(1.0))


def test_multi_image_batch_equals_one_call_per_image(tiny_encoder):
    """Images of one size share the trunk and the last block; each keeps its own prototypes,
    targets (including none) and scale, and gets exactly what a per-image call gives."""
    torch.manual_seed(1)
    images = torch.randn(3, 3, 48, 80)
    protos = [_protos(n, tiny_encoder.embed_dim) for n in (5, 7, 4)]
    targets = [[0, 1], [], [0, 1, 2]]
    scales = [tiny_encoder.logit_scale, torch.tensor(33.3), torch.tensor(10.0)]
    batch = batch_image_gradcams(tiny_encoder, images, protos, targets, scales)
    for i in range(3):
        single = image_gradcams(tiny_encoder, images[i], protos[i], targets[i], scales[i], backward="shared")
        assert batch[i].cams.shape == single.cams.shape
        torch.testing.assert_close(batch[i].cams, single.cams, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch[i].probabilities, single.probabilities, rtol=0, atol=1e-6)
        torch.testing.assert_close(batch[i].features, single.features, rtol=0, atol=1e-6)
        assert len(batch[i].attention) == len(single.attention)
        for a, b in zip(batch[i].attention, single.attention):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one prototype matrix"):
        batch_image_gradcams(tiny_encoder, images, protos[:2], targets, scales)


def test_gradcam_matches_a_float64_reference():
    torch.manual_seed(1)
    act, grad = torch.randn(1 + 12, 2, 8), torch.randn(1 + 12, 2, 8)
    cam = gradcam(act, grad, (3, 4))
    a, g = act[1:].double().permute(1, 0, 2), grad[1:].double().permute(1, 0, 2)
    raw = torch.relu((g.mean(dim=1, keepdim=True) * a).sum(-1)).reshape(2, 3, 4)
    ref = minmax_scale(minmax_scale(raw.float()))
    torch.testing.assert_close(cam, ref, rtol=0, atol=1e-6)


def test_box_mask_is_the_union_of_component_boxes_without_last_row_and_column():
    """Box mask: the union of bounding boxes of 8-connected components of {G >= 0.4}."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for trial in range(30):
        raw = rng.random((9, 13)).astype(np.float32) ** 3
        g = minmax_scale(minmax_scale(torch.from_numpy(raw))).numpy()
        assert (g * 255).astype(np.uint8).max() == 254
        on = g >= np.float32(0.4)
        labels, n = ndimage.label(on, structure=np.ones((3, 3)))
        expect = np.zeros_like(g)
        for sl in ndimage.find_objects(labels):
            y0, y1 = sl[0].start, min(sl[0].stop, g.shape[0] - 1)
            x0, x1 = sl[1].start, min(sl[1].stop, g.shape[1] - 1)
            expect[y0:y1, x0:x1] = 1
        np.testing.assert_array_equal(box_mask(g, 0.4), expect, err_msg=f"trial {trial}")
        fixed = box_mask(g, 0.4, clip_fix=True)
        assert fixed.sum() >= expect.sum()


def test_box_mask_of_a_border_pixel_is_empty_upstream_and_not_with_the_fix():
    g = np.zeros((5, 5), dtype=np.float32)
    g[4, 4] = 0.9999999
    assert box_mask(g, 0.4).sum() == 0
    assert box_mask(g, 0.4, clip_fix=True)[4, 4] == 1


def test_affinity_normalisation_symmetry_and_square():
    torch.manual_seed(0)
    n = 20
    maps = [torch.softmax(torch.randn(1, n + 1, n + 1), dim=-1) for _ in range(10)]
    t = affinity_transition(maps, layers=8, rounds=3)
    # reproduce the steps by hand in float64
    aff = torch.stack([m[0, 1:, 1:] for m in maps])[-8:].double().mean(0)
    s = aff
    for _ in range(3):
        s = s / s.sum(0, keepdim=True)
        s = s / s.sum(1, keepdim=True)
    torch.testing.assert_close(s.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-6, rtol=0)
    sym = (s + s.t()) / 2
    torch.testing.assert_close(t.double(), sym @ sym, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t, t.t(), atol=1e-6, rtol=0)
    assert torch.all(t >= 0)


def test_refine_all_classes_at_once_equals_masking_columns_per_class():
    torch.manual_seed(0)
    h, w = 4, 6
    t = torch.rand(h * w, h * w)
    cams = torch.rand(3, h, w)
    masks = (torch.rand(3, h, w) > 0.5).float()
    masks[2] = 0
    out = refine_cams(t, cams, masks)
    for c in range(3):
        tc = t * masks[c].reshape(1, -1)  # columns masked, as upstream
        ref = minmax_scale((tc @ cams[c].reshape(-1, 1)).reshape(1, h, w))[0]
        torch.testing.assert_close(out[c], ref, atol=1e-6, rtol=0)
    assert torch.all(out[2] == 0)  # empty box mask -> all-zero map


# ------------------------------------------------------------------------------------------------
# Parity with the upstream-style oracle on peaked-attention models and real VOC images
# ------------------------------------------------------------------------------------------------


def _one_fp16_step(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel: whether two float16 maps are at most one fp16 step apart."""
    a, b = a.astype(np.float16), b.astype(np.float16)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
    return np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step


@pytest.fixture(scope="module")
def peaked():
    """``(exact fp32 model, upstream's build_model copy, default encoder, exact encoder)``."""
    import clip.model
    from peaked_models import peaked_clip

    from vpl_plugin.backbones import CLIPDense

    model = peaked_clip()
    upstream = clip.model.build_model({k: v.clone() for k, v in model.state_dict().items()}).float()
    return model, upstream, CLIPDense(model), CLIPDense(model, exact_fp32=True)


@pytest.fixture(scope="module")
def voc_parity_images(voc_root):
    from PIL import Image
    from peaked_models import PARITY_IMAGES

    return [(Image.open(voc_root / "JPEGImages" / f"{i}.jpg"), labels) for i, labels in PARITY_IMAGES.items()]


def test_peaked_test_bed_has_real_dynamic_range(peaked, voc_parity_images):
    """CAA's refined maps before their min-max normalisation span a large part of their scale."""
    from peaked_models import refined_relative_range

    from vpl_plugin.adapters import CLIPESAdapter

    _, _, enc, _ = peaked
    text = CLIPESAdapter(enc).text_prototypes
    for image, labels in voc_parity_images:
        x, _ = enc.preprocess(image)
        stacked = torch.cat([text.fg[labels], text.bg])
        result = image_gradcams(enc, x, stacked, list(range(len(labels))), enc.logit_scale)
        assert refined_relative_range(result) > 0.5  # plain random weights on ViT-B/16: 1e-4 .. 1e-7


def _compare(adapter, oracle_model, images, **oracle):
    """Max GradCAM difference and the share of refined-map pixels more than one fp16 step off."""
    from upstream_reference import reference_cams

    text = adapter.text_prototypes
    worst_cam, off, total = 0.0, 0, 0
    for image, labels in images:
        ours = adapter(image, labels)
        ref = reference_cams(oracle_model, image, text.fg, text.bg, labels, adapter.encoder.logit_scale,
                             return_gradcams=True, **oracle)
        np.testing.assert_array_equal(ours.keys, ref["keys"])
        worst_cam = max(worst_cam, float(np.abs(ours.cams.numpy() - ref["gradcams"]).max()))
        close = _one_fp16_step(ours.attn_highres, ref["attn_highres"])
        off, total = off + int((~close).sum()), total + close.size
    return worst_cam, off / total


def test_default_numerics_equal_upstreams_cpu_path_on_real_images(peaked, voc_parity_images):
    """Upstream on a CPU: build_model's fp16-rounded weights, the positional table cast to fp16,
    fp32 arithmetic. The default CAMs equal it within one fp16 step on every pixel."""
    from vpl_plugin.adapters import CLIPESAdapter

    _, upstream, enc, _ = peaked
    worst_cam, off = _compare(CLIPESAdapter(enc), upstream, voc_parity_images, pos_fp16=True)
    assert worst_cam <= 1e-5
    assert off == 0


def test_exact_fp32_equals_the_oracle_on_the_checkpoints_values(peaked, voc_parity_images):
    """--exact-fp32 is the same loop on the exact weights with an fp32 table, and it is not
    upstream's result: the peaked test bed shows the difference."""
    from vpl_plugin.adapters import CLIPESAdapter

    model, upstream, _, exact = peaked
    worst_cam, off = _compare(CLIPESAdapter(exact), model, voc_parity_images)
    assert worst_cam <= 1e-5 and off == 0
    worst_cam, off = _compare(CLIPESAdapter(exact), upstream, voc_parity_images, pos_fp16=True)
    assert worst_cam > 1e-3 and off > 0.01


def test_oracle_comparison_catches_a_one_ulp_change_of_the_positional_table(peaked, voc_parity_images):
    """The test bed is sensitive: moving the oracle's fp16 positional table by one fp16 step makes
    the comparison above fail."""
    from vpl_plugin.adapters import CLIPESAdapter

    _, upstream, enc, _ = peaked
    worst_cam, off = _compare(CLIPESAdapter(enc), upstream, voc_parity_images, pos_fp16=True, pos_ulp_shift=1)
    assert worst_cam > 1e-3 and off > 0.1  # measured 6.5e-3 and 64 % of the pixels
