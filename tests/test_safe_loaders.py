"""No file vpl-plugin reads may run code: CAM files, training states and TorchScript archives.

Every malicious file below carries a payload that would create a marker file; the tests assert the
marker never appears. Oracles: ``np.save`` / ``np.load(allow_pickle=True)`` on the tests' own
trusted files for CAM files, ``torch.jit.load(path).state_dict()`` on the tests' own trusted
archives for TorchScript, and an uninterrupted training run for resumes.
"""

from __future__ import annotations

import collections
import copyreg
import io
import os
import pickle
import random
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

from vpl_plugin._unpickle import UnsafeFileError, load_weights_only
from vpl_plugin.data.cam_files import CAMFileError, read_cam_file, write_cam_file

SYSTEM = f"{os.system.__module__}.system"  # "posix.system" on Linux and macOS


class _Shell:
    """Pickles as ``os.system("touch MARKER")``: what a crafted file would run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Eval:
    """Pickles as ``builtins.eval(...)`` creating the marker."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def _cams(seed=0):
    rng = np.random.default_rng(seed)
    return {"keys": np.array([0, 14], np.int64),
            "attn_highres": rng.random((2, 5, 7)).astype(np.float16),
            "highres": rng.random((2, 5, 7)).astype(np.float16)}


# -- CAM files ----------------------------------------------------------------------------------
def test_cam_files_are_written_as_np_save_and_read_back_exactly(tmp_path):
    cams = {**_cams(), "score": np.float32(0.25)}
    buf = io.BytesIO()
    np.save(buf, cams, allow_pickle=True)
    write_cam_file(tmp_path / "a.npy", cams)
    assert (tmp_path / "a.npy").read_bytes() == buf.getvalue()  # upstream's format, byte for byte
    oracle = np.load(tmp_path / "a.npy", allow_pickle=True).item()  # our own trusted file
    got = read_cam_file(tmp_path / "a.npy")
    assert list(got) == list(oracle)
    for key in oracle:
        assert type(got[key]) is type(oracle[key]) and got[key].dtype == oracle[key].dtype, key
        np.testing.assert_array_equal(got[key], oracle[key])


def test_cam_files_written_by_numpy_1_are_read(tmp_path):
    """numpy 1 pickles name ``numpy.core.multiarray``; numpy 2 ``numpy._core.multiarray``."""
    from numpy.lib import format as npy_format

    cams = {**_cams(1), "score": np.float64(2.5)}
    # numpy 1's np.save pickled with protocol 3, whose GLOBAL opcodes name modules in plain text
    payload = pickle.dumps(np.array(cams, dtype=object), protocol=3)
    payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in payload and b"numpy._core" not in payload
    path = tmp_path / "np1.npy"
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        fh.write(payload)
    got = read_cam_file(path)
    assert list(got) == list(cams)
    for key in cams:
        assert got[key].dtype == cams[key].dtype
        np.testing.assert_array_equal(got[key], cams[key])


@pytest.mark.parametrize("payload, refused", [(_Shell, SYSTEM), (_Eval, "builtins.eval")])
def test_a_cam_file_with_a_pickled_payload_is_refused_without_running_it(tmp_path, payload, refused):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npy"
    np.save(path, {**_cams(), "extra": payload(marker)}, allow_pickle=True)
    with pytest.raises(UnsafeFileError) as info:
        read_cam_file(path)
    assert str(path) in str(info.value) and refused in str(info.value)
    assert info.value.global_name == refused and info.value.path == str(path)
    assert not marker.exists()


def test_vpl_eval_and_vpl_masks_skip_a_malicious_cam_file_without_running_it(tmp_path):
    from PIL import Image

    from vpl_plugin.metrics import evaluate_cams
    from vpl_plugin.pseudo_masks import make_pseudo_masks

    cam_dir, gt_dir = tmp_path / "cams", tmp_path / "gt"
    cam_dir.mkdir()
    gt_dir.mkdir()
    marker = tmp_path / "marker"
    write_cam_file(cam_dir / "good.npy", _cams())
    np.save(cam_dir / "evil.npy", {**_cams(), "x": _Shell(marker)}, allow_pickle=True)
    for name in ("good", "evil"):
        Image.fromarray(np.zeros((5, 7), np.uint8)).save(gt_dir / f"{name}.png")
    result = evaluate_cams(cam_dir, gt_dir, ["good", "evil"], progress=False)
    assert [m["id"] for m in result["missing"]] == ["evil"]
    assert "UnsafeFileError" in result["missing"][0]["reason"] and SYSTEM in result["missing"][0]["reason"]
    summary = make_pseudo_masks(cam_dir, tmp_path / "images", ["good", "evil"], tmp_path / "masks",
                                crf=False, progress=False)
    assert summary["done"] == ["good"] and [f[0] for f in summary["failed"]] == ["evil"]
    assert "evil.npy" in summary["failed"][0][1] and SYSTEM in summary["failed"][0][1]
    assert not marker.exists()


def _malformed(kind, path):
    full = io.BytesIO()
    np.save(full, _cams(), allow_pickle=True)
    if kind == "plain array":
        np.save(path, np.zeros((2, 3), np.float16))
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(full.getvalue()[:150])
    elif kind == "garbage":
        path.write_bytes(b"\x00\xffnot a numpy file at all" * 4)
    elif kind == "object vector":
        np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)
    elif kind == "not a dict":
        np.save(path, np.array("a string", dtype=object), allow_pickle=True)
    elif kind == "int key":
        np.save(path, {0: np.zeros(2)}, allow_pickle=True)
    elif kind == "list value":
        np.save(path, {"keys": [0, 14]}, allow_pickle=True)
    elif kind == "object array inside":
        np.save(path, {"keys": np.array([0, None], dtype=object)}, allow_pickle=True)


@pytest.mark.parametrize("kind, why", [
    ("plain array", "plain array"), ("zero bytes", "not a .npy file"),
    ("truncated", "truncated or corrupt"), ("garbage", "not a .npy file"),
    ("object vector", "shape (2,)"), ("not a dict", "type str, not a dict"),
    ("int key", "key 0 is of type int"), ("list value", "'keys' is of type list"),
    ("object array inside", "array of Python objects"),
])
def test_malformed_cam_files_are_refused_by_name(tmp_path, kind, why):
    path = tmp_path / f"{kind.replace(' ', '_')}.npy"
    _malformed(kind, path)
    with pytest.raises(CAMFileError) as info:
        read_cam_file(path)
    assert str(path) in str(info.value) and why in str(info.value)
    assert info.value.path == str(path)
    assert pickle.loads(pickle.dumps(info.value)).path == str(path)  # crosses worker processes


def test_write_cam_file_refuses_what_could_not_be_read_back(tmp_path):
    with pytest.raises(ValueError, match="bad.npy.*'x' is of type list"):
        write_cam_file(tmp_path / "bad.npy", {"x": [1, 2]})
    with pytest.raises(ValueError, match="objects"):
        write_cam_file(tmp_path / "bad.npy", {"x": np.array([None], dtype=object)})
    assert not (tmp_path / "bad.npy").exists()


# -- training states ------------------------------------------------------------------------------
def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    from vpl_plugin.phase2.train import _rng_state, _set_rng_state

    np.random.seed(3)
    random.seed(4)
    np.random.standard_normal()  # odd count: numpy caches a gaussian (has_gauss = 1)
    random.gauss(0, 1)  # python caches one too (gauss_next)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []

    def draw():
        return (np.random.standard_normal(3).tolist(), np.random.randint(0, 10**9, 3).tolist(),
                random.gauss(0, 1), random.random(), torch.rand(3).tolist())

    expected = draw()
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


@pytest.fixture(scope="module")
def p2_dataset(tmp_path_factory):
    pytest.importorskip("timm", reason="the phase-2 decoder needs timm")
    from phase2_helpers import export_world

    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.phase2.data import PseudoMaskDataset

    world = export_world(tmp_path_factory.mktemp("safe_p2") / "world")
    return PseudoMaskDataset(VOCDataset(world, "train.txt", class_spec=SYNTHETIC),
                             world / "SegmentationClass")


def _p2_config(**kw):
    from vpl_plugin.phase2.train import TrainConfig

    return TrainConfig(**{**dict(iterations=4, batch_size=2, crop=32, checkpoint_every=2, log_every=2,
                                 num_workers=0), **kw})


def _old_rng_state():
    """How states were written before: numpy's and python's RNG states as returned."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def test_phase2_states_are_plain_data_and_old_states_resume_bit_exact(p2_dataset, tmp_path, monkeypatch):
    from phase2_helpers import small_segmenter

    from vpl_plugin.phase2 import train as train_mod

    full = small_segmenter()
    train_mod.train_segmenter(full, p2_dataset, tmp_path / "full", config=_p2_config(), progress=False)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "full" / "last.pt") == []

    class Killed(Exception):
        pass

    def kill(iteration, values):
        if iteration == 3:
            raise Killed

    monkeypatch.setattr(train_mod, "_rng_state", _old_rng_state)  # write last.pt the old way
    with pytest.raises(Killed):
        train_mod.train_segmenter(small_segmenter(), p2_dataset, tmp_path / "old", config=_p2_config(),
                                  progress=False, on_step=kill)
    monkeypatch.undo()
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old" / "last.pt")
    assert "numpy.ndarray" in needed and all(n.startswith("numpy.") for n in needed)
    resumed = small_segmenter(seed=123)
    record = train_mod.train_segmenter(resumed, p2_dataset, tmp_path / "old", config=_p2_config(),
                                       progress=False)
    assert record["iteration"] == 4
    expected, got = full.decoder_state_dict(), resumed.decoder_state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_a_malicious_phase2_state_is_refused_without_running_it(p2_dataset, tmp_path):
    from phase2_helpers import small_segmenter

    from vpl_plugin.phase2.train import _STATE_FORMAT, load_train_state, train_segmenter

    marker, state = tmp_path / "marker", tmp_path / "out" / "last.pt"
    state.parent.mkdir()
    torch.save({"format": _STATE_FORMAT, "iteration": 1, "rng": _Shell(marker)}, state)
    for call in (lambda: load_train_state(state),
                 lambda: train_segmenter(small_segmenter(), p2_dataset, state.parent,
                                         config=_p2_config(iterations=2), progress=False)):
        with pytest.raises(UnsafeFileError) as info:
            call()
        assert str(state) in str(info.value) and SYSTEM in str(info.value)
        assert "--no-resume" in str(info.value)
    assert not marker.exists()
    record = train_segmenter(small_segmenter(), p2_dataset, state.parent, config=_p2_config(iterations=2),
                             progress=False, resume=False)  # starting over overwrites it
    assert record["iteration"] == 2 and load_train_state(state)["iteration"] == 2
    assert not marker.exists()


def test_load_weights_only_admits_numpy_data_and_nothing_else(tmp_path):
    plain = {"a": torch.arange(3), "numpy": np.arange(4, dtype=np.uint32), "score": np.float64(0.5),
             "f16": np.float16(1.5)}
    torch.save(plain, tmp_path / "legacy.pt")
    got = load_weights_only(tmp_path / "legacy.pt")
    assert torch.equal(got["a"], plain["a"]) and got["numpy"].dtype == np.uint32
    np.testing.assert_array_equal(got["numpy"], plain["numpy"])
    assert got["score"] == 0.5 and type(got["score"]) is np.float64 and got["f16"] == np.float16(1.5)
    torch.save({"a": np.array([None], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises((UnsafeFileError, ValueError), match="objects.pt"):
        load_weights_only(tmp_path / "objects.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights_only(tmp_path / "junk.pt", kind="training state")


TINY_DEMO = dict(embed_dim=32, vision_layers=2, vision_width=64, transformer_width=64, transformer_heads=1,
                 transformer_layers=1, context_length=24)


def test_demo_clip_states_are_plain_and_a_malicious_one_is_refused(tmp_path):
    pytest.importorskip("clip")
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig, export_training_state, train_demo_clip

    arch, cfg = DemoCLIPConfig(**TINY_DEMO), dict(batch_size=4, warmup=1, checkpoint_every=1, log_every=1)
    train_demo_clip(tmp_path / "a.pt", arch=arch, config=DemoTrainConfig(steps=1, **cfg), progress=False, log=None)
    state = tmp_path / "a.pt.train.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state) == []
    saved = torch.load(state, weights_only=True)
    saved["curve"].append({"evil": _Shell(tmp_path / "marker")})
    torch.save(saved, state)
    for call in (lambda: train_demo_clip(tmp_path / "a.pt", arch=arch, config=DemoTrainConfig(steps=2, **cfg),
                                         progress=False, log=None),
                 lambda: export_training_state(state, tmp_path / "e.pt")):
        with pytest.raises(UnsafeFileError, match=SYSTEM) as info:
            call()
        assert str(state) in str(info.value) and "--no-resume" in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_a_demo_state_holding_numpy_scalars_still_resumes_to_the_same_weights(tmp_path):
    pytest.importorskip("clip")
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig, train_demo_clip

    arch = DemoCLIPConfig(**TINY_DEMO)
    cfg = dict(batch_size=4, warmup=1, checkpoint_every=1, log_every=1)
    train_demo_clip(tmp_path / "full.pt", arch=arch, config=DemoTrainConfig(steps=3, **cfg), progress=False, log=None)
    train_demo_clip(tmp_path / "cut.pt", arch=arch, config=DemoTrainConfig(steps=2, **cfg), progress=False, log=None)
    state = tmp_path / "cut.pt.train.pt"
    saved = torch.load(state, weights_only=True)
    saved["seconds"] = np.float64(saved["seconds"])  # as a state holding numpy values would
    saved["curve"] = [{k: (np.float64(v) if isinstance(v, float) else v) for k, v in p.items()}
                      for p in saved["curve"]]
    torch.save(saved, state)
    assert "numpy.dtype" in torch.serialization.get_unsafe_globals_in_checkpoint(state)
    train_demo_clip(tmp_path / "cut.pt", arch=arch, config=DemoTrainConfig(steps=3, **cfg), progress=False, log=None)
    a = torch.load(tmp_path / "full.pt.train.pt", weights_only=True)["model"]
    b = load_weights_only(state)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- TorchScript archives -------------------------------------------------------------------------
SMALL_CLIP = dict(vision_layers=1, transformer_layers=1, image_resolution=32, context_length=16)


def _openai_like(fp16: bool):
    """A random CLIP shaped like OpenAI's released files (the three int buffers; fp16 weights)."""
    clip_model = pytest.importorskip("clip.model")
    from vpl_plugin.backbones import build_random_clip

    model = build_random_clip(seed=5, **SMALL_CLIP)
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    if fp16:
        clip_model.convert_weights(model)  # what OpenAI did: fp16 conv / linear / projections
    return model


def _jit_state(path):
    """The oracle: ``torch.jit.load`` on the test's own trusted archive."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).state_dict()


def _assert_same_state(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].stride() == value.stride(), key
        assert torch.equal(got[key], value), key
        assert not got[key].requires_grad


def _forbid_jit_load(monkeypatch):
    """From here on, any call into TorchScript's loader fails the test (the safe path never calls it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the TorchScript loader was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch.jit._serialization, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)


@pytest.fixture(scope="module")
def traced_archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("traced")
    out = {}
    for fp16 in (False, True):
        model = _openai_like(fp16)
        dtype = torch.float16 if fp16 else torch.float32
        inputs = (torch.zeros(1, 3, 32, 32, dtype=dtype), torch.zeros(1, 16, dtype=torch.long))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, inputs, check_trace=False)
        path = root / f"ViT-fp{16 if fp16 else 32}.pt"
        traced.save(str(path))
        out[fp16] = (path, _jit_state(path))
    return out


@pytest.mark.parametrize("fp16", [False, True])
def test_a_traced_openai_clip_archive_is_read_exactly_without_torch_jit_load(traced_archives, fp16, monkeypatch):
    from vpl_plugin.backbones import load_clip, load_state_dict_file

    path, expected = traced_archives[fp16]
    assert {"input_resolution", "context_length", "vocab_size"} <= set(expected)
    assert (expected["visual.conv1.weight"].dtype == torch.float16) == fp16
    _forbid_jit_load(monkeypatch)
    _assert_same_state(load_state_dict_file(path), expected)
    enc = load_clip(str(path), exact_fp32=True)
    assert enc.patch_size == 16 and enc.checkpoint == str(path)
    assert torch.equal(enc.visual.proj, expected["visual.proj"].float())
    # the default rounds it through fp16 as upstream's loader does (a no-op for an fp16 archive)
    assert torch.equal(load_clip(str(path)).visual.proj, expected["visual.proj"].half().float())


def test_trust_torchscript_is_the_only_path_to_torch_jit_load(traced_archives, monkeypatch):
    from vpl_plugin.backbones import load_state_dict_file

    path, expected = traced_archives[True]
    calls = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    load_state_dict_file(path)
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trusted = load_state_dict_file(path, trust_torchscript=True)
    assert len(calls) == 1
    _assert_same_state(trusted, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_projects_torchscript_checkpoints_are_read_exactly(tmp_path, tiny_clip, dtype, monkeypatch):
    import copy

    from vpl_plugin.backbones import load_state_dict_file, save_checkpoint

    path = tmp_path / "scripted.pt"
    save_checkpoint(copy.deepcopy(tiny_clip).to(dtype), path, torchscript=True)
    expected = _jit_state(path)
    assert expected["visual.proj"].dtype == dtype
    _forbid_jit_load(monkeypatch)
    _assert_same_state(load_state_dict_file(path), expected)


def test_a_scripted_openai_clip_is_read_exactly_and_its_attention_mask_stays_out(tmp_path, monkeypatch):
    """``torch.jit.script(clip.model.CLIP)`` fails as shipped: ``clip.model.LayerNorm.forward``
    calls ``super().forward`` and ``CLIP.forward`` calls ``Tensor.norm(dim=...)``, neither of which
    TorchScript compiles. With those two methods replaced (same weights, same module tree), the
    rest of OpenAI's classes script, including the text blocks' ``attn_mask`` tensor attribute,
    which is not a parameter or buffer and must not appear in the state dict."""
    clip_model = pytest.importorskip("clip.model")
    import torch.nn.functional as F

    from vpl_plugin.backbones import build_random_clip, load_state_dict_file

    class LayerNorm(torch.nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)

    class CLIP(clip_model.CLIP):
        def forward(self, image: torch.Tensor, text: torch.Tensor):
            return self.encode_image(image), self.encode_text(text)

    model = build_random_clip(seed=2, **SMALL_CLIP)
    for module in model.modules():
        if type(module) is clip_model.LayerNorm:
            module.__class__ = LayerNorm
    model.__class__ = CLIP
    path = tmp_path / "scripted_clip.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(path))
    with zipfile.ZipFile(path) as zf:
        code = "".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".py"))
    assert "attn_mask : Tensor" in code  # a tensor attribute that is not a parameter or buffer
    expected = _jit_state(path)
    assert not any("attn_mask" in k for k in expected)
    _forbid_jit_load(monkeypatch)
    _assert_same_state(load_state_dict_file(path), expected)


class _Odd(torch.nn.Module):
    """Attribute kinds a scripted module can hold besides parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, bias=False)
        self.bn = torch.nn.BatchNorm1d(2)
        self.plain = torch.ones(2)
        self.ints = [1, 2]
        self.named = {"a": torch.zeros(1)}
        self.tensors = [torch.full((2,), 7.0)]
        self.register_buffer("unset", None)
        self.register_parameter("unset_p", None)
        self.half_p = torch.nn.Parameter(torch.tensor([1.5, -2.0], dtype=torch.float16))
        self.view = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)[:, 1:])
        self.register_buffer("counts", torch.arange(4, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.plain + self.named["a"] + self.tensors[0] + float(self.ints[0])


def test_only_parameters_and_buffers_of_a_scripted_module_are_read(tmp_path, monkeypatch):
    from vpl_plugin.backbones._torchscript import read_torchscript_state_dict

    path = tmp_path / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_Odd()).save(str(path))
    expected = _jit_state(path)
    assert "plain" not in expected and "view" in expected and expected["view"].stride() == (3, 1)
    _forbid_jit_load(monkeypatch)
    _assert_same_state(read_torchscript_state_dict(path), expected)


def _rewrite(src, dst, replace):
    """Copy a zip, replacing (bytes) or dropping (None) the named entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = replace.get(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def _entry(path, suffix):
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith(suffix))


@pytest.mark.parametrize("payload, refused", [(_Shell, SYSTEM), (_Eval, "builtins.eval")])
def test_an_archive_whose_data_pkl_calls_code_is_refused_without_running_it(
        traced_archives, tmp_path, payload, refused, monkeypatch):
    from vpl_plugin.backbones import load_clip

    _forbid_jit_load(monkeypatch)
    marker = tmp_path / "marker"
    src = traced_archives[False][0]
    evil = tmp_path / "evil.pt"
    _rewrite(src, evil, {_entry(src, "/data.pkl"): pickle.dumps(payload(marker), protocol=2, fix_imports=False)})
    with pytest.raises(UnsafeFileError) as info:
        load_clip(str(evil))
    assert str(evil) in str(info.value) and refused in str(info.value)
    assert "--trust-torchscript" in str(info.value)
    assert not marker.exists()


class _RestoresItself(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state) -> None:
        print("ARCHIVE CODE RAN")
        self.w = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_an_archive_whose_code_runs_on_load_is_refused_without_running_it(tmp_path, capfd, monkeypatch):
    from vpl_plugin.backbones import load_state_dict_file
    from vpl_plugin.backbones.clip import CheckpointError

    path = tmp_path / "runs_code.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_RestoresItself()).save(str(path))
    _jit_state(path)
    assert "ARCHIVE CODE RAN" in capfd.readouterr().out  # torch.jit.load does run it
    _forbid_jit_load(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message and "__setstate__" in message
    assert "--trust-torchscript" in message and "executes the code" in message
    assert "ARCHIVE CODE RAN" not in capfd.readouterr().out


# hand-made archives: one module class ``__torch__.M`` with a parameter ``w``
class _Record:
    def __init__(self, key, numel, storage=torch.FloatStorage) -> None:
        self.key, self.numel, self.storage = key, numel, storage


class _Tensor:
    def __init__(self, record, offset, size, stride, rebuild=torch._utils._rebuild_tensor_v2) -> None:
        self.args = (record, offset, size, stride, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self):
        return (self.rebuild, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Record):
            return ("storage", obj.storage, obj.key, "cpu", obj.numel)
        return None


def _craft(path, monkeypatch, attrs, records, code='class M(Module):\n  __parameters__ = ["w", ]\n'
           '  __buffers__ = []\n  w : Tensor\n'):
    module = types.ModuleType("__torch__")

    class M:  # pickled as TorchScript pickles modules: NEWOBJ of __torch__.M, then its attributes
        def __reduce_ex__(self, protocol):
            return (copyreg.__newobj__, (M,), attrs)

    M.__module__, M.__qualname__ = "__torch__", "M"
    module.M = M
    monkeypatch.setitem(sys.modules, "__torch__", module)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(M.__new__(M))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arch/data.pkl", buf.getvalue())
        zf.writestr("arch/code/__torch__.py", code)
        for key, data in records.items():
            zf.writestr(f"arch/data/{key}", data)
        zf.writestr("arch/byteorder", "little")
    return path


def test_a_hand_made_archive_is_read_as_its_bytes_say(tmp_path, monkeypatch):
    from vpl_plugin.backbones._torchscript import read_torchscript_state_dict

    values = np.arange(6, dtype=np.float32)
    path = _craft(tmp_path / "ok.pt", monkeypatch,
                  {"w": _Tensor(_Record("0", 6), 1, (2, 2), (3, 1)), "training": False},
                  {"0": values.tobytes()})
    got = read_torchscript_state_dict(path)
    expected = torch.from_numpy(values).as_strided((2, 2), (3, 1), 1)  # [[1, 2], [4, 5]]
    assert list(got) == ["w"] and got["w"].stride() == (3, 1) and got["w"].dtype == torch.float32
    assert torch.equal(got["w"], expected)


@pytest.mark.parametrize("attrs, records, why", [
    ({"w": _Tensor(_Record("0", 4), 0, (3, 2), (2, 1))}, {"0": bytes(16)}, "reaches past its storage"),
    ({"w": _Tensor(_Record("0", 4), 0, (4,), (1,))}, {"0": bytes(12)}, "holds 12 bytes"),
    ({"w": _Tensor(_Record("1", 4), 0, (4,), (1,))}, {"0": bytes(16)}, "is missing"),
    ({"w": _Tensor(_Record("0", 4), 0, (4,), (1,), rebuild=torch._utils._rebuild_qtensor)},
     {"0": bytes(16)}, "torch._utils._rebuild_qtensor"),
    ({"v": _Tensor(_Record("0", 4), 0, (4,), (1,))}, {"0": bytes(16)}, "declares 'w'"),
])
def test_archives_the_reader_does_not_understand_are_refused_with_the_flag_named(
        tmp_path, monkeypatch, attrs, records, why):
    from vpl_plugin.backbones import load_state_dict_file
    from vpl_plugin.backbones.clip import CheckpointError

    path = _craft(tmp_path / "odd.pt", monkeypatch, attrs, records)
    _forbid_jit_load(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value) and why in str(info.value)
    assert "--trust-torchscript" in str(info.value)


def test_a_class_declaration_that_is_not_a_plain_list_is_not_understood(tmp_path, monkeypatch):
    from vpl_plugin.backbones import load_state_dict_file
    from vpl_plugin.backbones.clip import CheckpointError

    code = 'class M(Module):\n  __parameters__ = __import__("os").listdir(".")\n  __buffers__ = []\n'
    path = _craft(tmp_path / "code.pt", monkeypatch, {"w": _Tensor(_Record("0", 1), 0, (1,), (1,))},
                  {"0": bytes(4)}, code=code)
    with pytest.raises(CheckpointError, match="not a plain list of names"):
        load_state_dict_file(path)


# -- checkpoint validation ------------------------------------------------------------------------
def _poison(state, nan_key, inf_key):
    state[nan_key].view(-1)[3] = float("nan")
    state[inf_key].view(-1)[0] = float("inf")


def _state(tiny_clip):
    return {k: v.clone() for k, v in tiny_clip.state_dict().items()}


@pytest.mark.parametrize("edit, names", [
    (lambda s: s.pop("visual.conv1.weight"), ["visual.conv1.weight"]),
    (lambda s: s.pop("ln_final.weight"), ["ln_final.weight"]),
    (lambda s: s.update({"visual.conv1.weight": torch.zeros(64, 3, 0, 0)}), ["visual.conv1.weight", "(64, 3, 0, 0)"]),
    (lambda s: s.update({"visual.conv1.weight": torch.zeros(64, 3, 16, 8)}), ["visual.conv1.weight", "square"]),
    (lambda s: _poison(s, "visual.proj", "token_embedding.weight"),
     ["visual.proj", "token_embedding.weight", "non-finite"]),
    (lambda s: s.pop("transformer.resblocks.0.ln_1.bias"), ["transformer.resblocks.0.ln_1.bias"]),
])
def test_broken_clip_checkpoints_are_refused_naming_file_and_keys(tmp_path, tiny_clip, edit, names):
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.backbones.clip import CheckpointError

    state = _state(tiny_clip)
    edit(state)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_clip(str(path))
    for name in [str(path)] + names:
        assert name in str(info.value)


def test_a_plain_checkpoint_with_a_pickled_payload_is_refused(tmp_path, tiny_clip):
    from vpl_plugin.backbones import load_state_dict_file
    from vpl_plugin.backbones.clip import CheckpointError

    marker = tmp_path / "marker"
    torch.save({**_state(tiny_clip), "x": _Shell(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_non_finite_value_is_found_whatever_its_place_and_dtype(tiny_clip, dtype, bad):
    from vpl_plugin.backbones.clip import CheckpointError, _check_finite  # the module's own checker

    state = {k: v.to(dtype) for k, v in _state(tiny_clip).items()}
    _check_finite(state, "ok.pt")  # finite: accepted
    state["empty"] = torch.zeros(0, dtype=dtype)
    _check_finite(state, "ok.pt")  # an empty tensor has nothing to check
    for key in ("logit_scale", "visual.proj", "ln_final.bias"):
        for position in (0, state[key].numel() // 2, state[key].numel() - 1):
            broken = dict(state)
            broken[key] = state[key].clone()
            broken[key].view(-1)[position] = bad
            assert torch.isfinite(broken[key]).all().item() is False  # the oracle agrees it is bad
            with pytest.raises(CheckpointError, match=f"bad.pt.*{key}"):
                _check_finite(broken, "bad.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_mapped_loading_returns_the_same_tensors_as_reading(tmp_path, tiny_clip, zip_format):
    from vpl_plugin.backbones import load_clip, load_state_dict_file

    path = tmp_path / "clip.pt"
    torch.save(_state(tiny_clip), path, _use_new_zipfile_serialization=zip_format)
    read = load_state_dict_file(path)
    mapped = load_state_dict_file(path, mmap=True)  # the legacy format falls back to reading
    assert read.keys() == mapped.keys()
    for key in read:
        assert read[key].dtype == mapped[key].dtype and torch.equal(read[key], mapped[key]), key
    model = load_clip(str(path), exact_fp32=True).model  # the checkpoint's values, unrounded
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_clip.state_dict()[key]), key
