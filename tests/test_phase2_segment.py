"""Phase-2 inference (docs/vpl.md): multi-scale + flip averaging, label PNGs, `vpl segment`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="the phase-2 decoder uses timm layers (pip install 'vpl-plugin[decoder]')")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.phase2 import (  # noqa: E402
    DecoderConfig,
    build_segmenter,
    create_backbone,
    predict_probabilities,
    save_segmenter,
    segment_dataset,
    segment_image,
)
from vpl_plugin.phase2.segment import to_clip_tensor  # noqa: E402
from vpl_plugin.prototypes import PrototypeSet  # noqa: E402

SMALL = DecoderConfig(proj_dim=16, dim=32, depth=1, heads=2, ffn_dim=64)


def synthetic_prototypes(d: int = 32, seed: int = 0) -> PrototypeSet:
    from vpl_plugin.data.synthetic import SYNTHETIC

    g = torch.Generator().manual_seed(seed)
    n = len(SYNTHETIC.names) + len(SYNTHETIC.background)
    w = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return PrototypeSet(w, SYNTHETIC.names, SYNTHETIC.background, tau=0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vpl_plugin.data.synthetic import SceneWorld, export_voc

    root = tmp_path_factory.mktemp("world")
    return export_voc(SceneWorld(seed=3), root, {"val": (10_000, 4)})


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    torch.manual_seed(0)
    m = build_segmenter(create_backbone(f"clip:{tiny_checkpoint}"), synthetic_prototypes(), SMALL)
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 64, 64))  # non-trivial BN statistics
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "seg.pt"
    save_segmenter(path, model, {"iteration": 0})
    return path


def hand_average(model, x, scales, flip):
    """One forward per pass (no batching of the flipped copy), averaged by hand."""
    h, w = x.shape[-2:]
    passes = []
    for s in scales:
        size = (int(np.ceil(h * s / 16)) * 16, int(np.ceil(w * s / 16)) * 16)
        xs = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
        variants = [(xs, False)] + ([(xs.flip(-1), True)] if flip else [])
        for inp, flipped in variants:
            logits = model(inp)["logits"]
            up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = torch.softmax(up, dim=1)[0]
            passes.append(p.flip(-1) if flipped else p)
    return sum(passes) / len(passes)


@pytest.mark.parametrize("scales,flip", [((0.75, 1.0, 1.25), True), ((1.0,), False), ((0.5, 1.5), True)])
def test_multiscale_flip_equals_hand_computed_average(model, scales, flip):
    x = torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hand_average(model, x, scales, flip)
    got = predict_probabilities(model, x, scales=scales, flip=flip)
    assert got.shape == (11, 40, 56) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(0), torch.ones(40, 56))


def test_single_scale_no_flip_is_the_plain_forward(model):
    x = torch.randn(3, 48, 64)
    with torch.no_grad():
        logits = model(x[None])["logits"]
    expected = torch.softmax(F.interpolate(logits, size=(48, 64), mode="bilinear", align_corners=False), 1)[0]
    torch.testing.assert_close(predict_probabilities(model, x, scales=(1.0,), flip=False), expected)


def test_pil_input_and_mode_restored(model):
    from PIL import Image

    rgb = (np.random.default_rng(0).random((37, 50, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    model.train()
    try:
        a = predict_probabilities(model, img, scales=(1.0,), flip=True)
        assert model.training and not model.backbone.training
    finally:
        model.eval()
    b = predict_probabilities(model, to_clip_tensor(img), scales=(1.0,), flip=True)
    assert torch.equal(a, b) and a.shape == (11, 37, 50)
    with pytest.raises(ValueError, match="scales"):
        predict_probabilities(model, img, scales=())


def test_segment_image_labels_and_crf(model):
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(1).random((32, 40, 3)) * 255).astype(np.uint8))
    restricted = segment_image(model, img, labels=[2])
    assert restricted.dtype == np.uint8 and set(np.unique(restricted)) <= {0, 3}
    free = segment_image(model, img, scales=(1.0,), flip=False)
    probs = predict_probabilities(model, img, scales=(1.0,), flip=False)
    assert np.array_equal(free, probs.argmax(0).numpy().astype(np.uint8))
    pytest.importorskip("pydensecrf.densecrf")
    with_crf = segment_image(model, img, crf=True)
    assert with_crf.shape == (32, 40) and with_crf.max() <= 10


def test_segment_dataset_writes_evaluable_pngs_and_resumes(model, world, tmp_path):
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.metrics import evaluate_masks
    from vpl_plugin.pseudo_masks import load_label_png

    ds = VOCDataset(world, "val.txt", class_spec=SYNTHETIC)
    out = tmp_path / "pred"
    summary = segment_dataset(model, ds, out, scales=(1.0,), flip=True, progress=False)
    assert (summary.total, summary.done, summary.failed) == (4, 4, [])
    for image_id in ds.ids:
        label = load_label_png(out / f"{image_id}.png")
        assert label.shape == (64, 64) and label.max() <= 10
        assert np.array_equal(label, segment_image(model, __import__("PIL.Image").Image.open(
            world / "JPEGImages" / f"{image_id}.jpg"), scales=(1.0,), flip=True))
    result = evaluate_masks(out, world / "SegmentationClass", ds.ids, num_classes=11, progress=False)
    assert 0.0 <= result["miou"] <= 1.0 and not result["missing"]
    again = segment_dataset(model, ds, out, scales=(1.0,), progress=False)
    assert (again.done, again.skipped_existing) == (0, 4)
    only = segment_dataset(model, ds, tmp_path / "lab", scales=(1.0,), flip=False, progress=False,
                           use_image_labels=True, limit=2)
    assert only.done == 2
    for image_id in ds.ids[:2]:
        allowed = {0} | {c + 1 for c in ds[ds.ids.index(image_id)].labels}
        assert set(np.unique(load_label_png(tmp_path / "lab" / f"{image_id}.png"))) <= allowed


def test_segment_dataset_records_failures_and_checks_the_label_space(model, world, tmp_path):
    from vpl_plugin.data.classes import VOC
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset

    ds = VOCDataset(world, "val.txt", class_spec=SYNTHETIC)
    broken = world / "JPEGImages" / f"{ds.ids[1]}.jpg"
    saved = broken.read_bytes()
    try:
        broken.write_bytes(b"not a jpeg")
        summary = segment_dataset(model, ds, tmp_path / "p", scales=(1.0,), flip=False, progress=False)
    finally:
        broken.write_bytes(saved)
    assert summary.done == 3 and [i for i, _ in summary.failed] == [ds.ids[1]]
    with pytest.raises(ValueError, match="foreground classes"):
        segment_dataset(model, VOCDataset(world, "val.txt", class_spec=VOC, label_source="mask"),
                        tmp_path / "q", progress=False)


# -------------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------------


def test_cli_segment_then_eval(checkpoint, world, tmp_path, capsys):
    from vpl_plugin.cli import main

    out = tmp_path / "seg_out"
    argv = ["segment", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--root", str(world),
            "--split-file", "val.txt", "--out", str(out), "--scales", "0.75,1", "--no-progress"]
    assert main(argv) == 0
    assert len(list(out.glob("*.png"))) == 4
    assert (out / "vpl_segment.yaml").is_file()
    summary = json.loads((out / "vpl_segment_summary.json").read_text())
    assert summary["done"] == 4
    assert main(argv) == 0 and "4 already there" in capsys.readouterr().out
    code = main(["eval", "--masks", str(out), "--gt-root", str(world / "SegmentationClass"),
                 "--split-file", str(world / "ImageSets" / "Segmentation" / "val.txt"),
                 "--dataset", "synthetic", "--no-progress"])
    assert code == 0


def test_cli_segment_errors(checkpoint, world, tmp_path, capsys):
    from vpl_plugin.cli import main

    base = ["segment", "--root", str(world), "--split-file", "val.txt", "--out", str(tmp_path / "o"),
            "--dataset", "synthetic", "--no-progress"]
    assert main(base) == 2 and "--checkpoint" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(checkpoint), "--scales", "1,-2"]) == 2
    assert "--scales" in capsys.readouterr().err
    assert main(base + ["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    voc = ["segment", "--root", str(world), "--split-file", "val.txt", "--out", str(tmp_path / "o"),
           "--checkpoint", str(checkpoint), "--dataset", "voc", "--label-source", "mask", "--no-progress"]
    assert main(voc) == 2 and "foreground classes" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_segment_two_gloo_ranks_write_the_files_of_one_process(checkpoint, world, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    common = ["segment", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--root", str(world),
              "--split-file", "val.txt", "--scales", "0.75,1", "--no-progress"]

    def run(prefix, out):
        return subprocess.run([sys.executable, *prefix, "-m", "vpl_plugin", *common, "--out", str(out)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    one, two = tmp_path / "one", tmp_path / "two"
    single = run([], one)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)], two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 4 and sorted(p.name for p in two.glob("*.png")) == names
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    merged = json.loads((two / "vpl_segment_summary.json").read_text())
    assert merged["world_size"] == 2 and merged["done"] == 4 and merged["total"] == 4
    assert proc.stdout.count("vpl segment:") == 1
