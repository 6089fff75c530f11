"""Every reader and every `vpl` command over the crafted corpus of :mod:`crafted_files`.

For each crafted file and each reader or command that takes it: nothing from the file runs (its
marker file never appears), no traceback is printed, the refusal names the culprit file and the
problem, the exit status is the documented one (2: the input is refused; 3: some images were
skipped and the others processed; 0: a file a rerun must redo was redone), and where the file sits
among good ones the good outputs exist. Commands run in-process through ``vpl_plugin.cli.main``
on a tiny random-weight CLIP and 32-pixel synthetic scenes.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is needed")
pytest.importorskip("PIL.Image", reason="Pillow is needed")

import crafted_files as cf

from vpl_plugin.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = ["syn_0000000", "syn_0000001"]
SIZE = 32  # scene side in pixels


# ------------------------------------------------------------------------------------------------
# the good inputs the crafted files sit among
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two 32-pixel synthetic scenes in VOC layout (images, XML, ground truth, train.txt)."""
    from vpl_plugin.data.synthetic import SceneWorld, export_voc

    return export_voc(SceneWorld(size=SIZE, seed=3), tmp_path_factory.mktemp("corpus") / "world",
                      {"train": (0, len(GOOD))})


@pytest.fixture(scope="module")
def inputs(world, tiny_checkpoint, tmp_path_factory):
    """Good files every command needs: the tiny CLIP, prototypes, the good CAMs, a segmenter."""
    from conftest import TINY_CLIP
    from phase2_helpers import random_prototypes

    folder = tmp_path_factory.mktemp("inputs")
    protos = folder / "protos.pt"
    random_prototypes(dim=TINY_CLIP["embed_dim"]).save(protos)
    cams = folder / "cams"
    assert _run(["cams", "--clip", tiny_checkpoint, *_data(world, "train.txt"), "--out", cams]) == EXIT_OK
    train_out = folder / "train"
    assert _run(_train(world, tiny_checkpoint, protos, train_out, world / "SegmentationClass")) == EXIT_OK
    return {"clip": tiny_checkpoint, "protos": protos, "cams": cams, "segmenter": train_out / "segmenter.pt"}


def _run(argv: Sequence) -> int:
    return main([str(a) for a in argv])


def _data(root: Path, split, *extra) -> list:
    return ["--dataset", "synthetic", "--root", root, "--split-file", split, "--no-progress", *extra]


def _train(root: Path, clip, protos, out: Path, masks: Path, split="train.txt", *extra) -> list:
    return ["train", "--clip", clip, *_data(root, split), "--masks", masks, "--prototypes", protos,
            "--out", out, "--crop", "32", "--iters", "1", "--batch-size", "2", "--workers", "0", *extra]


def _copy_world(world: Path, dest: Path, new_id: str = "") -> Path:
    """A copy of ``world`` whose list is the good ids plus ``new_id`` (a copy of the first scene,
    image, annotation and ground truth, for a test to replace one of them with a crafted file)."""
    root = dest / "world"
    shutil.copytree(world, root)
    if new_id:
        for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png")):
            shutil.copy(root / sub / f"{GOOD[0]}{ext}", root / sub / f"{new_id}{ext}")
    ids = GOOD[:1] + ([new_id] if new_id else []) + GOOD[1:]
    (root / "ImageSets/Segmentation/list.txt").write_text("\n".join(ids) + "\n")
    return root


def _check(capsys, code: int, expected: int, crafted: cf.Crafted, why: bool = True) -> str:
    """The common assertions: exit status, no traceback, culprit (and reason) named, no marker."""
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    assert not crafted.marker.exists(), f"{crafted.case.name}: the payload ran"
    assert code == expected, f"{crafted.case.name}: exit {code}, expected {expected}\n{text}"
    assert crafted.culprit.name in text, f"{crafted.case.name}: culprit not named\n{text}"
    if why and crafted.case.why:
        assert crafted.case.why in text, f"{crafted.case.name}: reason {crafted.case.why!r} not given\n{text}"
    return text


def _ids(case: cf.Case) -> str:
    return case.name


# ------------------------------------------------------------------------------------------------
# readers (the Python API)
# ------------------------------------------------------------------------------------------------


def _refused(call, crafted: cf.Crafted, error=ValueError) -> str:
    with pytest.raises(error) as info:
        call()
    text = str(info.value)
    assert str(crafted.culprit) in text, text
    assert crafted.case.why in text, text
    assert not crafted.marker.exists()
    return text


@pytest.mark.parametrize("case", cf.CAM_CASES, ids=_ids)
def test_cam_readers(case, tmp_path):
    from vpl_plugin.data.cam_files import read_cam_file, write_cam_file
    from vpl_plugin.metrics import evaluate_cams
    from vpl_plugin.pseudo_masks import make_pseudo_masks

    cams, gt = tmp_path / "cams", tmp_path / "gt"
    crafted = case.make(cams, tmp_path / "MARKER", filename=f"{case.name}.npy")
    write_cam_file(cams / "good.npy", cf.good_cams((SIZE, SIZE)))
    if case.refused_by_reader:
        _refused(lambda: read_cam_file(crafted.path), crafted)
    else:
        read_cam_file(crafted.path)
    gt.mkdir()
    from PIL import Image

    for name in ("good", case.name):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(gt / f"{name}.png")
    ids = ["good", case.name]
    result = evaluate_cams(cams, gt, ids, bg_thresholds=1, progress=False)
    assert result["n_images"] == 1 and [m["id"] for m in result["missing"]] == [case.name]
    assert crafted.path.name in result["missing"][0]["reason"] + result["missing"][0].get("path", "")
    masks = make_pseudo_masks(cams, tmp_path / "no_images", ids, tmp_path / "masks", crf=False,
                              num_classes=21, progress=False)
    if case.name == "cam_wrong_size":  # without the image (no CRF) the CAM's own size is the mask's
        assert masks["done"] == ids
    else:
        assert masks["done"] == ["good"] and [f[0] for f in masks["failed"]] == [case.name]
        assert crafted.path.name in masks["failed"][0][1] and case.why in masks["failed"][0][1]
    assert not crafted.marker.exists()


@pytest.mark.parametrize("case", cf.IMAGE_CASES, ids=_ids)
def test_image_readers(case, tmp_path):
    from vpl_plugin.data.voc import DatasetError, load_image
    from vpl_plugin.pseudo_masks import read_image_bgr

    crafted = case.make(tmp_path, tmp_path / "MARKER", filename=f"{case.name}.jpg")
    if case.accepted:
        img = load_image(crafted.path)
        assert img.mode == "L" and np.asarray(img).max() == 255 and np.asarray(img).min() == 0
        assert read_image_bgr(crafted.path).shape == (SIZE, SIZE, 3)
        return
    _refused(lambda: load_image(crafted.path), crafted, DatasetError)
    _refused(lambda: read_image_bgr(crafted.path), crafted, DatasetError)


@pytest.mark.parametrize("case", cf.ANNOTATION_CASES, ids=_ids)
def test_annotation_reader(case, tmp_path):
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import DatasetError, parse_voc_xml

    crafted = case.make(tmp_path, tmp_path / "MARKER", filename=f"{case.name}.xml")
    _refused(lambda: parse_voc_xml(crafted.path, SYNTHETIC), crafted, DatasetError)


@pytest.mark.parametrize("case", cf.LABEL_CASES, ids=_ids)
def test_label_readers(case, tmp_path):
    from vpl_plugin.data.labels import read_label_png
    from vpl_plugin.data.voc import labels_from_mask

    crafted = case.make(tmp_path, tmp_path / "MARKER", filename=f"{case.name}.png")
    _refused(lambda: read_label_png(crafted.path, 21), crafted)
    _refused(lambda: labels_from_mask(crafted.path, 21), crafted)


@pytest.fixture(scope="module")
def good_state(tiny_checkpoint):
    return torch.load(tiny_checkpoint, weights_only=True)


@pytest.mark.parametrize("case", cf.CLIP_CASES, ids=_ids)
def test_clip_readers(case, tmp_path, good_state, monkeypatch):
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.phase2.backbones import create_backbone

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    crafted = case.make(tmp_path, tmp_path / "MARKER", good_state)
    monkeypatch.setattr(torch.jit, "load", refuse)
    _refused(lambda: load_clip(str(crafted.path)), crafted)
    _refused(lambda: create_backbone(f"clip:{crafted.path}"), crafted)


@pytest.mark.parametrize("case", cf.PROTOTYPE_CASES, ids=_ids)
def test_prototype_reader(case, tmp_path, inputs):
    from vpl_plugin.prototypes import PrototypeSet

    crafted = case.make(tmp_path, tmp_path / "MARKER", inputs["protos"])
    _refused(lambda: PrototypeSet.load(crafted.path), crafted)


@pytest.mark.parametrize("case", cf.SEGMENTER_CASES, ids=_ids)
def test_segmenter_reader(case, tmp_path, inputs, monkeypatch):
    if "timm" in case.name:
        pytest.importorskip("timm", reason="the timm backbone needs timm")
    from vpl_plugin.phase2.decoder import load_segmenter

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    crafted = case.make(tmp_path, tmp_path / "MARKER", inputs["segmenter"])
    _refused(lambda: load_segmenter(crafted.path), crafted)


@pytest.mark.parametrize("case", cf.STATE_CASES, ids=_ids)
def test_training_state_readers(case, tmp_path):
    from vpl_plugin.demo.train_clip import export_training_state
    from vpl_plugin.phase2.train import load_train_state

    crafted = case.make(tmp_path, tmp_path / "MARKER", filename="last.pt")
    for call in (lambda: load_train_state(crafted.path),
                 lambda: export_training_state(crafted.path, tmp_path / "o.pt")):
        text = _refused(call, crafted)
        assert "--no-resume" in text
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("case", cf.BANK_CASES, ids=_ids)
def test_context_bank_reader(case, tmp_path):
    from vpl_plugin.cpal import ContextBank

    crafted = case.make(tmp_path, tmp_path / "MARKER")
    _refused(lambda: ContextBank.load(crafted.path), crafted)


@pytest.mark.parametrize("case", cf.CONFIG_CASES, ids=_ids)
def test_yaml_reader(case, tmp_path):
    from vpl_plugin._yaml import read_yaml_mapping

    crafted = case.make(tmp_path, tmp_path / "MARKER")
    if case.refused_by_reader:
        _refused(lambda: read_yaml_mapping(crafted.path), crafted)
    else:
        assert isinstance(read_yaml_mapping(crafted.path), dict)
    assert not crafted.marker.exists()


@pytest.mark.parametrize("case", cf.SPLIT_CASES, ids=_ids)
def test_split_readers(case, tmp_path):
    from vpl_plugin.data.coco import read_coco_split
    from vpl_plugin.data.voc import DatasetError, read_split

    crafted = case.make(tmp_path, tmp_path / "MARKER", GOOD[0])
    _refused(lambda: read_split(crafted.path), crafted, DatasetError)
    _refused(lambda: read_coco_split(crafted.path), crafted, DatasetError)


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


def _text_of(capsys, caplog) -> str:
    out = capsys.readouterr()
    return out.out + out.err + caplog.text


def _cli_check(code: int, expected: int, text: str, crafted: cf.Crafted, why: bool = True) -> None:
    """The common assertions: no traceback, no marker, the exit status, the culprit and reason named."""
    assert "Traceback" not in text, text
    assert not crafted.marker.exists(), f"{crafted.case.name}: the payload ran"
    assert code == expected, f"{crafted.case.name}: exit {code}, expected {expected}\n{text}"
    if expected != EXIT_OK or not crafted.case.accepted:
        assert crafted.culprit.name in text, f"{crafted.case.name}: culprit not named\n{text}"
    if why and crafted.case.why:
        assert crafted.case.why in text, f"{crafted.case.name}: reason {crafted.case.why!r} not given\n{text}"


def _outputs(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def _with_cam_of_first(cams_src: Path, dest: Path, new_id: str) -> Path:
    """A copy of the good CAM folder plus ``new_id.npy``, a copy of the first image's CAMs."""
    shutil.copytree(cams_src, dest)
    shutil.copy(dest / f"{GOOD[0]}.npy", dest / f"{new_id}.npy")
    return dest


CAM_COMMANDS = ["masks", "masks_no_crf", "eval"]


@pytest.mark.parametrize("command", CAM_COMMANDS)
@pytest.mark.parametrize("case", cf.CAM_CASES, ids=_ids)
def test_cli_on_crafted_cam_files(case, command, world, inputs, tmp_path, capsys, caplog):
    if command == "masks_no_crf" and case.name == "cam_wrong_size":
        pytest.skip("without --crf no image is read, so the CAM's own size is the mask's (upstream's rule)")
    root = _copy_world(world, tmp_path, case.name)
    cams = tmp_path / "cams"
    shutil.copytree(inputs["cams"], cams)
    crafted = case.make(cams, tmp_path / "MARKER", filename=f"{case.name}.npy")
    out = tmp_path / "out"
    if command == "eval":
        code = _run(["eval", "--cams", cams, "--gt-root", root / "SegmentationClass", "--dataset", "synthetic",
                     "--split-file", root / "ImageSets/Segmentation/list.txt", "--json", out / "r.json",
                     "--no-progress"])
        import json

        result = json.loads((out / "r.json").read_text())
        assert result["n_images"] == len(GOOD)
    else:
        extra = ["--no-crf"] if command == "masks_no_crf" else []
        code = _run(["masks", "--cams", cams, *_data(root, "list.txt", *extra), "--out", out])
        assert _outputs(out, ".png") == GOOD
    _cli_check(code, EXIT_PARTIAL, _text_of(capsys, caplog), crafted)


#: one image per run; `vpl learn` and `vpl segment` (and `vpl cams` again) take the whole image corpus
#: in one run below (test_cli_whole_image_corpus_in_one_run)
IMAGE_COMMANDS = ["cams", "masks", "train"]
#: `vpl train` reads its images and pseudo masks at every epoch, not once: one it cannot read
#: stops the run by name (exit 2; it resumes from OUT/last.pt once the file is fixed or dropped
#: from the list), where the one-pass commands skip it and go on (exit 3)
EXIT_STOPS = {"train": EXIT_USAGE}
#: two iterations of two images: every one of the three images is read in the first epoch
TRAIN_EPOCH = ["--iters", "2"]


def _image_run(command: str, root: Path, inputs, tmp_path: Path, new_id: str, masks: Path | None = None,
               extra: Sequence = ()) -> tuple:
    """Run ``command`` over ``root``'s list.txt; returns (exit status, output folder or file)."""
    out = tmp_path / "out"
    if command == "cams":
        return _run(["cams", "--clip", inputs["clip"], *_data(root, "list.txt", *extra), "--out", out]), out
    if command == "learn":
        return _run(["learn", "--clip", inputs["clip"], *_data(root, "list.txt", *extra), "--out",
                     tmp_path / "p.pt", "--iters", "1"]), tmp_path / "p.pt"
    if command == "masks":
        cams = _with_cam_of_first(inputs["cams"], tmp_path / "cams", new_id)
        return _run(["masks", "--cams", cams, *_data(root, "list.txt", *extra), "--out", out]), out
    if command == "segment":
        return _run(["segment", "--checkpoint", inputs["segmenter"], *_data(root, "list.txt", *extra),
                     "--out", out, "--scales", "1", "--no-flip"]), out
    return _run(_train(root, inputs["clip"], inputs["protos"], out, masks or root / "SegmentationClass",
                       "list.txt", *extra)), out


def _good_outputs_exist(command: str, out: Path, new_id: str, processed: bool) -> None:
    if command == "learn":
        assert out.is_file()
    elif command == "train":
        assert (out / "segmenter.pt").is_file()
    else:
        suffix = ".npy" if command == "cams" else ".png"
        assert _outputs(out, suffix) == sorted(GOOD + ([new_id] if processed else []))


@pytest.mark.parametrize("command", IMAGE_COMMANDS)
@pytest.mark.parametrize("case", cf.IMAGE_CASES, ids=_ids)
def test_cli_on_crafted_images(case, command, world, inputs, tmp_path, capsys, caplog):
    root = _copy_world(world, tmp_path, case.name)
    crafted = case.make(root / "JPEGImages", tmp_path / "MARKER", filename=f"{case.name}.jpg")
    extra = TRAIN_EPOCH if command == "train" else []
    code, out = _image_run(command, root, inputs, tmp_path, case.name, extra=extra)
    expected = EXIT_OK if case.accepted else EXIT_STOPS.get(command, EXIT_PARTIAL)
    _cli_check(code, expected, _text_of(capsys, caplog), crafted)
    if expected != EXIT_USAGE:
        _good_outputs_exist(command, out, case.name, processed=case.accepted)


@pytest.mark.slow  # `vpl cams` and `vpl learn` take the whole annotation corpus in one run below
@pytest.mark.parametrize("command", ["cams", "learn", "train"])
@pytest.mark.parametrize("case", cf.ANNOTATION_CASES, ids=_ids)
def test_cli_on_crafted_annotations(case, command, world, inputs, tmp_path, capsys, caplog):
    root = _copy_world(world, tmp_path, case.name)
    crafted = case.make(root / "Annotations", tmp_path / "MARKER", filename=f"{case.name}.xml")
    extra = ["--label-source", "xml"] + (["--skip-missing"] if command == "train" else [])
    code, out = _image_run(command, root, inputs, tmp_path, case.name, extra=extra)
    _cli_check(code, EXIT_PARTIAL, _text_of(capsys, caplog), crafted)
    _good_outputs_exist(command, out, case.name, processed=False)


@pytest.mark.parametrize("command", ["eval_masks", "eval_cams", "cams_mask_labels", "train"])
@pytest.mark.parametrize("case", cf.LABEL_CASES, ids=_ids)
def test_cli_on_crafted_label_pngs(case, command, world, inputs, tmp_path, capsys, caplog):
    root = _copy_world(world, tmp_path, case.name)
    gt = root / "SegmentationClass"
    crafted = case.make(gt, tmp_path / "MARKER", filename=f"{case.name}.png")
    split = root / "ImageSets/Segmentation/list.txt"
    out = tmp_path / "out"
    if command.startswith("eval"):
        if command == "eval_masks":
            source = ["--masks", _copy_world(world, tmp_path / "pred", case.name) / "SegmentationClass"]
        else:
            source = ["--cams", _with_cam_of_first(inputs["cams"], tmp_path / "cams", case.name)]
        code = _run(["eval", *source, "--gt-root", gt, "--split-file", split, "--dataset", "synthetic",
                     "--no-progress"])
    elif command == "cams_mask_labels":
        code, out = _image_run("cams", root, inputs, tmp_path, case.name, extra=["--label-source", "mask"])
        _good_outputs_exist("cams", out, case.name, processed=False)
    else:  # the crafted file as a pseudo mask
        code, out = _image_run("train", root, inputs, tmp_path, case.name, masks=gt, extra=TRAIN_EPOCH)
    _cli_check(code, EXIT_STOPS.get(command, EXIT_PARTIAL), _text_of(capsys, caplog), crafted)


MODEL_COMMANDS = ["cams", "learn", "train", "segment", "reproduce", "demo"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("case", cf.CLIP_CASES, ids=_ids)
def test_cli_on_crafted_clip_checkpoints(case, command, world, inputs, good_state, tmp_path, capsys, caplog,
                                         monkeypatch):
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    crafted = case.make(tmp_path, tmp_path / "MARKER", good_state)
    out = tmp_path / "out"
    data = _data(world, "train.txt")
    argv = {"cams": ["cams", "--clip", crafted.path, *data, "--out", out],
            "learn": ["learn", "--clip", crafted.path, *data, "--out", tmp_path / "p.pt", "--iters", "1"],
            "train": _train(world, crafted.path, inputs["protos"], out, world / "SegmentationClass"),
            "segment": ["segment", "--checkpoint", inputs["segmenter"], "--clip", crafted.path, *data, "--out", out],
            "reproduce": ["reproduce", "table1", "--dataset", "synthetic", "--voc-root", world, "--clip",
                          crafted.path, "--out", out, "--limit", "1", "--iters", "1", "--no-progress"],
            "demo": ["demo", "--clip", crafted.path, "--out", out, "--quick", "--no-progress"]}[command]
    _cli_check(_run(argv), EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not list(out.glob("*.npy")) and not (out / "segmenter.pt").exists() and not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("command", ["cams", "train"])
@pytest.mark.parametrize("case", cf.PROTOTYPE_CASES, ids=_ids)
def test_cli_on_crafted_prototype_files(case, command, world, inputs, tmp_path, capsys, caplog):
    crafted = case.make(tmp_path, tmp_path / "MARKER", inputs["protos"])
    out = tmp_path / "out"
    if command == "cams":
        argv = ["cams", "--clip", inputs["clip"], *_data(world, "train.txt"), "--prototypes", crafted.path,
                "--out", out]
    else:
        argv = _train(world, inputs["clip"], crafted.path, out, world / "SegmentationClass")
    _cli_check(_run(argv), EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not list(out.glob("*.npy")) and not (out / "segmenter.pt").exists()


@pytest.mark.parametrize("case", cf.SEGMENTER_CASES, ids=_ids)
def test_cli_on_crafted_segmenter_checkpoints(case, world, inputs, tmp_path, capsys, caplog, monkeypatch):
    if "timm" in case.name:
        pytest.importorskip("timm", reason="the timm backbone needs timm")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    crafted = case.make(tmp_path, tmp_path / "MARKER", inputs["segmenter"])
    out = tmp_path / "out"
    code = _run(["segment", "--checkpoint", crafted.path, *_data(world, "train.txt"), "--out", out])
    _cli_check(code, EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("command", ["train", "train-clip"])
@pytest.mark.parametrize("case", cf.STATE_CASES, ids=_ids)
def test_cli_resume_from_crafted_training_states(case, command, world, inputs, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    if command == "train":
        crafted = case.make(out, tmp_path / "MARKER", filename="last.pt")
        argv = _train(world, inputs["clip"], inputs["protos"], out, world / "SegmentationClass")
    else:
        crafted = case.make(tmp_path, tmp_path / "MARKER", filename="c.pt.train.pt")
        argv = ["train-clip", "--out", tmp_path / "c.pt", "--steps", "1", "--batch-size", "2",
                "--vision-width", "64", "--vision-layers", "1", "--no-progress"]
    text_code = _run(argv)
    text = _text_of(capsys, caplog)
    _cli_check(text_code, EXIT_USAGE, text, crafted)
    assert "--no-resume" in text
    assert not (out / "segmenter.pt").exists() and not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("case", cf.RESUME_CASES, ids=_ids)
def test_cli_rerun_redoes_crafted_leftovers(case, world, inputs, tmp_path, capsys, caplog):
    """A file a rerun meets (resume state, cache record, earlier output) is redone, with a warning
    naming it; nothing in it runs."""
    out = tmp_path / "out"
    data = _data(world, "train.txt")
    if case.name.startswith("partial"):
        crafted = case.make(out, tmp_path / "MARKER", filename="cpal_bank.pt.partial")
        argv = ["cams", "--adapter", "clip-cpal", "--clip", inputs["clip"], *data, "--out", out]
    elif case.name.startswith("cache"):
        argv = ["learn", "--clip", inputs["clip"], *data, "--out", out / "p.pt", "--iters", "1"]
        assert _run(argv) == EXIT_OK
        crafted = case.make(out / "p.features", tmp_path / "MARKER", filename=f"{GOOD[0]}.npz")
    else:
        crafted = case.make(out, tmp_path / "MARKER", filename=f"{GOOD[0]}.npy")
        argv = ["cams", "--clip", inputs["clip"], *data, "--out", out]
    capsys.readouterr()
    caplog.clear()
    _cli_check(_run(argv), EXIT_OK, _text_of(capsys, caplog), crafted)
    if case.name.startswith("partial"):
        assert (out / "cpal_bank.pt").is_file() and not crafted.path.exists()
    elif case.name.startswith("cache"):
        assert crafted.path.stat().st_size > 100
    else:
        from vpl_plugin.data.cam_files import read_cam_file

        assert read_cam_file(crafted.path)["keys"].size


@pytest.mark.parametrize("case", cf.BANK_CASES, ids=_ids)
def test_cli_on_crafted_context_banks(case, world, inputs, tmp_path, capsys, caplog):
    crafted = case.make(tmp_path, tmp_path / "MARKER")
    out = tmp_path / "out"
    code = _run(["cams", "--adapter", "clip-cpal", "--cpal-bank", crafted.path, "--clip", inputs["clip"],
                 *_data(world, "train.txt"), "--out", out])
    _cli_check(code, EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not list(out.glob("*.npy"))


CONFIG_COMMANDS = ["cams", "learn", "masks", "eval", "train", "segment"]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("case", cf.CONFIG_CASES, ids=_ids)
def test_cli_on_crafted_config_files(case, command, tmp_path, capsys, caplog):
    crafted = case.make(tmp_path, tmp_path / "MARKER")
    code = _run([command, "--config", crafted.path, "--out", tmp_path / "out"] if command != "eval"
                else [command, "--config", crafted.path])
    _cli_check(code, EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("case", cf.SPLIT_CASES, ids=_ids)
def test_cli_on_crafted_split_files(case, command, world, inputs, tmp_path, capsys, caplog):
    crafted = case.make(tmp_path, tmp_path / "MARKER", GOOD[0])
    out = tmp_path / "out"
    data = _data(world, crafted.path)
    argv = {"cams": ["cams", "--clip", inputs["clip"], *data, "--out", out],
            "learn": ["learn", "--clip", inputs["clip"], *data, "--out", tmp_path / "p.pt", "--iters", "1"],
            "masks": ["masks", "--cams", inputs["cams"], *data, "--out", out],
            "eval": ["eval", "--cams", inputs["cams"], "--gt-root", world / "SegmentationClass", "--split-file",
                     crafted.path, "--dataset", "synthetic", "--no-progress"],
            "train": _train(world, inputs["clip"], inputs["protos"], out, world / "SegmentationClass", crafted.path),
            "segment": ["segment", "--checkpoint", inputs["segmenter"], *data, "--out", out]}[command]
    _cli_check(_run(argv), EXIT_USAGE, _text_of(capsys, caplog), crafted)
    assert not list(out.glob("*.npy")) and not list(out.glob("*.png"))


# ------------------------------------------------------------------------------------------------
# the whole corpus of a kind in one run: every culprit named, every good file processed
# ------------------------------------------------------------------------------------------------


def _corpus_world(world: Path, tmp_path: Path, groups) -> tuple:
    """A copy of ``world`` holding every case of ``groups`` (``(cases, folder, suffix)``; a
    folder name is under the copy) as its own image id, between the good ids; returns (root,
    crafted files)."""
    root = _copy_world(world, tmp_path)
    crafted, ids = [], []
    for cases, sub, suffix in groups:
        for case in cases:
            for s, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png")):
                shutil.copy(root / s / f"{GOOD[0]}{ext}", root / s / f"{case.name}{ext}")
            crafted.append(case.make(root / sub, tmp_path / f"MARKER_{case.name}", filename=case.name + suffix))
            ids.append(case.name)
    (root / "ImageSets/Segmentation/list.txt").write_text("\n".join(GOOD[:1] + ids + GOOD[1:]) + "\n")
    return root, crafted


@pytest.mark.parametrize("command", ["cams", "learn", "segment"])
def test_cli_whole_image_corpus_in_one_run(command, world, inputs, tmp_path, capsys, caplog):
    groups = [(cf.IMAGE_CASES, "JPEGImages", ".jpg")]
    if command != "segment":  # segment does not read annotations
        groups.append((cf.ANNOTATION_CASES, "Annotations", ".xml"))
    root, crafted = _corpus_world(world, tmp_path, groups)
    code, out = _image_run(command, root, inputs, tmp_path, "")
    text = _text_of(capsys, caplog)
    assert code == EXIT_PARTIAL and "Traceback" not in text, text
    refused = [c for c in crafted if not c.case.accepted]
    for c in crafted:
        assert not c.marker.exists()
    for c in refused:
        assert c.culprit.name in text and c.case.why in text, (c.case.name, text)
    accepted = sorted(c.case.name for c in crafted if c.case.accepted)
    if command == "learn":
        assert out.is_file()
    else:
        assert _outputs(out, ".npy" if command == "cams" else ".png") == sorted(GOOD + accepted)


@pytest.mark.parametrize("command", ["masks_workers", "eval"])
def test_cli_whole_cam_corpus_in_one_run(command, world, inputs, tmp_path, capsys, caplog):
    """Every crafted CAM file in one folder; `vpl masks --workers 2` sends the refusals from its
    worker processes."""
    cams = tmp_path / "cams"
    shutil.copytree(inputs["cams"], cams)
    root, crafted = _corpus_world(world, tmp_path, [(cf.CAM_CASES, cams, ".npy")])
    out = tmp_path / "out"
    if command == "eval":
        code = _run(["eval", "--cams", cams, "--gt-root", root / "SegmentationClass", "--dataset", "synthetic",
                     "--split-file", root / "ImageSets/Segmentation/list.txt", "--no-progress",
                     "--json", out / "r.json"])
        import json

        result = json.loads((out / "r.json").read_text())
        assert result["n_images"] == len(GOOD)
        text = _text_of(capsys, caplog)
        assert f"... and {len(crafted) - 10} more (--json FILE writes the full list)" in text
        text += json.dumps(result["missing"])  # stderr lists the first ten
    else:
        code = _run(["masks", "--cams", cams, *_data(root, "list.txt"), "--out", out, "--workers", "2"])
        assert _outputs(out, ".png") == GOOD
        text = _text_of(capsys, caplog)
    assert code == EXIT_PARTIAL and "Traceback" not in text, text
    for c in crafted:
        assert not c.marker.exists()
        assert c.culprit.name in text and c.case.why in text, (c.case.name, text)


# ------------------------------------------------------------------------------------------------
# the oracle: each payload does run under the loader the package does not use
# ------------------------------------------------------------------------------------------------


def _unsafe_load(group: str, crafted: cf.Crafted) -> None:
    """Open ``crafted`` the way the package never does (what the payload was written against)."""
    import pickle
    import zipfile

    path = crafted.culprit
    if group == "cam":
        np.load(path, allow_pickle=True)
    elif group == "config":
        import yaml

        yaml.unsafe_load(path.read_text())
    elif "torchscript" in crafted.case.name and "code" in crafted.case.name:
        torch.jit.load(str(path))
    elif "torchscript" in crafted.case.name:  # a Python reader of the archive's data.pkl record
        with zipfile.ZipFile(path) as zf:
            pickle.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    else:
        torch.load(path, weights_only=False)


_PAYLOADS = [pytest.param(group, case, id=case.name) for group, cases in cf.all_cases().items()
             for case in cases if case.runs_code]


@pytest.mark.parametrize("group, case", _PAYLOADS)
def test_every_payload_runs_under_an_unsafe_loader(group, case, tmp_path, good_state, inputs):
    """Without this the marker assertions above could not fail: each payload, opened with
    ``np.load(allow_pickle=True)``, ``torch.load(weights_only=False)``, ``torch.jit.load`` or
    ``yaml.unsafe_load``, creates its marker."""
    if "timm" in case.name:
        pytest.importorskip("timm")
    base = {"clip": good_state, "prototypes": inputs["protos"], "segmenter": inputs["segmenter"]}.get(group)
    crafted = case.make(tmp_path, tmp_path / "MARKER", base, filename=case.name + (".npy" if group == "cam" else ""))
    assert not crafted.marker.exists()
    with contextlib.suppress(Exception):  # the payload runs before the loader notices anything
        _unsafe_load(group, crafted)
    assert crafted.marker.exists(), f"{case.name}: the payload did not run even under an unsafe loader"


def test_the_truncated_jpeg_check_of_the_crf_reader(tmp_path):
    """A JPEG is complete when an end-of-image marker follows its last start-of-scan marker:
    cut anywhere inside its scans it is refused, with trailing bytes after the marker it is not
    (oracle: Pillow's decoder, which refuses every cut file and reads the others)."""
    from PIL import Image

    from vpl_plugin.data.voc import DatasetError, load_image
    from vpl_plugin.pseudo_masks import read_image_bgr

    rng = np.random.default_rng(0)
    for progressive in (False, True):
        buf = tmp_path / "full.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), np.uint8)).save(buf, progressive=progressive)
        data = buf.read_bytes()
        first_scan = data.index(b"\xff\xda")
        for cut in np.linspace(first_scan + 20, len(data) - 2, 6).astype(int):
            path = tmp_path / f"cut_{progressive}_{cut}.jpg"
            path.write_bytes(data[:cut])
            with pytest.raises(DatasetError):
                load_image(path)  # the oracle
            with pytest.raises(DatasetError, match="truncated"):
                read_image_bgr(path)
        padded = tmp_path / f"padded_{progressive}.jpg"
        padded.write_bytes(data + bytes(5000))  # beyond the 4 KB tail the check reads first
        assert read_image_bgr(padded).shape == (64, 96, 3)
        assert np.asarray(load_image(padded)).shape == (64, 96, 3)
