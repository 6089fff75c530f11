"""Shared pytest fixtures. Keep each group in its own section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Start torch's intra-op threads before any test. A ``vpl`` command that computes GradCAMs
    flushes subnormal floats from its start, and intra-op threads started during a command run
    in-process would keep that mode for the rest of the session
    (docs/upstream_clip_es.md#subnormals)."""
    import torch

    torch.ones(1 << 22).sum()

# ------------------------------------------------------------------------------------------------
# Real data: the shared PASCAL VOC 2012 subset (/work/shared/data/voc2012_subset, see SOURCES.md)
# ------------------------------------------------------------------------------------------------

VOC_SUBSET_RELPATH = Path("shared") / "data" / "voc2012_subset" / "VOC2012"


def _find_voc_root() -> Path | None:
    """``$VPL_VOC_ROOT``, else the first ``<ancestor>/shared/data/voc2012_subset/VOC2012``."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        candidate = folder / VOC_SUBSET_RELPATH
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """Path of the shared VOC2012 subset (the folder with ``JPEGImages/``); skips if absent."""
    env = os.environ.get("VPL_VOC_ROOT")
    if env:
        root = Path(env).expanduser()
        if not (root / "JPEGImages").is_dir():
            pytest.fail(f"VPL_VOC_ROOT={env} has no JPEGImages/ folder; point it at the VOC2012 "
                        "folder or unset it")
        return root
    root = _find_voc_root()
    if root is None:
        pytest.skip("shared VOC subset not found: set VPL_VOC_ROOT=/path/to/VOC2012 (the folder "
                    "with JPEGImages/) to run real-data tests")
    return root


# ------------------------------------------------------------------------------------------------
# Models: random-weight OpenAI CLIP ViTs of the real architecture, built here (never downloaded)
# ------------------------------------------------------------------------------------------------

TINY_CLIP = dict(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=64, patch_size=16,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-weight CLIP ViT (3 blocks, width 64, patch 16, 4x4 pretraining grid)."""
    pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
    from vpl_plugin.backbones import build_random_clip

    return build_random_clip(seed=0, **TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip):
    """The tiny CLIP with upstream CLIP-ES's numerics (the default: fp16-rounded weights, fp16
    positional table)."""
    from vpl_plugin.backbones import CLIPDense

    return CLIPDense(tiny_clip)


@pytest.fixture(scope="session")
def tiny_exact_encoder(tiny_clip):
    """The tiny CLIP with its exact fp32 weights and positional table (``exact_fp32=True``)."""
    from vpl_plugin.backbones import CLIPDense

    return CLIPDense(tiny_clip, exact_fp32=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_clip) -> Path:
    """The tiny random CLIP saved as a plain state dict file."""
    from vpl_plugin.backbones import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(tiny_clip, path)
    return path


@pytest.fixture(scope="session")
def voc_image(voc_root):
    """A real VOC image (2007_000032: aeroplane and person, 500 x 281)."""
    from PIL import Image

    return Image.open(voc_root / "JPEGImages" / "2007_000032.jpg")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread for the module (measured 0.07 s against 18 s for the same
    CLIP-CPAL pass 1 with two threads on a loaded 2-core machine; extra threads only add
    synchronisation). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
