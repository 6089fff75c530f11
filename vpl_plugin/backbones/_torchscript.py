"""The weights of a TorchScript archive, read without running the archive's code.

``torch.jit.load`` compiles and runs code stored in the archive (a crafted file can write files
or hang while it loads). OpenAI's released CLIP checkpoints are TorchScript archives, so this
module reads what ``torch.jit.load(path).state_dict()`` would return by parsing the archive as
data:

* the archive is a zip; ``<prefix>/data.pkl`` pickles the module tree: objects of classes named
  ``__torch__.<module>.<Class>`` (possibly ``___torch_mangle_N``), whose state is a dict of
  attributes, with every tensor stored as ``torch._utils._rebuild_tensor_v2`` over a persistent
  id ``("storage", torch.<Type>Storage, key, location, numel)`` that names the zip record
  ``<prefix>/data/<key>``;
* ``data.pkl`` is unpickled with :class:`vpl_plugin._unpickle.RestrictedUnpickler`: tensor
  rebuilders (sizes, strides and offsets checked against the record sizes), TorchScript's typed
  list and tag helpers and plain containers only; each scripted object becomes an inert
  attribute holder;
* which attributes are parameters and buffers (the state dict) is read from the
  ``__parameters__ = [...]`` and ``__buffers__ = [...]`` lines of the class definitions in
  ``<prefix>/code/``, parsed as text and never executed; child modules are the attributes whose
  class derives from ``Module``. Other tensor attributes (e.g. an attention mask) are not in the
  state dict, exactly as with ``torch.jit.load``.

Anything else (a class that restores itself with ``__setstate__`` code, quantized tensors, an
unknown ``torch`` global) is reported as not understood: :class:`ArchiveNotUnderstood`.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from vpl_plugin._unpickle import UnsafeFileError, restricted_load

__all__ = ["ArchiveNotUnderstood", "is_torchscript_archive", "read_torchscript_state_dict"]

PathLike = Union[str, os.PathLike]

TRUST_HINT = ("vpl-plugin reads only the weights of a TorchScript archive (tensors, numbers, "
              "strings, containers) and runs none of its code. If the file comes from a source you "
              "trust, the --trust-torchscript flag (trust_torchscript=True) loads it with "
              "torch.jit.load instead, which executes the code stored in the file while loading "
              "it.")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_CLASS_RE = re.compile(r"class ([A-Za-z_]\w*)(?:\(([A-Za-z_]\w*)\))?:\s*$")
_DECL_RE = re.compile(r"\s+(__parameters__|__buffers__)\s*=\s*(.*?)\s*$")
_NAME_LIST_RE = re.compile(r'\[\s*(?:"[^"\\\s]+"\s*,\s*)*(?:"[^"\\\s]+"\s*)?\]')
_NAME_RE = re.compile(r'"([^"\\\s]+)"')
_RECORD_KEY_RE = re.compile(r"[0-9A-Za-z_.]+")


class ArchiveNotUnderstood(Exception):
    """The archive uses something the safe reader does not know (``what`` says what)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class _ClassInfo:
    is_module: bool
    parameters: Tuple[str, ...]
    buffers: Tuple[str, ...]
    has_setstate: bool


class _StorageType:
    """What ``torch.<Type>Storage`` resolves to: an inert marker holding the dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage:
    """One ``data/<key>`` record: its bytes as an untyped storage, its dtype and element count."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int) -> None:
        self.untyped, self.dtype, self.numel = untyped, dtype, numel


class _ScriptObject:
    """An inert stand-in for a scripted object: its pickled attributes, nothing else."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


# -- archive layout ----------------------------------------------------------------------------
def _prefix(names: List[str]) -> Optional[str]:
    """The archive's top folder if it looks like TorchScript (a ``code/`` folder), else None."""
    tops = {n.split("/", 1)[0] for n in names if n.count("/") >= 2 and n.split("/")[1] == "code"}
    return next(iter(tops)) if len(tops) == 1 else None


def is_torchscript_archive(path: PathLike) -> bool:
    """True for a zip laid out as a TorchScript archive (``<prefix>/code/...``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return _prefix(zf.namelist()) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _parse_declaration(text: str, qualname: str) -> Tuple[str, ...]:
    if not _NAME_LIST_RE.fullmatch(text):
        raise ArchiveNotUnderstood(f"the declaration {text!r} of class {qualname} in the code/ "
                                   f"files is not a plain list of names")
    return tuple(_NAME_RE.findall(text))


def _parse_classes(zf: zipfile.ZipFile, prefix: str) -> Dict[str, _ClassInfo]:
    """Class table from the ``code/`` files (as text): parameters, buffers, Module or not."""
    classes: Dict[str, _ClassInfo] = {}
    root = f"{prefix}/code/"
    for name in zf.namelist():
        if not (name.startswith(root) and name.endswith(".py")):
            continue
        module = name[len(root):-3].replace("/", ".")
        try:
            lines = zf.read(name).decode("utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ArchiveNotUnderstood(f"the code file {name} is not UTF-8 text ({err})") from err
        current: Optional[Dict[str, Any]] = None
        for line in lines + ["<end>"]:
            match = _CLASS_RE.match(line)
            if (match or (line and not line[0].isspace())) and current is not None:
                classes[current["qualname"]] = _ClassInfo(
                    current["is_module"], current.get("__parameters__", ()),
                    current.get("__buffers__", ()), current["setstate"])
                current = None
            if match:
                current = {"qualname": f"{module}.{match[1]}", "is_module": match[2] == "Module",
                           "setstate": False}
            elif current is not None:
                decl = _DECL_RE.match(line)
                if decl:
                    current[decl[1]] = _parse_declaration(decl[2], current["qualname"])
                elif re.match(r"\s+def __setstate__\(", line):
                    current["setstate"] = True
    return classes


def _check_byteorder(zf: zipfile.ZipFile, prefix: str) -> None:
    try:
        order = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
    except KeyError:
        order = "little"  # archives written before the record existed are little-endian
    if order != sys.byteorder:
        raise ArchiveNotUnderstood(f"its tensors are stored {order}-endian, this machine is "
                                   f"{sys.byteorder}-endian")


# -- unpickling ---------------------------------------------------------------------------------
def _int_tuple(value: Any, what: str) -> Tuple[int, ...]:
    if not (isinstance(value, (tuple, list)) and all(type(v) is int and v >= 0 for v in value)):
        raise ArchiveNotUnderstood(f"a tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any,
                       metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` with every argument checked (bounds included)."""
    if not isinstance(storage, _Storage):
        raise ArchiveNotUnderstood(f"a tensor is rebuilt from a {type(storage).__name__}, not a "
                                   f"storage record")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    offset = _int_tuple((storage_offset,), "offset")[0]
    if len(size) != len(stride) or not isinstance(requires_grad, bool):
        raise ArchiveNotUnderstood(f"a tensor has size {size}, stride {stride}")
    if backward_hooks or metadata:
        raise ArchiveNotUnderstood("a tensor carries backward hooks or metadata")
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > storage.numel:
        raise ArchiveNotUnderstood(f"a tensor of size {size}, stride {stride} and offset {offset} "
                                   f"reaches past its storage of {storage.numel} elements")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise ArchiveNotUnderstood("a parameter is not rebuilt from a plain tensor")
    return data


def _typed_list(kind: type) -> Any:
    def build(values: Any) -> list:
        if not (isinstance(values, list) and all(isinstance(v, kind) for v in values)):
            raise ArchiveNotUnderstood(f"a typed list does not hold {kind.__name__} values only")
        return values

    return build


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    if not isinstance(type_str, str):
        raise ArchiveNotUnderstood("a type tag is not a string")
    return value


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str)
            and all(isinstance(a, int) for a in args[1:])):
        raise ArchiveNotUnderstood(f"a device is built from {args!r}")
    return torch.device(*args)


def _allowed_globals() -> Dict[str, Any]:
    out: Dict[str, Any] = {f"torch.{n}": _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()}
    out.update({
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch.jit._pickle.build_intlist": _typed_list(int),
        "torch.jit._pickle.build_doublelist": _typed_list(float),
        "torch.jit._pickle.build_boollist": _typed_list(bool),
        "torch.jit._pickle.build_tensorlist": _typed_list(torch.Tensor),
        "torch.jit._pickle.restore_type_tag": _restore_type_tag,
        "torch.device": _device,
        "collections.OrderedDict": OrderedDict,
    })
    return out


class _Reader:
    """Per-archive state: the zip, its class table and the storages read so far."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, classes: Dict[str, _ClassInfo]) -> None:
        self.zf, self.prefix, self.classes = zf, prefix, classes
        self.storages: Dict[str, _Storage] = {}
        self.types: Dict[str, type] = {}

    def resolve(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            info = self.classes.get(qualname)
            if info is None:
                raise ArchiveNotUnderstood(f"data.pkl uses the class {qualname}, which no code/ "
                                           f"file of the archive defines")
            if info.has_setstate:
                raise ArchiveNotUnderstood(f"the class {qualname} restores its objects with its "
                                           f"own __setstate__ code, which only torch.jit.load "
                                           f"can run")
            if qualname not in self.types:
                self.types[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.types[qualname]
        if module == "torch" or module.startswith("torch."):
            raise ArchiveNotUnderstood(f"data.pkl uses {qualname}, which the safe reader does not "
                                       f"know")
        return None  # anything else: refused as unsafe

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveNotUnderstood(f"data.pkl holds the persistent id {pid!r:.80}")
        _, stype, key, location, numel = pid
        if not (isinstance(stype, _StorageType) and isinstance(key, str)
                and _RECORD_KEY_RE.fullmatch(key) and isinstance(location, str)
                and type(numel) is int and numel >= 0):
            raise ArchiveNotUnderstood(f"data.pkl holds the storage reference {pid!r:.120}")
        if key in self.storages:
            known = self.storages[key]
            if (known.dtype, known.numel) != (stype.dtype, numel):
                raise ArchiveNotUnderstood(f"the record data/{key} is used with two types")
            return known
        record = f"{self.prefix}/data/{key}"
        nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
        try:
            info = self.zf.getinfo(record)
        except KeyError:
            raise ArchiveNotUnderstood(f"the tensor record {record} is missing") from None
        if info.file_size != nbytes:
            raise ArchiveNotUnderstood(f"the record {record} holds {info.file_size} bytes, but "
                                       f"data.pkl announces {numel} {stype.name} elements "
                                       f"({nbytes} bytes)")
        data = torch.empty(nbytes, dtype=torch.uint8)  # read straight into the storage: one copy
        view, done = memoryview(data.numpy()), 0  # type: ignore[arg-type]  # ndarray is a buffer
        with self.zf.open(record) as fh:
            while done < nbytes:
                n = fh.readinto(view[done:])  # type: ignore[attr-defined]  # ZipExtFile has readinto
                if not n:
                    raise ArchiveNotUnderstood(f"the record {record} ends after {done} bytes")
                done += n
        self.storages[key] = _Storage(data.untyped_storage(), stype.dtype, numel)
        return self.storages[key]


# -- state dict -----------------------------------------------------------------------------------
def _collect(obj: _ScriptObject, prefix: str, classes: Dict[str, _ClassInfo],
             out: Dict[str, torch.Tensor], active: set) -> None:
    """Parameters, then buffers, then child modules in attribute order (``state_dict``'s order)."""
    if id(obj) in active:
        raise ArchiveNotUnderstood("the module tree contains a cycle")
    info = classes[obj.qualname]
    attrs = getattr(obj, "state", None)
    if not (isinstance(attrs, dict) and all(isinstance(k, str) for k in attrs)):
        raise ArchiveNotUnderstood(f"the state of {obj.qualname} is not a dict of attributes")
    for name in info.parameters + info.buffers:
        if name not in attrs:
            raise ArchiveNotUnderstood(f"{obj.qualname} declares {name!r} but data.pkl holds no "
                                       f"value for it")
        value = attrs[name]
        if value is None:  # an unset optional parameter / buffer: not in the state dict
            continue
        if not isinstance(value, torch.Tensor):
            raise ArchiveNotUnderstood(f"the parameter or buffer {prefix}{name} is a "
                                       f"{type(value).__name__}, not a tensor")
        out[prefix + name] = value
    active.add(id(obj))
    for name, value in attrs.items():
        if isinstance(value, _ScriptObject) and classes[value.qualname].is_module:
            _collect(value, f"{prefix}{name}.", classes, out, active)
    active.discard(id(obj))


def read_torchscript_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """What ``torch.jit.load(path).state_dict()`` returns, read without executing the archive.

    Args:
        path: a TorchScript archive (``torch.jit.save`` of a traced or scripted module).

    Returns:
        ``{dotted name: tensor}`` of every parameter and buffer (CPU, same dtypes, shapes,
        strides and values as ``torch.jit.load``'s state dict), in the same order.

    Raises:
        ArchiveNotUnderstood: a layout, class or tensor kind the reader does not know.
        vpl_plugin._unpickle.UnsafeFileError: ``data.pkl`` asks for a global outside the
            allow-list (e.g. ``builtins.eval``); nothing from it was run.
    """
    path = os.fspath(path)
    with zipfile.ZipFile(path) as zf:
        prefix = _prefix(zf.namelist())
        if prefix is None:
            raise ArchiveNotUnderstood("it has no code/ folder, so it is not a TorchScript archive")
        try:
            payload = zf.read(f"{prefix}/data.pkl")
        except KeyError:
            raise ArchiveNotUnderstood("it has no data.pkl (an archive layout older than "
                                       "PyTorch 1.4?)") from None
        _check_byteorder(zf, prefix)
        classes = _parse_classes(zf, prefix)
        reader = _Reader(zf, prefix, classes)
        try:
            root = restricted_load(payload, path=path, allowed=_allowed_globals(),
                                   resolve=reader.resolve, persistent_load=reader.persistent_load,
                                   kind="TorchScript CLIP archive", hint=TRUST_HINT)
        except (ArchiveNotUnderstood, UnsafeFileError):
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt pickle raises many types
            raise ArchiveNotUnderstood(f"its data.pkl could not be read ({type(err).__name__}: "
                                       f"{err})") from err
    if not (isinstance(root, _ScriptObject) and classes[root.qualname].is_module):
        raise ArchiveNotUnderstood(f"data.pkl holds a {type(root).__name__}, not a scripted module")
    out: Dict[str, torch.Tensor] = {}
    _collect(root, "", classes, out, set())
    return out
