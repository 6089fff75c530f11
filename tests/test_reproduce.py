"""`vpl reproduce table1` in-process: real VOC images with a random CLIP, dry runs, the synthetic world."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from voc_helpers import FOUR_IDS, copy_voc_layout  # noqa: E402

from vpl_plugin.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from vpl_plugin.reproduce import STAGE_MARKER, TABLE1_ROWS  # noqa: E402

IDS = FOUR_IDS


@pytest.fixture(scope="module")
def four_voc(voc_root, tmp_path_factory) -> Path:
    """Four real VOC images (with XML and ground truth) in a temporary VOC layout with train.txt."""
    return copy_voc_layout(voc_root, tmp_path_factory.mktemp("voc4"))


def _run(argv):
    return main([str(a) for a in argv])


def _stage_state(out: Path):
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob(f"*/{STAGE_MARKER}")}


def test_table1_on_real_voc_with_a_random_clip_and_rerun_reuses_stages(four_voc, tiny_checkpoint, tmp_path,
                                                                       capsys):
    out = tmp_path / "t1"
    argv = ["reproduce", "table1", "--voc-root", four_voc, "--clip", tiny_checkpoint, "--learn-split", "train",
            "--out", out, "--iters", "5", "--no-progress"]
    assert _run(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert "projected run time" in text and "prototype steps: 5 steps" in text
    table = json.loads((out / "table1.json").read_text())
    rows = {r["row"]: r for r in table["rows"]}
    assert set(rows) == {row.name for row in TABLE1_ROWS}
    for row in TABLE1_ROWS:
        assert (rows[row.name]["paper_seed"], rows[row.name]["paper_mask"]) == (row.paper_seed, row.paper_mask)
    for row in TABLE1_ROWS:  # every row is chained (CLIP-CPAL: the reconstruction)
        r = rows[row.name]
        assert r["available"] is True
        assert 0 <= r["seed"] <= 100 and 0 <= r["mask"] <= 100
        assert r["diff_seed"] == pytest.approx(r["seed"] - r["paper_seed"], abs=0.011)
    md = (out / "table1.md").read_text()
    assert "CLIP-ES + VPL" in md and "76.3" in md and "77.8" in md
    for stage in ("text_cams", "prototypes", "vpl_cams", "cpal_cams", "cpal_vpl_cams", "text_masks",
                  "vpl_masks", "cpal_vpl_masks", "eval_text_cams", "eval_cpal_vpl_masks"):
        assert (out / stage / STAGE_MARKER).is_file()
    for stage in ("vpl_cams", "cpal_cams", "cpal_vpl_cams"):
        assert len(list((out / stage).glob("*.npy"))) == 4
    assert (out / "cpal_cams" / "cpal_bank.pt").is_file() and (out / "cpal_vpl_cams" / "cpal_bank.pt").is_file()
    assert len(list((out / "text_masks").glob("*.png"))) == 4

    before = _stage_state(out)
    npy = {p.name: p.stat().st_mtime_ns for p in (out / "text_cams").glob("*.npy")}
    assert _run(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert text.count("finished before; skipped") == 17 and "projected run time" not in text
    assert _stage_state(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "text_cams").glob("*.npy")} == npy
    assert json.loads((out / "table1.json").read_text())["rows"] == table["rows"]

    # changed learning settings: the prototypes and everything downstream are redone (old outputs
    # kept aside), the text stages are reused
    argv[argv.index("--iters") + 1] = "6"
    assert _run(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert text.count("finished before; skipped") == 8
    after = _stage_state(out)
    for kind in ("text", "cpal"):
        for stage in (f"{kind}_cams", f"{kind}_masks", f"eval_{kind}_cams", f"eval_{kind}_masks"):
            assert after[stage] == before[stage]
    for stage in ("prototypes", "vpl_cams", "vpl_masks", "eval_vpl_cams", "eval_vpl_masks", "cpal_vpl_cams",
                  "eval_cpal_vpl_masks"):
        assert after[stage] != before[stage]
        assert len(list(out.glob(f"{stage}.old-*"))) == 1


def test_dry_run_reports_what_is_missing_and_exits_2(four_voc, tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(four_voc, root)
    shutil.rmtree(root / "SegmentationClass")
    out = tmp_path / "never"
    code = _run(["reproduce", "table1", "--voc-root", root, "--clip", tiny_checkpoint, "--dry-run", "--out", out])
    assert code == EXIT_USAGE
    text = capsys.readouterr().out
    assert "SegmentationClass" in text and "train_aug.txt" in text
    assert "voc12/train_aug.txt" in text and "SBD" in text   # where users usually get it
    assert not out.exists()
    code = _run(["reproduce", "table1", "--voc-root", root, "--clip", tmp_path / "nope.pt", "--dry-run"])
    assert code == EXIT_USAGE and "nope.pt" in capsys.readouterr().out


def test_dry_run_on_a_complete_root_exits_0_with_a_projection(four_voc, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "t1"
    code = _run(["reproduce", "table1", "--voc-root", four_voc, "--clip", tiny_checkpoint, "--learn-split",
                 "train", "--dry-run", "--out", out, "--no-progress"])
    assert code == EXIT_OK
    text = capsys.readouterr().out
    assert "projected run time:" in text and "n/a" not in text.split("projected run time:")[1].split("\n")[0]
    assert "loadable" in text and "disk: about" in text and "ready:" in text
    assert not out.exists()  # a dry run writes nothing under --out


def test_help_teaches():
    assert main(["reproduce", "--help"]) == 0


def test_table1_on_the_synthetic_export_with_the_demo_clip(tmp_path, capsys):
    from vpl_plugin.data.synthetic import SceneWorld, export_voc
    from vpl_plugin.demo.report import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"shipped demo CLIP {DEFAULT_CHECKPOINT} absent")
    root = export_voc(SceneWorld(seed=7), tmp_path / "syn", {"train": (0, 16), "val": (10_000_000, 8)})
    out = tmp_path / "t1"
    assert _run(["reproduce", "table1", "--dataset", "synthetic", "--voc-root", root, "--clip", DEFAULT_CHECKPOINT,
                 "--split", "val", "--learn-split", "train", "--template", "a photo of a {}.", "--out", out,
                 "--iters", "50", "--no-progress"]) == EXIT_OK
    rows = {r["row"]: r for r in json.loads((out / "table1.json").read_text())["rows"]}
    for name in ("CLIP-ES", "CLIP-ES + VPL"):
        assert rows[name]["available"] and 0 <= rows[name]["seed"] <= 100 and 0 <= rows[name]["mask"] <= 100
    print(capsys.readouterr().out)


def test_no_cpal_leaves_the_clip_cpal_rows_out(four_voc, tiny_checkpoint, tmp_path, capsys):
    from vpl_plugin.reproduce import build_table

    out = tmp_path / "t1"
    argv = ["reproduce", "table1", "--voc-root", four_voc, "--clip", tiny_checkpoint, "--learn-split", "train",
            "--out", out, "--dry-run", "--no-projection"]
    assert _run(argv) == EXIT_OK and "ready: 17 of 17 stages" in capsys.readouterr().out
    assert _run(argv + ["--no-cpal"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "ready: 9 of 9 stages" in text and "cpal" not in text.split("ready:")[1]
    rows = {r["row"]: r for r in build_table(out, ["clip-es", "clip-cpal"], skipped=("CLIP-CPAL", "CLIP-CPAL + VPL"))}
    assert rows["CLIP-CPAL"]["note"] == "skipped (--no-cpal)" and rows["CLIP-CPAL"]["seed"] is None


def test_stage_keys_keep_runs_of_the_former_exact_fp32_default_under_exact_fp32(tmp_path, four_voc,
                                                                                  tiny_checkpoint):
    """Stages made before upstream's numerics became the default (exact fp32, keyed without a
    numerics marker) keep their keys under --exact-fp32; a default run gets other keys, so their
    outputs are set aside rather than reused."""
    import hashlib

    from vpl_plugin.cli import UsageError
    from vpl_plugin.cli import parse_args as _parse
    from vpl_plugin.reproduce import _DEPENDS, _stages, stage_keys

    def former_keys(stages):  # the key rule of earlier versions: the arguments as given
        keys = {}
        for name, argv in stages:
            argv = [a for a in argv if a != "--exact-fp32"]
            out, skip = [], 0
            for a in argv:
                if skip:
                    skip -= 1
                elif a in ("--no-progress", "--workers"):
                    skip = 1 if a == "--workers" else 0
                else:
                    out.append(a)
            payload = json.dumps([out, [keys[d] for d in _DEPENDS.get(name, ())]])
            keys[name] = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return keys

    base = ["reproduce", "table1", "--voc-root", str(four_voc), "--clip", str(tiny_checkpoint),
            "--learn-split", "train"]
    exact = _stages(_parse(base + ["--exact-fp32"]), tmp_path)
    default = _stages(_parse(base), tmp_path)
    assert all("--exact-fp32" in argv for name, argv in exact if "--clip" in argv)
    assert stage_keys(exact) == former_keys(exact)
    changed = stage_keys(default)
    assert all(changed[n] != k for n, k in former_keys(default).items())
    with pytest.raises(UsageError, match="contradicts --exact-fp32"):
        _stages(_parse(base + ["--exact-fp32", "--fp16-compat"]), tmp_path)


def test_stage_keys_ignore_how_a_stage_runs_and_an_interrupted_stage_is_set_aside(tmp_path):
    from vpl_plugin.reproduce import _mark_started, stage_keys

    a = [("text_cams", ["cams", "--out", "x", "--no-progress"]), ("text_masks", ["masks", "--workers", "4"])]
    b = [("text_cams", ["cams", "--out", "x"]), ("text_masks", ["masks", "--workers", "1"])]
    c = [("text_cams", ["cams", "--out", "y"]), ("text_masks", ["masks", "--workers", "1"])]
    assert stage_keys(a) == stage_keys(b)
    kc = stage_keys(c)
    assert kc["text_cams"] != stage_keys(b)["text_cams"] and kc["text_masks"] != stage_keys(b)["text_masks"]

    out = tmp_path / "t1"
    _mark_started(out, "text_cams", b[0][1], "key-old")
    (out / "text_cams" / "half.npy").write_bytes(b"written before the interruption")
    _mark_started(out, "text_cams", b[0][1], "key-old")  # same settings: the files stay (resume)
    assert (out / "text_cams" / "half.npy").is_file()
    _mark_started(out, "text_cams", c[0][1], "key-new")  # other settings: set aside, fresh folder
    assert not (out / "text_cams" / "half.npy").exists()
    aside = list(out.glob("text_cams.old-*"))
    assert len(aside) == 1 and (aside[0] / "half.npy").is_file()
    assert json.loads((out / "text_cams" / STAGE_MARKER).read_text())["key"] == "key-new"


def test_mask_column_is_scored_like_upstreams_eval_only_and_no_refine_reaches_the_vpl_rows(tmp_path, four_voc,
                                                                                          tiny_checkpoint):
    """The table's masks label every pixel by default (--conf 0, upstream's --eval_only scoring);
    --mask-conf 0.95 gives the former stages (same keys); --no-refine drops CAA from the VPL rows
    only and scores their CAMs with exponents 1..10."""
    from vpl_plugin.cli import parse_args as _parse
    from vpl_plugin.reproduce import _stages, stage_keys

    base = ["reproduce", "table1", "--voc-root", str(four_voc), "--clip", str(tiny_checkpoint),
            "--learn-split", "train"]
    default = dict(_stages(_parse(base), tmp_path))
    former = _stages(_parse(base + ["--mask-conf", "0.95"]), tmp_path)
    for name, argv in default.items():
        if name.endswith("_masks") and not name.startswith("eval_"):
            assert argv[argv.index("--conf") + 1] == "0.0"
    assert not any("--conf" in argv for _, argv in former)
    keys, former_keys = stage_keys(list(default.items())), stage_keys(former)
    assert keys["text_cams"] == former_keys["text_cams"] and keys["text_masks"] != former_keys["text_masks"]

    plain = dict(_stages(_parse(base + ["--pooling", "region", "--tau", "0.1", "--map-mode", "dense"]), tmp_path))
    rec = dict(_stages(_parse(base + ["--pooling", "region", "--tau", "0.1", "--map-mode", "dense",
                                      "--no-refine"]), tmp_path))
    for name in rec:
        vision_cams = name in ("vpl_cams", "cpal_vpl_cams")
        assert ("--no-refine" in rec[name]) == vision_cams
        if name.startswith("eval_") and name.endswith("_cams"):
            searched = "--bg-threshold" in rec[name]
            assert searched == (name[len("eval_"):] in ("vpl_cams", "cpal_vpl_cams"))
            if searched:
                assert rec[name][rec[name].index("--bg-threshold") + 1] == "1,2,3,4,5,6,7,8,9,10"
        if name in ("text_cams", "cpal_cams", "text_masks"):
            assert rec[name] == plain[name]  # text rows untouched
    from vpl_plugin._cli_common import ParseError

    with pytest.raises(ParseError, match=r"--mask-conf: must be in \[0, 1\]"):
        _parse(base + ["--mask-conf", "1.5"])


def test_eval_takes_a_comma_list_of_background_exponents(tmp_path):
    """`vpl eval --bg-threshold 1,2,3` searches exactly those exponents (oracle: the best of the
    single-exponent runs)."""
    import numpy as np
    from PIL import Image

    from vpl_plugin.cli import main
    from vpl_plugin.data.cam_files import write_cam_file

    rng = np.random.default_rng(0)
    cams, gt = tmp_path / "cams", tmp_path / "gt"
    cams.mkdir(), gt.mkdir()
    ids = [f"im{i}" for i in range(3)]
    for i in ids:
        label = np.zeros((8, 8), np.uint8)
        label[2:6, 2:6] = 1
        Image.fromarray(label).save(gt / f"{i}.png")
        cam = np.clip(label * 0.6 + rng.random((8, 8)) * 0.5, 0, 1)[None].astype(np.float16)
        write_cam_file(cams / f"{i}.npy", {"keys": np.array([0]), "attn_highres": cam})
    (tmp_path / "l.txt").write_text("\n".join(ids) + "\n")

    def miou(thr):
        out = tmp_path / f"r{thr}.json"
        assert main(["eval", "--cams", str(cams), "--gt-root", str(gt), "--split-file", str(tmp_path / "l.txt"),
                     "--bg-threshold", thr, "--json", str(out), "--no-progress"]) == 0
        return json.loads(out.read_text())["miou"]

    singles = [miou(str(t)) for t in (1, 2, 3)]
    assert miou("1,2,3") == pytest.approx(max(singles))
    assert main(["eval", "--cams", str(cams), "--gt-root", str(gt), "--split-file", str(tmp_path / "l.txt"),
                 "--bg-threshold", "1,x", "--no-progress"]) == 2
