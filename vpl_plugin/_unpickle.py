"""Restricted unpickling: read pickled files without letting them run code.

A pickle is a small program. Besides building lists, dicts and strings, it can name any
importable function or class (a *global*, e.g. ``os.system`` or ``builtins.eval``) and call it
with arguments of its choosing. ``pickle.load``, ``np.load(..., allow_pickle=True)``,
``torch.load(..., weights_only=False)`` and ``torch.jit.load`` all honour such calls, so a
crafted file of any of those kinds can run arbitrary code the moment it is opened.

vpl-plugin never opens an input file that way. Every pickled file it reads goes through an
unpickler that resolves globals from a short allow-list and refuses everything else with
:class:`UnsafeFileError`, before the global is imported or called. What each reader admits:

* **CAM files** (``<id>.npy``, a dict saved with ``np.save``, the format of upstream CLIP-ES):
  the dict, its ``str`` keys, numpy arrays and numpy scalars, and the numpy functions that
  rebuild them (``_reconstruct``, ``scalar``, ``_frombuffer`` under their numpy 1 names
  ``numpy.core.*`` and numpy 2 names ``numpy._core.*``, plus ``numpy.ndarray`` and
  ``numpy.dtype``). These only allocate arrays and copy bytes into them. Object arrays are
  refused inside the dict (they could hold anything); see :mod:`vpl_plugin.data.cam_files`.
* **Training states** (``vpl train``'s ``last.pt``, ``vpl train-clip``'s ``.train.pt``): written
  as tensors, numbers, strings, lists, tuples and dicts only, and read with
  ``torch.load(weights_only=True)``, PyTorch's own restricted unpickler. States written by
  earlier versions hold numpy's random-generator state as a numpy array; they are read with
  exactly numpy's array, dtype and scalar rebuilders added (:func:`load_weights_only`), and a
  state that needs anything else is refused.
* **TorchScript CLIP archives** (OpenAI's released ``ViT-B-16.pt`` files): ``torch.jit.load``
  would run the archive's code while loading it. Instead, the weights are read from the zip
  without executing anything: the module tree in ``data.pkl`` is unpickled with tensor
  rebuilders and plain containers only, each scripted module becomes an inert attribute holder,
  and which attributes are parameters or buffers is read from the ``__parameters__`` /
  ``__buffers__`` lines of the archive's ``code/`` files, parsed as text
  (:mod:`vpl_plugin.backbones._torchscript`). ``torch.jit.load`` stays available behind an
  explicit opt-in for files whose source is trusted.

Why this is enough: in the pickle machine, the only way to obtain something callable is a
global (or an extension code, which is resolved the same way), so a pickle that can only name
numpy's and torch's data-building functions can only build data. Errors name the file and the
refused global so that a refused file can be identified and inspected.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    "RestrictedUnpickler",
    "UnsafeFileError",
    "check_tensor_sizes",
    "load_weights_only",
    "numpy_globals",
    "restricted_load",
]

PathLike = Union[str, os.PathLike]


class UnsafeFileError(ValueError):
    """A file that asks for a global outside the reader's allow-list (it could run code).

    Attributes:
        path: the refused file.
        global_name: the refused global, ``"module.name"`` (e.g. ``"posix.system"``).
    """

    def __init__(self, path: PathLike, global_name: str, kind: str = "file",
                 hint: str = "") -> None:
        self.path = os.fspath(path)
        self.global_name = global_name
        message = (f"refused to load {self.path}: it asks for the Python global {global_name!r}, "
                   f"which a {kind} never contains; loading it could run arbitrary code, so "
                   f"nothing from it was executed.")
        super().__init__(message + (f" {hint}" if hint else ""))

    def __reduce__(self) -> Tuple[Any, ...]:  # keep the attributes when the error crosses a process boundary
        return (_rebuild_unsafe_error, (self.path, self.global_name, str(self)))


def _rebuild_unsafe_error(path: str, global_name: str, message: str) -> UnsafeFileError:
    err = UnsafeFileError.__new__(UnsafeFileError)
    ValueError.__init__(err, message)
    err.path, err.global_name = path, global_name
    return err


Resolver = Callable[[str, str], Any]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come from an allow-list only.

    Args:
        file: binary file positioned at the pickle.
        path: the file's name, for error messages.
        allowed: ``{"module.name": object}``; the object is what the pickle gets for that global.
        resolve: optional ``resolve(module, name)`` consulted for names not in ``allowed``
            (returns the object, or None to refuse).
        persistent_load: optional handler of persistent ids (None: refuse them).
        kind: what the file is, for the message (``"CAM file"``).
        hint: appended to the refusal message (what the user can do).
    """

    def __init__(self, file: IO[bytes], *, path: PathLike, allowed: Mapping[str, Any],
                 resolve: Optional[Resolver] = None,
                 persistent_load: Optional[Callable[[Any], Any]] = None,
                 kind: str = "file", hint: str = "") -> None:
        super().__init__(file)
        self._path, self._allowed, self._resolve = path, dict(allowed), resolve
        self._kind, self._hint = kind, hint
        if persistent_load is not None:
            # the documented way to give a pickle.Unpickler a persistent_load (typeshed: a method)
            self.persistent_load = persistent_load  # type: ignore[method-assign]

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in self._allowed:
            return self._allowed[key]
        if self._resolve is not None:
            found = self._resolve(module, name)
            if found is not None:
                return found
        raise UnsafeFileError(self._path, key, self._kind, self._hint)


def restricted_load(file: Union[IO[bytes], bytes], *, path: PathLike, allowed: Mapping[str, Any],
                    resolve: Optional[Resolver] = None,
                    persistent_load: Optional[Callable[[Any], Any]] = None,
                    kind: str = "file", hint: str = "") -> Any:
    """Unpickle one object from ``file`` (a binary file or bytes) with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeFileError: the pickle names a global outside ``allowed`` / ``resolve``.
        Other exceptions (``EOFError``, ``pickle.UnpicklingError``, ...) for corrupt data;
        callers turn them into their own error naming the file.
    """
    fh = io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else file
    return RestrictedUnpickler(fh, path=path, allowed=allowed, resolve=resolve,
                               persistent_load=persistent_load, kind=kind, hint=hint).load()


# -- numpy --------------------------------------------------------------------------------------
_NUMPY_MODULES = ("numpy.core", "numpy._core")  # numpy 1 and numpy 2 spellings in pickles


def _numpy_core():
    try:
        from numpy import _core as core  # numpy >= 1.26 (numpy 2: the real package)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 1.26
        from numpy import core
        from numpy.core import multiarray, numeric
    return core, multiarray, numeric


class _ArrayClass:
    """What a CAM pickle gets for the global ``numpy.ndarray``.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by its shape, dtype
    and bytes: the class is an argument and never called. Called directly, ``ndarray(shape,
    dtype)`` returns an *uninitialised* array of any size, so a few bytes of pickle would stand
    for gigabytes of whatever memory held (an allocation bomb, and a clean-looking CAM of
    leftover memory). This stand-in is accepted where numpy passes the class and refuses the call.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            f"the pickle calls numpy.ndarray{args!r} directly, which makes an uninitialised array of "
            f"that size out of nothing; np.save never writes that")


_ARRAY_CLASS = _ArrayClass()


def _checked_reconstruct(real: Callable[..., Any]) -> Callable[..., Any]:
    import numpy as np

    def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by its state
        if subtype is _ARRAY_CLASS:
            subtype = np.ndarray
        if subtype is not np.ndarray or not (isinstance(shape, tuple) and all(
                isinstance(n, int) and 0 <= n <= 1 for n in shape)):
            raise pickle.UnpicklingError(f"unexpected numpy array reconstruction arguments "
                                         f"({type(subtype).__name__}, {shape!r}).")
        return real(subtype, shape, dtype)

    return _reconstruct


@functools.lru_cache(maxsize=None)
def numpy_globals() -> Dict[str, Any]:
    """The globals a pickled numpy array, dtype or scalar needs, under numpy 1 and numpy 2 names.

    Returns:
        ``{"numpy._core.multiarray._reconstruct": ..., "numpy.core.multiarray.scalar": ...,
        "numpy.ndarray": ..., "numpy.dtype": ..., ...}``; the functions are numpy's own
        (``_reconstruct`` checks its arguments first), and ``numpy.ndarray`` is a stand-in that
        ``_reconstruct`` accepts but that cannot be called (see :class:`_ArrayClass`). Cached: do
        not modify it.
    """
    import numpy as np

    _, multiarray, numeric = _numpy_core()
    out: Dict[str, Any] = {"numpy.ndarray": _ARRAY_CLASS, "numpy.dtype": np.dtype}
    reconstruct = _checked_reconstruct(multiarray._reconstruct)
    for prefix in _NUMPY_MODULES:
        out[f"{prefix}.multiarray._reconstruct"] = reconstruct
        out[f"{prefix}.multiarray.scalar"] = multiarray.scalar
        out[f"{prefix}.numeric._frombuffer"] = numeric._frombuffer  # pickle protocol 5
    return out


def _numpy_plain_dtype_classes() -> List[type]:
    import numpy as np

    return [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]


def _torch_numpy_safe_globals() -> Dict[str, Any]:
    """``{"module.name": object}`` of the numpy globals admitted in legacy torch states."""
    import numpy as np

    _, multiarray, _ = _numpy_core()
    out: Dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in _NUMPY_MODULES:
        out[f"{prefix}.multiarray._reconstruct"] = multiarray._reconstruct
        out[f"{prefix}.multiarray.scalar"] = multiarray.scalar
    for cls in _numpy_plain_dtype_classes():
        out[f"{cls.__module__}.{cls.__name__}"] = cls
    return out


# -- torch ----------------------------------------------------------------------------------------
def load_weights_only(path: PathLike, *, map_location: Any = "cpu", kind: str = "file",
                      hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)``, also accepting numpy arrays and scalars.

    Files written with plain data only load directly. A file that needs other globals is
    inspected first (``torch.serialization.get_unsafe_globals_in_checkpoint`` reads the pickle's
    opcodes, runs nothing); when those are only numpy's array, dtype and scalar rebuilders (what
    ``np.random.get_state()`` or a numpy float leaves in a state), exactly these are admitted
    for this one load, still under PyTorch's restricted unpickler.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        kind: what the file is, for messages (``"phase-2 training state"``).
        hint: what the user can do about a refused or unreadable file.

    Raises:
        UnsafeFileError: the file needs any other global (nothing from it is executed).
        ValueError: the file is not a readable torch file.
    """
    import torch

    path = os.fspath(path)
    try:
        return check_tensor_sizes(torch.load(path, map_location=map_location, weights_only=True), path, kind)
    except pickle.UnpicklingError:
        pass  # needs globals beyond plain data: inspect them below
    except Exception as err:  # noqa: BLE001 - torch raises several types for foreign files
        raise ValueError(f"{path} is not a readable {kind} ({type(err).__name__}: {err}). "
                         f"{hint}".rstrip()) from err
    try:
        needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable {kind} ({type(err).__name__}: {err}). "
                         f"{hint}".rstrip()) from err
    admitted = _torch_numpy_safe_globals()
    for name in needed:
        if name not in admitted:
            raise UnsafeFileError(path, name, kind, hint)
    entries: List[Union[Any, Tuple[Any, str]]] = [(admitted[n], n) for n in needed]
    entries += _numpy_plain_dtype_classes()  # BUILD on a dtype needs its class admitted
    try:
        with torch.serialization.safe_globals(entries):
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable {kind} ({type(err).__name__}: {err}). "
                         f"{hint}".rstrip()) from err
    return check_tensor_sizes(loaded, path, kind)


#: how many times the bytes its tensors store a file's tensors may claim in all (views sharing a
#: storage, e.g. tied weights or q/k/v slices, stay far below this)
MAX_VIEW_AMPLIFICATION = 4


def check_tensor_sizes(obj: Any, path: PathLike, kind: str = "file") -> Any:
    """Refuse tensors that claim more memory than the file stores for them; returns ``obj``.

    ``torch.save`` keeps a view as its storage plus shape and strides, so a tensor expanded from
    one element (stride 0) or overlapping itself is a few bytes in the file and any size once
    used: ``.float()``, ``.clone()``, ``isfinite`` or copying it into a model materialises it
    (a 1 KB file can ask for tens of gigabytes). Each tensor (in dicts, lists and tuples) must
    claim at most the bytes of its storage, and all of them together at most
    :data:`MAX_VIEW_AMPLIFICATION` times the bytes of their distinct storages.

    Raises:
        ValueError: naming the file and the tensor.
    """
    import torch

    stack: List[Tuple[str, Any]] = [("", obj)]
    claimed_total, storages = 0, {}
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                continue
            storage = value.untyped_storage()
            claimed, stored = value.numel() * value.element_size(), storage.nbytes()
            if claimed > stored:
                raise ValueError(
                    f"{path}: the tensor {name or '(top level)'} of shape {tuple(value.shape)} claims "
                    f"{claimed:,} bytes but the {kind} stores {stored:,} for it (an expanded or "
                    f"overlapping view); once used it would take that much memory. Re-save it "
                    f"from contiguous tensors (tensor.contiguous()).")
            claimed_total += claimed
            storages[storage.data_ptr()] = stored
        elif isinstance(value, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    stored_total = sum(storages.values())
    if claimed_total > MAX_VIEW_AMPLIFICATION * stored_total + (1 << 20):
        raise ValueError(f"{path}: its tensors claim {claimed_total:,} bytes in all but the {kind} stores "
                         f"{stored_total:,} (many views of the same data); once used they would take "
                         f"that much memory. Re-save it from contiguous tensors.")
    return obj

