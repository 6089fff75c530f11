"""The contract every registered adapter keeps (parametrised over ``list_adapters()``).

A new adapter inherits these tests by registering itself. An adapter that needs a preparation step
before it can make CAMs (CLIP-CPAL's pass 1) adds it to ``PREPARE``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.adapters import CAMAdapter, create_adapter, list_adapters  # noqa: E402
from vpl_plugin.cpal import build_context_bank  # noqa: E402
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld, export_voc  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _cpal_bank(adapter, samples):
    adapter.set_bank(build_context_bank(adapter, samples, progress=False))


#: adapter name -> preparation(adapter, samples) run once before the contract tests
PREPARE = {"clip-cpal": _cpal_bank}


@pytest.fixture(scope="module")
def samples():
    from PIL import Image

    scenes = SceneWorld(seed=3).batch(0, 6)
    return [SimpleNamespace(image=Image.fromarray(sc.image), labels=list(sc.labels)) for sc in scenes]


def _make(name, encoder, samples):
    adapter = create_adapter(name, encoder, SYNTHETIC)
    prepare = PREPARE.get(name)
    if prepare is not None:
        prepare(adapter, samples)
    return adapter


@pytest.fixture(scope="module", params=list_adapters())
def adapter(request, tiny_encoder, samples):
    return _make(request.param, tiny_encoder, samples)


def test_every_adapter_is_a_cam_adapter_with_its_registered_name(adapter):
    assert isinstance(adapter, CAMAdapter)
    assert adapter.name in list_adapters()
    description = adapter.describe()
    assert description["adapter"] == adapter.name
    json.dumps(description)  # written beside outputs: must be plain JSON


def test_output_format_is_upstream_clip_es(adapter, samples, tmp_path):
    sample = next(s for s in samples if len(s.labels) >= 2)
    labels = list(reversed(sample.labels))
    out = adapter(sample.image, labels)
    d = out.to_upstream()
    assert {"keys", "attn_highres"} <= set(d)
    assert d["keys"].dtype == np.int64 and d["keys"].tolist() == labels
    h0, w0 = sample.image.height, sample.image.width
    assert d["attn_highres"].dtype == np.float16 and d["attn_highres"].shape == (len(labels), h0, w0)
    assert np.isfinite(d["attn_highres"]).all()
    assert d["attn_highres"].min() >= 0 and d["attn_highres"].max() <= 1
    assert tuple(out.cams.shape) == (len(labels), *out.grid)
    np.save(tmp_path / "x.npy", d)
    back = np.load(tmp_path / "x.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(back["attn_highres"], d["attn_highres"])
    np.testing.assert_array_equal(back["keys"], d["keys"])


def test_outputs_are_deterministic_across_calls_and_instances(adapter, samples, tiny_encoder):
    sample = samples[0]
    a = adapter(sample.image, sample.labels)
    b = adapter(sample.image, sample.labels)
    np.testing.assert_array_equal(a.attn_highres, b.attn_highres)
    fresh = _make(adapter.name, tiny_encoder, samples)
    np.testing.assert_array_equal(fresh(sample.image, sample.labels).attn_highres, a.attn_highres)


def test_bad_labels_are_refused_with_the_valid_range(adapter, samples):
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        adapter(samples[0].image, [10])
    with pytest.raises(ValueError, match="outside"):
        adapter(samples[0].image, [-1])


def test_an_image_without_labels_gives_no_maps(adapter, samples):
    out = adapter(samples[0].image, [])
    assert out.keys.shape == (0,) and out.attn_highres.shape[0] == 0


def test_dataset_runs_resume_and_report_bad_images(adapter, tmp_path):
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.pipeline import generate_cams

    root = export_voc(SceneWorld(seed=5), tmp_path / "syn", {"train": (0, 5)})
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    dataset = VOCDataset(root, "train.txt", class_spec=SYNTHETIC)
    first = generate_cams(adapter, dataset, tmp_path / "cams", progress=False)
    assert first.done == 4 and [i for i, _ in first.failed] == [ids[2]]
    kept = np.load(tmp_path / "cams" / f"{ids[0]}.npy", allow_pickle=True).item()
    (tmp_path / "cams" / f"{ids[0]}.npy").unlink()
    again = generate_cams(adapter, dataset, tmp_path / "cams", progress=False)
    assert (again.done, again.skipped_existing, len(again.failed)) == (1, 3, 1)
    redone = np.load(tmp_path / "cams" / f"{ids[0]}.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(redone["attn_highres"], kept["attn_highres"])
    assert not list((tmp_path / "cams").glob(".*tmp*"))  # atomic writes leave no temporaries
