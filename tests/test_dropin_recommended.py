"""The recommended VPL configuration inside an upstream CLIP-ES script (``dropin.dense_cams_for``
and the lines of ``adapters/clip_es/README.md``) equals ``vpl cams --prototypes P --map-mode dense
--no-refine`` on the same weights and images."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
clip = pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from clip_es_standin import CLIPESStandIn  # noqa: E402
from upstream_reference import preprocess  # noqa: E402
from voc_helpers import copy_voc_layout  # noqa: E402

from vpl_plugin.dropin import dense_cams_for, learn_vision_prototypes_for  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
IDS = ["2007_000032", "2007_000039", "2007_000063"]
TINY_CLIP = dict(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=64, patch_size=16,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _peaked_clip(seed: int = 0):
    """A random CLIP whose image attention is peaked (query and key in-projections scaled x8),
    with its weights rounded through fp16 and back as ``clip.load`` gives them on a CPU."""
    from vpl_plugin.backbones import build_random_clip

    model = build_random_clip(seed=seed, **TINY_CLIP)
    width = TINY_CLIP["vision_width"]
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight[:2 * width] *= 8
    return clip.model.build_model({k: v.clone() for k, v in model.state_dict().items()}).float()


def _one_fp16_step(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference in units of the fp16 spacing at the larger magnitude (<= 1: one step)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    return float((np.abs(a32 - b32) / step).max()) if a.size else 0.0


@pytest.fixture(scope="module")
def setup(voc_root, tmp_path_factory):
    """The VOC layout, the checkpoint (written once) and the stand-in over the same weights."""
    from vpl_plugin.backbones import save_checkpoint

    tmp = tmp_path_factory.mktemp("recommended")
    root = copy_voc_layout(voc_root, tmp, IDS)
    model = _peaked_clip()
    ckpt = tmp / "clip.pt"
    save_checkpoint(model, ckpt)
    return root, ckpt, model


def _vpl_dense_cams(ckpt: Path, root: Path, protos: Path, out: Path) -> Path:
    from vpl_plugin.cli import EXIT_OK, main

    args = ["cams", "--clip", ckpt, "--root", root, "--split-file", "train.txt", "--prototypes",
            protos, "--map-mode", "dense", "--no-refine", "--out", out, "--no-progress"]
    assert main([str(a) for a in args]) == EXIT_OK
    return out


def _samples(root: Path):
    from vpl_plugin.data.voc import VOCDataset

    return [(s.image_path, list(s.labels)) for s in VOCDataset(root, "train.txt")]


def test_dense_cams_for_equals_vpl_cams_dense_no_refine(setup, tmp_path):
    from PIL import Image

    from vpl_plugin.adapters import text_prototype_set
    from vpl_plugin.backbones import CLIPDense
    from vpl_plugin.data.classes import VOC

    root, ckpt, base = setup
    model = CLIPESStandIn(copy.deepcopy(base))
    text = text_prototype_set(CLIPDense(copy.deepcopy(base)), VOC)
    samples = _samples(root)
    dp = learn_vision_prototypes_for(model, text.fg.clone(), text.bg.clone(), samples, tau=0.1,
                                     pooling="region", iters=40, progress=False)
    assert not torch.equal(dp.fg, text.fg)  # learning moved the prototypes
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    protos = tmp_path / "P.pt"
    dp.save(protos, VOC.names, VOC.background)
    out = _vpl_dense_cams(ckpt, root, protos, tmp_path / "cams")
    spreads = []
    for image_id, (path, labels) in zip(IDS, samples):
        saved = np.load(out / f"{image_id}.npy", allow_pickle=True).item()
        calls = dict(model.calls)
        mine = dense_cams_for(model, path, labels, dp)
        assert model.calls == calls  # without image_features the trunk runs in vpl_plugin
        p = model.visual.conv1.kernel_size[0]
        x, (h, w), _ = preprocess(Image.open(path), p)
        tokens, _ = model.encode_image(x, h, w)  # the script's own image features
        theirs = dense_cams_for(model, Image.open(path), labels, dp, image_features=tokens)
        for got in (mine, theirs):
            assert set(got) == {"keys", "attn_highres"}
            assert got["keys"].dtype == np.int64 and got["keys"].tolist() == saved["keys"].tolist()
            assert got["attn_highres"].dtype == np.float16
            assert got["attn_highres"].shape == saved["attn_highres"].shape
            assert _one_fp16_step(got["attn_highres"], saved["attn_highres"]) <= 1.0, image_id
        spreads.append(float(saved["attn_highres"].astype(np.float32).std()))
    assert min(spreads) > 0.05  # peaked attention: the maps are far from flat
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_dense_cams_for_refuses_bad_inputs_by_name(setup):
    from vpl_plugin.dropin import DropInPrototypes

    root, _, base = setup
    dp = DropInPrototypes(fg=torch.nn.functional.normalize(torch.randn(20, 32), dim=1),
                          bg=torch.nn.functional.normalize(torch.randn(5, 32), dim=1), tau=0.1,
                          logit_scale=10.0)
    path = root / "JPEGImages" / f"{IDS[0]}.jpg"
    with pytest.raises(ValueError, match=r"outside 0\.\.19 \(prototypes\.fg has 20 rows"):
        dense_cams_for(base, path, [20], dp)
    with pytest.raises(ValueError, match="image_features has shape .* trunk tokens"):
        dense_cams_for(base, path, [0], dp, image_features=torch.zeros(5, 1, 64))
    empty = dense_cams_for(base, path, [], dp)
    assert empty["keys"].shape == (0,) and empty["attn_highres"].shape[0] == 0


# ------------------------------------------------------------------------------------------------
# The README's lines, pasted into a stand-in of upstream's script and run as a subprocess
# ------------------------------------------------------------------------------------------------


def _readme_blocks() -> list:
    """The python blocks of the README's recommended-configuration section, list indentation
    removed (each keeps the 4-space indentation of the ``__main__`` block)."""
    text = (REPO / "adapters" / "clip_es" / "README.md").read_text()
    start = text.index("## The recommended configuration in `generate_cams_voc12.py`")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = []
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", section, flags=re.S | re.M):
        indent = len(m.group(1))
        blocks.append("".join(line[indent:] + "\n" for line in m.group(2).splitlines()))
    return blocks


def _edited_script() -> str:
    parser_line, anchor, learn, dispatch, loop = _readme_blocks()
    script = (TESTS / "clip_es_script_standin.py").read_text()
    assert anchor in script and dispatch in script, "the README quotes lines the script lacks"
    last_arg = max(m.end() for m in re.finditer(r"^    parser\.add_argument\(.*\n", script, re.M))
    script = script[:last_arg] + parser_line + script[last_arg:]
    script = script.replace(anchor, anchor + learn)
    return script.replace(dispatch, loop)


@pytest.mark.slow  # a subprocess that loads torch and CLIP, learns, then `vpl cams`: about 30 s
def test_edited_upstream_script_runs_and_equals_vpl_cams(setup, tmp_path):
    from vpl_plugin.prototypes import PrototypeSet

    root, ckpt, _ = setup
    script = tmp_path / "generate_cams_voc12.py"
    script.write_text(_edited_script())
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    out = tmp_path / "script_cams"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "--img_root", str(root / "JPEGImages"), "--split_file",
         str(split), "--vpl_split_file", str(split), "--cam_out_dir", str(out), "--model",
         str(ckpt)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    protos = out / "vpl_prototypes.pt"
    ps = PrototypeSet.load(protos)
    assert ps.kind == "vision" and ps.tau == pytest.approx(0.1)
    assert ps.provenance["pooling"] == "region"
    ref = _vpl_dense_cams(ckpt, root, protos, tmp_path / "vpl_cams")
    for image_id in IDS:
        got = np.load(out / f"{image_id}.npy", allow_pickle=True).item()
        want = np.load(ref / f"{image_id}.npy", allow_pickle=True).item()
        assert set(got) == {"keys", "attn_highres"}
        assert got["keys"].tolist() == want["keys"].tolist()
        assert got["attn_highres"].dtype == np.float16
        assert _one_fp16_step(got["attn_highres"], want["attn_highres"]) <= 1.0, image_id
