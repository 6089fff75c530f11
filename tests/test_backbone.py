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
        enc = load_clip(str(path), exact_fp32=True)
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


def test_positional_embedding_identity_at_pretraining_grid(tiny_clip):
    enc = CLIPDense(tiny_clip, exact_fp32=True)
    g = enc.pretrain_grid
    table = enc.positional_embedding(g, g)
    assert torch.equal(table, enc.visual.positional_embedding.float())
    assert enc.positional_embedding(3, 7).shape == (1 + 21, enc.width)
    upstream = CLIPDense(tiny_clip).positional_embedding(g, g)
    assert upstream.dtype == torch.float16 and torch.equal(upstream, table.half())


def test_default_is_upstreams_rounding_and_exact_fp32_keeps_the_checkpoint(tmp_path, tiny_clip):
    """load_clip / CLIPDense default: build_model's fp16 rounding and an fp16 positional table;
    exact_fp32=True: the checkpoint's values and an fp32 table."""
    import clip.model

    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_clip, path)
    upstream = clip.model.build_model({k: v.clone() for k, v in tiny_clip.state_dict().items()}).float()
    for enc in (load_clip(str(path)), CLIPDense(tiny_clip)):
        _same_state(enc.model, upstream)
        assert not enc.exact_fp32 and enc.fp16_compat and not enc.half_arithmetic  # CPU: fp32 arithmetic
        assert enc.positional_embedding(5, 6).dtype == torch.float16
    for enc in (load_clip(str(path), exact_fp32=True), CLIPDense(tiny_clip, exact_fp32=True)):
        _same_state(enc.model, tiny_clip)
        assert enc.exact_fp32 and not enc.fp16_compat
        assert enc.positional_embedding(5, 6).dtype == torch.float32
    assert CLIPDense(tiny_clip).fingerprint() != CLIPDense(tiny_clip, exact_fp32=True).fingerprint()


def test_fp16_compat_is_an_alias_of_the_default(tiny_clip):
    alias = CLIPDense(tiny_clip, fp16_compat=True)
    assert not alias.exact_fp32 and alias.fingerprint() == CLIPDense(tiny_clip).fingerprint()
    with pytest.raises(ValueError, match="exact_fp32"):
        CLIPDense(tiny_clip, fp16_compat=True, exact_fp32=True)
    with pytest.warns(FutureWarning, match="exact_fp32=True"):
        former_default = CLIPDense(tiny_clip, fp16_compat=False)
    assert former_default.exact_fp32


def _snapshot(model):
    return {k: (v.dtype, v.device, v.requires_grad, v.detach().clone()) for k, v in
            list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("exact_fp32", [False, True])
@pytest.mark.parametrize("source", ["fp32", "half"])
def test_clipdense_never_changes_the_callers_model(tiny_clip, exact_fp32, source):
    """The caller's model keeps its values, dtypes, devices and flags; the encoder converts a copy
    only when the model does not already fit its numerics."""
    import copy

    import clip.model

    model = copy.deepcopy(tiny_clip)
    if source == "half":
        clip.model.convert_weights(model)  # what clip.load gives on CUDA
    before = _snapshot(model)
    enc = CLIPDense(model, exact_fp32=exact_fp32)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k][:3] == after[k][:3], k
        assert torch.equal(before[k][3], after[k][3]), k
    # exact fp32 of an fp32 model fits as it is; otherwise rounding or an fp32 conversion is needed
    assert (enc.model is model) == (source == "fp32" and exact_fp32)
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    rounded = clip.model.build_model({k: v.clone() for k, v in tiny_clip.state_dict().items()}).float()
    fitting = rounded if not exact_fp32 else tiny_clip
    assert CLIPDense(fitting, exact_fp32=exact_fp32).model is fitting  # nothing to convert: no copy


def test_a_fitting_model_changed_afterwards_is_checked_again(tiny_clip):
    """The 'already fits' answer is remembered per model, but not across a change of its weights
    (in place, or written through .data)."""
    import clip.model

    rounded = clip.model.build_model({k: v.clone() for k, v in tiny_clip.state_dict().items()}).float()
    assert CLIPDense(rounded).model is rounded
    assert CLIPDense(rounded).model is rounded  # remembered
    w = rounded.visual.proj
    w.data[0, 0] = float(w[0, 0]) + 1e-4  # not an fp16 value any more
    enc = CLIPDense(rounded)
    assert enc.model is not rounded and float(enc.visual.proj[0, 0]) == float(w[0, 0].half())
    rounded.visual.conv1.weight.data.mul_(1.0001)  # writes through .data bump no version counter
    assert CLIPDense(rounded).model is not rounded


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


def test_clip_normalize_is_the_one_normalisation_of_both_phases():
    """Phase 2's ``normalize_image`` (0-255 arrays) and CLIPDense.preprocess share
    ``clip_normalize``; it matches a float64 reference for single images and batches."""
    from vpl_plugin.backbones.clip import clip_normalize
    from vpl_plugin.phase2.data import normalize_image

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    ref = ((img / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(normalize_image(img).numpy(), ref, rtol=0, atol=1e-6)
    batch = torch.from_numpy(np.stack([img, img[::-1]]).astype(np.float32) / 255).permute(0, 3, 1, 2)
    out = clip_normalize(batch)
    assert out.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), ref[:, ::-1], rtol=0, atol=1e-6)


def test_trunk_plus_last_block_reproduce_clip_encode_image(tiny_clip, tiny_exact_encoder):
    """At the pretraining resolution our split forward's CLS embedding is CLIP's own embedding."""
    tiny_encoder = tiny_exact_encoder
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


@pytest.mark.parametrize("exact_fp32", [False, True])
def test_text_prototypes_match_encode_text(tiny_clip, exact_fp32):
    import clip
    import clip.model

    tiny_encoder = CLIPDense(tiny_clip, exact_fp32=exact_fp32)
    if not exact_fp32:  # upstream's text encoder runs on build_model's rounded weights
        tiny_clip = clip.model.build_model({k: v.clone() for k, v in tiny_clip.state_dict().items()}).float()
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
    enc = CLIPDense(model, exact_fp32=True)
    assert (enc.patch_size, enc.pretrain_grid, enc.num_layers, enc.embed_dim) == (16, 14, 12, 512)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(image)
    tokens, maps = enc.trunk(image)
    out = enc.last_block(tokens)
    torch.testing.assert_close(out.cls_embedding.detach(), expected, rtol=1e-4, atol=1e-4)
    assert len(maps) == 7


def test_phase2_backbone_follows_the_numerics_and_rebuilds_earlier_records(tmp_path, tiny_clip):
    """`vpl train`'s OpenAI CLIP backbone takes the default numerics (or exact_fp32=True); a
    description records them and rebuilds the same backbone, and a record of an earlier version
    (fp16_compat false or absent: exact fp32 then) rebuilds the exact-fp32 backbone."""
    from vpl_plugin.phase2.backbones import backbone_from_description, create_backbone

    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_clip, path)
    default = create_backbone(f"clip:{path}")
    exact = create_backbone(f"clip:{path}", exact_fp32=True)
    assert default.describe()["fp16_compat"] is True and exact.describe()["fp16_compat"] is False
    assert default.fingerprint() != exact.fingerprint()
    for bb in (default, exact):
        again = backbone_from_description(bb.describe())
        assert again.fingerprint() == bb.fingerprint() and again.encoder.exact_fp32 == bb.encoder.exact_fp32
    earlier = {k: v for k, v in exact.describe().items() if k != "fp16_compat"}
    assert backbone_from_description(earlier).encoder.exact_fp32
    with pytest.raises(ValueError, match="timm"):
        create_backbone("timm:vit_tiny_patch16_224", exact_fp32=True)
