"""Metrics vs naive oracles and hand-computed examples (docs/upstream_clip_es.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vpl_plugin import metrics
from vpl_plugin.metrics import (
    auto_thresholds,
    MeanIoU,
    cams_to_label,
    confusion_matrix,
    evaluate_cams,
    evaluate_masks,
    iou_from_confusion,
    mean_iou,
)

F16 = np.float16


# ------------------------------------------------------------------ confusion matrix / IoU


def _naive_hist(pred, target, c):
    hist = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(np.ravel(pred).tolist(), np.ravel(target).tolist()):
        if 0 <= t < c:
            hist[t, p] += 1
    return hist


def test_confusion_matrix_matches_naive_loop():
    rng = np.random.default_rng(0)
    c = 5
    target = rng.integers(0, c, size=(17, 23))
    target[rng.random(target.shape) < 0.2] = 255
    target[0, :3] = 40  # any value >= C is ignored too
    pred = rng.integers(0, c, size=target.shape)
    pred[target == 255] = rng.integers(0, 256, size=int((target == 255).sum()))  # not counted
    pred[0, :3] = 200
    hist = confusion_matrix(pred.astype(np.uint8), target.astype(np.uint8), c)
    assert hist.dtype == np.int64 and hist.shape == (c, c)
    np.testing.assert_array_equal(hist, _naive_hist(pred, target, c))
    # torch tensors give the same
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), c), hist)


def test_hand_computed_3x3():
    target = np.array([[0, 0, 1], [1, 2, 2], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0], [2, 2, 2]])
    hist = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(hist, [[1, 1, 0], [0, 2, 0], [1, 0, 3]])
    r = iou_from_confusion(hist)
    np.testing.assert_allclose(r["iou"], [1 / 3, 2 / 3, 3 / 4])
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert r["pixel_accuracy"] == pytest.approx(6 / 8)
    assert r["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 3 / 4) / 3)
    assert r["fw_iou"] == pytest.approx(15 / 24)


def test_class_predicted_but_absent_from_gt_is_not_in_the_mean():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    r = mean_iou(pred, target, num_classes=3)
    assert r["iou"][0] == pytest.approx(0.5) and r["iou"][1] == pytest.approx(1.0)
    assert math.isnan(r["iou"][2])
    assert r["miou"] == pytest.approx(0.75)  # (0.5 + 1) / 2, not (0.5 + 1 + 0) / 3
    assert r["valid"].tolist() == [True, True, False]


def test_perfect_prediction_gives_miou_one():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 21, size=(30, 40)).astype(np.uint8)
    target[:5] = 255
    pred = np.where(target == 255, 0, target)
    r = mean_iou(pred, target, 21)
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0


def test_accumulator_equals_one_call_on_concatenation():
    rng = np.random.default_rng(2)
    c = 4
    preds = [rng.integers(0, c, size=s) for s in [(5, 7), (9, 3), (4, 4)]]
    targets = [rng.integers(0, c + 1, size=p.shape) for p in preds]
    targets = [np.where(t == c, 255, t) for t in targets]
    m = MeanIoU(c, class_names=["bg", "a", "b", "c"])
    for i, (p, t) in enumerate(zip(preds, targets)):
        m.update(torch.from_numpy(p) if i == 1 else p, t)
    got = m.compute()
    ref = mean_iou(np.concatenate([p.ravel() for p in preds]),
                   np.concatenate([t.ravel() for t in targets]), c)
    np.testing.assert_array_equal(got["confusion"], ref["confusion"])
    assert got["miou"] == ref["miou"]
    assert list(got["per_class"]) == ["bg", "a", "b", "c"]
    m.reset()
    assert m.confusion.sum() == 0 and math.isnan(m.compute()["miou"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"7"):
        confusion_matrix(np.array([0, 7, 1]), np.array([0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"-1"):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)
    with pytest.raises(TypeError):
        confusion_matrix(np.zeros(3), np.zeros(3, int), 3)
    with pytest.raises(ValueError, match="class_names"):
        MeanIoU(3, class_names=["a", "b"])
    # a bad prediction at an ignored GT pixel is not counted, hence not an error
    assert confusion_matrix(np.array([0, 9]), np.array([0, 255]), 3).sum() == 1


# ------------------------------------------------------------------ CAM -> label

KEYS = np.array([2, 6], dtype=np.int64)  # labels 3 and 7
CAMS = np.array([[[0.9, 0.2, 0.5], [0.0, 0.6, 0.3]],
                 [[0.1, 0.7, 0.5], [0.0, 0.2, 0.6]]], dtype=F16)


@pytest.mark.parametrize("thr, mode, expected", [
    (1, "power", [[3, 7, 0], [0, 3, 7]]),      # (0,2): bg 1-0.5 = 0.5 ties the CAM -> bg
    (2, "power", [[3, 7, 3], [0, 3, 7]]),      # (0,2): bg 0.25 < 0.5; CAM tie -> first key
    (0.55, "constant", [[3, 7, 0], [0, 3, 7]]),
    (0.6, "constant", [[3, 7, 0], [0, 0, 0]]),  # fp16(0.6) == the stored 0.6 CAMs -> tie -> bg
    (0.6, None, [[3, 7, 0], [0, 0, 0]]),       # < 1 -> constant mode (upstream switch)
    (2, None, [[3, 7, 3], [0, 3, 7]]),
])
def test_cams_to_label_hand_made(thr, mode, expected):
    out = cams_to_label(CAMS, KEYS, thr, mode)
    assert out.dtype == np.uint8
    assert out.tolist() == expected


def _upstream_label(cams, keys, thr):
    """Literal transcription of upstream eval_cam.py (fp16 arithmetic, argmax over [bg; cams])."""
    if thr < 1:
        planes = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
    else:
        bg = np.power(1 - np.max(cams, axis=0, keepdims=True), thr)
        planes = np.concatenate((bg, cams), axis=0)
    lut = np.pad(keys + 1, (1, 0), mode="constant")
    return lut[np.argmax(planes, axis=0)].astype(np.uint8)


@pytest.mark.parametrize("thr", [1, 2, 3, 0.05, 0.3, 0.45, 0.6])
def test_cams_to_label_equals_upstream_on_random_fp16(thr):
    rng = np.random.default_rng(3)
    cams = (rng.integers(0, 9, size=(3, 40, 50)) / 8).astype(F16)  # many exact ties
    keys = np.array([0, 14, 19])
    np.testing.assert_array_equal(cams_to_label(cams, keys, thr, None),
                                  _upstream_label(cams, keys, thr))
    cams[1, 1, :5] = np.nan  # upstream would label these pixels; here NaN CAMs are refused
    with pytest.raises(ValueError, match="5 non-finite values"):
        cams_to_label(cams, keys, thr, None)


def test_cams_to_label_empty_and_validation():
    out = cams_to_label(np.zeros((0, 2, 3), F16), np.zeros(0, np.int64), 1, "power")
    assert out.shape == (2, 3) and out.dtype == np.uint8 and not out.any()
    with pytest.raises(ValueError, match="keys"):
        cams_to_label(CAMS, np.array([1]), 1)
    with pytest.raises(ValueError, match="mode"):
        cams_to_label(CAMS, KEYS, 1, "linear")


# ------------------------------------------------------------------ file-based evaluation

PIL = pytest.importorskip("PIL.Image", reason="Pillow is needed to read label PNGs")

IMAGES = {
    # id: (keys, cams, GT)
    "a": (KEYS, CAMS, [[3, 7, 3], [0, 3, 255]]),
    "b": ([0], [[[0.8, 0.3], [0.45, 0.6]]], [[1, 0], [1, 0]]),
    "c": ([14], [[[0.3, 0.7, 0.5, 0.2]]], [[0, 15, 15, 0]]),
}
# Hand-computed (see the per-class tallies in the comments):
# power 1: IoU bg 4/8, 1: 1/3, 3: 2/3, 7: 1, 15: 1/2 -> 3/5
# power 2: IoU bg 4/5, 1: 2/3, 3: 1, 7: 1, 15: 1    -> (0.8 + 2/3 + 3) / 5
MIOU_P1 = 0.6
MIOU_P2 = (0.8 + 2 / 3 + 3) / 5


def _write_fixture(tmp_path, palette_gt=True, cam_key="attn_highres"):
    cam_dir, gt_dir = tmp_path / "cams", tmp_path / "gt"
    cam_dir.mkdir()
    gt_dir.mkdir()
    for i, (img_id, (keys, cams, gt)) in enumerate(IMAGES.items()):
        np.save(cam_dir / f"{img_id}.npy", {"keys": np.array(keys, dtype=np.int64),
                                            cam_key: np.array(cams).astype(np.float16)})
        im = PIL.fromarray(np.array(gt, dtype=np.uint8))  # L mode
        if palette_gt and i % 2 == 0:
            im.putpalette([v for k in range(256) for v in (k, 255 - k, 7)])  # P mode
        im.save(gt_dir / f"{img_id}.png")
    # "d": GT only, no CAM file
    PIL.fromarray(np.zeros((2, 2), np.uint8)).save(gt_dir / "d.png")
    return cam_dir, gt_dir


def test_evaluate_cams_sweep_and_missing(tmp_path, monkeypatch):
    cam_dir, gt_dir = _write_fixture(tmp_path)
    loads = []
    real = metrics._load_cam
    monkeypatch.setattr(metrics, "_load_cam", lambda p, k: loads.append(p) or real(p, k))
    r = evaluate_cams(cam_dir, gt_dir, ["a", "b", "c", "d"], progress=False)
    assert len(loads) == 3  # each CAM file read once for both thresholds
    assert list(r["sweep"]) == [1.0, 2.0]
    assert r["sweep"][1.0] == pytest.approx(MIOU_P1)
    assert r["sweep"][2.0] == pytest.approx(MIOU_P2)
    assert r["best_threshold"] == 2.0 and r["mode"] == "power"
    assert r["miou"] == pytest.approx(MIOU_P2)
    assert r["per_class"]["background"] == pytest.approx(0.8)
    assert r["per_class"]["bird"] == pytest.approx(1.0)  # class 3
    assert math.isnan(r["per_class"]["bicycle"])  # class 2, absent from GT
    assert r["n_images"] == 3
    assert len(r["missing"]) == 1 and r["missing"][0]["id"] == "d"
    assert r["missing"][0]["path"].endswith("d.npy")


def test_evaluate_cams_single_thresholds_and_modes(tmp_path):
    cam_dir, gt_dir = _write_fixture(tmp_path)
    ids = ["a", "b", "c"]
    r1 = evaluate_cams(cam_dir, gt_dir, ids, bg_thresholds=1, progress=False)
    assert r1["mode"] == "power" and r1["miou"] == pytest.approx(MIOU_P1)
    # 0.55 < 1 -> constant background; on this data it gives the same labels as power 1
    r2 = evaluate_cams(cam_dir, gt_dir, ids, bg_thresholds=0.55, progress=False)
    assert r2["mode"] == "constant" and r2["miou"] == pytest.approx(MIOU_P1)
    # sweep order and "first strictly greater" rule
    r3 = evaluate_cams(cam_dir, gt_dir, ids, bg_thresholds=[1, 2, 3], progress=False)
    assert r3["best_threshold"] == 2.0
    r4 = evaluate_cams(cam_dir, gt_dir, ids, bg_thresholds="auto", mode="constant",
                       progress=False)
    assert list(r4["sweep"]) == [round(k * 0.05, 2) for k in range(1, 13)]
    assert set(r4["modes"].values()) == {"constant"}
    best = max(r4["sweep"].values())
    assert r4["best_threshold"] == next(t for t, m in r4["sweep"].items() if m == best)


def _oracle_miou(thr, n_class=21):
    """mIoU of upstream's power rule at one exponent: naive labels and a naive confusion matrix."""
    hist = np.zeros((n_class, n_class), dtype=np.int64)
    for keys, cams, gt in IMAGES.values():
        pred = _upstream_label(np.array(cams).astype(F16), np.array(keys), thr)
        hist += _naive_hist(pred, np.array(gt), n_class)
    rows, cols, diag = hist.sum(1), hist.sum(0), np.diag(hist)
    valid = rows > 0
    return float(np.mean(diag[valid] / (rows + cols - diag)[valid]))


def test_evaluate_cams_auto_follows_upstreams_cam_type_switch(tmp_path):
    # upstream eval_cam.py: exponents [1, 2] for 'attn*' keys, [1..10] for any other key
    cam_dir, gt_dir = _write_fixture(tmp_path, cam_key="highres")
    r = evaluate_cams(cam_dir, gt_dir, ["a", "b", "c"], cam_key="highres", progress=False)
    assert list(r["sweep"]) == [float(k) for k in range(1, 11)]
    for thr, miou in r["sweep"].items():
        assert miou == pytest.approx(_oracle_miou(thr))
    best = max(r["sweep"].values())
    assert r["best_threshold"] == next(t for t, m in r["sweep"].items() if m == best)
    assert r["miou"] == pytest.approx(best)
    assert auto_thresholds("power", "attn_highres") == [1.0, 2.0]
    assert auto_thresholds("constant", "highres") == [round(k * 0.05, 2) for k in range(1, 13)]
    with pytest.raises(ValueError, match="background plane"):
        evaluate_cams(cam_dir, gt_dir, ["a"], cam_key="attn_highres_bg", progress=False)


def test_evaluate_cams_missing_gt_is_reported(tmp_path):
    cam_dir, gt_dir = _write_fixture(tmp_path, palette_gt=False)
    (gt_dir / "b.png").unlink()
    r = evaluate_cams(cam_dir, gt_dir, ["a", "b", "c"], progress=False)
    assert r["n_images"] == 2
    assert [m["id"] for m in r["missing"]] == ["b"] and "GT" in r["missing"][0]["reason"]


def test_evaluate_masks_excludes_255_predictions(tmp_path):
    rng = np.random.default_rng(4)
    mask_dir, gt_dir = tmp_path / "masks", tmp_path / "gt"
    mask_dir.mkdir()
    gt_dir.mkdir()
    preds, gts = [], []
    for i in range(3):
        gt = rng.integers(0, 4, size=(6, 9)).astype(np.uint8)
        gt[0] = 255
        pred = rng.integers(0, 4, size=gt.shape).astype(np.uint8)
        pred[rng.random(gt.shape) < 0.3] = 255
        PIL.fromarray(gt).save(gt_dir / f"{i}.png")
        PIL.fromarray(pred).save(mask_dir / f"{i}.png")
        preds.append(pred)
        gts.append(gt)
    r = evaluate_masks(mask_dir, gt_dir, ["0", "1", "2", "9"], num_classes=4, progress=False)
    p, g = np.concatenate(preds).ravel(), np.concatenate(gts).ravel()
    keep = p != 255
    ref = mean_iou(p[keep], g[keep], 4)
    np.testing.assert_array_equal(r["confusion"], ref["confusion"])
    assert r["miou"] == ref["miou"]
    ignored = ((p == 255) & (g != 255)).sum() / (g != 255).sum()
    assert r["ignored_fraction"] == pytest.approx(ignored)
    assert r["n_images"] == 3 and [m["id"] for m in r["missing"]] == ["9"]
