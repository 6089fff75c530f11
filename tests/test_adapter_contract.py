"""The contract every registered adapter keeps (parametrised over ``list_adapters()``), and two
small third adapters written against it (``docs/adapters.md``).

A new adapter inherits these tests by registering itself. An adapter that needs a preparation step
before it can make CAMs (CLIP-CPAL's pass 1) adds it to ``PREPARE``. The third adapters below are
not registered (the registry is process-wide); ``THIRD`` adds them to the same parametrisation.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.adapters import (CAMAdapter, CLIPESAdapter, create_adapter, list_adapters,  # noqa: E402
                                 text_prototype_set)
from vpl_plugin.cam import GradCAMResult, image_gradcams, resize_maps  # noqa: E402
from vpl_plugin.adapters.cpal_bank import build_context_bank  # noqa: E402
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld, export_voc  # noqa: E402
from vpl_plugin.prototypes import PrototypeSet  # noqa: E402


class SquaredCAMAdapter(CLIPESAdapter):
    """A third adapter that changes one hook: the map entering CAA is the GradCAM squared (a
    gamma correction that sharpens peaks). Everything else is CLIP-ES's."""

    name = "squared-gradcam"

    def fuse(self, result: GradCAMResult, labels: Sequence[int]) -> torch.Tensor:
        return super().fuse(result, labels) ** 2


class PlainGradCAMAdapter(CAMAdapter):
    """A third adapter written on the bare contract: CLIP-ES's GradCAM with the text prototypes,
    no refinement (the base class's ``fuse``/``refine``/``finish``/``call_batch`` defaults)."""

    name = "plain-gradcam"

    def __init__(self, encoder, class_spec) -> None:
        self.encoder = encoder
        self.class_spec = class_spec
        self.text_prototypes = self.prototypes = text_prototype_set(encoder, class_spec)

    def gradcams(self, image: torch.Tensor, labels: Sequence[int],
                 prototypes: Optional[PrototypeSet] = None) -> GradCAMResult:
        ps = prototypes or self.prototypes
        idx = torch.as_tensor(list(labels), dtype=torch.long)
        stacked = torch.cat([ps.fg[idx], ps.bg], dim=0).float()
        return image_gradcams(self.encoder, image, stacked, list(range(len(labels))),
                              torch.tensor(ps.logit_scale, dtype=torch.float32))

    def describe(self) -> dict:
        return {"adapter": self.name, "dataset": self.class_spec.name}


#: unregistered adapters run through the same contract tests
THIRD = {"squared-gradcam": SquaredCAMAdapter, "plain-gradcam": PlainGradCAMAdapter}


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
    adapter = THIRD[name](encoder, SYNTHETIC) if name in THIRD else create_adapter(name, encoder, SYNTHETIC)
    prepare = PREPARE.get(name)
    if prepare is not None:
        prepare(adapter, samples)
    return adapter


@pytest.fixture(scope="module", params=list_adapters() + list(THIRD))
def adapter(request, tiny_encoder, samples):
    return _make(request.param, tiny_encoder, samples)


def test_every_adapter_is_a_cam_adapter_with_its_registered_name(adapter):
    assert isinstance(adapter, CAMAdapter)
    assert adapter.name in list_adapters() + list(THIRD)
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


# ------------------------------------------------------------------------------------------------
# Third adapters end to end, against a direct computation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn_dataset(tmp_path_factory):
    from vpl_plugin.data.voc import VOCDataset

    root = export_voc(SceneWorld(seed=7), tmp_path_factory.mktemp("third") / "syn", {"train": (0, 4)})
    return VOCDataset(root, "train.txt", class_spec=SYNTHETIC)


def _direct_cams(encoder, sample, image, *, square: bool, refine: bool) -> np.ndarray:
    """The CAM file's ``attn_highres`` recomputed from the pieces: text GradCAM, optional
    squaring, optional CAA, resize, float16."""
    plain = CLIPESAdapter(encoder, SYNTHETIC)
    x, size = encoder.preprocess(image)
    result = plain.gradcams(x, list(sample.labels))
    maps = result.cams ** 2 if square else result.cams
    final = plain.refine(result, maps) if refine else maps
    return resize_maps(final, size).astype(np.float16)


@pytest.mark.parametrize("name", list(THIRD))
def test_third_adapter_cams_through_generate_cams_equal_a_direct_computation(
        name, tiny_encoder, syn_dataset, tmp_path):
    from vpl_plugin.data.voc import sample_image
    from vpl_plugin.pipeline import generate_cams

    adapter = THIRD[name](tiny_encoder, SYNTHETIC)
    summary = generate_cams(adapter, syn_dataset, tmp_path / "cams", progress=False, batch_size=2)
    assert (summary.done, summary.failed) == (len(syn_dataset), [])
    squared = name == "squared-gradcam"
    assert adapter.supports_batch is squared  # only the CLIP-ES subclass batches
    for i, image_id in enumerate(syn_dataset.ids):
        sample = syn_dataset[i]
        saved = np.load(tmp_path / "cams" / f"{image_id}.npy", allow_pickle=True).item()
        want = _direct_cams(tiny_encoder, sample, sample_image(syn_dataset, sample),
                            square=squared, refine=squared)
        assert saved["keys"].tolist() == list(sample.labels)
        if squared:  # batched forward: equal up to float summation order
            np.testing.assert_allclose(saved["attn_highres"].astype(np.float32),
                                       want.astype(np.float32), atol=2e-3)
        else:
            np.testing.assert_array_equal(saved["attn_highres"], want)
    if squared:  # one image per call: bit-identical
        out = adapter(sample_image(syn_dataset, syn_dataset[0]), syn_dataset[0].labels)
        want = _direct_cams(tiny_encoder, syn_dataset[0], sample_image(syn_dataset, syn_dataset[0]),
                            square=True, refine=True)
        np.testing.assert_array_equal(out.attn_highres, want)
        assert not np.array_equal(want, _direct_cams(
            tiny_encoder, syn_dataset[0], sample_image(syn_dataset, syn_dataset[0]),
            square=False, refine=True))  # the hook changes the output


@pytest.mark.parametrize("name", list(THIRD))
def test_third_adapter_learning_set_equals_rows_from_its_text_gradcams(name, tiny_encoder, syn_dataset):
    from vpl_plugin.data.voc import sample_image
    from vpl_plugin.pipeline import collect_learning_set, learn_from_dataset, learning_rows

    adapter = THIRD[name](tiny_encoder, SYNTHETIC)
    lset = collect_learning_set(adapter, syn_dataset, progress=False, pooling="region")
    assert lset.ids == syn_dataset.ids
    text = text_prototype_set(tiny_encoder, SYNTHETIC)
    pos = 0
    for i in range(len(syn_dataset.ids)):
        sample = syn_dataset[i]
        x, _ = tiny_encoder.preprocess(sample_image(syn_dataset, sample))
        labels = torch.as_tensor(list(sample.labels), dtype=torch.long)
        stacked = torch.cat([text.fg[labels], text.bg], dim=0).float()
        res = image_gradcams(tiny_encoder, x, stacked, list(range(len(labels))),
                             torch.tensor(text.logit_scale, dtype=torch.float32))
        rows = learning_rows(res.features, res.cams.reshape(len(labels), -1).float(), labels, text,
                             phi=0.4, target_mode="seed_hardened", candidates="image",
                             pooling="region", tau_text=1.0 / float(text.logit_scale))
        n = rows["features"].shape[0]
        assert lset.sizes[i] == n
        np.testing.assert_array_equal(lset.features[pos:pos + n].numpy(),
                                      rows["features"].astype(np.float32))
        np.testing.assert_array_equal(lset.targets[pos:pos + n].numpy(), rows["targets"])
        pos += n
    ps, _ = learn_from_dataset(adapter, lset, tau=0.1, iters=5, progress=False)
    assert ps.kind == "vision" and ps.class_names == text.class_names
    assert torch.isfinite(ps.prototypes).all()


def test_a_clip_es_subclass_that_overrides_gradcams_does_not_batch_unless_it_says_so():
    class OwnForward(CLIPESAdapter):
        def gradcams(self, image, labels, prototypes=None):
            return super().gradcams(image, labels, prototypes)

    class OwnForwardBatched(OwnForward):
        supports_batch = True

    class OnlyFuse(CLIPESAdapter):
        def fuse(self, result, labels):
            return result.cams

    assert CLIPESAdapter.supports_batch and OnlyFuse.supports_batch
    assert not OwnForward.supports_batch and OwnForwardBatched.supports_batch
    assert not CAMAdapter.supports_batch and not PlainGradCAMAdapter.supports_batch
