"""The CLIP-ES adapter: output format, prototype plug point, identity of VPL at initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.adapters import CLIPESAdapter, create_adapter, list_adapters  # noqa: E402
from vpl_plugin.prototypes import PrototypeSet  # noqa: E402


@pytest.fixture(scope="module")
def adapter(tiny_encoder):
    return CLIPESAdapter(tiny_encoder)


def test_registry_lists_choices_on_unknown_names(tiny_encoder):
    assert "clip-es" in list_adapters()
    assert isinstance(create_adapter("clip-es", tiny_encoder), CLIPESAdapter)
    with pytest.raises(ValueError, match="clip-es"):
        create_adapter("clip-xx", tiny_encoder)


def test_output_is_upstream_format_and_round_trips_through_np_save(adapter, voc_image, tmp_path):
    out = adapter(voc_image, [14, 0])
    d = out.to_upstream()
    assert set(d) == {"keys", "attn_highres"}
    assert d["keys"].dtype == np.int64 and list(d["keys"]) == [14, 0]
    assert d["attn_highres"].dtype == np.float16 and d["attn_highres"].shape == (2, 281, 500)
    assert 0 <= d["attn_highres"].min() and d["attn_highres"].max() <= 1
    np.save(tmp_path / "x.npy", d)
    back = np.load(tmp_path / "x.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(back["attn_highres"], d["attn_highres"])


def test_text_prototypes_are_cached_per_model(adapter, tiny_encoder):
    again = CLIPESAdapter(tiny_encoder)
    assert torch.equal(again.text_prototypes.prototypes, adapter.text_prototypes.prototypes)
    assert adapter.text_prototypes.prototypes.shape == (45, tiny_encoder.embed_dim)
    assert adapter.text_prototypes.logit_scale == float(tiny_encoder.logit_scale)


def test_text_prototype_cache_lives_with_its_encoder(tiny_clip):
    """The cache is per encoder: a cached set equals a fresh computation, a second encoder of the
    same weights gets equal prototypes from its own entry, and a dropped encoder leaves nothing."""
    import copy
    import gc
    import weakref

    from vpl_plugin.adapters import clip_es
    from vpl_plugin.backbones import CLIPDense
    from vpl_plugin.data.classes import SYNTHETIC

    enc = CLIPDense(copy.deepcopy(tiny_clip))
    first = clip_es.text_prototype_set(enc, SYNTHETIC)
    again = clip_es.text_prototype_set(enc, SYNTHETIC)
    assert again.prototypes is not first.prototypes  # callers get copies they may change
    assert torch.equal(again.prototypes, first.prototypes)
    names = list(SYNTHETIC.prompt_names) + list(SYNTHETIC.background)
    fresh = enc.encode_text_prototypes(names, (clip_es.CLIP_ES_TEMPLATE,))
    assert torch.equal(first.prototypes, fresh)
    other = CLIPDense(copy.deepcopy(tiny_clip))
    assert torch.equal(clip_es.text_prototype_set(other, SYNTHETIC).prototypes, first.prototypes)
    assert enc in clip_es._TEXT_CACHE and other in clip_es._TEXT_CACHE
    ref = weakref.ref(enc)
    del enc, other
    gc.collect()
    assert ref() is None  # the cache holds no strong reference to the encoder


def _vision(adapter, tau, override=None):
    text = adapter.text_prototypes
    return PrototypeSet(text.prototypes.clone(), text.class_names, text.background_names, tau=tau,
                        kind="vision", logit_scale_override=override)


def test_vision_prototypes_at_init_with_clip_temperature_give_the_text_cams(adapter, tiny_encoder, voc_image):
    """W = Z, T_w = 0 and tau_I = CLIP's temperature reproduce the text CAMs exactly."""
    text_out = adapter(voc_image, [0, 14])
    scale = float(tiny_encoder.logit_scale)
    vis = CLIPESAdapter(tiny_encoder, prototypes=_vision(adapter, 1 / scale, override=scale))
    vis_out = vis(voc_image, [0, 14])
    np.testing.assert_array_equal(vis_out.attn_highres, text_out.attn_highres)
    # the same prototypes with tau_I = 0.03 must change the maps (the temperature is not ignored)
    other = CLIPESAdapter(tiny_encoder, prototypes=_vision(adapter, 0.03))
    assert not np.array_equal(other(voc_image, [0, 14]).attn_highres, text_out.attn_highres)


def test_prototype_sets_from_another_label_space_or_model_are_refused(adapter, tiny_encoder):
    text = adapter.text_prototypes
    wrong_names = PrototypeSet(text.prototypes[:-1], text.class_names, text.background_names[:-1], tau=0.03)
    with pytest.raises(ValueError, match="background"):
        adapter.set_prototypes(wrong_names)
    wrong_dim = PrototypeSet(torch.ones(45, 8), text.class_names, text.background_names, tau=0.03)
    with pytest.raises(ValueError, match="dimension"):
        adapter.set_prototypes(wrong_dim)


def test_labels_outside_the_class_list_are_refused(adapter, voc_image):
    with pytest.raises(ValueError, match="outside 0..19"):
        adapter(voc_image, [20])


def test_no_refine_saves_the_upsampled_gradcam(tiny_encoder, voc_image):
    plain = CLIPESAdapter(tiny_encoder, refine=False, save_gradcam=True)(voc_image, [0])
    np.testing.assert_array_equal(plain.attn_highres, plain.extra["highres"])
