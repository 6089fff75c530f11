"""The `vpl` command end to end, in-process, on real VOC images with a random-weight CLIP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from voc_helpers import FOUR_IDS, copy_voc_layout  # noqa: E402

from vpl_plugin.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main  # noqa: E402

IDS = FOUR_IDS


@pytest.fixture(scope="module")
def small_voc(voc_root, tmp_path_factory) -> Path:
    """Four real VOC images (with XML and ground truth) in a temporary VOC layout with train.txt."""
    return copy_voc_layout(voc_root, tmp_path_factory.mktemp("voc"))


def _run(argv):
    return main([str(a) for a in argv])


def test_cams_learn_cams_masks_eval_end_to_end(small_voc, tiny_checkpoint, tmp_path, capsys):
    data = ["--clip", tiny_checkpoint, "--root", small_voc, "--split-file", "train.txt", "--no-progress"]
    assert _run(["cams", *data, "--out", tmp_path / "cams_text"]) == EXIT_OK
    files = sorted(p.name for p in (tmp_path / "cams_text").glob("*.npy"))
    assert files == [f"{i}.npy" for i in IDS]
    import yaml

    written = yaml.safe_load((tmp_path / "cams_text" / "vpl_cams.yaml").read_text())
    assert written["label_sources"]["xml"] == 4
    assert written["adapter_config"]["templates"] == ["a clean origami {}."]
    d = np.load(tmp_path / "cams_text" / "2007_000032.npy", allow_pickle=True).item()
    assert list(d["keys"]) == [0, 14] and d["attn_highres"].shape == (2, 281, 500)

    protos = tmp_path / "vpl.pt"
    assert _run(["learn", *data, "--out", protos, "--iters", "5", "--tau", "0.03"]) == EXIT_OK
    assert protos.exists() and (tmp_path / "vpl.yaml").exists()
    history = json.loads((tmp_path / "vpl.history.json").read_text())
    assert history["loss"][-1] <= history["loss"][0]

    assert _run(["cams", *data, "--out", tmp_path / "cams_vpl", "--prototypes", protos]) == EXIT_OK
    d2 = np.load(tmp_path / "cams_vpl" / "2007_000032.npy", allow_pickle=True).item()
    assert not np.array_equal(d["attn_highres"], d2["attn_highres"])

    assert _run(["masks", "--cams", tmp_path / "cams_vpl", "--root", small_voc, "--split-file", "train.txt",
                 "--out", tmp_path / "masks", "--no-progress"]) == EXIT_OK
    from PIL import Image

    mask = np.array(Image.open(tmp_path / "masks" / "2007_000032.png"))
    assert mask.shape == (281, 500) and set(np.unique(mask)) <= {0, 1, 15, 255}

    capsys.readouterr()
    result = tmp_path / "eval.json"
    gt = small_voc / "SegmentationClass"
    assert _run(["eval", "--cams", tmp_path / "cams_text", "--gt-root", gt, "--split-file",
                 small_voc / "ImageSets/Segmentation/train.txt", "--json", result, "--no-progress"]) == EXIT_OK
    out = capsys.readouterr().out
    report = json.loads(result.read_text())
    assert 0 <= report["miou"] <= 1 and f"{100 * report['miou']:.2f}" in out
    assert _run(["eval", "--masks", tmp_path / "masks", "--gt-root", gt, "--split-file",
                 small_voc / "ImageSets/Segmentation/train.txt", "--no-progress"]) == EXIT_OK
    # the raw GradCAM (--save-gradcam, key highres) is searched over upstream's exponents 1..10
    assert _run(["cams", *data, "--out", tmp_path / "cams_raw", "--save-gradcam", "--limit", "2"]) == EXIT_OK
    raw_json = tmp_path / "eval_raw.json"
    assert _run(["eval", "--cams", tmp_path / "cams_raw", "--gt-root", gt, "--cam-key", "highres",
                 "--split-file", small_voc / "ImageSets/Segmentation/train.txt", "--limit", "2",
                 "--json", raw_json, "--no-progress"]) == EXIT_OK
    raw = json.loads(raw_json.read_text())
    assert [float(t) for t in raw["sweep"]] == [float(k) for k in range(1, 11)]
    assert raw["miou"] == pytest.approx(max(raw["sweep"].values())) and raw["n_images"] == 2


def test_identity_learning_reproduces_text_cams(small_voc, tiny_checkpoint, tmp_path):
    """`vpl learn --tau clip --iters 0` gives prototypes whose CAMs are the text CAMs, bit for bit."""
    data = ["--clip", tiny_checkpoint, "--root", small_voc, "--split-file", "train.txt", "--no-progress",
            "--limit", "2"]
    assert _run(["cams", *data, "--out", tmp_path / "t"]) == EXIT_OK
    assert _run(["learn", *data, "--out", tmp_path / "id.pt", "--tau", "clip", "--iters", "0"]) == EXIT_OK
    assert _run(["cams", *data, "--out", tmp_path / "v", "--prototypes", tmp_path / "id.pt"]) == EXIT_OK
    for i in IDS[:2]:
        a = np.load(tmp_path / "t" / f"{i}.npy", allow_pickle=True).item()
        b = np.load(tmp_path / "v" / f"{i}.npy", allow_pickle=True).item()
        np.testing.assert_array_equal(a["attn_highres"], b["attn_highres"])
    # resuming into a folder of CAMs made with other settings is refused (they would be kept)
    before = (tmp_path / "t" / f"{IDS[0]}.npy").read_bytes()
    assert _run(["cams", *data, "--out", tmp_path / "t", "--prototypes", tmp_path / "id.pt"]) == EXIT_USAGE
    assert _run(["cams", *data, "--out", tmp_path / "t", "--no-refine"]) == EXIT_USAGE
    assert (tmp_path / "t" / f"{IDS[0]}.npy").read_bytes() == before
    assert _run(["cams", *data, "--out", tmp_path / "t"]) == EXIT_OK  # same settings: resumes


def test_cams_of_the_former_exact_fp32_default_resume_only_with_exact_fp32(small_voc, tiny_checkpoint, tmp_path,
                                                                          capsys):
    """A CAM folder written before upstream's numerics became the default (recorded
    fp16_compat: false) is refused by a default run, naming --exact-fp32, and resumes with it."""
    import yaml

    data = ["--clip", tiny_checkpoint, "--root", small_voc, "--split-file", "train.txt", "--no-progress"]
    old = tmp_path / "old"
    assert _run(["cams", *data, "--out", old, "--limit", "1", "--exact-fp32"]) == EXIT_OK
    record = yaml.safe_load((old / "vpl_cams.yaml").read_text())
    assert record["adapter_config"]["fp16_compat"] is False
    record.pop("exact_fp32", None)  # the record as earlier versions wrote it: no such option
    record.pop("fp16_compat", None)
    (old / "vpl_cams.yaml").write_text(yaml.safe_dump(record))
    before = (old / f"{IDS[0]}.npy").read_bytes()
    capsys.readouterr()
    for alias in ([], ["--fp16-compat"]):
        assert _run(["cams", *data, "--out", old, *alias]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "fp16_compat: False -> True" in err and "rerun with --exact-fp32" in err
    assert (old / f"{IDS[0]}.npy").read_bytes() == before and len(list(old.glob("*.npy"))) == 1
    assert _run(["cams", *data, "--out", old, "--exact-fp32"]) == EXIT_OK  # resumes the old run
    assert (old / f"{IDS[0]}.npy").read_bytes() == before and len(list(old.glob("*.npy"))) == 4
    # and the other way round: a default folder refuses --exact-fp32
    new = tmp_path / "new"
    assert _run(["cams", *data, "--out", new, "--limit", "1"]) == EXIT_OK
    capsys.readouterr()
    assert _run(["cams", *data, "--out", new, "--exact-fp32"]) == EXIT_USAGE
    assert "rerun without --exact-fp32" in capsys.readouterr().err
    assert _run(["cams", *data, "--out", new, "--fp16-compat"]) == EXIT_OK  # the alias is the default
    assert np.abs(np.load(old / f"{IDS[1]}.npy", allow_pickle=True).item()["attn_highres"].astype(np.float32)
                  - np.load(new / f"{IDS[1]}.npy", allow_pickle=True).item()["attn_highres"]).max() > 0
    assert _run(["cams", *data, "--out", tmp_path / "both", "--fp16-compat", "--exact-fp32"]) == EXIT_USAGE
    assert "contradicts --exact-fp32" in capsys.readouterr().err


def test_learn_cache_of_the_former_exact_fp32_default_is_reused_only_with_exact_fp32(small_voc, tiny_checkpoint,
                                                                                     tmp_path, capsys):
    data = ["--clip", tiny_checkpoint, "--root", small_voc, "--split-file", "train.txt", "--no-progress",
            "--limit", "1", "--iters", "1", "--cache-dir", tmp_path / "cache"]
    assert _run(["learn", *data, "--out", tmp_path / "a.pt", "--exact-fp32"]) == EXIT_OK
    assert "numerics" not in json.loads((tmp_path / "cache" / "settings.json").read_text())  # as written before
    capsys.readouterr()
    assert _run(["learn", *data, "--out", tmp_path / "b.pt"]) == EXIT_USAGE
    assert "rerun with --exact-fp32" in capsys.readouterr().err
    assert _run(["learn", *data, "--out", tmp_path / "c.pt", "--exact-fp32"]) == EXIT_OK
    summary = json.loads((tmp_path / "c.history.json").read_text())["summary"]
    assert summary["skipped_existing"] == 1


def test_interrupted_run_resumes_to_identical_files(small_voc, tiny_checkpoint, tmp_path):
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.pipeline import generate_cams

    dataset = VOCDataset(small_voc, "train.txt")
    adapter = CLIPESAdapter(load_clip(str(tiny_checkpoint)))
    generate_cams(adapter, dataset, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real_call = CLIPESAdapter.__call__

    class Crashing(CLIPESAdapter):
        def __call__(self, image, labels):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real_call(self, image, labels)

    crashing = Crashing(adapter.encoder)
    with pytest.raises(KeyboardInterrupt):
        generate_cams(crashing, dataset, tmp_path / "resumed", progress=False)
    assert len(list((tmp_path / "resumed").glob("*.npy"))) == 2
    assert not list((tmp_path / "resumed").glob(".*tmp*"))  # no half-written file left
    summary = generate_cams(adapter, dataset, tmp_path / "resumed", progress=False)
    assert summary.skipped_existing == 2 and summary.done == 2
    for i in IDS:
        assert (tmp_path / "full" / f"{i}.npy").read_bytes() == (tmp_path / "resumed" / f"{i}.npy").read_bytes()


def test_bad_inputs_are_reported_and_the_run_continues(small_voc, tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(small_voc, root)
    (root / "JPEGImages" / "broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(root / "Annotations" / f"{IDS[0]}.xml", root / "Annotations" / "broken.xml")
    shutil.copy(root / "JPEGImages" / f"{IDS[0]}.jpg", root / "JPEGImages" / "alien.jpg")
    xml = (root / "Annotations" / f"{IDS[0]}.xml").read_text().replace("<name>aeroplane</name>", "<name>ufo</name>")
    (root / "Annotations" / "alien.xml").write_text(xml)
    shutil.copy(root / "JPEGImages" / f"{IDS[0]}.jpg", root / "JPEGImages" / "nolabel.jpg")
    (root / "list.txt").write_text("\n".join([IDS[0], "broken", "alien", "nolabel", IDS[1]]) + "\n")
    out = tmp_path / "cams"
    code = _run(["cams", "--clip", tiny_checkpoint, "--root", root, "--split-file", root / "list.txt",
                 "--out", out, "--no-progress"])
    assert code == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "broken" in err and "alien" in err and "ufo" in err and "nolabel" in err
    summary = json.loads((out / "vpl_cams_summary.json").read_text())
    assert summary["done"] == 2 and {f["id"] for f in summary["failed"]} == {"broken", "alien", "nolabel"}
    assert sorted(p.stem for p in out.glob("*.npy")) == sorted(IDS[:2])


def test_usage_errors_exit_2_with_a_message(tmp_path, small_voc, capsys):
    assert _run(["cams", "--root", small_voc, "--out", tmp_path]) == EXIT_USAGE
    assert "--clip" in capsys.readouterr().err
    assert _run(["cams", "--clip", tmp_path / "missing.pt", "--root", small_voc, "--out", tmp_path / "o",
                 "--no-progress"]) == EXIT_USAGE
    assert "missing.pt" in capsys.readouterr().err
    assert _run(["learn", "--clip", "x", "--root", small_voc, "--out", tmp_path / "p.pt", "--tau", "hot"]) == EXIT_USAGE
    assert "--tau" in capsys.readouterr().err
    argv = ["eval", "--gt-root", tmp_path, "--split-file", tmp_path / "nolist.txt", "--cams", tmp_path]
    assert _run(argv) == EXIT_USAGE


def test_config_file_sits_between_defaults_and_flags(tmp_path, small_voc, tiny_checkpoint):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"clip": str(tiny_checkpoint), "root": str(small_voc), "limit": 1,
                                   "box_threshold": 0.5, "progress": False}))
    assert _run(["cams", "--config", cfg, "--out", tmp_path / "o", "--box-threshold", "0.6"]) == EXIT_OK
    written = yaml.safe_load((tmp_path / "o" / "vpl_cams.yaml").read_text())
    assert written["limit"] == 1 and written["box_threshold"] == 0.6
    assert written["adapter_config"]["box_threshold"] == 0.6
    assert len(list((tmp_path / "o").glob("*.npy"))) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: red\n")
    assert _run(["cams", "--config", bad, "--out", tmp_path / "o2"]) == EXIT_USAGE


def test_help_teaches_and_python_m_works():
    proc = subprocess.run([sys.executable, "-m", "vpl_plugin", "learn", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("--tau", "--phi", "--iters", "examples:", "seed_hardened",
                 "torchrun --nproc_per_node 4 -m vpl_plugin learn"):
        assert word in proc.stdout
    assert main(["--version"]) == 0


def test_template_ensemble_changes_the_text_prototypes(small_voc, tiny_checkpoint, tmp_path):
    data = ["--clip", tiny_checkpoint, "--root", small_voc, "--split-file", "train.txt", "--no-progress",
            "--limit", "1"]
    assert _run(["cams", *data, "--out", tmp_path / "a"]) == EXIT_OK
    assert _run(["cams", *data, "--out", tmp_path / "b", "--template", "a clean origami {}.",
                 "--template", "a photo of a {}."]) == EXIT_OK
    a = np.load(tmp_path / "a" / f"{IDS[0]}.npy", allow_pickle=True).item()
    b = np.load(tmp_path / "b" / f"{IDS[0]}.npy", allow_pickle=True).item()
    assert not np.array_equal(a["attn_highres"], b["attn_highres"])
    assert _run(["cams", *data, "--out", tmp_path / "c", "--template", "no slot"]) == EXIT_USAGE


def test_recommended_configuration_on_the_synthetic_export(tmp_path):
    """`--dataset synthetic` end to end with the shipped demo CLIP and the recommended flags."""
    from vpl_plugin.data.synthetic import SceneWorld, export_voc
    from vpl_plugin.demo.report import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"shipped demo CLIP {DEFAULT_CHECKPOINT} absent")
    root = export_voc(SceneWorld(seed=7), tmp_path / "syn", {"train": (0, 12), "val": (10_000_000, 6)})
    common = ["--clip", DEFAULT_CHECKPOINT, "--dataset", "synthetic", "--root", root, "--no-progress",
              "--template", "a photo of a {}."]
    assert _run(["learn", *common, "--split-file", "train.txt", "--out", tmp_path / "p.pt",
                 "--pooling", "region", "--tau", "0.1"]) == EXIT_OK
    for name, extra in (("text", []), ("vpl", ["--prototypes", tmp_path / "p.pt", "--map-mode", "dense"])):
        assert _run(["cams", *common, "--split-file", "val.txt", "--out", tmp_path / name, *extra]) == EXIT_OK
        assert _run(["eval", "--dataset", "synthetic", "--cams", tmp_path / name, "--gt-root",
                     root / "SegmentationClass", "--split-file", root / "ImageSets/Segmentation/val.txt",
                     "--json", tmp_path / f"{name}.json", "--no-progress"]) == EXIT_OK
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(report["per_class"]) == 11 and 0 <= report["miou"] <= 1


def test_train_clip_refuses_bad_selection_settings_and_reports_the_kept_step(tmp_path, capsys):
    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--select-every", "1", "--select-scenes", "0",
                 "--no-progress"]) == EXIT_USAGE
    assert "--select-scenes must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()
    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--workers", "-1", "--no-progress"]) == EXIT_USAGE
    assert "--workers must be at least 0" in capsys.readouterr().err
    # the selection scenes start at scene 50,000,000 of the training world; training must stay below
    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--select-every", "1", "--steps", "400000",
                 "--batch-size", "128", "--no-progress"]) == EXIT_USAGE
    assert "selection scenes" in capsys.readouterr().err
    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--steps", "2", "--batch-size", "4", "--select-every", "1",
                 "--select-scenes", "3", "--workers", "1", "--no-progress"]) == EXIT_OK
    record = json.loads((tmp_path / "c.pt.curve.json").read_text())
    assert [s["step"] for s in record["selection"]] == [1, 2]
    assert f"kept step {record['selected_step']} (text GradCAM seed mIoU" in capsys.readouterr().out


def test_train_clip_patch_size_sets_the_token_grid(tmp_path, capsys):
    from vpl_plugin.backbones import load_clip

    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--patch-size", "16", "--no-progress"]) == EXIT_USAGE
    assert "at least 8x8 tokens" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()
    assert _run(["train-clip", "--out", tmp_path / "c.pt", "--patch-size", "4", "--steps", "1", "--batch-size", "2",
                 "--no-progress"]) == EXIT_OK
    enc = load_clip(str(tmp_path / "c.pt"))
    assert (enc.patch_size, enc.pretrain_grid) == (4, 16)
    assert json.loads((tmp_path / "c.pt.curve.json").read_text())["arch"]["patch_size"] == 4
