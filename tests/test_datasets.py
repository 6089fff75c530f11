"""Datasets: split lists, image-level labels (XML / mask / list), VOC and COCO datasets.

Real-data tests use the shared VOC 2012 subset (fixture ``voc_root``); the rest build tiny
synthetic dataset folders under ``tmp_path``.
"""

from __future__ import annotations

import csv
import pickle
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vpl_plugin.data.classes import VOC_CLASSES
from vpl_plugin.data.coco import COCODataset, read_coco_split
from vpl_plugin.data.voc import (
    DatasetError,
    Sample,
    VOCDataset,
    image_level_label_mismatches,
    labels_from_mask,
    load_image,
    parse_voc_xml,
    read_split,
)

Image = pytest.importorskip("PIL.Image")

N_TRAIN, N_VAL = 663, 670  # SOURCES.md


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _xml(objects, size=(20, 30)) -> str:
    """A VOC annotation with the given object names (``size`` = (H, W) or None)."""
    size_xml = (f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
                if size else "")
    objs = "".join(
        f"<object><name>{name}</name><truncated>0</truncated><difficult>{i % 2}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for i, name in enumerate(objects)
    )
    return f"<annotation><folder>VOC2012</folder>{size_xml}{objs}</annotation>"


def _write_mask(path: Path, values, shape=(20, 30)) -> None:
    arr = np.zeros(shape, dtype=np.uint8)
    flat = arr.reshape(-1)
    for i, v in enumerate(values):
        flat[i] = v
    img = Image.fromarray(arr, mode="L").convert("P")
    img.putpalette([c for i in range(256) for c in (i, i, i)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _make_voc(root: Path, items: dict, split=None) -> Path:
    """``items``: id -> dict(xml=[names] or raw str or None, mask=[values] or None, image=bool)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "SegmentationClass").mkdir()
    for image_id, spec in items.items():
        if spec.get("image", True):
            Image.new("RGB", (30, 20), (120, 60, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
        xml = spec.get("xml")
        if xml is not None:
            text = xml if isinstance(xml, str) else _xml(xml)
            (root / "Annotations" / f"{image_id}.xml").write_text(text)
        if spec.get("mask") is not None:
            _write_mask(root / "SegmentationClass" / f"{image_id}.png", spec["mask"])
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(split or items) + "\n")
    return root


def _manifest(voc_root: Path) -> dict:
    path = voc_root.parent / "manifest.csv"
    if not path.is_file():
        pytest.skip(f"manifest.csv not found next to {voc_root}")
    with open(path, newline="") as fh:
        return {row["name"]: row for row in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------------
# real data: the shared VOC 2012 subset
# ------------------------------------------------------------------------------------------------


def test_real_split_sizes(voc_root):
    lists = voc_root / "ImageSets" / "Segmentation"
    train, val = read_split(lists / "train.txt"), read_split(lists / "val.txt")
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert not set(train) & set(val)
    assert train[0] == "2007_000032"


def test_real_xml_labels_first_appearance_order(voc_root):
    path = voc_root / "Annotations" / "2007_000032.xml"
    names = [obj.find("name").text.strip() for obj in ET.parse(path).getroot().findall("object")]
    assert names == ["aeroplane", "aeroplane", "person", "person"]  # file order
    labels, size = parse_voc_xml(path)
    assert labels == (VOC_CLASSES.index("aeroplane"), VOC_CLASSES.index("person")) == (0, 14)
    assert size == (281, 500)  # (H0, W0)


def test_real_auto_label_source(voc_root):
    ds = VOCDataset(voc_root)  # default split: ImageSets/Segmentation/train.txt
    assert len(ds) == N_TRAIN
    assert ds.split_file == voc_root / "ImageSets" / "Segmentation" / "train.txt"
    sources = Counter()
    for sample in ds:
        has_xml = (voc_root / "Annotations" / f"{sample.id}.xml").is_file()
        assert sample.label_source == ("xml" if has_xml else "mask"), sample.id
        if sample.label_source == "xml":
            assert sample.id.startswith("2007_") and sample.size is not None
        else:
            assert sample.size is None
        assert sample.labels and all(0 <= c < 20 for c in sample.labels)
        assert sample.gt_path == voc_root / "SegmentationClass" / f"{sample.id}.png"
        sources[sample.label_source] += 1
    counts = ds.label_source_counts
    assert sum(counts.values()) == len(ds)
    assert counts == {"xml": sources["xml"], "mask": sources["mask"], "missing": 0}
    assert counts["xml"] == 311  # SOURCES.md: train XML files
    assert ds.validate() == []


def test_real_mask_labels_match_manifest(voc_root):
    manifest = _manifest(voc_root)
    names = sorted(manifest)
    picked = names[::97] + ["2007_000032", "2008_000700", "2011_000069", "2007_001027"]
    for image_id in picked:
        labels = labels_from_mask(voc_root / "SegmentationClass" / f"{image_id}.png")
        assert list(labels) == sorted(labels)
        expected = set(manifest[image_id]["mask_classes"].split())
        assert {VOC_CLASSES[c] for c in labels} == expected, image_id
    assert labels_from_mask(voc_root / "SegmentationClass" / "2007_001027.png") == (1, 8, 17, 19)


def test_real_mask_mode_and_q18_mismatches(voc_root):
    manifest = _manifest(voc_root)
    ds = VOCDataset(voc_root, "val", label_source="mask")  # name without .txt, under ImageSets
    assert len(ds) == N_VAL
    sample = ds[0]
    assert sample.label_source == "mask"
    expected = set(manifest[sample.id]["mask_classes"].split())
    assert {VOC_CLASSES[c] for c in sample.labels} == expected
    # SOURCES.md: mask classes are a subset of the XML classes for all 632 XML files
    for image_id, (xml_labels, mask_labels) in image_level_label_mismatches(ds).items():
        assert set(mask_labels) < set(xml_labels), image_id


def test_real_load_image_no_conversion(voc_root):
    sample = VOCDataset(voc_root, "train.txt")[0]
    img = load_image(sample.image_path)
    assert img.mode == "RGB" and (img.height, img.width) == sample.size


# ------------------------------------------------------------------------------------------------
# synthetic: XML parsing
# ------------------------------------------------------------------------------------------------


def test_xml_without_objects_is_a_dataset_error(tmp_path):
    path = tmp_path / "empty.xml"
    path.write_text(_xml([]))
    with pytest.raises(DatasetError, match="no <object>") as info:
        parse_voc_xml(path)
    assert info.value.path == path and str(path) in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.reason


def test_xml_unknown_class_lists_valid_names(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(_xml(["dog", "unicorn"]))
    with pytest.raises(DatasetError, match="unicorn") as info:
        parse_voc_xml(path)
    message = str(info.value)
    assert all(name in message for name in VOC_CLASSES)
    assert str(path) in message


def test_xml_duplicates_keep_first_appearance_order(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(_xml(["dog", " person\n", "dog", "cat", "person", "aeroplane"], size=(7, 9)))
    labels, size = parse_voc_xml(path)
    assert labels == (11, 14, 7, 0)
    assert size == (7, 9)


def test_xml_parts_ignored_and_missing_size(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text("<annotation><object><name>person</name><part><name>head</name></part>"
                    "</object></annotation>")
    assert parse_voc_xml(path) == ((14,), None)


def test_xml_malformed(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text("<annotation><object><name>dog</name>")
    with pytest.raises(DatasetError, match="malformed XML") as info:
        parse_voc_xml(path)
    assert info.value.path == path


def test_dataset_error_pickles():
    err = pickle.loads(pickle.dumps(DatasetError("/a/b.xml", "why", "fix")))
    assert (err.path, err.reason, err.hint) == (Path("/a/b.xml"), "why", "fix")
    assert str(err) == f"{Path('/a/b.xml')}: why (fix)"


# ------------------------------------------------------------------------------------------------
# synthetic: masks, images
# ------------------------------------------------------------------------------------------------


def test_labels_from_mask(tmp_path):
    path = tmp_path / "m.png"
    _write_mask(path, [15, 3, 255, 3, 0])
    assert labels_from_mask(path) == (2, 14)
    _write_mask(path, [255, 0])
    assert labels_from_mask(path) == ()
    _write_mask(path, [30])
    with pytest.raises(DatasetError, match="30"):
        labels_from_mask(path)
    assert labels_from_mask(path, num_classes=81) == (29,)


def test_labels_from_rgb_mask_rejected(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(path)
    with pytest.raises(DatasetError, match="mode 'RGB'"):
        labels_from_mask(path)


def test_load_image_keeps_mode_and_names_bad_file(tmp_path):
    p_img = tmp_path / "p.png"
    Image.new("P", (5, 4)).save(p_img)
    # resize first, convert later (docs/upstream_clip_es.md#resize-then-rgb)
    assert load_image(p_img).mode == "P"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")


# ------------------------------------------------------------------------------------------------
# synthetic: split lists
# ------------------------------------------------------------------------------------------------


def test_read_split_variants(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(
        "\ufeff# a comment\n"
        "2007_000032\r\n"
        "\n"
        "   2007_000039   \n"
        "2007_000063 0 14\n"
        "/JPEGImages/2007_000068.jpg /SegmentationClassAug/2007_000068.png\n"
        "JPEGImages/2007_000121.jpg SegmentationClassAug/2007_000121.png\n"
        "  # indented comment\n".encode("utf-8")
    )
    assert read_split(path) == ["2007_000032", "2007_000039", "2007_000063", "2007_000068",
                                "2007_000121"]


def test_read_split_missing_names_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split(missing)


# ------------------------------------------------------------------------------------------------
# synthetic: VOCDataset
# ------------------------------------------------------------------------------------------------


def test_missing_root_message(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        VOCDataset(tmp_path / "nowhere")
    assert "JPEGImages" in str(info.value)
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no JPEGImages") as info:
        VOCDataset(tmp_path / "VOCdevkit")
    assert "Did you mean" in str(info.value) and "VOC2012" in str(info.value)


def test_voc_dataset_auto_mixes_xml_and_mask(tmp_path):
    root = _make_voc(tmp_path / "VOC2012", {
        "a": {"xml": ["dog", "person"], "mask": [12]},          # XML / mask mismatch: xml has person
        "b": {"mask": [8, 1]},                                  # no XML -> mask
        "c": {"xml": ["cat"]},                                  # no mask -> gt_path None
    })
    ds = VOCDataset(root)
    assert ds.ids == ["a", "b", "c"] and len(ds) == 3
    a, b, c = ds
    assert (a.labels, a.label_source, a.size) == ((11, 14), "xml", (20, 30))
    assert (b.labels, b.label_source, b.size) == ((0, 7), "mask", None)
    assert c.label_source == "xml" and c.gt_path is None
    assert a.gt_path == root / "SegmentationClass" / "a.png"
    assert isinstance(a, Sample) and ds[-1] == c
    assert ds.label_source_counts == {"xml": 2, "mask": 1, "missing": 0}
    assert image_level_label_mismatches(ds) == {"a": ((11, 14), (11,))}
    with pytest.raises(IndexError):
        ds[3]


def test_voc_dataset_sample_errors_and_skipping(tmp_path):
    root = _make_voc(tmp_path / "VOC2012", {
        "ok": {"xml": ["bus"]},
        "noobj": {"xml": []},
        "nolabels": {},
        "noimage": {"xml": ["bus"], "image": False},
    })
    ds = VOCDataset(root, "train.txt")
    assert ds.label_source_counts == {"xml": 3, "mask": 0, "missing": 1}
    with pytest.raises(DatasetError, match="no <object>") as info:
        ds[1]
    assert info.value.path == root / "Annotations" / "noobj.xml"
    with pytest.raises(DatasetError) as info:
        ds[2]
    assert "no Annotations/nolabels.xml and no SegmentationClass/nolabels.png" in str(info.value)
    assert "drop 'nolabels'" in str(info.value)
    problems = ds.validate()
    assert [image_id for image_id, _ in problems] == ["noobj", "nolabels", "noimage"]
    skipped = []
    assert [s.id for s in ds.iter_samples(skip_errors=True, skipped=skipped)] == ["ok"]
    assert [image_id for image_id, _ in skipped] == ["noobj", "nolabels", "noimage"]
    with pytest.raises(DatasetError):
        list(ds)


def test_voc_dataset_label_source_modes(tmp_path):
    root = _make_voc(tmp_path / "VOC2012", {"a": {"xml": ["dog", "person"], "mask": [12]},
                                            "b": {"mask": [3]}})
    xml_ds = VOCDataset(root, label_source="xml")
    assert xml_ds[0].labels == (11, 14)
    with pytest.raises(DatasetError, match="label_source='auto'"):
        xml_ds[1]
    mask_ds = VOCDataset(root, label_source="mask")
    assert [(s.labels, s.label_source) for s in mask_ds] == [((11,), "mask"), ((2,), "mask")]
    with pytest.raises(ValueError, match="label_source"):
        VOCDataset(root, label_source="json")


def test_voc_dataset_mask_without_foreground_is_an_error(tmp_path):
    root = _make_voc(tmp_path / "VOC2012", {"a": {"mask": [255]}})
    with pytest.raises(DatasetError, match="no foreground"):
        VOCDataset(root)[0]


def test_voc_dataset_paths(tmp_path, monkeypatch):
    root = _make_voc(tmp_path / "VOC2012", {"a": {"xml": ["dog"]}, "b": {"xml": ["cat"]}})
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    (root / "mine.txt").write_text("a\n")
    monkeypatch.chdir(tmp_path)
    assert VOCDataset(root, "val.txt").ids == ["b"]       # under ImageSets/Segmentation
    assert VOCDataset(root, "mine.txt").ids == ["a"]      # under root
    (tmp_path / "mine.txt").write_text("b\n")
    assert VOCDataset(root, "mine.txt").ids == ["b"]      # cwd first
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        VOCDataset(root, "absent.txt")
    # SegmentationClassAug is preferred when present
    _write_mask(root / "SegmentationClassAug" / "a.png", [12])
    ds = VOCDataset(root)
    assert ds.gt_dir == root / "SegmentationClassAug" and ds[0].gt_path == ds.gt_dir / "a.png"
    assert VOCDataset(root, gt_dir="SegmentationClass").gt_dir == root / "SegmentationClass"


def test_voc_dataset_xml_mode_needs_annotations(tmp_path):
    root = _make_voc(tmp_path / "VOC2012", {"a": {"mask": [1]}})
    (root / "Annotations").rmdir()
    with pytest.raises(DatasetError, match="Annotations"):
        VOCDataset(root, label_source="xml")
    assert VOCDataset(root)[0].label_source == "mask"


# ------------------------------------------------------------------------------------------------
# synthetic: COCO
# ------------------------------------------------------------------------------------------------


def test_read_coco_split(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("# coco\nCOCO_train2014_000000000009 45 49 50\n"
                    "COCO_train2014_000000000025 23 0 23\n\n")
    assert read_coco_split(path) == [("COCO_train2014_000000000009", (45, 49, 50)),
                                     ("COCO_train2014_000000000025", (23, 0))]
    path.write_text("A 1\nB\nC 79\n")
    with pytest.raises(DatasetError, match=r"line 2 \(B\)"):
        read_coco_split(path)
    assert read_coco_split(path, allow_empty=True)[1] == ("B", ())
    path.write_text("A 80\n")
    with pytest.raises(DatasetError, match="outside 0..79"):
        read_coco_split(path)
    path.write_text("A x\n")
    with pytest.raises(DatasetError, match="not an integer"):
        read_coco_split(path)


def test_coco_dataset(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    for image_id in ("A", "B"):
        Image.new("RGB", (8, 6)).save(root / "train2014" / f"{image_id}.jpg")
    _write_mask(root / "SegmentationClass" / "A.png", [1])
    (root / "train.txt").write_text("A 3 0\nB\n")
    ds = COCODataset(root, "train.txt")
    a = ds[0]
    assert (a.id, a.labels, a.label_source, a.size) == ("A", (3, 0), "list", None)
    assert a.image_path == root / "train2014" / "A.jpg"
    assert a.gt_path == root / "SegmentationClass" / "A.png"
    assert ds.label_source_counts == {"list": 1, "missing": 1}
    with pytest.raises(DatasetError, match="no image-level label"):
        ds[1]
    assert [image_id for image_id, _ in ds.validate()] == ["B"]
    assert [s.id for s in ds.iter_samples(skip_errors=True)] == ["A"]
    with pytest.raises(DatasetError, match="val2014"):
        COCODataset(root, "train.txt", image_dir="val2014")
