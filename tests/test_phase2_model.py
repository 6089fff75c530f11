"""Phase-2 segmentation network: backbones, decoder, frozen parts, save / load (docs/vpl.md).

One contract suite runs on both backbone families: a tiny random OpenAI CLIP (conftest fixtures)
and timm's CLIP ViT at tiny width with random weights. The full-size timm
``vit_base_patch16_clip_224.openai`` (random weights, ~86M parameters) is built in a slow test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="the phase-2 decoder uses timm layers (pip install 'vpl-plugin[decoder]')")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.phase2 import (  # noqa: E402
    DecoderConfig,
    OpenAICLIPBackbone,
    Phase2Loss,
    PrototypeSegmenter,
    TimmCLIPBackbone,
    build_segmenter,
    create_backbone,
    load_segmenter,
    read_segmenter_checkpoint,
    save_segmenter,
    segmentation_logits,
)
from vpl_plugin.prototypes import PrototypeSet  # noqa: E402

TIMM_NAME = "vit_base_patch16_clip_224.openai"
TIMM_TINY = dict(embed_dim=64, depth=2, num_heads=2)


def make_prototypes(d: int, n_fg: int = 3, n_bg: int = 2, tau: float = 0.03, seed: int = 0) -> PrototypeSet:
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(n_fg + n_bg, d, generator=g), dim=-1)
    return PrototypeSet(w, [f"c{i}" for i in range(n_fg)], [f"bg{i}" for i in range(n_bg)], tau=tau)


@pytest.fixture(scope="module")
def timm_tiny():
    torch.manual_seed(0)
    return TimmCLIPBackbone(TIMM_NAME, pretrained=False, **TIMM_TINY)


@pytest.fixture(params=["clip", "timm"])
def backbone(request, tiny_encoder, timm_tiny):
    return OpenAICLIPBackbone(tiny_encoder) if request.param == "clip" else timm_tiny


SMALL = DecoderConfig(proj_dim=32, dim=32, depth=1, heads=2, ffn_dim=64)


def small_segmenter(backbone, d=32, **overrides):
    torch.manual_seed(1)
    return build_segmenter(backbone, make_prototypes(d), SMALL, **overrides)


# -------------------------------------------------------------------------------------------------
# backbones
# -------------------------------------------------------------------------------------------------


def test_backbone_protocol_shapes_any_patch_multiple(backbone):
    x = torch.randn(2, 3, 48, 80)
    maps = backbone(x)
    assert len(maps) == backbone.num_layers
    assert all(m.shape == (2, backbone.width, 3, 5) and m.dtype == torch.float32 for m in maps)
    assert backbone.patch_size == 16
    with pytest.raises(ValueError, match="multiple of the patch"):
        backbone(torch.randn(1, 3, 40, 48))


def test_openai_backbone_last_map_is_clipdense_patch_tokens(tiny_encoder):
    bb = OpenAICLIPBackbone(tiny_encoder)
    x = torch.randn(1, 3, 32, 64)
    last = bb(x)[-1]  # (1, C, 2, 4)
    tokens = last.flatten(2).transpose(1, 2)
    ours = tiny_encoder.visual.ln_post(tokens) @ tiny_encoder.visual.proj
    trunk, _ = tiny_encoder.trunk(x)
    ref = tiny_encoder.last_block(trunk).patch_features.detach()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_timm_backbone_last_map_is_forward_features(timm_tiny):
    x = torch.randn(1, 3, 32, 48)
    last = timm_tiny(x)[-1].flatten(2).transpose(1, 2)
    with torch.no_grad():
        ref = timm_tiny.model.forward_features(x)[:, timm_tiny.model.num_prefix_tokens:]
    torch.testing.assert_close(timm_tiny.model.norm(last), ref, rtol=1e-5, atol=1e-5)


def test_create_backbone_specs_and_errors(tiny_checkpoint):
    for spec in (f"clip:{tiny_checkpoint}", str(tiny_checkpoint)):
        bb = create_backbone(spec, "cpu")
        assert isinstance(bb, OpenAICLIPBackbone) and bb.encoder.checkpoint == str(tiny_checkpoint)
    bb = create_backbone(f"timm:{TIMM_NAME}", pretrained=False, **TIMM_TINY)
    assert isinstance(bb, TimmCLIPBackbone) and bb.width == 64 and bb.num_layers == 2
    with pytest.raises(ValueError, match=r"clip:\.\.\..*timm:\.\.\."):
        create_backbone("bogus:model")
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm:no_such_model_xyz", pretrained=False)
    with pytest.raises(ValueError, match="non-empty"):
        create_backbone("")


# -------------------------------------------------------------------------------------------------
# segmenter contract
# -------------------------------------------------------------------------------------------------


def test_segmenter_output_shapes_and_definitions(backbone):
    model = small_segmenter(backbone).eval()
    x = torch.randn(2, 3, 48, 80)
    out = model(x)
    assert out["logits"].shape == (2, 4, 3, 5)
    assert out["prototype_logits"].shape == (2, 5, 3, 5)
    assert out["features"].shape == (2, 32, 3, 5)
    torch.testing.assert_close(out["features"].norm(dim=1), torch.ones(2, 3, 5))
    # A = W^T V-hat / tau_seg with tau_seg = the prototypes' tau by default
    expected = torch.einsum("nd,bdhw->bnhw", model.prototypes, out["features"]) / 0.03
    torch.testing.assert_close(out["prototype_logits"], expected)
    torch.testing.assert_close(out["logits"], segmentation_logits(expected, 3))
    assert model.num_classes == 4 and model.tau_seg == pytest.approx(0.03)


def test_tau_seg_override_and_layer_subset(backbone):
    model = small_segmenter(backbone, tau_seg=0.1, layers=(-1,)).eval()
    assert model.layers == (backbone.num_layers - 1,)
    out = model(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(out["prototype_logits"],
                               torch.einsum("nd,bdhw->bnhw", model.prototypes, out["features"]) / 0.1)
    with pytest.raises(ValueError, match="outside"):
        small_segmenter(backbone, layers=(99,))


def test_backbone_is_frozen_and_stays_in_eval(backbone):
    model = small_segmenter(backbone)
    model.train()
    assert model.training and model.decoder.training
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    trainable = set(map(id, model.trainable_parameters()))
    assert trainable == set(map(id, model.decoder.parameters()))
    assert all(id(p) not in trainable for p in model.backbone.parameters())
    x = torch.randn(2, 3, 32, 48)
    out = model(x)
    loss, _ = Phase2Loss()(out, torch.randint(0, 4, (2, 32, 48)), torch.tensor([[1, 0, 1], [0, 1, 0]]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert not model.prototypes.requires_grad and "prototypes" in dict(model.named_buffers())


def test_a_few_sgd_steps_lower_the_loss(backbone):
    model = small_segmenter(backbone).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.003, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 48, generator=g)
    target = torch.randint(0, 4, (2, 32, 48), generator=g)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    crit = Phase2Loss(tau_rsc=0.1)  # at 0.01 the RSC gradients of a random decoder spike (x100)
    losses = []
    for _ in range(10):
        loss, _ = crit(model(x), target, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_decoder_state_round_trips_bit_exactly(backbone, tmp_path):
    model = small_segmenter(backbone).train()
    x = torch.randn(2, 3, 32, 48)
    model(x)  # move the BN statistics off their initial values
    model.eval()
    ref = model(x)
    path = tmp_path / "seg.pt"
    save_segmenter(path, model, {"iteration": 7, "config": {"lr": 0.01}})
    loaded = load_segmenter(path, backbone=backbone)
    assert loaded.checkpoint_extra == {"iteration": 7, "config": {"lr": 0.01}}
    a, b = model.decoder_state_dict(), loaded.decoder_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.prototypes, model.prototypes)
    assert loaded.config == model.config and loaded.class_names == model.class_names
    out = loaded(x)
    for key in ("logits", "prototype_logits", "features"):
        assert torch.equal(out[key], ref[key])
    payload = read_segmenter_checkpoint(path)
    assert payload["backbone"]["family"] == backbone.family
    # load_decoder_state_dict accepts DDP / full-model prefixes
    other = small_segmenter(backbone)
    other.load_decoder_state_dict({f"module.decoder.{k}": v for k, v in a.items()})
    assert all(torch.equal(other.decoder_state_dict()[k], a[k]) for k in a)


def test_load_rebuilds_the_clip_backbone_from_its_checkpoint(tiny_checkpoint, tmp_path):
    bb = create_backbone(f"clip:{tiny_checkpoint}")
    model = small_segmenter(bb).eval()
    path = tmp_path / "seg.pt"
    save_segmenter(path, model, {})
    loaded = load_segmenter(path)  # backbone from the stored checkpoint path
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x)["logits"], model(x)["logits"])


def test_load_refuses_a_different_backbone(tiny_encoder, tmp_path):
    torch.manual_seed(5)
    other_timm = TimmCLIPBackbone(TIMM_NAME, **TIMM_TINY)
    torch.manual_seed(6)
    model = small_segmenter(TimmCLIPBackbone(TIMM_NAME, **TIMM_TINY))
    path = tmp_path / "seg.pt"
    save_segmenter(path, model)
    with pytest.raises(ValueError, match="fingerprint"):
        load_segmenter(path, backbone=other_timm)
    load_segmenter(path, backbone=other_timm, check_backbone=False)  # on request
    with pytest.raises(ValueError):
        load_segmenter(path, backbone=OpenAICLIPBackbone(tiny_encoder), check_backbone=False)
    with pytest.raises(ValueError, match="not a segmenter checkpoint"):
        torch.save({"x": 1}, tmp_path / "foreign.pt")
        load_segmenter(tmp_path / "foreign.pt", backbone=other_timm)
    with pytest.raises(FileNotFoundError):
        load_segmenter(tmp_path / "missing.pt")


def test_segmenter_validates_its_inputs(backbone):
    ps = make_prototypes(32)
    with pytest.raises(TypeError, match="PrototypeSet"):
        PrototypeSegmenter(backbone, ps.prototypes)
    no_bg = PrototypeSet(ps.prototypes[:3], ["a", "b", "c"], [], tau=0.03)
    with pytest.raises(ValueError, match="background"):
        PrototypeSegmenter(backbone, no_bg)
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(dim=100, heads=8)
    with pytest.raises(ValueError, match="unknown DecoderConfig"):
        build_segmenter(backbone, ps, bogus=1)


def test_default_config_is_the_spec_decoder(tiny_encoder):
    model = build_segmenter(OpenAICLIPBackbone(tiny_encoder), make_prototypes(32))
    dec = model.decoder
    assert len(dec.projs) == 3 and all(p.in_features == 64 and p.out_features == 256 for p in dec.projs)
    assert dec.fuse[0].in_channels == 3 * 256 and dec.fuse[0].out_channels == 256
    assert len(dec.blocks) == 3
    blk = dec.blocks[0]
    assert blk.attn.num_heads == 8 and blk.mlp.fc1.out_features == 1024
    assert dec.head.in_features == 256 and dec.head.out_features == 32


@pytest.mark.slow
def test_full_size_timm_clip_vit_b16_random_weights():
    bb = create_backbone(f"timm:{TIMM_NAME}", pretrained=False)
    assert (bb.width, bb.num_layers, bb.patch_size) == (768, 12, 16)
    model = build_segmenter(bb, make_prototypes(512, n_fg=20, n_bg=25))
    x = torch.randn(1, 3, 224, 288)
    out = model.eval()(x)
    assert out["logits"].shape == (1, 21, 14, 18) and out["features"].shape == (1, 512, 14, 18)


def test_prototype_logits_are_float32_under_autocast(timm_tiny):
    model = small_segmenter(timm_tiny).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32))
    assert out["prototype_logits"].dtype == torch.float32 and out["features"].dtype == torch.float32
    expected = torch.einsum("nd,bdhw->bnhw", model.prototypes, out["features"]) * model.logit_scale
    assert torch.equal(out["prototype_logits"], expected)


def test_timm_backbone_wraps_a_built_model_only_with_dynamic_size():
    import timm

    built = timm.create_model(TIMM_NAME, pretrained=False, dynamic_img_size=True, **TIMM_TINY)
    bb = TimmCLIPBackbone(TIMM_NAME, model=built)
    assert bb.model is built and len(bb(torch.zeros(1, 3, 32, 64))) == 2
    with pytest.raises(ValueError, match="dynamic_img_size"):
        TimmCLIPBackbone(TIMM_NAME, model=timm.create_model(TIMM_NAME, pretrained=False, **TIMM_TINY))
