"""The CLIP-ES drop-in API (`vpl_plugin.dropin`) against a stand-in of upstream's model."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
clip = pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from clip_es_standin import CLIPESStandIn  # noqa: E402
from voc_helpers import copy_voc_layout  # noqa: E402
from PIL import Image  # noqa: E402
from upstream_reference import per_class_loop, preprocess  # noqa: E402

from vpl_plugin.dropin import (  # noqa: E402
    DropInPrototypes,
    check_imports,
    learn_vision_prototypes_for,
    use_logit_scale,
    vision_logit_scale,
)

IDS = ["2007_000032", "2007_000039", "2007_000063"]
TINY_CLIP = dict(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=64, patch_size=16,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)


def _upstream_like_clip(seed: int = 0):
    """A random CLIP with peaked attention as ``clip.load`` returns it on a CPU: weights rounded
    through fp16 by ``build_model``, then fp32, parameters requiring grad."""
    from peaked_models import peaked_clip

    exact = peaked_clip(seed=seed, **TINY_CLIP)
    model = clip.model.build_model({k: v.clone() for k, v in exact.state_dict().items()}).float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _one_fp16_step(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = a.astype(np.float16), b.astype(np.float16)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
    return bool((np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step).all())


def _snapshot(model):
    return {n: (p.detach().clone(), p.dtype, p.device, p.requires_grad, p.grad)
            for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for name, (value, dtype, device, req, grad) in snap.items():
        p = now[name]
        assert p.dtype == dtype and p.device == device and p.requires_grad == req, name
        assert torch.equal(p.detach(), value), name
        assert p.grad is grad, name


@pytest.fixture(scope="module")
def small_voc(voc_root, tmp_path_factory) -> Path:
    return copy_voc_layout(voc_root, tmp_path_factory.mktemp("voc_dropin"), IDS)


@pytest.fixture(scope="module")
def samples(small_voc):
    from vpl_plugin.data.voc import VOCDataset

    data = VOCDataset(small_voc, "train.txt")
    out = [(s.image_path, list(s.labels)) for s in data]
    out[0] = (Image.open(out[0][0]), out[0][1])  # a PIL image and paths both work
    return out


@pytest.fixture(scope="module")
def voc_text(small_voc):
    """The stand-in, its CLIP, and CLIP-ES's VOC text features split into fg / bg (fp32, CPU)."""
    from vpl_plugin.adapters import text_prototype_set
    from vpl_plugin.backbones import CLIPDense
    from vpl_plugin.data.classes import VOC

    base = _upstream_like_clip()
    text = text_prototype_set(CLIPDense(copy.deepcopy(base)), VOC)
    return base, text.fg.clone(), text.bg.clone()


def _script_style_cams(model, image, fg, bg, labels, thr=0.4):
    """Upstream ``generate_cams_voc12.py``'s per-image loop on the stand-in (docs/upstream_clip_es.md):
    ``encode_image``, then per class ``forward_last_layer`` + GradCAM through a forward hook on
    ``resblocks[-1].ln_1`` with a tensor hook for the gradient, numpy GradCAM normalised twice,
    CAA with the affinity of the last 8 layers."""
    p = model.visual.conv1.kernel_size[0]
    x, (H, W), size = preprocess(image, p)
    image_features, attn_list = model.encode_image(x, H, W)
    text = torch.cat([fg[labels], bg], dim=0)
    return per_class_loop(model, lambda: model.forward_last_layer(image_features, text),
                          model.visual.transformer.resblocks[-1].ln_1, labels, (H // p, W // p), size,
                          attn_list, thr)


# ------------------------------------------------------------------------------------------------
# (a) script-style loop with the drop-in tensors == `vpl cams --prototypes`
# ------------------------------------------------------------------------------------------------


def test_script_loop_with_dropin_equals_vpl_cams(voc_text, samples, small_voc, tmp_path):
    """The README's drop-in lines in upstream's loop (a model as clip.load gives it, an fp16
    positional table) give the CAMs of `vpl cams --prototypes` without any numerics flag."""
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import load_clip, save_checkpoint
    from vpl_plugin.cli import EXIT_OK, main
    from vpl_plugin.data.classes import VOC
    from vpl_plugin.prototypes import PrototypeSet

    base, fg, bg = voc_text
    model = CLIPESStandIn(base)
    original_scale = model.logit_scale.detach().clone()
    original_ptr = model.logit_scale.data_ptr()
    dp = learn_vision_prototypes_for(model, fg, bg, samples, iters=15, progress=False)
    assert model.calls == {"encode_image": 0, "forward_last_layer": 0}
    assert isinstance(dp, DropInPrototypes)
    assert dp.fg.shape == fg.shape and dp.bg.shape == bg.shape
    assert not torch.equal(dp.fg, fg)  # learning moved the prototypes
    assert dp.logit_scale == float(torch.tensor(np.log(1 / 0.03), dtype=torch.float32).exp())

    ckpt, protos = tmp_path / "clip.pt", tmp_path / "P.pt"
    save_checkpoint(base, ckpt)
    dp.save(protos, VOC.names, VOC.background)
    assert PrototypeSet.load(protos).logit_scale == dp.logit_scale
    out = tmp_path / "cams"
    assert main([str(a) for a in ["cams", "--clip", ckpt, "--root", small_voc, "--split-file", "train.txt",
                                  "--prototypes", protos, "--out", out, "--no-progress"]]) == EXIT_OK
    adapter = CLIPESAdapter(load_clip(str(ckpt)), VOC, PrototypeSet.load(protos))

    with use_logit_scale(model, dp.logit_scale):
        assert model.logit_scale.exp().item() == dp.logit_scale
        for i, (image, labels) in zip(IDS, samples):
            image = image if isinstance(image, Image.Image) else Image.open(image)
            gradcams, highres = _script_style_cams(model, image, dp.fg, dp.bg, labels)
            saved = np.load(out / f"{i}.npy", allow_pickle=True).item()
            assert list(saved["keys"]) == labels
            assert saved["attn_highres"].dtype == np.float16
            assert _one_fp16_step(saved["attn_highres"], highres), i  # default numerics = upstream's
            x, _ = adapter.encoder.preprocess(image)
            ours = adapter.gradcams(x, labels).cams.numpy()
            assert np.abs(ours - gradcams).max() <= 1e-5, i
    assert model.logit_scale.data_ptr() == original_ptr  # the original tensor is back
    assert torch.equal(model.logit_scale.detach(), original_scale)


# ------------------------------------------------------------------------------------------------
# (b) no mutation; the logit scale comes back even after an exception
# ------------------------------------------------------------------------------------------------


def test_model_is_not_mutated(voc_text, samples):
    base, fg, bg = voc_text
    model = CLIPESStandIn(copy.deepcopy(base))
    model.visual.transformer.resblocks[0].ln_1.weight.requires_grad_(False)  # mixed flags survive
    snap = _snapshot(model)
    training = [m.training for m in model.modules()]
    learn_vision_prototypes_for(model, fg, bg, samples[:2], iters=2, progress=False,
                                pooling="region")
    _assert_unchanged(model, snap)
    assert [m.training for m in model.modules()] == training
    assert model.calls == {"encode_image": 0, "forward_last_layer": 0}


def test_logit_scale_restored_after_an_exception(voc_text):
    model = CLIPESStandIn(copy.deepcopy(voc_text[0]))
    original = model.logit_scale.data_ptr()
    value = model.logit_scale.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with use_logit_scale(model, 33.333335876464844):  # the scale for tau = 0.03
            assert model.logit_scale.dtype == torch.float32
            assert model.logit_scale.exp().item() == 33.333335876464844
            raise RuntimeError("boom")
    assert model.logit_scale.data_ptr() == original
    assert torch.equal(model.logit_scale.detach(), value)
    with pytest.raises(ValueError, match="positive"):
        with use_logit_scale(model, -1.0):
            pass


def test_an_unreachable_scale_warns_and_takes_the_closest():
    model = _upstream_like_clip()
    with pytest.warns(RuntimeWarning, match="closest"):
        with use_logit_scale(model, 33.333332061767578):  # between two fp32 exp values
            assert model.logit_scale.exp().item() == pytest.approx(33.333332, abs=4e-6)


@pytest.mark.parametrize("tau", [0.03, 0.1, 0.017, 0.5, 0.01])
def test_logit_scale_is_exact_inside_the_context(tau):
    from vpl_plugin.dropin import _scale_for_tau

    model = _upstream_like_clip()
    scale = _scale_for_tau(tau)
    with use_logit_scale(model, scale):
        assert model.logit_scale.exp().item() == scale


# ------------------------------------------------------------------------------------------------
# (c) a stock OpenAI CLIP; dtype / device of the inputs are kept
# ------------------------------------------------------------------------------------------------


def test_stock_clip_and_fp16_inputs(voc_text, samples):
    base, fg, bg = voc_text
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    dp = learn_vision_prototypes_for(model, fg.half(), bg.half(), samples[1:], iters=3, progress=False)
    _assert_unchanged(model, snap)
    assert dp.fg.dtype == torch.float16 and dp.bg.dtype == torch.float16
    assert dp.fg.device == fg.device and dp.fg.shape == fg.shape and dp.bg.shape == bg.shape
    with vision_logit_scale(model, dp):
        assert model.logit_scale.exp().item() == dp.logit_scale


def test_identity_at_clip_temperature(voc_text, samples):
    """``tau='clip', iters=0`` returns the text features and CLIP's own exact scale."""
    base, fg, bg = voc_text
    model = copy.deepcopy(base)
    dp = learn_vision_prototypes_for(model, fg, bg, samples[1:2], tau="clip", iters=0, progress=False)
    assert torch.equal(dp.fg, fg) and torch.equal(dp.bg, bg)
    assert dp.logit_scale == model.logit_scale.detach().exp().item()
    with use_logit_scale(model, dp.logit_scale):
        assert model.logit_scale.exp().item() == dp.logit_scale


def test_bad_labels_and_shapes_are_named(voc_text, samples):
    base, fg, bg = voc_text
    image = samples[1][0]
    with pytest.raises(ValueError, match="outside 0..19"):
        learn_vision_prototypes_for(base, fg, bg, [(image, [20])], iters=0, progress=False)
    with pytest.raises(ValueError, match="fg_text_features.shape"):
        learn_vision_prototypes_for(base, fg[:, :8], bg[:, :8], [(image, [0])], iters=0,
                                    progress=False)


# ------------------------------------------------------------------------------------------------
# (d) shadowing checks
# ------------------------------------------------------------------------------------------------


def test_check_imports_reports_the_loaded_clip():
    files = check_imports()
    assert files["clip"] == clip.__file__
    assert set(files) == {"clip", "clip.model", "pytorch_grad_cam"}


def test_model_without_proj_names_the_loaded_clip(voc_text, samples):
    base, fg, bg = voc_text
    model = copy.deepcopy(base)
    del model.visual.proj
    with pytest.raises(TypeError, match=re.escape(clip.__file__)) as info:
        learn_vision_prototypes_for(model, fg, bg, samples[1:2], iters=0, progress=False)
    assert "visual.proj" in str(info.value) and "vendored" in str(info.value)


def test_readme_lines_fit_inside_the_main_block():
    """The README's lines for generate_cams_voc12.py are indented for upstream's
    ``if __name__ == "__main__":`` block and compile there; they pass the iteration count."""
    readme = (Path(__file__).resolve().parent.parent / "adapters" / "clip_es" / "README.md").read_text()
    setup = readme.split("## Setup")[1].split("\n## ")[0]
    assert "No numerics flag is needed" in setup and "pip install -e /path/to/vpl-plugin" in setup
    for title in ("## The recommended configuration", "## The lines to add"):
        section = readme.split(title)[1].split("\n## ")[0]
        blocks = re.findall(r"```python\n(.*?)```", section, re.S)
        assert len(blocks) >= 4, title
        for block in blocks:
            lines = [line.removeprefix("   ") for line in block.splitlines() if line.strip()]  # list indent
            assert all(line.startswith("    ") for line in lines), block
            compile('if __name__ == "__main__":\n' + "\n".join(lines) + "\n", "README", "exec")
        assert "[Setup](#setup)" in section
    assert "iters=args.vpl_iters" in readme.split("## The lines to add")[1]


def test_example_runs(voc_root):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "examples" / "clip_es_dropin.py"
    proc = subprocess.run([sys.executable, str(script), "--voc-root", str(voc_root), "--iters", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logit scale: text" in proc.stdout and "mean |GradCAM change|" in proc.stdout
    assert proc.stdout.count("recommended maps float16") == 4


def test_mixed_fp16_model_like_clip_load_on_gpu(samples):
    """``clip.load`` on CUDA returns a model with fp16 convs / linears / proj and fp32 layer norms
    and logit_scale (``clip.model.convert_weights``); the same layout here, on the CPU."""
    from vpl_plugin.backbones import build_random_clip

    model = build_random_clip(seed=1, **TINY_CLIP)
    clip.model.convert_weights(model)
    standin = CLIPESStandIn(model)
    snap = _snapshot(standin)
    fg = torch.nn.functional.normalize(torch.randn(20, 32), dim=1).half()
    bg = torch.nn.functional.normalize(torch.randn(25, 32), dim=1).half()
    dp = learn_vision_prototypes_for(standin, fg, bg, samples[:1], iters=3, progress=False)
    _assert_unchanged(standin, snap)
    assert dp.fg.dtype == torch.float16 and torch.isfinite(dp.fg.float()).all()
    with use_logit_scale(standin, dp.logit_scale):
        assert standin.logit_scale.exp().item() == dp.logit_scale
