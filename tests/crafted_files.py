"""A corpus of crafted input files: one per attack or defect, written by the tests into a folder.

Nothing here is committed as a binary: every file is generated from a few bytes, a tiny tensor or a
short pickle. Each :class:`Case` writes one file and says what a refusal of it must contain besides
the file's name (``why``). Files that carry a *payload* (``runs_code=True``) would create the
``marker`` file if anything in them were executed: a pickle whose ``__reduce__`` calls
``os.system("touch MARKER")``, ``eval(...)`` or numpy's ``runstring``, a TorchScript archive whose
``__setstate__`` creates the marker through ``torch.from_file``, a YAML ``!!python`` tag. A safe
reader never creates it.

Groups (each a list of cases; ``write(path, marker, base)`` writes the crafted file at ``path``):

* :data:`CAM_CASES`: ``<id>.npy`` CAM files (``vpl masks``, ``vpl eval --cams``).
* :data:`IMAGE_CASES`: ``JPEGImages/<id>.jpg`` images (content decides, not the suffix).
* :data:`ANNOTATION_CASES`: ``Annotations/<id>.xml``.
* :data:`LABEL_CASES`: ``<id>.png`` ground truth or pseudo masks.
* :data:`CLIP_CASES`: ``--clip`` checkpoints (``base``: a good CLIP state dict).
* :data:`PROTOTYPE_CASES`: ``--prototypes`` files (``base``: a good prototype file).
* :data:`SEGMENTER_CASES`: ``vpl segment --checkpoint`` files (``base``: a good segmenter file).
* :data:`STATE_CASES`: resumable training states (``vpl train``'s ``last.pt``, ``vpl train-clip``'s
  ``PATH.pt.train.pt``).
* :data:`RESUME_CASES`: files a rerun meets and must redo rather than trust (CLIP-CPAL
  ``cpal_bank.pt.partial``, the learning cache ``<id>.npz``, an empty ``<id>.npy`` output).
* :data:`BANK_CASES`: ``--cpal-bank`` files.
* :data:`CONFIG_CASES`: ``--config`` YAML files.
* :data:`SPLIT_CASES`: ``--split-file`` lists (``base``: a good image id).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: a Case's ``write(path, marker, base)``; returns the culprit's path when it is another file
Writer = Callable[[Path, Path, Any], Path | None]

#: how ``os.system`` pickles on this platform ("posix.system" on Linux and macOS)
SYSTEM = f"{os.system.__module__}.system"


@dataclass(frozen=True)
class Case:
    """One crafted file.

    Attributes:
        name: short id (also used as the image id or file stem, so ids stay valid file names).
        write: ``write(path, marker, base)`` writes the file at ``path``; returns another path when
            the file that must be named is not ``path`` itself (e.g. a CLIP archive recorded in a
            segmenter checkpoint), else None.
        why: a fragment the refusal must contain besides the culprit's name ("" = the name alone).
        runs_code: the file carries a payload that would create ``marker`` if executed.
        refused_by_reader: the file reader itself refuses it (False: the file reads, and its
            consumer refuses the content, e.g. NaN CAMs).
        accepted: not a refusal: the defect is handled and the file processed (e.g. 16-bit images).
    """

    name: str
    write: Writer
    why: str = ""
    runs_code: bool = False
    refused_by_reader: bool = True
    accepted: bool = False

    def make(self, folder: Path, marker: Path, base: Any = None, *, filename: str = "") -> Crafted:
        """Write the file into ``folder`` (as ``filename``, default ``<name>``) and describe it."""
        path = Path(folder) / (filename or self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        other = self.write(path, Path(marker), base)
        return Crafted(self, path, Path(other) if other is not None else path, Path(marker))


@dataclass(frozen=True)
class Crafted:
    """A written crafted file: its case, its path, the file a refusal names, the marker."""

    case: Case
    path: Path
    culprit: Path
    marker: Path


# ------------------------------------------------------------------------------------------------
# payloads
# ------------------------------------------------------------------------------------------------


class Shell:
    """Pickles as ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Eval:
    """Pickles as ``builtins.eval("open(MARKER, 'w').close()")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class NumpyRunstring:
    """Pickles as numpy's own ``numpy.testing._private.utils.runstring(code, {})``: a function
    inside numpy that executes a string, the classic way around an unpickler that admits any
    ``numpy.*`` global."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"open({self.marker!r}, 'w').close()", {}))


class SetstateRunsCode(torch.nn.Module):
    """Scripted and saved with ``torch.jit.save``, its ``__setstate__`` runs when
    ``torch.jit.load`` opens the archive and creates the file named by ``marker`` (through
    ``torch.from_file(..., shared=True)``, which creates the file it maps)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        touched = torch.from_file(state[1], True, 1, dtype=torch.uint8)
        self.w = state[0] + touched.float().sum() * 0  # used, so the call is not optimised away
        self.marker = state[1]
        self.training = state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def torchscript_with_code(path: Path, marker: Path) -> Path:
    """A TorchScript archive whose loading creates ``marker`` (only under ``torch.jit.load``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(SetstateRunsCode(str(marker))).save(str(path))
    return path


# ------------------------------------------------------------------------------------------------
# small writers
# ------------------------------------------------------------------------------------------------


def _bytes(data: bytes) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        path.write_bytes(data)

    return write


def _torch_save(make: Callable[[Path, Any], Any]) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        torch.save(make(marker, base), path)

    return write


def _np_save(make: Callable[[Path], Any]) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        with open(path, "wb") as fh:  # np.save(str) would append ".npy"
            np.save(fh, make(marker), allow_pickle=True)

    return write


def good_cams(size: tuple[int, int] = (32, 32), keys=(0,), seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed CAM dict (upstream's keys and dtypes) for an image of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    return {"keys": np.asarray(keys, np.int64),
            "attn_highres": rng.random((len(keys), *size)).astype(np.float16)}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, bit_depth: int = 1, colour: int = 0) -> bytes:
    """A PNG that claims ``width x height`` but holds no pixel data (a decompression bomb's header:
    decoding it would allocate ``width * height`` pixels; reading the header allocates nothing)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def small_jpeg(size: tuple[int, int] = (32, 32), seed: int = 0) -> bytes:
    """A real small RGB JPEG (``size`` = W, H)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _huge_jpeg(path: Path, marker: Path, base: Any) -> None:
    data = bytearray(small_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 7000, 7000)  # the frame header claims 7000x7000
    path.write_bytes(bytes(data))


def _image_array(mode_array: np.ndarray, fmt: str) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        from PIL import Image

        Image.fromarray(mode_array).save(path, format=fmt)

    return write


def _grey_ramp(size: int = 32) -> np.ndarray:
    return (np.arange(size * size, dtype=np.uint32).reshape(size, size) * 255 // (size * size - 1)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# CAM files
# ------------------------------------------------------------------------------------------------


def _cams_with(extra: dict[str, Any]) -> Callable[[Path], Any]:
    return lambda marker: {**good_cams(), **{k: (v(marker) if callable(v) else v) for k, v in extra.items()}}


def _cam_nan(marker: Path) -> dict[str, np.ndarray]:
    cams = good_cams()
    cams["attn_highres"][0, 3:5, 3:7] = np.nan
    return cams


def _cam_inf(marker: Path) -> dict[str, np.ndarray]:
    cams = good_cams()
    cams["attn_highres"][0, 0, 0] = np.inf
    return cams


def _cam_truncated(path: Path, marker: Path, base: Any) -> None:
    buf = io.BytesIO()
    np.save(buf, good_cams(), allow_pickle=True)
    path.write_bytes(buf.getvalue()[:200])


def _cam_npz(path: Path, marker: Path, base: Any) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **good_cams())


def _cam_huge_plain(path: Path, marker: Path, base: Any) -> None:
    from numpy.lib import format as npy_format

    with open(path, "wb") as fh:  # a header claiming 4e12 float32 values, and no data
        npy_format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                               "shape": (20000, 20000, 10000)})


class UninitialisedArray:
    """Pickles as a direct call ``numpy.ndarray((1, 3000, 3000), "f4")``: 36 MB of uninitialised
    memory from a 150-byte file (any size, with another shape). ``np.save`` never writes that: it
    passes the class to ``_reconstruct`` and fills the array from bytes stored in the file."""

    def __reduce__(self):
        return (np.ndarray, ((1, 3000, 3000), "f4"))


CAM_CASES: list[Case] = [
    Case("cam_pickle_system", _np_save(_cams_with({"extra": Shell})), SYSTEM, runs_code=True),
    Case("cam_pickle_eval", _np_save(_cams_with({"extra": Eval})), "builtins.eval", runs_code=True),
    Case("cam_pickle_numpy_runstring", _np_save(_cams_with({"extra": NumpyRunstring})), "runstring",
         runs_code=True),
    Case("cam_uninitialised_array", _np_save(_cams_with({"attn_highres": lambda m: UninitialisedArray()})),
         "numpy.ndarray"),
    Case("cam_zero_bytes", _bytes(b""), "not a .npy file"),
    Case("cam_truncated", _cam_truncated, "truncated or corrupt"),
    Case("cam_garbage", _bytes(b"\x00\xffnot a numpy file" * 4), "not a .npy file"),
    Case("cam_npz_archive", _cam_npz, "not a .npy file"),
    Case("cam_huge_plain_array", _cam_huge_plain, "plain array"),
    Case("cam_object_array", _np_save(_cams_with({"keys": np.array([0, None], dtype=object)})),
         "array of Python objects"),
    Case("cam_nan", _np_save(_cam_nan), "non-finite", refused_by_reader=False),
    Case("cam_inf", _np_save(_cam_inf), "non-finite", refused_by_reader=False),
    Case("cam_key_outside_classes", _np_save(lambda m: good_cams(keys=(99,))), "[99]",
         refused_by_reader=False),
    Case("cam_no_maps", _np_save(lambda m: {"keys": np.array([0], np.int64)}), "attn_highres",
         refused_by_reader=False),
    Case("cam_wrong_size", _np_save(lambda m: good_cams(size=(5, 7))), "", refused_by_reader=False),
    Case("cam_keys_maps_mismatch", _np_save(lambda m: {**good_cams(keys=(0, 1)), "keys": np.array([0], np.int64)}),
         "", refused_by_reader=False),
]


# ------------------------------------------------------------------------------------------------
# images and annotations
# ------------------------------------------------------------------------------------------------


def _truncated_jpeg(path: Path, marker: Path, base: Any) -> None:
    data = small_jpeg()
    path.write_bytes(data[: len(data) // 2])


IMAGE_CASES: list[Case] = [
    Case("img_bomb_png", _bytes(png_header_only(14000, 14000)), "14000x14000"),
    Case("img_huge_jpeg", _huge_jpeg, "7000x7000"),
    Case("img_truncated_jpeg", _truncated_jpeg, ""),
    Case("img_garbage", _bytes(b"GIF89a but not really" * 3), ""),
    Case("img_zero_bytes", _bytes(b""), ""),
    Case("img_float_tiff", _image_array(np.zeros((32, 32), np.float32), "TIFF"), "mode 'F'"),
    Case("img_16bit_grey", _image_array(_grey_ramp().astype(np.uint16) * 257, "PNG"), accepted=True),
]


def _xml(body: str) -> Writer:
    return _bytes(body.encode())


_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE a [\n <!ENTITY l0 "lollollollollollollollollollol">\n'
           + "".join(f' <!ENTITY l{i} "' + f"&l{i - 1};" * 10 + '">\n' for i in range(1, 10))
           + ']>\n<annotation><object><name>&l9;</name></object></annotation>\n')

ANNOTATION_CASES: list[Case] = [
    Case("xml_billion_laughs", _xml(_LAUGHS), "malformed XML"),
    Case("xml_malformed", _xml("<annotation><object><name>cat</name></annotation>"), "malformed XML"),
    Case("xml_no_object", _xml("<annotation><size><width>32</width></size></annotation>"), "no <object>"),
    Case("xml_unknown_class", _xml("<annotation><object><name>ufo</name></object></annotation>"), "ufo"),
]


# ------------------------------------------------------------------------------------------------
# label PNGs (ground truth, pseudo masks)
# ------------------------------------------------------------------------------------------------


def _label(values: np.ndarray, fmt: str = "PNG") -> Writer:
    return _image_array(values, fmt)


def _label_77(size: int = 32) -> np.ndarray:
    arr = np.zeros((size, size), np.uint8)
    arr[:2, :3] = 77
    return arr


LABEL_CASES: list[Case] = [
    Case("label_value_77", _label(_label_77()), "77 (6 pixels)"),
    Case("label_16bit", _label(np.ones((32, 32), np.uint16) * 257), "mode 'I;16'"),
    Case("label_jpeg_data", _label(np.zeros((32, 32), np.uint8), "JPEG"), "JPEG data"),
    Case("label_garbage", _bytes(b"\x89PNG\r\n\x1a\n but cut"), ""),
]


# ------------------------------------------------------------------------------------------------
# CLIP checkpoints (base: a good state dict)
# ------------------------------------------------------------------------------------------------


def _state_edit(edit: Callable[[dict[str, torch.Tensor], Path], None]) -> Writer:
    def write(path: Path, marker: Path, base: dict[str, torch.Tensor]) -> None:
        state = {k: v.clone() for k, v in base.items()}
        edit(state, marker)
        torch.save(state, path)

    return write


def expanded(shape: tuple[int, ...], value: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """A tensor of ``shape`` stored as one element (stride 0): ``torch.save`` writes 4 bytes of
    data for it, whatever its shape; used, it takes its full size (``(50000, 50000)`` = 10 GB)."""
    return torch.full((1,), value, dtype=dtype).expand(*shape)


def _expand_key(state: dict[str, torch.Tensor], key: str) -> None:
    state[key] = expanded(tuple(state[key].shape), 0.01, state[key].dtype)


def _poison(state: dict[str, torch.Tensor], marker: Path) -> None:
    state["visual.proj"].view(-1)[3] = float("nan")


def _torchscript_code(path: Path, marker: Path, base: Any) -> None:
    torchscript_with_code(path, marker)


def _torchscript_data_pickle(path: Path, marker: Path, base: Any) -> None:
    """A genuine TorchScript archive whose ``data.pkl`` record is replaced by a pickled payload."""
    plain = path.with_name(path.name + ".plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(plain))
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps(Shell(marker), protocol=2)
            zout.writestr(name, data)
    plain.unlink()


CLIP_CASES: list[Case] = [
    Case("clip_torchscript_code.pt", _torchscript_code, "__setstate__", runs_code=True),
    Case("clip_torchscript_pickle.pt", _torchscript_data_pickle, SYSTEM, runs_code=True),
    Case("clip_state_pickle.pt", _state_edit(lambda s, m: s.update({"x": Shell(m)})), "", runs_code=True),
    Case("clip_missing_key.pt", _state_edit(lambda s, m: s.pop("visual.conv1.weight")), "visual.conv1.weight"),
    Case("clip_zero_patch.pt", _state_edit(lambda s, m: s.update({"visual.conv1.weight": torch.zeros(
        s["visual.conv1.weight"].shape[0], 3, 0, 0)})), "visual.conv1.weight"),
    Case("clip_nan_weights.pt", _state_edit(_poison), "non-finite"),
    Case("clip_expanded_view.pt", _state_edit(lambda s, m: _expand_key(s, "visual.proj")), "expanded or overlapping"),
    Case("clip_garbage.pt", _bytes(b"PK\x03\x04 not really a zip" * 3), ""),
    Case("clip_zero_bytes.pt", _bytes(b""), ""),
]


# ------------------------------------------------------------------------------------------------
# prototype files (base: a good prototype file)
# ------------------------------------------------------------------------------------------------


def _proto_edit(edit: Callable[[dict[str, Any], Path], Any]) -> Writer:
    def write(path: Path, marker: Path, base: Path) -> None:
        payload = torch.load(base, weights_only=True)
        payload = edit(payload, marker) or payload
        torch.save(payload, path)

    return write


def _proto_row(row: int, value: float) -> Callable[[dict[str, Any], Path], None]:
    def edit(payload: dict[str, Any], marker: Path) -> None:
        payload["prototypes"] = payload["prototypes"].clone()
        payload["prototypes"][row] = value

    return edit


PROTOTYPE_CASES: list[Case] = [
    Case("proto_pickle.pt", _proto_edit(lambda p, m: {**p, "x": Shell(m)}), "not a readable", runs_code=True),
    Case("proto_nan_row.pt", _proto_edit(_proto_row(1, float("nan"))), "NaN"),
    Case("proto_zero_row.pt", _proto_edit(_proto_row(0, 0.0)), "all zeros"),
    Case("proto_tau_inf.pt", _proto_edit(lambda p, m: p.update({"tau": float("inf")})), "tau"),
    Case("proto_row_count.pt", _proto_edit(lambda p, m: p.update({"prototypes": p["prototypes"][:-1]})),
         "prototype rows"),
    Case("proto_missing_keys.pt", _proto_edit(lambda p, m: {k: v for k, v in p.items() if k != "tau"}), "tau"),
    Case("proto_expanded_view.pt", _proto_edit(lambda p, m: p.update({"prototypes": expanded(
        tuple(p["prototypes"].shape), 0.2)})), "expanded or overlapping"),
    Case("proto_garbage.pt", _bytes(b"\x80\x02garbage"), "not a readable"),
]


# ------------------------------------------------------------------------------------------------
# segmenter checkpoints (base: a good segmenter file recording a CLIP checkpoint)
# ------------------------------------------------------------------------------------------------


def _seg_records_evil_clip(path: Path, marker: Path, base: Path) -> Path:
    clip = torchscript_with_code(path.with_name(path.stem + "_clip.pt"), marker)
    payload = torch.load(base, weights_only=True)
    payload["backbone"] = {**payload["backbone"], "checkpoint": str(clip)}
    torch.save(payload, path)
    return clip


def _seg_timm_weights_pickle(path: Path, marker: Path, base: Path) -> Path:
    """A segmenter whose backbone description sends timm to a pickled payload as its weights."""
    weights = path.with_name(path.stem + "_weights.pth")
    torch.save({"x": Shell(marker)}, weights)
    payload = torch.load(base, weights_only=True)
    payload["backbone"] = {"family": "timm", "name": "vit_tiny_patch16_224", "pretrained": False,
                           "checkpoint_path": str(weights),
                           "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 1}}
    torch.save(payload, path)
    return weights


def _seg_nan_decoder(payload: dict[str, Any], marker: Path) -> None:
    name = next(k for k, v in payload["decoder"].items() if v.is_floating_point() and v.numel() > 1)
    payload["decoder"][name] = payload["decoder"][name].clone()
    payload["decoder"][name].view(-1)[0] = float("nan")


SEGMENTER_CASES: list[Case] = [
    Case("seg_pickle.pt", _proto_edit(lambda p, m: {**p, "x": Shell(m)}), "not a readable", runs_code=True),
    Case("seg_records_torchscript_code.pt", _seg_records_evil_clip, "__setstate__", runs_code=True),
    Case("seg_timm_weights_pickle.pt", _seg_timm_weights_pickle, SYSTEM, runs_code=True),
    Case("seg_nan_decoder.pt", _proto_edit(_seg_nan_decoder), "non-finite"),
    Case("seg_nan_prototypes.pt", _proto_edit(lambda p, m: p["prototypes"].update(
        {"prototypes": p["prototypes"]["prototypes"] * float("nan")})), "NaN"),
    Case("seg_huge_config.pt", _proto_edit(lambda p, m: p.update({"config": {**p["config"], "dim": 10 ** 6}})),
         "do not fit its configuration"),
    Case("seg_unknown_config_key.pt", _proto_edit(lambda p, m: p.update({"config": {**p["config"], "x": 1}})),
         "configuration is invalid"),
    Case("seg_weight_shapes.pt", _proto_edit(lambda p, m: p.update({"decoder": {
        k: (v[..., :1] if v.ndim else v) for k, v in p["decoder"].items()}})), "do not fit its configuration"),
    Case("seg_expanded_view.pt", _proto_edit(lambda p, m: p.update({"decoder": {
        k: (expanded(tuple(v.shape), 0.01, v.dtype) if v.is_floating_point() else v)
        for k, v in p["decoder"].items()}})),
         "expanded or overlapping"),
    Case("seg_missing_keys.pt", _proto_edit(lambda p, m: {k: v for k, v in p.items() if k != "decoder"}),
         "missing keys"),
    Case("seg_garbage.pt", _bytes(b"not a checkpoint"), "not a readable"),
]


# ------------------------------------------------------------------------------------------------
# training states
# ------------------------------------------------------------------------------------------------


def _shared_views() -> dict[str, Any]:
    """40 views of one 1 MB storage: ``torch.save`` stores the data once (1 MB); used, 40 MB."""
    data = torch.zeros(1 << 18)
    return {"iteration": 1, "views": [data.view(-1) for _ in range(40)]}


STATE_CASES: list[Case] = [
    Case("state_pickle_system", _torch_save(lambda m, b: {"iteration": 1, "rng": Shell(m)}), SYSTEM,
         runs_code=True),
    Case("state_pickle_eval", _torch_save(lambda m, b: {"iteration": 1, "curve": [Eval(m)]}), "builtins.eval",
         runs_code=True),
    Case("state_expanded_view", _torch_save(lambda m, b: {"iteration": 1, "x": expanded((1000, 1000))}),
         "expanded or overlapping"),
    Case("state_shared_views", _torch_save(lambda m, b: _shared_views()), "many views of the same data"),
    Case("state_garbage", _bytes(b"\x00 not a training state"), ""),
    Case("state_zero_bytes", _bytes(b""), ""),
]


# ------------------------------------------------------------------------------------------------
# files a rerun meets
# ------------------------------------------------------------------------------------------------


def _npz_truncated(path: Path, marker: Path, base: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, features=np.zeros((4, 8), np.float16))
    path.write_bytes(buf.getvalue()[:60])


RESUME_CASES: list[Case] = [
    Case("partial_garbage", _bytes(b"\x00garbage, not a torch file"), "starting over"),
    Case("partial_pickle", _torch_save(lambda m, b: {"ids": [], "records": [], "settings": {}, "x": Shell(m)}),
         "starting over", runs_code=True),
    Case("cache_truncated", _npz_truncated, "recomputing"),
    Case("cache_zero_bytes", _bytes(b""), "recomputing"),
    Case("output_zero_bytes", _bytes(b""), "empty file"),
]

BANK_CASES: list[Case] = [
    Case("bank_pickle.pt", _torch_save(lambda m, b: {"format": "vpl_plugin.cpal.ContextBank", "x": Shell(m)}),
         "not a readable context bank", runs_code=True),
    Case("bank_garbage.pt", _bytes(b"garbage"), "not a readable context bank"),
    Case("bank_foreign.pt", _torch_save(lambda m, b: {"weights": torch.zeros(2)}), "not a CLIP-CPAL context bank"),
]


# ------------------------------------------------------------------------------------------------
# --config YAML files and --split-file lists
# ------------------------------------------------------------------------------------------------


def _alias_bomb() -> str:
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(rows) + "\n"  # under 500 bytes; 9**9 strings if expanded


def _text(make: Callable[[Path], str]) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        path.write_text(make(marker))

    return write


def _sparse(size: int) -> Writer:
    def write(path: Path, marker: Path, base: Any) -> None:
        with open(path, "wb") as fh:
            fh.truncate(size)

    return write


CONFIG_CASES: list[Case] = [
    Case("cfg_alias_bomb.yaml", _text(lambda m: _alias_bomb()), "alias"),
    Case("cfg_python_tag.yaml", _text(lambda m: f"limit: !!python/object/apply:os.system [\"touch '{m}'\"]\n"),
         "not valid YAML", runs_code=True),
    Case("cfg_malformed.yaml", _text(lambda m: "limit: [1\nout: x\n"), "line 2"),
    Case("cfg_not_a_mapping.yaml", _text(lambda m: "- limit\n- 1\n"), "mapping"),
    Case("cfg_float_for_int.yaml", _text(lambda m: "limit: 1.5\n"), "--limit", refused_by_reader=False),
    Case("cfg_nan.yaml", _text(lambda m: "limit: .nan\n"), "--limit", refused_by_reader=False),
    Case("cfg_switch_not_bool.yaml", _text(lambda m: "progress: 3\n"), "progress", refused_by_reader=False),
    Case("cfg_nested.yaml", _text(lambda m: "limit: [[1]]\n"), "nested", refused_by_reader=False),
    Case("cfg_unknown_key.yaml", _text(lambda m: "colour: red\n"), "colour", refused_by_reader=False),
    Case("cfg_too_big.yaml", _sparse(2 << 20), "bytes"),
    Case("cfg_not_utf8.yaml", _bytes(b"limit: \xff\xfe\n"), "UTF-8"),
]

def _split(make: Callable[[str], bytes]) -> Writer:
    def write(path: Path, marker: Path, good_id: str) -> None:
        path.write_bytes(make(good_id))

    return write


SPLIT_CASES: list[Case] = [
    Case("split_nul.txt", _split(lambda good: f"{good}\nab\x00c\n".encode()), "NUL character"),
    Case("split_empty.txt", _split(lambda good: b"# nothing\n\n"), "lists no images"),
    Case("split_dotdot.txt", _split(lambda good: f"{good}\n..\n".encode()), "starts with '.'"),
    Case("split_long_id.txt", _split(lambda good: f"{good}\n{'x' * 240}\n".encode()), "240 bytes long"),
    Case("split_not_utf8.txt", _split(lambda good: f"{good}\n".encode() + b"\xff\xfe\n"), ""),
]


def all_cases() -> dict[str, list[Case]]:
    """Every group by name (for listing the corpus)."""
    return {"cam": CAM_CASES, "image": IMAGE_CASES, "annotation": ANNOTATION_CASES, "label": LABEL_CASES,
            "clip": CLIP_CASES, "prototypes": PROTOTYPE_CASES, "segmenter": SEGMENTER_CASES,
            "state": STATE_CASES, "resume": RESUME_CASES, "bank": BANK_CASES, "config": CONFIG_CASES,
            "split": SPLIT_CASES}
