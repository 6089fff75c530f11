"""CAM files: the ``<id>.npy`` dicts of upstream CLIP-ES, read without running code.

Upstream CLIP-ES saves the CAMs of an image with ``np.save(path, {"keys": ..., "attn_highres":
...})``: a ``.npy`` file holding a 0-d object array whose single element, the dict, is pickled.
``np.load(path, allow_pickle=True)`` would run whatever a crafted file's pickle asks for, so
:func:`read_cam_file` parses the ``.npy`` header itself (``numpy.lib.format``) and unpickles the
payload with an allow-list of numpy's array, dtype and scalar rebuilders only
(:mod:`vpl_plugin._unpickle`). :func:`write_cam_file` writes the same bytes as ``np.save``, so the
files stay readable by upstream's code.

Example:
    >>> cams = {"keys": keys, "attn_highres": maps}  # doctest: +SKIP
    >>> write_cam_file("cams/2007_000032.npy", cams)  # doctest: +SKIP
    >>> read_cam_file("cams/2007_000032.npy")["attn_highres"].shape  # doctest: +SKIP
    (2, 281, 500)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable, Dict, Mapping, Tuple, Union

import numpy as np

from vpl_plugin._io import atomic_path
from vpl_plugin._unpickle import UnsafeFileError, numpy_globals, restricted_load

__all__ = ["CAMFileError", "UnsafeFileError", "read_cam_file", "write_cam_file"]

CAMDict = Dict[str, Union[np.ndarray, np.generic]]

_KIND = "CAM file"
_FORMAT = ("a CAM file is a dict of numpy arrays saved with np.save(path, {'keys': ..., "
           "'attn_highres': ...}), as `vpl cams` and upstream CLIP-ES write it")
_HINT = (f"Only numpy arrays and scalars are admitted ({_FORMAT}); recompute the file with "
         f"`vpl cams` and do not use CAM files of unknown origin.")


class CAMFileError(ValueError):
    """A CAM file that is not a well-formed ``np.save``'d dict of numpy arrays.

    Attributes:
        path: the file.
    """

    def __init__(self, path: Union[str, os.PathLike], why: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path} is not a readable CAM file: {why}; {_FORMAT}. "
                         f"Recompute it (e.g. with `vpl cams`).")

    def __reduce__(self) -> Tuple[Any, ...]:  # picklable with its message (errors cross worker processes)
        return (_rebuild_cam_error, (self.path, str(self)))


def _rebuild_cam_error(path: str, message: str) -> CAMFileError:
    err = CAMFileError.__new__(CAMFileError)
    ValueError.__init__(err, message)
    err.path = path
    return err


def _read_header(fh: IO[bytes], path: Path) -> None:
    """Check the ``.npy`` header announces a 0-d object array (a pickled dict)."""
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(fh)
    except ValueError as err:
        raise CAMFileError(path, f"it is not a .npy file ({err})") from err
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    if version not in readers:
        raise CAMFileError(path, f"its .npy format version {version[0]}.{version[1]} is not one "
                                 f"numpy writes for a dict")
    try:
        shape, _, dtype = readers[version](fh)
    except (ValueError, SyntaxError, TypeError) as err:
        raise CAMFileError(path, f"its .npy header is corrupt ({err})") from err
    if not dtype.hasobject:
        raise CAMFileError(path, f"it holds a plain array (dtype {dtype}, shape "
                                 f"{tuple(shape)}), not a dict of arrays")
    if dtype != np.dtype(object) or tuple(shape) != ():
        raise CAMFileError(path, f"it holds an array of dtype {dtype} and shape {tuple(shape)}, "
                                 f"not a dict")


def _check_entries(cams: Mapping[Any, Any], path: Path,
                   error: Callable[[Any, str], Exception] = CAMFileError) -> None:
    """Raise unless every key is a str and every value a non-object numpy array or scalar."""
    for key, value in cams.items():
        if not isinstance(key, str):
            raise error(path, f"its key {key!r} is of type {type(key).__name__}, not a string")
        if not isinstance(value, (np.ndarray, np.generic)):
            raise error(path, f"the value of {key!r} is of type {type(value).__name__}, not a "
                              f"numpy array")
        if value.dtype.hasobject:
            raise error(path, f"the value of {key!r} is an array of Python objects "
                              f"({value.dtype}), not of numbers")


def read_cam_file(path: Union[str, os.PathLike]) -> CAMDict:
    """Read a CAM file (``np.save``'d dict) without executing anything from it.

    Args:
        path: the ``.npy`` file.

    Returns:
        The dict: ``str`` keys (``"keys"``: int64 class indices ``(n,)``, ``"attn_highres"``:
        float16 CAMs ``(n, H, W)``, and whatever else the writer saved) to numpy arrays (numpy
        scalars stay scalars).

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the pickle asks for a global other than numpy's array rebuilders
            (e.g. ``posix.system``); nothing from it was run.
        CAMFileError: anything else that is not a dict of numeric numpy arrays with ``str`` keys
            (a plain array file, a truncated, empty or corrupt file, object arrays inside).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        _read_header(fh, path)
        try:
            obj = restricted_load(fh, path=path, allowed=numpy_globals(), kind=_KIND, hint=_HINT)
        except UnsafeFileError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated / corrupt pickles raise many types
            raise CAMFileError(path, f"its pickled dict is truncated or corrupt "
                                     f"({type(err).__name__}: {err})") from err
    if not (isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == np.dtype(object)):
        raise CAMFileError(path, f"its payload is of type {type(obj).__name__}, not a 0-d object "
                                 f"array")
    cams = obj.item()
    if not isinstance(cams, dict):
        raise CAMFileError(path, f"it holds an object of type {type(cams).__name__}, not a dict")
    _check_entries(cams, path)
    return dict(cams)


def _write_error(path: Path, why: str) -> ValueError:
    return ValueError(f"cannot write CAM file {path}: {why}; {_FORMAT}.")


def write_cam_file(path: Union[str, os.PathLike],
                   cams: Mapping[str, Union[np.ndarray, np.generic]]) -> None:
    """Write a CAM dict atomically, byte for byte as ``np.save(path, cams)`` (upstream's format).

    Args:
        path: the ``.npy`` file (its folder is created).
        cams: ``str`` keys to numeric numpy arrays or scalars (e.g. ``{"keys": int64 (n,),
            "attn_highres": float16 (n, H, W)}``).

    Raises:
        ValueError: a non-str key, a value that is not a numeric numpy array or scalar (such a
            file could not be read back by :func:`read_cam_file`).
    """
    path = Path(path)
    if not isinstance(cams, Mapping):
        raise _write_error(path, f"got an object of type {type(cams).__name__}, not a dict")
    _check_entries(cams, path, error=_write_error)
    obj = cams if type(cams) is dict else dict(cams)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, obj, allow_pickle=True)  # type: ignore[arg-type]  # numpy's stubs omit object arrays
