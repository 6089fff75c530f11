"""CRF pseudo masks, palette PNGs, the resumable batch writer (docs/upstream_clip_es.md)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from vpl_plugin.metrics import cams_to_label
from vpl_plugin.pseudo_masks import (
    VOC_PALETTE,
    cams_to_pseudo_mask,
    crf_image,
    dense_crf,
    load_label_png,
    make_pseudo_masks,
    save_label_png,
    voc_palette,
)

PIL = pytest.importorskip("PIL.Image", reason="Pillow is needed for label PNGs")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_crf = pytest.mark.skipif(not _has("pydensecrf"),
                               reason="pydensecrf2 (extra 'crf') is needed for CRF tests")
needs_cv2 = pytest.mark.skipif(not _has("cv2"),
                               reason="opencv-python-headless (extra 'crf') is needed for images")


# ------------------------------------------------------------------ palette / PNG


def test_voc_palette_values():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE.size == 768
    assert tuple(VOC_PALETTE[0]) == (0, 0, 0)
    assert tuple(VOC_PALETTE[1]) == (128, 0, 0)
    assert tuple(VOC_PALETTE[2]) == (0, 128, 0)
    assert tuple(VOC_PALETTE[15]) == (192, 128, 128)
    assert tuple(VOC_PALETTE[255]) == (224, 224, 192)
    np.testing.assert_array_equal(voc_palette(21), VOC_PALETTE[:21])


@pytest.mark.parametrize("palette, mode", [(True, "P"), (False, "L")])
def test_label_png_round_trip(tmp_path, palette, mode):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, size=(13, 17)).astype(np.uint8)
    label[3:5] = 255
    path = tmp_path / "sub" / "x.png"
    save_label_png(path, label, palette=palette)
    np.testing.assert_array_equal(load_label_png(path), label)
    with PIL.open(path) as im:
        assert im.mode == mode
        if palette:
            assert im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left behind


def test_save_label_png_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="256"):
        save_label_png(tmp_path / "a.png", np.array([[0, 256]]))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_label_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))


# ------------------------------------------------------------------ CRF image (--crf-image)


def test_crf_image_wraps_like_upstream():
    bgr = np.array([[[0, 0, 0], [104, 116, 122], [103, 115, 121], [255, 255, 255]]], np.uint8)
    out = crf_image(bgr, "upstream_wrapped")
    # 0 - 104.008 = -104.008 -> trunc -104 -> 152; 0 - 116.669 -> -116 -> 140; -122.675 -> 134
    # 104 - 104.008 = -0.008 -> trunc 0 (floor would give 255); 103 - 104.008 -> -1 -> 255
    assert out.tolist() == [[[152, 140, 134], [0, 0, 0], [255, 255, 255], [150, 138, 132]]]
    # against a scalar oracle on a random image
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    mean = (104.008, 116.669, 122.675)
    ref = [[[math.trunc(float(np.float32(float(img[y, x, c]) - mean[c]))) % 256 for c in range(3)]
            for x in range(7)] for y in range(6)]
    np.testing.assert_array_equal(crf_image(img), np.array(ref, np.uint8))
    rgb = crf_image(img, "rgb")
    assert rgb.flags.c_contiguous and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, img[..., ::-1])
    with pytest.raises(ValueError, match="mode"):
        crf_image(img, "bgr")


# ------------------------------------------------------------------ dense CRF


def _random_case(seed=2, h=20, w=30):
    rng = np.random.default_rng(seed)
    cams = rng.random((2, h, w)).astype(np.float16)
    keys = np.array([4, 11], dtype=np.int64)
    image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
    return cams, keys, image


def _probs(cams):
    return np.concatenate([1 - cams.max(0, keepdims=True), cams]).astype(np.float16)


@needs_crf
def test_unary_equals_pydensecrf_unary_from_softmax():
    utils = pytest.importorskip("pydensecrf.utils")
    from vpl_plugin.pseudo_masks import _unary_from_probs

    cams, _, _ = _random_case()
    probs = _probs(cams)
    probs[0, 0, :4] = 0  # clipped at 1e-5 (in float16)
    u = _unary_from_probs(probs)
    assert u.dtype == np.float32 and u.shape == (3, 600)
    np.testing.assert_array_equal(u, utils.unary_from_softmax(probs))


@needs_crf
def test_dense_crf_marginals_sum_to_one():
    cams, _, image = _random_case()
    q = dense_crf(_probs(cams), image)
    assert q.shape == (3, 20, 30) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q >= 0).all()


@needs_crf
def test_pseudo_mask_255_exactly_where_max_marginal_below_conf():
    cams, keys, image = _random_case()
    q = dense_crf(_probs(cams), crf_image(image))
    expected = np.array([0, 5, 12], np.uint8)[q.argmax(0)]
    low = q.max(0) < 0.95
    assert low.any() and (~low).any()  # the example exercises both branches
    expected[low] = 255
    got = cams_to_pseudo_mask(cams, keys, image, conf=0.95)
    np.testing.assert_array_equal(got, expected)
    # conf=None: plain CRF argmax, no 255
    got_all = cams_to_pseudo_mask(cams, keys, image, conf=None)
    np.testing.assert_array_equal(got_all, np.array([0, 5, 12], np.uint8)[q.argmax(0)])
    # the "rgb" image gives a different bilateral term (and so, here, different marginals)
    q_rgb = dense_crf(_probs(cams), crf_image(image, "rgb"))
    assert not np.array_equal(q_rgb, q)


@needs_crf
def test_crf_recovers_clear_halves():
    h, w = 20, 30
    rng = np.random.default_rng(3)
    cams = np.zeros((1, h, w), np.float32)
    cams[0, :, : w // 2] = 0.85
    cams[0, :, w // 2:] = 0.05
    cams += rng.normal(0, 0.05, cams.shape)
    cams = np.clip(cams, 0, 1).astype(np.float16)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (30, 40, 200)
    image[:, w // 2:] = (200, 150, 40)
    for mode in ("upstream_wrapped", "rgb"):
        mask = cams_to_pseudo_mask(cams, np.array([6]), image, crf_image_mode=mode)
        assert (mask[:, : w // 2] == 7).all(), mode
        assert (mask[:, w // 2:] == 0).all(), mode


def test_pseudo_mask_without_crf():
    cams, keys, _ = _random_case()
    # conf=None: plain argmax over [bg; cams], i.e. eval_cam's power-1 labels
    np.testing.assert_array_equal(cams_to_pseudo_mask(cams, keys, crf=False, conf=None),
                                  cams_to_label(cams, keys, 1, "power"))
    # conf: 255 where the max of the sum-normalised scores is below it
    p = _probs(cams).astype(np.float32)
    expected = cams_to_label(cams, keys, 1, "power")
    low = p.max(0) / p.sum(0) < 0.5
    assert low.any() and (~low).any()
    expected[low] = 255
    np.testing.assert_array_equal(cams_to_pseudo_mask(cams, keys, crf=False, conf=0.5), expected)
    with pytest.raises(ValueError, match="image_bgr"):
        cams_to_pseudo_mask(cams, keys)
    empty = cams_to_pseudo_mask(np.zeros((0, 4, 5), np.float16), np.zeros(0, np.int64), crf=False)
    assert empty.shape == (4, 5) and not empty.any()


# ------------------------------------------------------------------ batch writer

def _write_dataset(tmp_path, n=4, h=16, w=20):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    cam_dir, img_dir = tmp_path / "cams", tmp_path / "images"
    cam_dir.mkdir()
    img_dir.mkdir()
    ids = [f"img{i}" for i in range(n)]
    for i in ids:
        cams = rng.random((2, h, w)).astype(np.float16)
        np.save(cam_dir / f"{i}.npy", {"keys": np.array([0, 14], np.int64), "attn_highres": cams})
        assert cv2.imwrite(str(img_dir / f"{i}.jpg"), rng.integers(0, 256, (h, w, 3), np.uint8))
    return cam_dir, img_dir, ids


@needs_crf
@needs_cv2
def test_make_pseudo_masks_is_resumable_and_matches_single_image(tmp_path):
    cv2 = pytest.importorskip("cv2")
    cam_dir, img_dir, ids = _write_dataset(tmp_path)
    out = tmp_path / "out"
    s1 = make_pseudo_masks(cam_dir, img_dir, ids, out, progress=False)
    assert s1["done"] == ids and s1["skipped_existing"] == [] and s1["failed"] == []
    first = {i: (out / f"{i}.png").read_bytes() for i in ids}
    mtimes = {i: (out / f"{i}.png").stat().st_mtime_ns for i in ids}
    # written mask equals the in-memory function on the same inputs
    d = np.load(cam_dir / "img1.npy", allow_pickle=True).item()
    ref = cams_to_pseudo_mask(d["attn_highres"], d["keys"], cv2.imread(str(img_dir / "img1.jpg")))
    np.testing.assert_array_equal(load_label_png(out / "img1.png"), ref)

    (out / "img2.png").unlink()
    s2 = make_pseudo_masks(cam_dir, img_dir, ids, out, progress=False)
    assert s2["done"] == ["img2"]
    assert s2["skipped_existing"] == ["img0", "img1", "img3"]
    for i in ids:
        assert (out / f"{i}.png").read_bytes() == first[i]
        if i != "img2":
            assert (out / f"{i}.png").stat().st_mtime_ns == mtimes[i]

    # skip_existing=False with two worker processes rewrites everything, byte-identically
    s3 = make_pseudo_masks(cam_dir, img_dir, ids, out, workers=2, skip_existing=False,
                           progress=False)
    assert sorted(s3["done"]) == ids
    assert all((out / f"{i}.png").read_bytes() == first[i] for i in ids)


@needs_crf
@needs_cv2
def test_make_pseudo_masks_records_failures_and_continues(tmp_path):
    cv2 = pytest.importorskip("cv2")
    cam_dir, img_dir, ids = _write_dataset(tmp_path)
    (img_dir / "img1.jpg").write_bytes(b"not a jpeg")  # undecodable
    (cam_dir / "img2.npy").unlink()  # missing CAM
    assert cv2.imwrite(str(img_dir / "img3.jpg"), np.zeros((10, 20, 3), np.uint8))  # wrong size
    out = tmp_path / "out"
    s = make_pseudo_masks(cam_dir, img_dir, ids + ["nothing"], out, progress=False)
    assert s["done"] == ["img0"]
    failed = dict(s["failed"])
    assert set(failed) == {"img1", "img2", "img3", "nothing"}
    assert "img1.jpg" in failed["img1"]
    assert "img2.npy" in failed["img2"]
    assert "(16, 20)" in failed["img3"] and "(10, 20)" in failed["img3"]
    assert "img3.jpg" in failed["img3"]
    assert sorted(p.name for p in out.iterdir()) == ["img0.png"]
    # no GT directory anywhere (docs/upstream_clip_es.md#crf-reads-ground-truth) and the CRF-free
    # path needs no images at all
    s_nocrf = make_pseudo_masks(cam_dir, tmp_path / "no_images", ["img3"], tmp_path / "o2",
                                crf=False, conf=None, progress=False)
    assert s_nocrf["done"] == ["img3"]
