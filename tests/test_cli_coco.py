"""`vpl cams --dataset coco` on a COCO-style layout (CLIP-ES list format, 80 classes, box 0.7)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.cli import EXIT_OK, EXIT_PARTIAL, main  # noqa: E402


def test_coco_layout_runs_with_coco_labels_and_threshold(voc_root, tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    ids = ["2007_000032", "2007_000039"]
    for i in ids:
        shutil.copy(voc_root / "JPEGImages" / f"{i}.jpg", root / "train2014" / f"{i}.jpg")
    # CLIP-ES COCO list: "<id> l1 l2 ..." with 0..79 indices; 0 = person, 4 = aeroplane, 62 = tv
    (root / "train.txt").write_text(f"{ids[0]} 4 0\n{ids[1]} 62\nmissing_image 3\n")
    out = tmp_path / "cams"
    code = main(["cams", "--dataset", "coco", "--clip", str(tiny_checkpoint), "--root", str(root),
                 "--split-file", str(root / "train.txt"), "--out", str(out), "--no-progress"])
    assert code == EXIT_PARTIAL  # the missing image is reported, the others are written
    assert "missing_image" in capsys.readouterr().err
    d = np.load(out / f"{ids[0]}.npy", allow_pickle=True).item()
    assert list(d["keys"]) == [4, 0] and d["attn_highres"].shape == (2, 281, 500)
    import yaml

    cfg = yaml.safe_load((out / "vpl_cams.yaml").read_text())
    assert cfg["adapter_config"]["box_threshold"] == 0.7 and cfg["adapter_config"]["dataset"] == "coco"
    assert main(["cams", "--dataset", "coco", "--clip", str(tiny_checkpoint), "--root", str(root),
                 "--split-file", str(root / "train.txt"), "--out", str(out), "--no-progress",
                 "--limit", "2"]) == EXIT_OK  # rerun: both done already
