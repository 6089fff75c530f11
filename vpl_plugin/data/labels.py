"""Label PNGs: the one reader and the one writer of class-id maps.

Ground-truth masks, pseudo masks and predicted masks are single-channel PNGs whose pixel values
are class ids (0 = background, ``c + 1`` = foreground class ``c``, 255 = ignore / no prediction).
Everything in the package that reads such a file goes through :func:`read_label_png`, which
refuses what would otherwise be counted silently or dropped: content that is not PNG (a JPEG
renamed ``.png``: lossy compression invents label values at every edge), modes other than P/L
(16-bit ``I;16``, colour renderings) and values outside the class list.

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.png")
    >>> save_label_png(path, np.array([[0, 3], [255, 3]], np.uint8))
    >>> read_label_png(path, num_classes=21).tolist()
    [[0, 3], [255, 3]]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from vpl_plugin._checks import check_ndim
from vpl_plugin._imports import require
from vpl_plugin._io import atomic_path
from vpl_plugin.data.errors import DatasetError

__all__ = ["IGNORE_INDEX", "LABEL_MODES", "VOC_PALETTE", "read_label_png", "save_label_png", "voc_palette"]

#: Label value of pixels that no metric or loss counts (object borders in VOC masks).
IGNORE_INDEX = 255

#: PIL modes that store one 8-bit class id per pixel.
LABEL_MODES = ("P", "L")

_SHOWN_VALUES = 10  # values listed in a refusal; the rest are counted


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bits of the index interleaved into R, G, B).

    Args:
        n: number of entries (1..256).

    Returns:
        ``(n, 3)`` uint8 RGB colours; ``voc_palette().ravel()`` is the 768-value list that
        ``PIL.Image.putpalette`` expects. Index 1 = (128, 0, 0), 15 = (192, 128, 128),
        255 = (224, 224, 192).
    """
    if not 1 <= int(n) <= 256:
        raise ValueError(f"n must be in [1, 256]; got {n}.")
    pal = np.zeros((int(n), 3), dtype=np.uint8)
    for i in range(int(n)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


#: ``(256, 3)`` uint8 VOC colour map.
VOC_PALETTE: np.ndarray = voc_palette()
VOC_PALETTE.setflags(write=False)


def save_label_png(
    path: Union[str, os.PathLike], label: np.ndarray, palette: bool = True
) -> None:
    """Write a label map as a single-channel PNG, atomically.

    The stored pixel values are the class ids. With ``palette=True`` (default) the PNG is a
    P-mode (indexed) image with the VOC colour map, like VOC's ``SegmentationClass``, so it
    renders in colour; read it back with Pillow (:func:`read_label_png`), which returns the
    indices. ``cv2.imread(..., IMREAD_GRAYSCALE)`` would return the *luminance of the colours*
    instead; loaders that read labels with OpenCV (e.g. deeplab-pytorch's ``SegmentationClassAug``
    path) need ``palette=False``, which writes an L-mode greyscale PNG as upstream's
    ``cv2.imwrite`` does.

    Args:
        path: output ``.png`` path (parent directories are created).
        label: ``(H, W)`` integer labels in ``[0, 255]``.
        palette: write the VOC palette (P mode) or plain greyscale (L mode).
    """
    image_mod = require("PIL.Image")
    arr = np.asarray(label)
    check_ndim("label", arr, 2, "(H, W)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"label must hold integer class ids; got dtype {arr.dtype}.")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label values must be in [0, 255]; got [{arr.min()}, {arr.max()}].")
    img = image_mod.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))  # mode "L"
    if palette:
        img.putpalette(VOC_PALETTE.ravel().tolist())  # L -> P, pixel values unchanged
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(
    path: Union[str, os.PathLike], num_classes: Optional[int] = None, *,
    what: str = "ground truth",
) -> np.ndarray:
    """Read a label PNG as ``(H, W)`` uint8 class ids, refusing anything that is not one.

    Refused, with a :class:`~vpl_plugin.data.voc.DatasetError` naming the file:

    * a missing or undecodable file;
    * content that is not PNG, whatever the file name (e.g. a JPEG renamed ``.png``: lossy
      compression changes label values along every edge);
    * a mode other than P or L: 16-bit (``I;16``, ``I``), bilevel (``1``), colour (``RGB``,
      a colour-coded rendering) and so on, whose values are not 8-bit class ids;
    * with ``num_classes``: values outside ``0 .. num_classes - 1`` other than 255 (ignore / no
      prediction); the message lists the values found with their pixel counts.

    Args:
        path: the PNG.
        num_classes: number of labels including background (VOC 21, COCO 81); None checks the
            format only.
        what: what the file is, for messages (``"ground truth"``, ``"prediction"``,
            ``"pseudo mask"``).

    Returns:
        ``(H, W)`` uint8 class ids.

    Raises:
        DatasetError: see above.
        ImportError: Pillow is not installed.
    """
    image_mod = require("PIL.Image")
    path = Path(path)
    try:
        with image_mod.open(path) as im:
            if im.format != "PNG":
                raise DatasetError(
                    path, f"{what} file holds {im.format or 'unknown'} data, not PNG",
                    "label maps must be stored losslessly as PNG; a JPEG (even renamed .png) "
                    "changes class ids along every edge; re-export the mask as PNG",
                )
            if im.mode not in LABEL_MODES:
                raise DatasetError(
                    path, f"{what} has mode {im.mode!r}; expected a single-channel 8-bit label "
                    "image (P or L) whose pixel values are class ids",
                    "a colour-coded RGB rendering or a 16-bit image cannot be used as labels; "
                    "write the class ids as an 8-bit P or L PNG",
                )
            arr = np.array(im, dtype=np.uint8)
    except DatasetError:
        raise
    except FileNotFoundError as err:
        raise DatasetError(path, f"{what} file does not exist") from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(path, f"cannot decode {what} ({err})") from err
    if num_classes is not None:
        _check_label_values(path, arr, int(num_classes), what)
    return arr


def _check_label_values(path: Path, arr: np.ndarray, num_classes: int, what: str) -> None:
    """Raise unless every value of ``arr`` is a class id ``< num_classes`` or 255."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    if not arr.size or int(arr.max()) < num_classes:
        return
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX)  # two uint8 compares: ~0.04 ms at 500x375
    if not bad.any():
        return
    counts = np.bincount(arr[bad], minlength=256)
    values = np.flatnonzero(counts)
    shown = ", ".join(f"{v} ({counts[v]:,} pixels)" for v in values[:_SHOWN_VALUES])
    if values.size > _SHOWN_VALUES:
        shown += f" and {values.size - _SHOWN_VALUES} more values"
    raise DatasetError(
        path,
        f"{what} holds values outside 0..{num_classes - 1} (and {IGNORE_INDEX} = ignore): {shown}",
        "is this mask from another dataset, is num_classes wrong, or was it resampled or "
        "colour-quantised (which invents in-between values)?",
    )
