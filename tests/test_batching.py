"""Several images per forward (``CLIPESAdapter.call_batch``, ``generate_cams(batch_size=)``): the
same CAMs as one image at a time, within float summation order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from PIL import Image  # noqa: E402

from vpl_plugin.adapters import CLIPESAdapter, create_adapter  # noqa: E402
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld  # noqa: E402
from vpl_plugin.pipeline import generate_cams  # noqa: E402
from vpl_plugin.prototypes import PrototypeSet  # noqa: E402


@pytest.fixture(scope="module")
def scenes():
    return SceneWorld(seed=5).batch(0, 5)


def _vision_set(adapter, seed=0):
    text = adapter.text_prototypes
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(text.prototypes + 0.3 * torch.randn(text.prototypes.shape, generator=g), dim=1)
    return PrototypeSet(w, text.class_names, text.background_names, tau=0.05)


@pytest.mark.parametrize("map_mode", ["gradcam", "dense", "fused"])
def test_call_batch_equals_one_call_per_image(tiny_encoder, scenes, map_mode):
    base = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    adapter = CLIPESAdapter(tiny_encoder, SYNTHETIC, prototypes=_vision_set(base), map_mode=map_mode,
                            save_gradcam=True)
    images = [Image.fromarray(sc.image) for sc in scenes]
    labels = [list(sc.labels) for sc in scenes]
    labels[2] = []  # an image without foreground labels rides along
    batch = adapter.call_batch(images, labels)
    assert len(batch) == len(images)
    for out, im, lab in zip(batch, images, labels):
        single = adapter(im, lab)
        np.testing.assert_array_equal(out.keys, single.keys)
        torch.testing.assert_close(out.cams, single.cams, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.probabilities, single.probabilities, atol=1e-6, rtol=0)
        for key in ("attn_highres", "highres"):
            a, b = out.to_upstream()[key], single.to_upstream()[key]
            assert a.shape == b.shape and a.dtype == np.float16
            assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max(initial=0.0) <= 1e-3


def test_call_batch_refuses_mixed_sizes_and_bad_labels(tiny_encoder, scenes):
    adapter = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    small = Image.fromarray(scenes[0].image)
    with pytest.raises(ValueError, match="one preprocessed size"):
        adapter.call_batch([small, small.resize((96, 64))], [[0], [1]])
    with pytest.raises(ValueError, match="outside"):
        adapter.call_batch([small, small], [[0], [99]])
    with pytest.raises(ValueError, match="one label list per image"):
        adapter.call_batch([small, small], [[0]])


def test_an_adapter_with_its_own_gradcams_is_served_image_by_image(tiny_encoder, scenes):
    from vpl_plugin.adapters.cpal_bank import build_context_bank

    samples = [SimpleNamespace(image=Image.fromarray(sc.image), labels=list(sc.labels)) for sc in scenes]
    cpal = create_adapter("clip-cpal", tiny_encoder, SYNTHETIC)
    cpal.set_bank(build_context_bank(cpal, samples, progress=False))
    assert not cpal.supports_batch and CLIPESAdapter(tiny_encoder, SYNTHETIC).supports_batch
    batch = cpal.call_batch([s.image for s in samples], [s.labels for s in samples])
    for out, s in zip(batch, samples):
        np.testing.assert_array_equal(out.attn_highres, cpal(s.image, s.labels).attn_highres)


class _Listed:
    """A dataset of image files (``ids``, ``samples[i].image_path``, ``.labels``)."""

    def __init__(self, folder, items):
        self.ids = [name for name, _, _ in items]
        self.samples = []
        for name, array, labels in items:
            path = folder / f"{name}.png"
            Image.fromarray(array).save(path)
            self.samples.append(SimpleNamespace(image_path=path, labels=labels))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.samples[i]


def test_generate_cams_in_batches_writes_what_single_images_write(tiny_encoder, scenes, tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i, sc in enumerate(scenes):
        items.append((f"a{i}", sc.image, list(sc.labels)))  # 64 x 64
        if i < 3:  # a second size, interleaved in the list
            wide = np.concatenate([sc.image, sc.image[:, :32]], axis=1)
            items.append((f"b{i}", wide, list(sc.labels)))
    items.append(("bad", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), [99]))  # a label out of range
    dataset = _Listed(tmp_path, items)
    adapter = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    one = generate_cams(adapter, dataset, tmp_path / "one", progress=False)
    many = generate_cams(adapter, dataset, tmp_path / "many", progress=False, batch_size=3)
    assert (one.done, len(one.failed)) == (len(items) - 1, 1)
    assert (many.done, len(many.failed)) == (one.done, 1)
    assert many.failed[0][0] == "bad" and "outside" in many.failed[0][1]
    for name in dataset.ids[:-1]:
        a = np.load(tmp_path / "one" / f"{name}.npy", allow_pickle=True).item()
        b = np.load(tmp_path / "many" / f"{name}.npy", allow_pickle=True).item()
        np.testing.assert_array_equal(a["keys"], b["keys"])
        assert np.abs(a["attn_highres"].astype(np.float32) - b["attn_highres"].astype(np.float32)).max() <= 1e-3
    with pytest.raises(ValueError, match="batch_size"):
        generate_cams(adapter, dataset, tmp_path / "x", progress=False, batch_size=0)
