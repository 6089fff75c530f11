"""CLIP loading and the dense forward, against stock OpenAI CLIP as the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.backbones import (  # noqa: E402
    CLIPDense,
    build_clip_from_state_dict,
    build_random_clip,
    load_clip,
    load_state_dict_file,
    save_checkpoint,
)
from vpl_plugin.backbones.clip import CheckpointError  # noqa: E402


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_plain_state_dict_and_torchscript_load_the_same_weights(tmp_path, tiny_clip):
    plain, archive = tmp_path / "plain.pt", tmp_path / "archive.pt"
    save_checkpoint(tiny_clip, plain)
    save_checkpoint(tiny_clip, archive, torchscript=True)
    torch.jit.load(str(archive))  # really a TorchScript archive
    with pytest.raises(RuntimeError):
        torch.jit.load(str(plain))
    for path in (plain, archive):
        enc = load_clip(str(path))
        _same_state(enc.model, tiny_clip)
        assert enc.checkpoint == str(path)


def test_module_prefix_and_nesting_are_stripped(tmp_path, tiny_clip):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in tiny_clip.state_dict().items()}}, path)
    state = load_state_dict_file(path)
    assert set(state) == set(tiny_clip.state_dict())


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_state_dict_file(junk)
    notclip = tmp_path / "notclip.pt"
    torch.save({"weight": torch.zeros(2)}, notclip)
    with pytest.raises(CheckpointError, match="visual.proj"):
        load_state_dict_file(notclip)
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):
        load_clip("no-such-model-or-file")


def test_fp32_weights_are_exact_and_fp16_compat_rounds_like_build_model(tiny_clip):
    import clip.model

    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    exact = build_clip_from_state_dict(state, round_weights=False)
    _same_state(exact, tiny_clip)
    rounded = build_clip_from_state_dict(state, round_weights=True)
    upstream = clip.model.build_model({k: v.clone() for k, v in state.items()}).float()
    _same_state(rounded, upstream)
    # the rounding touches linear weights but not LayerNorms or embeddings
    w = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(rounded.state_dict()[w], tiny_clip.state_dict()[w])
    assert torch.equal(rounded.state_dict()["visual.ln_pre.weight"], tiny_clip.state_dict()["visual.ln_pre.weight"])


def _build_model_then_load(state, round_weights):
    """The construction ``build_clip_from_state_dict`` replaces (oracle): ``clip.model.build_model``
    on the CPU (random initialisation, fp16 conversion, load), cast to fp32, and for exact weights
    the fp32 values loaded again."""
    import clip.model

    model = clip.model.build_model({k: v.clone() for k, v in state.items()}).float()
    if not round_weights:
        model.load_state_dict({k: v.float() for k, v in state.items()
                               if k not in ("input_resolution", "context_length", "vocab_size")})
    return model.eval()


@pytest.mark.parametrize("round_weights", [False, True])
def test_build_without_throwaway_init_equals_build_model_bit_for_bit(tiny_clip, round_weights):
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    state["visual.ln_pre.weight"] = state["visual.ln_pre.weight"].half()  # mixed dtypes, as OpenAI's files
    before = {k: v.clone() for k, v in state.items()}
    ours = build_clip_from_state_dict(state, round_weights=round_weights)
    oracle = _build_model_then_load(state, round_weights)
    sa, sb = ours.state_dict(), oracle.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype == torch.float32, k
        assert torch.equal(sa[k], sb[k]), k
        assert sa[k].data_ptr() != state[k].data_ptr(), k  # a copy: the model never aliases the input
    assert all(not p.requires_grad and p.device.type == "cpu" for p in ours.parameters())
    assert not ours.training
    for ba, bb in zip(ours.transformer.resblocks, oracle.transformer.resblocks):
        assert torch.equal(ba.attn_mask, bb.attn_mask) and ba.attn_mask.device.type == "cpu"
    assert all(b.attn_mask is None for b in ours.visual.transformer.resblocks)
    tokens = torch.randint(1, 400, (2, 77))
    tokens[:, 9] = 400  # the EOT position (argmax)
    with torch.no_grad():
        assert torch.equal(ours.encode_text(tokens), oracle.encode_text(tokens))
    for k in state:  # the input state dict is untouched
        assert torch.equal(state[k], before[k]) and state[k].dtype == before[k].dtype, k


def test_inconsistent_state_dicts_are_refused_by_name(tiny_clip):
    state = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    extra = {**state, "visual.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="(?s)src.pt.*visual.extra.weight"):
        build_clip_from_state_dict(extra, source="src.pt")
    wrong = {**state, "ln_final.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match="(?s)src.pt.*ln_final.bias"):
        build_clip_from_state_dict(wrong, source="src.pt")


def test_positional_embedding_identity_at_pretraining_grid(tiny_encoder):
    g = tiny_encoder.pretrain_grid
    table = tiny_encoder.positional_embedding(g, g)
    assert torch.equal(table, tiny_encoder.visual.positional_embedding.float())
    assert tiny_encoder.positional_embedding(3, 7).shape == (1 + 21, tiny_encoder.width)


def test_fp16_compat_stores_the_positional_table_in_half(tiny_clip):
    enc = CLIPDense(tiny_clip, fp16_compat=True)
    assert enc.positional_embedding(5, 6).dtype == torch.float16


@pytest.mark.parametrize("size", [(281, 500), (16, 16), (17, 33), (375, 500)])
def test_padded_sizes_are_multiples_of_the_patch_and_cover_the_image(tiny_encoder, size):
    h, w = tiny_encoder.padded_size(*size)
    assert h % 16 == 0 and w % 16 == 0 and h >= size[0] and w >= size[1] and h - size[0] < 16


def test_preprocess_resizes_before_rgb_conversion(tiny_encoder):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), mode="L")
    x, size = tiny_encoder.preprocess(img)
    assert size == (20, 30) and x.shape == (3, 32, 32)
    expect = np.asarray(img.resize((32, 32), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (expect - mean) / std, rtol=0, atol=1e-6)


def test_trunk_plus_last_block_reproduce_clip_encode_image(tiny_clip, tiny_encoder):
    """At the pretraining resolution our split forward's CLS embedding is CLIP's own embedding."""
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_clip.encode_image(image)
    tokens, maps = tiny_encoder.trunk(image)
    out = tiny_encoder.last_block(tokens)
    torch.testing.assert_close(out.cls_embedding.detach(), expected, rtol=1e-5, atol=1e-5)
    # CLIP-ES's image embedding is the projected mean of the patch tokens
    manual = out.patch_features.mean(dim=1)
    torch.testing.assert_close(out.image_embedding.detach(), manual.detach(), rtol=1e-5, atol=1e-5)
    assert len(maps) == tiny_encoder.num_layers - 1  # fewer blocks than the 8 kept
    assert maps[0].shape == (2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 17))


def test_text_prototypes_match_encode_text(tiny_clip, tiny_encoder):
    import clip

    templates = ["a clean origami {}.", "a photo of a {}."]
    protos = tiny_encoder.encode_text_prototypes(["cat", "person with clothes,people,human"], templates)
    with torch.no_grad():
        for i, name in enumerate(["cat", "person with clothes,people,human"]):
            emb = tiny_clip.encode_text(clip.tokenize([t.format(name) for t in templates])).double()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(0)
            torch.testing.assert_close(protos[i].double(), emb / emb.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(2))


def test_logit_scale_is_the_fp32_exp_of_the_stored_parameter(tiny_clip):
    model = build_random_clip(seed=1)
    model.logit_scale.data = torch.tensor(np.float32(math.log(100)))
    enc = CLIPDense(model)
    assert enc.logit_scale.dtype == torch.float32
    # known answer: float32(ln 100) = 4.60517025, its fp32 exp is one ulp above 100
    assert float(enc.logit_scale) == 100.00000762939453


def test_images_must_be_multiples_of_the_patch(tiny_encoder):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_encoder.embed(torch.zeros(1, 3, 30, 32))
    with pytest.raises(TypeError, match="CLIP ViT"):
        CLIPDense(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_vit_b16_sized_random_model_runs_and_matches_encode_image():
    model = build_random_clip(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                              patch_size=16, transformer_width=512, transformer_heads=8,
                              transformer_layers=12)
    enc = CLIPDense(model)
    assert (enc.patch_size, enc.pretrain_grid, enc.num_layers, enc.embed_dim) == (16, 14, 12, 512)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(image)
    tokens, maps = enc.trunk(image)
    out = enc.last_block(tokens)
    torch.testing.assert_close(out.cls_embedding.detach(), expected, rtol=1e-4, atol=1e-4)
    assert len(maps) == 7
