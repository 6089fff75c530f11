"""Bad data is refused by name, never turned into a clean-looking result (library layer).

Every crafted file is generated here into ``tmp_path``: huge images (headers only, never decoded),
16-bit copies of 8-bit images, NaN/inf prototypes and CAMs, ground truth with foreign values,
truncated outputs and caches, garbage resume files and unusable split lines.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write the crafted images")

from vpl_plugin.data.voc import DatasetError, VOCDataset, labels_from_mask, load_image, read_split  # noqa: E402
from vpl_plugin.metrics import evaluate_cams, evaluate_masks  # noqa: E402
from vpl_plugin.prototypes import PrototypeSet, learn_vision_prototypes  # noqa: E402
from vpl_plugin.pseudo_masks import save_label_png  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# crafted files
# ------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path: Path, width: int = 14000, height: int = 14000) -> Path:
    """A 1-bit greyscale PNG header claiming ``width x height`` (no real pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    return path


def huge_jpeg(path: Path, width: int = 7000, height: int = 7000) -> Path:
    """A real small JPEG whose frame header is patched to claim ``width x height``."""
    Image.new("RGB", (32, 24), (90, 140, 30)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def grey8(shape=(40, 48), seed: int = 0) -> np.ndarray:
    """A textured 8-bit greyscale image (gradient + noise, every value 0..255 used)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, shape[1])[None, :] * np.ones((shape[0], 1))
    return np.clip(ramp + rng.normal(0, 40, shape), 0, 255).astype(np.uint8)


def save_16bit_copy(arr8: np.ndarray, path: Path) -> Path:
    """The 8-bit ``arr8`` stretched to 16 bits (``v * 257``: 0 -> 0, 255 -> 65535) as a PNG."""
    Image.fromarray(arr8.astype(np.uint16) * 257).save(path, format="PNG")
    assert Image.open(path).mode == "I;16"
    return path


def synthetic_root(tmp_path: Path, count: int = 4, size: int = 32) -> Path:
    from vpl_plugin.data.synthetic import SceneWorld, export_voc

    return export_voc(SceneWorld(size=size, seed=5), tmp_path / "syn", {"train": (0, count)})


def synthetic_dataset(root: Path, **kwargs) -> VOCDataset:
    from vpl_plugin.data.synthetic import SYNTHETIC

    return VOCDataset(root, "train.txt", class_spec=SYNTHETIC, **kwargs)


class StubAdapter:
    """A CAM adapter whose CAMs are zeros of the image's size; raises ``fail[image size]``."""

    supports_batch = False

    def __init__(self, fail=None) -> None:
        self.fail = fail or {}
        self.calls = 0

    def __call__(self, image, labels):
        self.calls += 1
        if image.size in self.fail:
            raise self.fail[image.size]
        w, h = image.size
        out = {"keys": np.asarray(labels, np.int64),
               "attn_highres": np.zeros((len(labels), h, w), np.float16)}
        return SimpleNamespace(to_upstream=lambda: out)


# ------------------------------------------------------------------------------------------------
# 1. huge images
# ------------------------------------------------------------------------------------------------


def test_default_pixel_limit_leaves_voc_and_coco_far_inside():
    from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS >= 5 * 640 * 640
    assert DEFAULT_MAX_PIXELS < 7000 * 7000


def test_oversized_jpeg_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS

    path = huge_jpeg(tmp_path / "big.jpg")

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DatasetError) as info:
        load_image(path)
    text = str(info.value)
    for part in ("big.jpg", "7000x7000", "49,000,000 pixels", f"{DEFAULT_MAX_PIXELS:,}",
                 "--max-pixels"):
        assert part in text, part


def test_decompression_bomb_png_becomes_a_dataset_error_naming_it(tmp_path):
    path = huge_png(tmp_path / "bomb.png")
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DatasetError, match=r"bomb\.png.*14000x14000 = 196,000,000 pixels.*--max-pixels"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_the_pixel_limit_can_be_lifted_past_pillows_own(tmp_path):
    from vpl_plugin.data.voc import read_image_header

    path = huge_png(tmp_path / "bomb.png")
    pil_limit = Image.MAX_IMAGE_PIXELS
    # a caller who lifts the limit gets the header past Pillow's own limit; Pillow's is restored
    assert read_image_header(path, max_pixels=None) == ((14000, 14000), "1")
    assert read_image_header(path, max_pixels=200_000_000) == ((14000, 14000), "1")
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    with pytest.raises(DatasetError, match="over the limit of 1,000"):
        read_image_header(huge_jpeg(tmp_path / "j.jpg", 40, 30), max_pixels=1000)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_generate_cams_records_any_per_image_failure_and_goes_on(tmp_path):
    from vpl_plugin.pipeline import generate_cams

    root = synthetic_root(tmp_path, count=4)
    ds = synthetic_dataset(root)
    huge_png(root / "JPEGImages" / f"{ds.ids[1]}.jpg")  # content decides, not the name
    Image.new("RGB", (48, 16)).save(root / "JPEGImages" / f"{ds.ids[2]}.jpg")
    adapter = StubAdapter({(48, 16): MemoryError("cannot allocate 10 GB")})
    summary = generate_cams(adapter, ds, tmp_path / "cams", progress=False)
    assert summary.done == 2 and [i for i, _ in summary.failed] == [ds.ids[1], ds.ids[2]]
    bomb, oom = summary.failed[0][1], summary.failed[1][1]
    assert bomb.startswith("DatasetError: ") and "14000x14000" in bomb and "--max-pixels" in bomb
    assert oom.startswith("MemoryError: cannot allocate 10 GB")
    assert f"{ds.ids[2]}.jpg" in oom  # the image file is named
    assert sorted(p.stem for p in (tmp_path / "cams").glob("*.npy")) == [ds.ids[0], ds.ids[3]]
    # an allocator's RuntimeError inside a batch is retried alone and recorded the same way
    adapter = StubAdapter({(32, 32): RuntimeError("CUDA out of memory")})
    summary = generate_cams(adapter, ds, tmp_path / "cams2", progress=False, limit=1)
    assert summary.failed == [(ds.ids[0], "RuntimeError: CUDA out of memory (image "
                                          f"{root / 'JPEGImages' / (ds.ids[0] + '.jpg')})")]
    with pytest.raises(KeyboardInterrupt):  # an interruption still stops the run
        generate_cams(StubAdapter({(32, 32): KeyboardInterrupt()}), ds, tmp_path / "c3",
                      progress=False)


def test_max_pixels_is_set_once_on_the_dataset(tmp_path):
    from vpl_plugin.pipeline import generate_cams

    root = synthetic_root(tmp_path, count=2)
    small = synthetic_dataset(root, max_pixels=32 * 32 - 1)
    summary = generate_cams(StubAdapter(), small, tmp_path / "cams", progress=False)
    assert summary.done == 0 and len(summary.failed) == 2
    assert all("32x32 = 1,024 pixels, over the limit of 1,023" in r for _, r in summary.failed)
    assert generate_cams(StubAdapter(), synthetic_dataset(root, max_pixels=1024), tmp_path / "ok",
                         progress=False).done == 2
    with pytest.raises(ValueError, match="max_pixels"):
        synthetic_dataset(root, max_pixels=-5)


def test_collect_learning_set_records_any_failure_and_goes_on(tmp_path, tiny_encoder):
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.pipeline import collect_learning_set

    root = synthetic_root(tmp_path, count=3)
    ds = synthetic_dataset(root)
    adapter = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    real, calls = adapter.gradcams, []

    def flaky(x, labels, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(x, labels, **kw)

    adapter.gradcams = flaky
    summary = SimpleNamespace(total=0, done=0, skipped_existing=0, failed=[], seconds=0.0)
    lset = collect_learning_set(adapter, ds, progress=False, summary=summary)
    assert lset.ids == [ds.ids[0], ds.ids[2]] and summary.done == 2
    (image_id, reason), = summary.failed
    assert image_id == ds.ids[1]
    assert reason.startswith("RuntimeError: DefaultCPUAllocator") and f"{ds.ids[1]}.jpg" in reason


# ------------------------------------------------------------------------------------------------
# 2. 16-bit images
# ------------------------------------------------------------------------------------------------


def test_16bit_grey_png_gives_the_cams_of_its_8bit_original(tmp_path, tiny_encoder):
    from vpl_plugin.adapters import CLIPESAdapter

    arr8 = grey8()
    eight = tmp_path / "eight.png"
    Image.fromarray(arr8).save(eight)
    sixteen = save_16bit_copy(arr8, tmp_path / "sixteen.png")
    img16 = load_image(sixteen)
    assert img16.mode == "L" and np.array_equal(np.asarray(img16), arr8)
    adapter = CLIPESAdapter(tiny_encoder)
    a = adapter(load_image(eight), [0, 14]).to_upstream()
    b = adapter(img16, [0, 14]).to_upstream()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    white = adapter(Image.new("L", arr8.shape[::-1], 255), [0, 14]).to_upstream()
    assert not np.array_equal(white["attn_highres"], a["attn_highres"])  # the test can tell
    # the high byte: values that are not an exact 257-multiple round down, as OpenCV does
    odd = np.array([[0, 255, 256, 32767, 65535]], np.uint16)
    Image.fromarray(odd).save(tmp_path / "odd.png")
    assert np.asarray(load_image(tmp_path / "odd.png")).tolist() == [[0, 0, 1, 127, 255]]


def test_other_image_readers_share_the_limit_and_the_16bit_rule(tmp_path):
    pytest.importorskip("cv2")
    import cv2

    from vpl_plugin.pseudo_masks import read_image_bgr

    arr8 = grey8(seed=2)
    Image.fromarray(arr8).save(tmp_path / "eight.png")
    save_16bit_copy(arr8, tmp_path / "sixteen.png")
    bgr8, bgr16 = read_image_bgr(tmp_path / "eight.png"), read_image_bgr(tmp_path / "sixteen.png")
    assert bgr16.shape == (40, 48, 3) and np.array_equal(bgr16, bgr8)
    with pytest.raises(DatasetError, match="7000x7000"):
        read_image_bgr(huge_jpeg(tmp_path / "huge.jpg"))
    # an ordinary 8-bit RGB JPEG is still decoded by OpenCV exactly as before
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=90)
    np.testing.assert_array_equal(read_image_bgr(tmp_path / "c.jpg"),
                                  cv2.imread(str(tmp_path / "c.jpg"), cv2.IMREAD_COLOR))
    with Image.open(tmp_path / "c.jpg") as ref:
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "c.jpg")), np.asarray(ref))
    for mode_array in (np.zeros((4, 4), np.float32),):
        Image.fromarray(mode_array).save(tmp_path / "f.tif")
        with pytest.raises(DatasetError, match="mode 'F'"):
            load_image(tmp_path / "f.tif")


def test_phase2_training_images_and_pseudo_masks(tmp_path):
    from vpl_plugin.phase2.data import PseudoMaskDataset

    root = synthetic_root(tmp_path, count=3)
    ds = synthetic_dataset(root)
    arr8 = grey8((32, 32), seed=4)
    Image.fromarray(arr8).save(root / "JPEGImages" / f"{ds.ids[0]}.jpg", format="PNG")
    save_16bit_copy(arr8, root / "JPEGImages" / f"{ds.ids[1]}.jpg")
    masks = tmp_path / "masks"
    for image_id in ds.ids:
        save_label_png(masks / f"{image_id}.png", np.zeros((32, 32), np.uint8))
    bad = np.zeros((32, 32), np.uint8)
    bad[:3, :5] = 50  # the synthetic world has 11 labels (0..10)
    save_label_png(masks / f"{ds.ids[2]}.png", bad)
    data = PseudoMaskDataset(ds, masks)
    image0, _ = data.load(0)
    image1, _ = data.load(1)
    assert np.array_equal(image0, np.repeat(arr8[..., None], 3, axis=2))
    assert np.array_equal(image1, image0)  # not clipped to white
    with pytest.raises(DatasetError, match=r"pseudo mask holds values outside 0\.\.10.*50 \(15 pixels\)"):
        data.load(2)
    limited = PseudoMaskDataset(synthetic_dataset(root, max_pixels=100), masks)
    with pytest.raises(DatasetError, match="over the limit of 100"):
        limited.load(0)


# ------------------------------------------------------------------------------------------------
# 3. NaN / inf
# ------------------------------------------------------------------------------------------------


def _saved_set(tmp_path: Path, **change) -> Path:
    """A valid prototype file, then its payload edited behind the constructor's back."""
    ps = PrototypeSet(F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=1),
                      ["cat", "dog"], ["sky", "grass", "wall"], tau=0.03)
    path = tmp_path / "set.pt"
    ps.save(path)
    payload = torch.load(path, weights_only=True)
    for key, value in change.items():
        if key == "row":
            index, values = value
            payload["prototypes"][index] = values
        else:
            payload[key] = value
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("row, values, found", [
    (1, float("nan"), r"row 1 \('dog'\) holds 4 NaN and 0 inf"),
    (3, float("inf"), r"row 3 \('grass'\) holds 0 NaN and 4 inf"),
    (4, 0.0, r"row 4 \('wall'\) is all zeros and cannot be normalised"),
])
def test_prototype_file_with_bad_rows_is_refused_naming_file_and_class(tmp_path, row, values, found):
    path = _saved_set(tmp_path, row=(row, values))
    with pytest.raises(ValueError, match=r"set\.pt.*" + found):
        PrototypeSet.load(path)


@pytest.mark.parametrize("key", ["tau", "logit_scale_override"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_prototype_file_with_bad_temperature_is_refused(tmp_path, key, value):
    path = _saved_set(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"set\.pt.*{key} must be a finite number > 0"):
        PrototypeSet.load(path)


def _problem(k: int = 24, d: int = 8, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(k, d, generator=g), dim=1)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return x, torch.softmax(x @ z.T / 0.05, dim=1), z


@pytest.mark.parametrize("name", ["lr", "tau", "tau_text"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_learning_refuses_non_finite_or_non_positive_settings(name, value):
    x, q, z = _problem()
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0"):
        learn_vision_prototypes(x, q, z, iters=2, **{name: value})


@pytest.mark.parametrize("which, row", [("features", 7), ("targets", 13), ("features", 23)])
def test_learning_refuses_non_finite_rows_naming_them(which, row):
    # before: NaN features gave an unexplained "loss not finite"; a NaN target row was ignored by
    # the loss and learning "converged" at once, returning the text prototypes as a clean result
    x, q, z = _problem()
    (x if which == "features" else q)[row, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{which} row {row} holds NaN/inf") as info:
        learn_vision_prototypes(x, q, z, iters=3, chunk_size=5)
    assert (type(info.value).__name__, info.value.name, info.value.row) == ("NonFiniteRowsError", which, row)


def test_the_finiteness_check_rides_on_the_first_pass(tmp_path):
    x, q, z = _problem(k=40)
    reads = []

    class Counting:  # a memmap stand-in that counts the rows it hands out
        def __init__(self, arr):
            self.arr, self.shape, self.ndim = arr, arr.shape, arr.ndim

        def __getitem__(self, item):
            reads.append(item.stop - item.start)
            return self.arr[item]

    learn_vision_prototypes(Counting(x.numpy()), q, z, iters=0, chunk_size=16)
    assert sum(reads) == 40  # one pass (the initial loss) reads each row once, check included


def test_learn_from_dataset_names_the_image_of_a_bad_row_and_refuses_bad_lr():
    from vpl_plugin.pipeline import LearningSet, learn_from_dataset

    x, q, z = _problem(k=12)
    x[9, 0] = float("inf")
    text = PrototypeSet(z, ["a"], ["b", "c"], tau=0.05, kind="text")
    adapter = SimpleNamespace(text_prototypes=text)
    lset = LearningSet(x, q, torch.ones(12, 3, dtype=torch.bool), torch.zeros(12, dtype=torch.long),
                       [5, 4, 3], ["img_a", "img_b", "img_c"])
    with pytest.raises(ValueError, match=r"row 9, row 0 of image 'img_c'"):
        learn_from_dataset(adapter, lset, iters=2, progress=False)
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            learn_from_dataset(adapter, lset, lr=bad, iters=2, progress=False)
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            learn_from_dataset(adapter, lset, tau=bad, iters=2, progress=False)


def _cam_fixture(tmp_path: Path, cams: dict, gt: dict):
    """``cams``: id -> (keys, (n, H, W) array); ``gt``: id -> (H, W) label array (L-mode PNG)."""
    cam_dir, gt_dir = tmp_path / "cams", tmp_path / "gt"
    cam_dir.mkdir(exist_ok=True)
    gt_dir.mkdir(exist_ok=True)
    for image_id, (keys, arr) in cams.items():
        np.save(cam_dir / f"{image_id}.npy",
                {"keys": np.asarray(keys, np.int64), "attn_highres": np.asarray(arr, np.float16)})
    for image_id, labels in gt.items():
        Image.fromarray(np.asarray(labels, np.uint8)).save(gt_dir / f"{image_id}.png")
    return cam_dir, gt_dir


GOOD_CAMS = [[[0.9, 0.1, 0.8], [0.2, 0.7, 0.1]]]
GOOD_GT = [[1, 0, 1], [0, 1, 0]]


def test_evaluate_cams_lists_nan_cams_and_foreign_keys_instead_of_scoring_them(tmp_path):
    nan = np.array(GOOD_CAMS, np.float32)
    nan[0, 0, 0] = np.nan
    cam_dir, gt_dir = _cam_fixture(
        tmp_path, {"good": ([0], GOOD_CAMS), "nan": ([0], nan), "key99": ([99], GOOD_CAMS)},
        {"good": GOOD_GT, "nan": GOOD_GT, "key99": GOOD_GT})
    r = evaluate_cams(cam_dir, gt_dir, ["good", "nan", "key99"], bg_thresholds=1, progress=False)
    ref = evaluate_cams(cam_dir, gt_dir, ["good"], bg_thresholds=1, progress=False)
    assert r["n_images"] == 1 and r["miou"] == ref["miou"]
    reasons = {m["id"]: m["reason"] for m in r["missing"]}
    assert "1 non-finite values (1 NaN, 0 inf)" in reasons["nan"] and "nan.npy" in reasons["nan"]
    assert "keys [99] are not foreground classes" in reasons["key99"]
    assert "key99.npy" in reasons["key99"] and "keys 0..19" in reasons["key99"]


def test_pseudo_masks_refuse_nan_cams_and_foreign_keys(tmp_path):
    pytest.importorskip("cv2")
    pytest.importorskip("pydensecrf.densecrf")
    from vpl_plugin.pseudo_masks import cams_to_pseudo_mask, make_pseudo_masks

    nan = np.full((1, 6, 8), 0.7, np.float32)
    nan[0, 2:4, 2:5] = np.nan
    ok = np.zeros((1, 6, 8), np.float32)
    ok[0, :, :4] = 0.99
    cam_dir, _ = _cam_fixture(tmp_path, {"nan": ([3], nan), "k99": ([99], ok), "ok": ([3], ok)}, {})
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    for image_id in ("nan", "k99", "ok"):
        Image.fromarray(np.full((6, 8, 3), 128, np.uint8)).save(image_dir / f"{image_id}.jpg")
    out = make_pseudo_masks(cam_dir, image_dir, ["nan", "k99", "ok"], tmp_path / "m", num_classes=21,
                            progress=False)
    assert out["done"] == ["ok"]
    reasons = dict(out["failed"])
    assert "nan.npy" in reasons["nan"] and "6 non-finite values" in reasons["nan"]
    assert "k99.npy" in reasons["k99"] and "keys [99]" in reasons["k99"]
    assert not (tmp_path / "m" / "nan.png").exists()
    with pytest.raises(ValueError, match="non-finite"):
        cams_to_pseudo_mask(np.full((1, 2, 2), np.inf, np.float16), np.array([0]), crf=False)


# ------------------------------------------------------------------------------------------------
# 4. ground truth and predicted masks
# ------------------------------------------------------------------------------------------------


def test_read_label_png_returns_exactly_what_was_written(tmp_path):
    from vpl_plugin.data.labels import read_label_png

    label = np.array([[0, 3, 255], [20, 1, 0]], np.uint8)
    for palette in (True, False):
        save_label_png(tmp_path / f"p{palette}.png", label, palette=palette)
        assert Image.open(tmp_path / f"p{palette}.png").mode == ("P" if palette else "L")
        np.testing.assert_array_equal(read_label_png(tmp_path / f"p{palette}.png", 21), label)


def _bad_gt_files(gt_dir: Path) -> None:
    foreign = np.array(GOOD_GT, np.uint8)
    foreign[0, :2] = 77
    Image.fromarray(foreign).save(gt_dir / "v77.png")
    Image.fromarray(np.array(GOOD_GT, np.uint16) * 257).save(gt_dir / "i16.png")
    Image.fromarray(np.array(GOOD_GT, np.uint8)).save(gt_dir / "jpeg.png", format="JPEG")


def test_evaluate_cams_refuses_foreign_16bit_and_jpeg_ground_truth(tmp_path):
    cam_dir, gt_dir = _cam_fixture(tmp_path, {i: ([0], GOOD_CAMS) for i in ("good", "v77", "i16", "jpeg")},
                                   {"good": GOOD_GT})
    _bad_gt_files(gt_dir)
    r = evaluate_cams(cam_dir, gt_dir, ["good", "v77", "i16", "jpeg"], bg_thresholds=1, progress=False)
    assert r["n_images"] == 1
    reasons = {m["id"]: (m["path"], m["reason"]) for m in r["missing"]}
    assert reasons["v77"][0].endswith("v77.png")
    assert "values outside 0..20 (and 255 = ignore): 77 (2 pixels)" in reasons["v77"][1]
    assert "mode 'I;16'" in reasons["i16"][1]
    assert "JPEG data, not PNG" in reasons["jpeg"][1]


def test_evaluate_masks_checks_predictions_and_ground_truth(tmp_path):
    mask_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    mask_dir.mkdir()
    gt_dir.mkdir()
    pred = np.array(GOOD_GT, np.uint8)
    pred[1, 2] = 255  # "no prediction" stays allowed
    for image_id in ("good", "v77", "i16", "jpeg", "badpred"):
        Image.fromarray(pred).save(mask_dir / f"{image_id}.png")
    Image.fromarray(np.array(GOOD_GT, np.uint8)).save(gt_dir / "good.png")
    Image.fromarray(np.array(GOOD_GT, np.uint8)).save(gt_dir / "badpred.png")
    wrong = pred.copy()
    wrong[0, 0] = 40
    Image.fromarray(wrong).save(mask_dir / "badpred.png")
    _bad_gt_files(gt_dir)
    r = evaluate_masks(mask_dir, gt_dir, ["good", "v77", "i16", "jpeg", "badpred"], progress=False)
    assert r["n_images"] == 1 and r["miou"] == 1.0
    reasons = {m["id"]: m["reason"] for m in r["missing"]}
    assert set(reasons) == {"v77", "i16", "jpeg", "badpred"}
    assert "prediction holds values outside 0..20" in reasons["badpred"] and "40 (1 pixels)" in reasons["badpred"]
    assert "ground truth holds values outside" in reasons["v77"]


def test_labels_from_mask_refuses_16bit_and_jpeg_masks(tmp_path):
    Image.fromarray(np.array([[0, 3], [15, 255]], np.uint16)).save(tmp_path / "m16.png")
    with pytest.raises(DatasetError, match="m16.png.*mode 'I;16'"):
        labels_from_mask(tmp_path / "m16.png")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tmp_path / "mj.png", format="JPEG")
    with pytest.raises(DatasetError, match="mj.png.*JPEG data"):
        labels_from_mask(tmp_path / "mj.png")


# ------------------------------------------------------------------------------------------------
# 5. incomplete outputs, corrupt caches, garbage resume files, unusable split lines
# ------------------------------------------------------------------------------------------------


def test_generate_cams_redoes_empty_truncated_and_foreign_outputs(tmp_path, caplog):
    from vpl_plugin.pipeline import generate_cams

    root = synthetic_root(tmp_path, count=4)
    ds = synthetic_dataset(root)
    out = tmp_path / "cams"
    assert generate_cams(StubAdapter(), ds, out, progress=False).done == 4
    finished = {i: (out / f"{i}.npy").read_bytes() for i in ds.ids}
    good = finished[ds.ids[0]]
    (out / f"{ds.ids[0]}.npy").write_bytes(b"")
    cut = next(n for n in range(len(good) - 20, 0, -1) if good[n - 1:n] != b".")
    (out / f"{ds.ids[1]}.npy").write_bytes(good[:cut])  # magic intact, pickle cut short
    (out / f"{ds.ids[2]}.npy").write_bytes(b"hello")
    adapter = StubAdapter()
    with caplog.at_level(logging.WARNING, logger="vpl_plugin.pipeline"):
        summary = generate_cams(adapter, ds, out, progress=False)
    assert (summary.done, summary.skipped_existing, adapter.calls) == (3, 1, 3)
    logged = caplog.text
    for image_id, why in ((ds.ids[0], "empty file"), (ds.ids[1], "truncated"),
                          (ds.ids[2], "no magic")):
        assert f"{image_id}.npy" in logged and why in logged
        assert (out / f"{image_id}.npy").read_bytes() == finished[image_id]


def test_corrupt_feature_cache_record_is_recomputed(tmp_path, tiny_encoder, caplog):
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.pipeline import collect_learning_set

    ds = synthetic_dataset(synthetic_root(tmp_path, count=3))
    adapter = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    cache = tmp_path / "cache"
    first = collect_learning_set(adapter, ds, progress=False, cache_dir=cache)
    record = cache / f"{ds.ids[1]}.npz"
    record.write_bytes(record.read_bytes()[:100])  # truncated: the zip directory is gone
    with caplog.at_level(logging.WARNING, logger="vpl_plugin.pipeline"):
        again = collect_learning_set(adapter, ds, progress=False, cache_dir=cache)
    assert f"{ds.ids[1]}.npz" in caplog.text and "recomputing" in caplog.text
    assert torch.equal(torch.as_tensor(again.features), torch.as_tensor(first.features))
    assert again.ids == first.ids


def test_garbage_cpal_partial_file_is_ignored_with_a_warning(tmp_path, tiny_encoder, caplog):
    from vpl_plugin.adapters import CLIPCPALAdapter
    from vpl_plugin.adapters.cpal_bank import build_context_bank
    from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld

    samples = [SimpleNamespace(image=Image.fromarray(sc.image), labels=list(sc.labels))
               for sc in SceneWorld(seed=11).batch(0, 4)]
    adapter = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=2)
    reference = build_context_bank(adapter, samples, progress=False)
    partial = tmp_path / "cpal_bank.pt.partial"
    for garbage in (b"\x00garbage, not a torch file", None):
        if garbage is None:
            torch.save({"something": "else"}, partial)
        else:
            partial.write_bytes(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vpl_plugin.cpal"):
            bank = build_context_bank(adapter, samples, partial=partial, progress=False)
        assert "cpal_bank.pt.partial" in caplog.text and "starting over" in caplog.text
        assert torch.equal(bank.centres, reference.centres) and not partial.exists()


@pytest.mark.parametrize("line, problem", [
    ("a" * 201, "201 bytes long"),
    ("abc\x00def", "NUL character"),
    (".hidden", "starts with '.'"),
    ("/", "empty"),
    ("bell\x07", "control character"),
])
def test_split_lines_that_cannot_be_file_names_are_refused(tmp_path, line, problem):
    from vpl_plugin.data.coco import read_coco_split

    voc = tmp_path / "train.txt"
    voc.write_text(f"2007_000032\n{line}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"train\.txt: line 2 .*{problem}"):
        read_split(voc)
    coco = tmp_path / "coco.txt"
    coco.write_text(f"COCO_1 3\n# comment\n{line} 4\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"coco\.txt: line 3 .*{problem}"):
        read_coco_split(coco)
    voc.write_text("x" * 200 + "\n", encoding="utf-8")
    assert read_split(voc) == ["x" * 200]


def test_empty_split_file_is_refused(tmp_path):
    from vpl_plugin.data.coco import read_coco_split

    path = tmp_path / "val.txt"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(DatasetError, match=r"val\.txt: split file lists no images"):
        read_split(path)
    with pytest.raises(DatasetError, match="lists no images"):
        read_coco_split(path)


def test_data_layer_imports_no_upper_layer_even_lazily():
    import ast

    import vpl_plugin.data

    upper = ("metrics", "pseudo_masks", "pipeline", "cli", "reproduce", "demo")
    found = []
    for path in sorted(Path(vpl_plugin.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [(path.name, n) for n in names
                      if any(n == f"vpl_plugin.{u}" or n.startswith(f"vpl_plugin.{u}.") for u in upper)]
    assert found == []
