"""`vpl reproduce table1 --coco-root`: a tiny COCO 2014 layout built from real VOC images.

The fixture renames nothing in the images: it copies four VOC JPEGs into ``train2014/``, writes
their ground truth re-indexed into COCO's 80-class order under ``SegmentationClass/`` and a
CLIP-ES list (``coco14/train.txt``, ``<id> l1 l2 ...``) derived from those masks. With a random
CLIP the numbers are meaningless; the pipeline (COCO labels, box threshold 0.7, token budget,
81-class evaluation) is real.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from PIL import Image  # noqa: E402
from voc_helpers import FOUR_IDS  # noqa: E402

from vpl_plugin.cli import EXIT_OK, EXIT_USAGE, main  # noqa: E402
from vpl_plugin.data.classes import COCO, VOC  # noqa: E402
from vpl_plugin.reproduce import COCO_NOTE, STAGE_MARKER, TABLE1_ROWS  # noqa: E402

# VOC class index (0..19) -> COCO class index (0..79): every VOC name is a COCO prompt name
VOC_TO_COCO = [COCO.names.index(name) for name in VOC.names]


def copy_coco_layout(voc_root: Path, dest: Path, ids: Sequence[str] = FOUR_IDS, folder: str = "train2014",
                     list_name: str = "train.txt") -> Path:
    """``dest/coco`` with ``folder/<id>.jpg``, ``SegmentationClass/<id>.png`` (COCO indices + 1) and
    ``coco14/<list_name>`` whose labels are the classes present in each mask, ascending."""
    root = dest / "coco"
    for sub in (folder, "SegmentationClass", "coco14"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for voc, coco in enumerate(VOC_TO_COCO):
        lut[voc + 1] = coco + 1
    lines = []
    for i in ids:
        shutil.copy(voc_root / "JPEGImages" / f"{i}.jpg", root / folder / f"{i}.jpg")
        gt = lut[np.asarray(Image.open(voc_root / "SegmentationClass" / f"{i}.png"))]
        Image.fromarray(gt, mode="L").save(root / "SegmentationClass" / f"{i}.png")
        labels = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        lines.append(" ".join([i, *map(str, labels)]))
    (root / "coco14" / list_name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def coco_root(voc_root, tmp_path_factory) -> Path:
    return copy_coco_layout(voc_root, tmp_path_factory.mktemp("coco4"))


def _run(argv):
    return main([str(a) for a in argv])


def _naive_confusion(pred_dir: Path, gt_dir: Path, ids, n: int = 81) -> np.ndarray:
    """Confusion matrix of mask PNGs, pixel by pixel (255 in prediction or GT left out)."""
    hist = np.zeros((n, n), dtype=np.int64)
    for i in ids:
        pred = np.asarray(Image.open(pred_dir / f"{i}.png")).astype(np.int64)
        gt = np.asarray(Image.open(gt_dir / f"{i}.png")).astype(np.int64)
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g < n and p != 255:
                hist[g, p] += 1
    return hist


def test_the_fixture_is_a_coco_layout(coco_root, voc_root):
    lines = (coco_root / "coco14" / "train.txt").read_text().split("\n")
    assert lines[0] == "2007_000032 0 4"  # person (COCO 0) and aeroplane (COCO 4)
    gt = np.asarray(Image.open(coco_root / "SegmentationClass" / "2007_000032.png"))
    voc = np.asarray(Image.open(voc_root / "SegmentationClass" / "2007_000032.png"))
    assert set(np.unique(gt)) == {0, 1, 5, 255}
    assert np.array_equal(gt == 5, voc == 1) and np.array_equal(gt == 255, voc == 255)


def test_coco_eval_counts_81_classes_like_a_pixel_loop(coco_root, tmp_path):
    """`vpl eval --dataset coco` (the eval stages of the COCO chain) against a pixel-by-pixel count,
    on predictions that are right, wrong (another COCO class, index 79) and unsure (255)."""
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in FOUR_IDS:
        gt = np.asarray(Image.open(coco_root / "SegmentationClass" / f"{i}.png"))
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        noise = rng.random(gt.shape)
        pred[noise < 0.2] = 80  # toothbrush, in no image
        pred[(noise >= 0.2) & (noise < 0.3)] = 255
        Image.fromarray(pred, mode="L").save(pred_dir / f"{i}.png")
    result_path = tmp_path / "r.json"
    assert _run(["eval", "--masks", pred_dir, "--dataset", "coco", "--gt-root", coco_root / "SegmentationClass",
                 "--split-file", coco_root / "coco14" / "train.txt", "--json", result_path,
                 "--no-progress"]) == EXIT_OK
    result = json.loads(result_path.read_text())
    naive = _naive_confusion(pred_dir, coco_root / "SegmentationClass", FOUR_IDS)
    assert np.array_equal(np.asarray(result["confusion"]), naive) and naive[:, 80].sum() > 0
    rowsum, colsum, diag = naive.sum(1), naive.sum(0), np.diag(naive)
    present = rowsum > 0
    assert result["miou"] == pytest.approx(np.mean(diag[present] / (rowsum + colsum - diag)[present]), abs=1e-12)
    assert len(result["iou"]) == 81


@pytest.mark.slow  # 14 s on an idle-ish 2-core machine, 30 s under load
def test_coco_table1_end_to_end_with_a_token_budget(coco_root, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "t1"
    ids = FOUR_IDS[:2]
    budget = 1400  # 700 tokens per image: 2007_000032 has 18 x 32 = 576 (kept whole), 2007_000039 24 x 32
    argv = ["reproduce", "table1", "--coco-root", coco_root, "--clip", tiny_checkpoint, "--out", out,
            "--iters", "3", "--max-tokens", budget, "--limit", len(ids), "--no-projection", "--no-progress"]
    assert _run(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert "vpl reproduce table1: coco" in text and "--dataset coco" in text and COCO_NOTE in text

    # CAMs: COCO labels from the list, CAA box threshold 0.7
    cam = np.load(out / "text_cams" / "2007_000032.npy", allow_pickle=True).item()
    assert list(cam["keys"]) == [0, 4] and cam["attn_highres"].shape == (2, 281, 500)
    import yaml

    cfg = yaml.safe_load((out / "text_cams" / "vpl_cams.yaml").read_text())
    assert cfg["adapter_config"]["box_threshold"] == 0.7 and cfg["dataset"] == "coco"

    # learning: an equal share of the budget per image, drawn (never more than an image has)
    from vpl_plugin.prototypes import PrototypeSet

    per_image = budget // len(ids)
    tokens = []
    for i in ids:
        w, h = Image.open(coco_root / "train2014" / f"{i}.jpg").size
        tokens.append(math.ceil(h / 16) * math.ceil(w / 16))
    ps = PrototypeSet.load(out / "prototypes" / "vpl.pt")
    assert ps.provenance["pixels"] == sum(min(t, per_image) for t in tokens) == 576 + 700
    assert ps.provenance["max_tokens"] == budget and ps.prototypes.shape[0] == 80 + 23

    # evaluation over 81 classes; the mask confusion matrix equals a pixel-by-pixel count
    for name in ("eval_text_cams", "eval_vpl_cams", "eval_text_masks", "eval_vpl_masks"):
        result = json.loads((out / name / "result.json").read_text())
        assert len(result["iou"]) == 81 and np.asarray(result["confusion"]).shape == (81, 81), name
    result = json.loads((out / "eval_vpl_masks" / "result.json").read_text())
    naive = _naive_confusion(out / "vpl_masks", coco_root / "SegmentationClass", ids)
    assert np.array_equal(np.asarray(result["confusion"]), naive)
    rowsum, colsum, diag = naive.sum(1), naive.sum(0), np.diag(naive)
    present = rowsum > 0
    miou = np.mean(diag[present] / (rowsum + colsum - diag)[present])
    assert result["miou"] == pytest.approx(miou, abs=1e-12)

    # the table: measured numbers, "n/a" where the paper gives none, COCO val numbers as context
    table = json.loads((out / "table1.json").read_text())
    assert table["dataset"] == "coco" and table["coco_root"] == str(coco_root) and table["max_tokens"] == budget
    rows = {r["row"]: r for r in table["rows"]}
    assert rows["CLIP-ES + VPL"]["mask"] == round(100 * result["miou"], 2)
    for name, r in rows.items():
        assert r["paper_seed"] is None and r["paper_mask"] is None
        paper = {row.name: row.paper_coco_val_segmentation for row in TABLE1_ROWS}
        assert r["paper_coco_val_segmentation"] == paper[name]
        assert r["diff_seed"] is None and r["diff_mask"] is None
    for name in rows:  # CLIP-CPAL rows too (the reconstruction, M = 4 context prototypes on COCO)
        assert rows[name]["available"] and 0 <= rows[name]["seed"] <= 100 and 0 <= rows[name]["mask"] <= 100
    md = (out / "table1.md").read_text()
    assert "| CLIP-ES + VPL | n/a | n/a |" in md and "45.4" in md and "at most 1.4e+03 tokens" in md

    # rerun: every stage reused
    assert _run(argv) == EXIT_OK
    assert capsys.readouterr().out.count("finished before; skipped") == 17
    assert len(list(out.glob(f"*/{STAGE_MARKER}"))) == 17


def test_coco_dry_run_on_a_complete_root_projects_the_learning_time(coco_root, tiny_checkpoint, tmp_path,
                                                                    capsys):
    out = tmp_path / "t1"
    assert _run(["reproduce", "table1", "--coco-root", coco_root, "--clip", tiny_checkpoint, "--dry-run",
                 "--out", out, "--limit", "2", "--no-progress"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "images from train2014/" in text and "at most 1e+07 tokens" in text
    line = text.split("projected run time:")[1].split("\n")[0]
    assert "n/a" not in line
    # the budget does not bite on 2 images: every token (18 x 32 + 24 x 32) is learned from
    assert "3000 steps x 1.33 passes x 1344 tokens" in text
    assert "ready: 17 of 17 stages" in text and not out.exists()


def test_coco_dry_run_says_what_is_missing_and_where_to_get_it(coco_root, tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    shutil.rmtree(root / "SegmentationClass")
    (root / "coco14" / "train.txt").write_text("2007_000032 0 4\n2007_000039\n2007_000063 200\n")
    out = tmp_path / "never"
    code = _run(["reproduce", "table1", "--coco-root", root, "--clip", tiny_checkpoint, "--split", "val",
                 "--dry-run", "--out", out])
    assert code == EXIT_USAGE and not out.exists()
    text = capsys.readouterr().out
    missing = text.split("\nmissing (")[1]
    # ground truth, the val list (CLIP-ES ships coco14/val.txt), the broken train list line by line
    assert f"{root}/SegmentationClass/ is missing" in missing and "pycocotools" in missing
    assert f"--split list {root / 'coco14' / 'val.txt'} is missing (also looked for {root / 'val.txt'})" in missing
    assert "CLIP-ES repository's coco14/val.txt" in missing
    assert f"{root / 'val2014'}/ is missing (the images of --split val.txt)" in missing  # and its images
    assert "label 200 outside 0..79" in missing
    assert "nothing was run." in text

    # a val list without the val2014 folder: the folder and the COCO archive are named
    (root / "coco14" / "train.txt").write_text("2007_000032 0 4\n")
    (root / "coco14" / "val.txt").write_text("2007_000039 0\n")
    code = _run(["reproduce", "table1", "--coco-root", root, "--clip", tiny_checkpoint, "--split", "val",
                 "--dry-run", "--out", out])
    assert code == EXIT_USAGE
    missing = capsys.readouterr().out.split("\nmissing (")[1]
    assert f"{root / 'val2014'}/ is missing" in missing and "val2014.zip" in missing
    assert "cocodataset.org" in missing

    # a line without labels (upstream crashes on it) is named before anything runs
    (root / "SegmentationClass").mkdir()
    (root / "coco14" / "train.txt").write_text("2007_000032 0 4\n2007_000039\n")
    code = _run(["reproduce", "table1", "--coco-root", root, "--clip", tiny_checkpoint, "--dry-run",
                 "--out", out, "--no-projection"])
    assert code == EXIT_USAGE
    missing = capsys.readouterr().out.split("\nmissing (")[1]
    assert "2007_000039" in missing and "no image-level label" in missing


def test_coco_root_and_voc_root_together_or_a_bad_budget_are_refused(coco_root, tiny_checkpoint, capsys):
    code = _run(["reproduce", "table1", "--coco-root", coco_root, "--voc-root", coco_root, "--clip",
                 tiny_checkpoint, "--dry-run"])
    assert code == EXIT_USAGE and "not both" in capsys.readouterr().err
    for bad in ("lots", "inf", "0", "2.5"):
        code = _run(["reproduce", "table1", "--coco-root", coco_root, "--clip", tiny_checkpoint, "--dry-run",
                     "--max-tokens", bad])
        assert code == EXIT_USAGE and "--max-tokens must be a positive whole number" in capsys.readouterr().err


def test_token_budget_keeps_an_equal_share_of_each_images_own_rows(coco_root, tiny_encoder, tmp_path):
    """The budgeted learning set holds, per image, min(tokens, budget // images) of the rows the full
    set holds for that image, each once, in their original order; the draw depends on the seed and
    the image id only (so a rerun, a resumed or a sharded run picks the same rows)."""
    import torch

    from vpl_plugin.adapters import create_adapter
    from vpl_plugin.data.coco import COCODataset
    from vpl_plugin.pipeline import collect_learning_set, subsample_rows

    adapter = create_adapter("clip-es", tiny_encoder, COCO)
    ids = FOUR_IDS[:2]
    data = COCODataset(coco_root, "coco14/train.txt")
    full = collect_learning_set(adapter, data, progress=False, limit=2)
    budget = 1300  # 650 per image: 576 (kept whole), 768 -> 650
    part = collect_learning_set(adapter, data, progress=False, limit=2, max_tokens=budget)
    assert part.sizes == [min(n, budget // 2) for n in full.sizes] == [576, 650]
    assert part.num_pixels <= budget

    def rows(ls, image_id):
        start = sum(ls.sizes[: ls.ids.index(image_id)])
        return slice(start, start + ls.sizes[ls.ids.index(image_id)])

    for image_id in ids:
        whole, kept = full.features[rows(full, image_id)], part.features[rows(part, image_id)]
        match = [int(torch.nonzero((whole == row).all(dim=1))[0]) for row in kept]
        assert match == sorted(set(match))  # rows of this image, each once, in order
        assert torch.equal(part.targets[rows(part, image_id)], full.targets[rows(full, image_id)][match])
        assert torch.equal(part.seeds[rows(part, image_id)], full.seeds[rows(full, image_id)][match])

    rec = {"features": np.arange(768.0)[:, None], "targets": np.ones((768, 2)), "seeds": np.arange(768),
           "candidates": np.ones(2, bool)}
    a = subsample_rows(rec, 650, seed=0, key=ids[1])["seeds"]
    _ = subsample_rows(rec, 650, seed=0, key=ids[0])  # another image in between changes nothing
    assert np.array_equal(subsample_rows(rec, 650, seed=0, key=ids[1])["seeds"], a)
    assert not np.array_equal(subsample_rows(rec, 650, seed=1, key=ids[1])["seeds"], a)
    assert subsample_rows(rec, 800, seed=0, key=ids[1]) is rec  # fewer rows than the share: all kept
    with pytest.raises(ValueError, match="max_tokens must be at least one row per image"):
        collect_learning_set(adapter, data, progress=False, limit=2, max_tokens=1)
