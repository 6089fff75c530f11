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
    protos = [_protos(5, tiny_encoder.embed_dim), _protos(7, tiny_encoder.embed_dim), _protos(4, tiny_encoder.embed_dim)]
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


def test_adapter_reproduces_the_upstream_style_loop_on_a_real_image(tiny_clip, tiny_encoder, voc_image):
    from upstream_reference import reference_cams

    from vpl_plugin.adapters import CLIPESAdapter

    adapter = CLIPESAdapter(tiny_encoder)
    text = adapter.text_prototypes
    labels = [0, 14]
    ours = adapter(voc_image, labels)
    ref = reference_cams(tiny_clip, voc_image, text.fg, text.bg, labels, tiny_encoder.logit_scale,
                         return_gradcams=True)
    np.testing.assert_array_equal(ours.keys, ref["keys"])
    assert ours.attn_highres.dtype == np.float16 and ours.attn_highres.shape == (2, 281, 500)
    np.testing.assert_allclose(ours.cams.numpy(), ref["gradcams"], atol=1e-5, rtol=0)
    diff = np.abs(ours.attn_highres.astype(np.float32) - ref["attn_highres"].astype(np.float32))
    assert diff.max() <= 1e-3  # fp16 storage: a few ulps where a float32 rounding flips


def test_fp16_compat_on_cpu_is_upstreams_cpu_path(tiny_clip, voc_image):
    """Upstream on CPU: weights rounded through fp16 by build_model, positional table cast to fp16,
    fp32 arithmetic. Our --fp16-compat must give the same CAMs; plain fp32 must differ."""
    import clip.model
    from upstream_reference import reference_cams

    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense, build_clip_from_state_dict

    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    upstream_model = clip.model.build_model({k: v.clone() for k, v in state.items()}).float()
    ours = CLIPDense(build_clip_from_state_dict(state, round_weights=True), fp16_compat=True)
    adapter = CLIPESAdapter(ours)
    text = adapter.text_prototypes
    out = adapter(voc_image, [0, 14])
    ref = reference_cams(upstream_model, voc_image, text.fg, text.bg, [0, 14], ours.logit_scale,
                         return_gradcams=True, pos_fp16=True)
    np.testing.assert_allclose(out.cams.numpy(), ref["gradcams"], atol=1e-5, rtol=0)
    exact = reference_cams(tiny_clip, voc_image, text.fg, text.bg, [0, 14], ours.logit_scale,
                           return_gradcams=True)
    assert np.abs(exact["gradcams"] - ref["gradcams"]).max() > 1e-6  # the rounding is visible
