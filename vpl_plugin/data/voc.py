"""PASCAL VOC 2012 as CLIP-ES reads it: split lists, image-level labels, images.

CLIP-ES needs three things per image: the JPEG, its image-level foreground labels in
*first-appearance order* (``docs/upstream_clip_es.md#labels-and-class-order``) and, for VOC, the
original size
``(H0, W0)`` from the XML. Labels come from ``Annotations/<id>.xml`` exactly as upstream reads them
(every ``<object>`` in file order, difficult and truncated ones included,
``docs/upstream_clip_es.md#voc-labels-from-xml``). Images
without an XML (e.g. ``train_aug`` ids from SBD) can take their labels from the ground-truth mask
instead (``label_source="auto"`` or ``"mask"``).

Upstream crashes on an annotation without objects; here that image raises a
:class:`DatasetError`, which the CAM loop turns into "skip this image with a warning"
(see :meth:`VOCDataset.iter_samples` and ``docs/upstream_clip_es.md#annotation-without-objects``).

Example:
    >>> ds = VOCDataset("VOCdevkit/VOC2012", "train.txt")  # doctest: +SKIP
    >>> s = ds[0]  # doctest: +SKIP
    >>> s.id, s.labels, s.label_source, s.size  # doctest: +SKIP
    ('2007_000032', (0, 14), 'xml', (281, 500))
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from vpl_plugin._checks import check_choice
from vpl_plugin._imports import require
from vpl_plugin.data.classes import VOC, ClassSpec
from vpl_plugin.data.errors import DatasetError
from vpl_plugin.data.labels import IGNORE_INDEX, read_label_png  # noqa: F401  (IGNORE_INDEX: re-exported)

if TYPE_CHECKING:  # Pillow is optional (extra 'data'); imported lazily at run time
    from PIL.Image import Image as PILImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DatasetError",
    "cam_memory_estimate",
    "Sample",
    "VOCDataset",
    "image_level_label_mismatches",
    "labels_from_mask",
    "load_image",
    "parse_voc_xml",
    "read_image_header",
    "read_split",
    "sample_image",
]

log = logging.getLogger(__name__)

LABEL_SOURCES = ("auto", "xml", "mask")
#: Longest image id (UTF-8 bytes) a split file may hold: ``<id>.npy`` and the temporary
#: ``.<id>.XXXXXXXX.tmp.npy`` of an atomic write must fit the usual 255-byte file-name limit.
MAX_ID_BYTES = 200
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_VOC_LAYOUT = (
    "A VOC root is the VOC2012 folder itself, holding JPEGImages/<id>.jpg, "
    "Annotations/<id>.xml, SegmentationClass/<id>.png (or SegmentationClassAug/<id>.png) and "
    "ImageSets/Segmentation/train.txt."
)




@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its image-level labels.

    Attributes:
        id: image id (file stem), e.g. ``'2007_000032'``.
        image_path: path of the JPEG.
        labels: 0-based foreground class indices in first-appearance order (VOC: 0..19).
        label_source: where the labels came from: ``'xml'``, ``'mask'`` or ``'list'`` (COCO).
        gt_path: ground-truth segmentation PNG, or None when there is none.
        size: original ``(H0, W0)`` when known from the XML ``<size>``, else None (then take it
            from the decoded image).
    """

    id: str
    image_path: Path
    labels: Tuple[int, ...]
    label_source: str
    gt_path: Optional[Path] = None
    size: Optional[Tuple[int, int]] = None


class SampleDataset(Protocol):
    """What the dataset stages (CAMs, learning set, context bank) use of a dataset:
    :class:`VOCDataset` and :class:`~vpl_plugin.data.coco.COCODataset` provide it, and so does
    any indexable with ``ids`` whose items carry ``image_path`` and ``labels``.

    An optional ``max_pixels`` attribute sets the pixel limit of :func:`sample_image`.
    """

    @property
    def ids(self) -> List[str]:
        """Image ids in list order; output files are named ``<id>.npy``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample:
        """The ``index``-th sample (raises :class:`DatasetError` for a broken one)."""


# --------------------------------------------------------------------------------------------
# Split lists
# --------------------------------------------------------------------------------------------


def _id_from_token(token: str) -> str:
    """``'2007_000032'`` -> itself; ``'/JPEGImages/2007_000032.jpg'`` -> ``'2007_000032'``."""
    if "/" in token or "\\" in token or token.lower().endswith(_IMAGE_SUFFIXES):
        return Path(token.replace("\\", "/")).stem
    return token


def _id_problem(image_id: str) -> Optional[str]:
    """Why ``image_id`` cannot name output files (``<id>.npy``, ``<id>.png``), or None."""
    if not image_id:
        return "the image id is empty"
    if "\x00" in image_id:
        return "the image id contains a NUL character"
    if "/" in image_id or "\\" in image_id:
        return "the image id contains a path separator"
    if image_id.startswith("."):
        return "the image id starts with '.' (a hidden file, or '.'/'..')"
    if any(ord(ch) < 32 for ch in image_id):
        return "the image id contains a control character"
    size = len(image_id.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        return (f"the image id is {size} bytes long; at most {MAX_ID_BYTES} fit a file name "
                "(with the output suffixes and the temporary-file prefix, within the usual "
                "255-byte limit)")
    return None


def checked_id(path: Path, number: int, token: str) -> str:
    """The id of one list line, refused (naming the file and line) if it cannot be a file name."""
    image_id = _id_from_token(token)
    problem = _id_problem(image_id)
    if problem is not None:
        shown = image_id if len(image_id) <= 60 else image_id[:57] + "..."
        raise DatasetError(path, f"line {number} ({shown!r}): {problem}",
                           "outputs are written as <id>.npy / <id>.png; fix or drop that line")
    return image_id


def read_list_lines(path: str | os.PathLike[str], what: str) -> List[Tuple[int, List[str]]]:
    """Return ``(line number, tokens)`` of the non-blank, non-comment lines of a list file."""
    path = Path(path)
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{what} '{path}' {where}. Give a text file with one image id per line, e.g. "
            f"VOC2012/ImageSets/Segmentation/train.txt."
        )
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                rows.append((number, line.split()))
    except UnicodeDecodeError as err:
        raise DatasetError(path, f"{_first_undecodable_line(path)} is not UTF-8 text ({err.reason})",
                           "a list file holds one image id per line, as UTF-8 text") from None
    return rows


def _first_undecodable_line(path: Path) -> str:
    """``"line N"`` of the first line of ``path`` that is not UTF-8 (``"a line"`` if none is)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number}"
    return "a line"


def read_split(path: str | os.PathLike[str]) -> List[str]:
    """Read the image ids of a split list, in file order.

    Accepted line forms (the first whitespace-separated token is used):

    * ``2007_000032`` (VOC ``ImageSets`` lists; CLIP-ES lists);
    * ``2007_000032 <anything>`` (e.g. a COCO list with labels);
    * ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (DeepLab lists; the
      id is the file stem).

    Blank lines and lines starting with ``#`` are skipped.

    Args:
        path: the list file.

    Returns:
        The ids, duplicates kept.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        DatasetError: the file lists no id, or a line's id cannot be a file name (empty, longer
            than :data:`MAX_ID_BYTES` bytes, holding ``/``, ``\\``, NUL or a control character,
            or starting with ``.``); the message names the file and the line.

    Example:
        >>> read_split("VOC2012/ImageSets/Segmentation/train.txt")[:2]  # doctest: +SKIP
        ['2007_000032', '2007_000039']
    """
    path = Path(path)
    ids = [checked_id(path, number, tokens[0])
           for number, tokens in read_list_lines(path, "split file")]
    if not ids:
        raise DatasetError(path, "split file lists no images",
                           "give a text file with one image id per line")
    return ids


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _int_text(elem: Optional[ET.Element], tag: str) -> Optional[int]:
    if elem is None:
        return None
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    try:
        return int(float(child.text.strip()))
    except ValueError:
        return None


def parse_voc_xml(
    path: str | os.PathLike[str], class_spec: ClassSpec = VOC
) -> Tuple[Tuple[int, ...], Optional[Tuple[int, int]]]:
    """Image-level labels and size from a VOC annotation, as upstream CLIP-ES reads them.

    Every ``<object>`` child of the root is visited in file order (difficult and truncated ones
    included, as upstream); its ``<name>`` (whitespace stripped) is mapped to its index in
    ``class_spec.names``; repeated classes keep their first position. ``<name>`` tags of
    ``<part>`` elements (person layout) are not objects and are ignored.

    Args:
        path: ``Annotations/<id>.xml``.
        class_spec: the label space (default VOC, 20 classes).

    Returns:
        ``(labels, size)``: 0-based class indices in first-appearance order, and ``(H0, W0)``
        from ``<size>`` or None when the XML has no usable size.

    Raises:
        DatasetError: unreadable or malformed XML; no ``<object>`` (upstream crashes; callers
            skip the image); an object without ``<name>``; a name not in ``class_spec.names``
            (the message lists the valid names).

    Example:
        >>> parse_voc_xml("VOC2012/Annotations/2007_000032.xml")  # doctest: +SKIP
        ((0, 14), (281, 500))
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(path, f"malformed XML ({err})",
                           "re-download the annotation or drop the id from the list") from err
    except OSError as err:
        raise DatasetError(path, f"cannot read annotation ({err.strerror or err})") from err

    objects = root.findall("object")
    if not objects:
        raise DatasetError(
            path, "annotation has no <object>, so the image has no image-level labels",
            "upstream CLIP-ES crashes here; skip the image or drop the id from the list",
        )
    index = {name: i for i, name in enumerate(class_spec.names)}
    labels: List[int] = []
    unknown: List[str] = []
    for number, obj in enumerate(objects, start=1):
        name_elem = obj.find("name")
        if name_elem is None or not (name_elem.text or "").strip():
            raise DatasetError(path, f"<object> number {number} has no <name>")
        name = (name_elem.text or "").strip()
        if name not in index:
            if name not in unknown:
                unknown.append(name)
            continue
        if index[name] not in labels:
            labels.append(index[name])
    if unknown:
        raise DatasetError(
            path,
            f"object name(s) {unknown} not in the {class_spec.name} class list",
            f"valid names: {', '.join(class_spec.names)}",
        )

    size_elem = root.find("size")
    height, width = _int_text(size_elem, "height"), _int_text(size_elem, "width")
    size = (height, width) if height and width and height > 0 and width > 0 else None
    return tuple(labels), size


def labels_from_mask(path: str | os.PathLike[str], num_classes: int = 21) -> Tuple[int, ...]:
    """Image-level labels from a segmentation PNG: the classes present in it.

    Args:
        path: a label mask (P or L mode PNG) whose pixel values are class ids, 0 = background,
            255 = ignore (VOC ``SegmentationClass``/``SegmentationClassAug``).
        num_classes: number of labels including background (VOC: 21).

    Returns:
        The 0-based foreground indices (pixel value - 1) present, ascending; empty when the mask
        holds only background/ignore.

    Raises:
        DatasetError: the file cannot be decoded, is not PNG, is not an 8-bit P/L image (e.g.
            RGB or 16-bit), or holds a value ``>= num_classes`` other than 255 (see
            :func:`vpl_plugin.data.labels.read_label_png`).

    Example:
        >>> labels_from_mask("VOC2012/SegmentationClass/2007_000032.png")  # doctest: +SKIP
        (0, 14)
    """

    arr = read_label_png(path, num_classes, what="ground-truth mask")
    present = np.flatnonzero(np.bincount(arr.reshape(-1), minlength=256)[1:num_classes])
    return tuple(int(v) for v in present)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

#: Default pixel limit of :func:`load_image` (width x height): 2**21 = 2,097,152 pixels, e.g.
#: 2048 x 1024 or 1448 x 1448. The largest VOC/COCO image (640 x 640 = 409,600 pixels) is 5x
#: inside it. Measured on the CPU with a ViT-B/16-sized CLIP (``benchmarks/NOTES.md``), one
#: image's CLIP-ES CAMs need about 0.25 GB at 500 x 375, 0.65 GB at 640 x 640, 2.9 GB at
#: 1000 x 1000 and 6.9 GB at 1250 x 1250 on top of the model, growing with the square of the
#: pixel count (the attention maps): about 12 GB at this limit, so one image cannot exhaust a
#: 16-GB machine, while doubling the limit would cost about four times the memory.
DEFAULT_MAX_PIXELS = 2 ** 21

#: PIL modes of 16-bit greyscale images, mapped to 8 bits by keeping the high byte.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PIL_LIMIT_LOCK = threading.Lock()


def check_max_pixels(max_pixels: Optional[int]) -> Optional[int]:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) \
            or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels or None (no limit); "
                         f"got {max_pixels!r}.")
    return int(max_pixels)


def _open_without_pil_limit(Image, path: Path):
    """``Image.open`` with Pillow's own decompression-bomb limit lifted (header only)."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_checked(path: Path, max_pixels: Optional[int]):
    """Open ``path`` lazily (header only) and refuse it if it has more than ``max_pixels``.

    Pillow's own limit (``Image.MAX_IMAGE_PIXELS``: a warning above it, an error above twice it)
    is replaced by ``max_pixels``: an image over it is refused here by name, and a caller who
    raises ``max_pixels`` past Pillow's limit gets the image.
    """
    Image = require("PIL.Image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is not None and (max_pixels is None or max_pixels > pil_limit):
            img = _open_without_pil_limit(Image, path)
        else:
            try:
                img = Image.open(path)
            except Image.DecompressionBombError:
                img = _open_without_pil_limit(Image, path)  # to name its size below
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise DatasetError(
            path,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels ({_cam_memory_note(width, height)})",
            "raise the limit with --max-pixels N (max_pixels=N in Python) if the memory is "
            "there, or downscale the image",
        )
    return img


#: Fit of the measured peak memory of one image's CLIP-ES CAMs beyond the model (ViT-B/16 sized
#: CLIP, CPU, ``benchmarks/NOTES.md``): ``CAM_BYTES_PER_TOKEN * T + CAM_BYTES_PER_TOKEN_SQUARED *
#: T**2`` bytes for ``T`` 16 x 16 patch tokens (within 10 % from 640 x 640 to 1250 x 1250).
CAM_BYTES_PER_TOKEN = 125_000
CAM_BYTES_PER_TOKEN_SQUARED = 171


def cam_memory_estimate(width: int, height: int) -> float:
    """Rough peak memory (bytes) of one image's CLIP-ES CAMs beyond the model (ViT-B/16, CPU).

    Example:
        >>> round(cam_memory_estimate(1000, 1000) / 1024 ** 3, 1)
        3.0
    """
    tokens = math.ceil(width / 16) * math.ceil(height / 16)
    return CAM_BYTES_PER_TOKEN * tokens + CAM_BYTES_PER_TOKEN_SQUARED * tokens ** 2


def _cam_memory_note(width: int, height: int) -> str:
    gb = cam_memory_estimate(width, height) / 1024 ** 3
    return f"CLIP-ES CAMs with a ViT-B/16 would need roughly {gb:,.0f} GB for it"


def read_image_header(
    path: str | os.PathLike[str], *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> Tuple[Tuple[int, int], str]:
    """Size and mode of an image from its header, without decoding it, with the pixel limit.

    Args:
        path: the image file.
        max_pixels: refuse images with more than this many pixels (None: no limit).

    Returns:
        ``((width, height), PIL mode)``.

    Raises:
        DatasetError: the file does not exist, is not an image, or is over ``max_pixels``.
    """
    path = Path(path)
    max_pixels = check_max_pixels(max_pixels)
    try:
        with _open_checked(path, max_pixels) as img:
            return img.size, img.mode
    except DatasetError:
        raise
    except FileNotFoundError as err:
        raise DatasetError(path, "image file does not exist") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(path, f"cannot read image header ({err})",
                           "the file is corrupt or not an image; re-download it or drop the id") \
            from err


def _to_eight_bit(img, path: Path):
    """Map a 16-bit greyscale image to 8-bit ``L`` by its high byte; other modes unchanged.

    ``value >> 8`` is what Pillow does to 16-bit colour PNGs and OpenCV to every 16-bit PNG, so
    the CAM image and the CRF image agree; it maps ``v * 257`` (8-bit ``v`` stretched to 16 bits)
    back to ``v`` exactly. Mode ``I`` (32-bit, how older Pillow opens 16-bit PNGs) is accepted
    when its values lie in 0..65535. Floating-point and other 32-bit images have no defined range
    and are refused.
    """
    Image = require("PIL.Image")
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img)
        if mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise DatasetError(path, f"32-bit integer image with values in [{int(arr.min())}, "
                               f"{int(arr.max())}]; cannot map it to 8-bit colour",
                               "save it as an 8-bit or 16-bit image")
        out = Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
        img.close()
        return out
    if mode in ("F", "I;16S", "I;32", "I;32S") or mode.startswith(("I;32", "F;")):
        raise DatasetError(path, f"image has mode {mode!r} (floating-point or 32-bit), whose "
                           "range is not defined; cannot map it to 8-bit colour",
                           "save it as an 8-bit (or 16-bit) image")
    return img


def load_image(
    path: str | os.PathLike[str], *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> PILImage:
    """Open and decode an image with PIL: the one image reader of the package.

    The pixel limit is checked from the header before anything is decoded (PIL opens lazily),
    so a huge image is refused by name instead of exhausting memory later (the ViT's attention
    grows with the square of the token count). 16-bit greyscale images become 8-bit ``L`` by
    their high byte (``value >> 8``; a plain RGB conversion would clip them to white). Any other
    mode is left as stored: CLIP-ES resizes the PIL image first and converts it to RGB
    afterwards, so an ordinary 8-bit image is returned exactly as decoded.

    Args:
        path: the image file.
        max_pixels: refuse images with more than this many pixels (width x height); None: no
            limit. Default :data:`DEFAULT_MAX_PIXELS`.

    Returns:
        A loaded ``PIL.Image.Image`` (the file is closed).

    Raises:
        DatasetError: the file does not exist, cannot be decoded, is over ``max_pixels`` (the
            message gives its size, the limit and how to raise it), or has a floating-point or
            32-bit mode (the message names the file).
        ImportError: Pillow is not installed (the message names the pip extra).
    """
    path = Path(path)
    max_pixels = check_max_pixels(max_pixels)
    img = None
    try:
        img = _open_checked(path, max_pixels)
        img.load()  # decode now, so a truncated file fails here and the file handle is released
        return _to_eight_bit(img, path)
    except DatasetError:
        if img is not None:
            img.close()
        raise
    except FileNotFoundError as err:
        raise DatasetError(path, "image file does not exist") from err
    except (OSError, ValueError, SyntaxError) as err:
        if img is not None:
            img.close()
        raise DatasetError(path, f"cannot decode image ({err})",
                           "the file is corrupt or not an image; re-download it or drop the id") \
            from err


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def resolve_split_file(split_file: str | os.PathLike[str], bases: Sequence[Path]) -> Path:
    """Return ``split_file`` as given if it exists, else the first ``base/split_file`` that does.

    A name without suffix (``train``) also tries ``train.txt``.
    """
    given = Path(split_file)
    if given.exists() or given.is_absolute():
        return given
    names = [given] if given.suffix else [given, given.with_name(given.name + ".txt")]
    for base in bases:
        for name in names:
            candidate = base / name
            if candidate.is_file():
                return candidate
    tried = ", ".join(str(b / n) for b in bases for n in names)
    raise FileNotFoundError(
        f"split file '{split_file}' not found (also tried {tried}). Give a text file with one "
        f"image id per line, e.g. VOC2012/ImageSets/Segmentation/train.txt."
    )


def sample_image(dataset: Any, sample: Sample) -> PILImage:
    """Decode ``sample``'s image with its dataset's pixel limit.

    The limit is ``dataset.max_pixels`` when the dataset has one (``VOCDataset(...,
    max_pixels=N)``, ``COCODataset(...)``), else :data:`DEFAULT_MAX_PIXELS`; every dataset-level
    stage (CAMs, learning set, context bank, phase-2 training and inference) reads images
    through here, so one setting governs them all.
    """
    return load_image(sample.image_path,
                      max_pixels=getattr(dataset, "max_pixels", DEFAULT_MAX_PIXELS))


class ListDataset:
    """Shared behaviour of the map-style datasets: ids, indexing, iteration, validation."""

    _ids: List[str]
    _cache: Dict[int, Sample]
    #: Pixel limit of the images read through :func:`sample_image` (None: no limit).
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS

    def _make_sample(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def ids(self) -> List[str]:
        """The image ids, in split-file order."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Sample:
        """Return sample ``index`` (negative indices count from the end).

        Raises:
            IndexError: index out of range.
            DatasetError: this sample's image or labels cannot be used (callers may skip it).
        """
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int; got {type(index).__name__}.")
        n = len(self._ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images.")
        index = int(index) % n
        sample = self._cache.get(index)
        if sample is None:
            sample = self._make_sample(index)
            self._cache[index] = sample
        return sample

    def __iter__(self) -> Iterator[Sample]:
        """Yield every sample; a :class:`DatasetError` stops the iteration (see
        :meth:`iter_samples` to skip bad samples instead)."""
        return self.iter_samples()

    def iter_samples(
        self, *, skip_errors: bool = False, skipped: Optional[List[Tuple[str, str]]] = None
    ) -> Iterator[Sample]:
        """Yield the samples in order, optionally skipping the unusable ones.

        Args:
            skip_errors: if True, a sample raising :class:`DatasetError` (e.g. an annotation
                without objects) is logged as a warning and skipped instead of raised.
            skipped: if given, ``(id, message)`` of each skipped sample is appended to it (for
                the run summary and the exit status).
        """
        for index, image_id in enumerate(self._ids):
            try:
                sample = self[index]
            except DatasetError as err:
                if not skip_errors:
                    raise
                log.warning("skipping image %s: %s", image_id, err)
                if skipped is not None:
                    skipped.append((image_id, str(err)))
                continue
            yield sample

    def validate(self) -> List[Tuple[str, str]]:
        """Check every sample up front (image exists, labels obtainable), for dry runs.

        Returns:
            ``(id, message)`` of each problem; empty when every sample is usable.
        """
        problems = []
        for index, image_id in enumerate(self._ids):
            try:
                self[index]
            except DatasetError as err:
                problems.append((image_id, str(err)))
        return problems


class VOCDataset(ListDataset):
    """PASCAL VOC images of one split with their image-level labels (map-style).

    Labels are read lazily, one sample at a time (and cached); :meth:`validate` checks all of
    them up front.

    Args:
        root: the ``VOC2012`` folder (holding ``JPEGImages/``, ``Annotations/``,
            ``SegmentationClass/``).
        split_file: list of ids (see :func:`read_split`). None: ``root/ImageSets/Segmentation/
            train.txt``. A relative path that does not exist from the current directory is also
            looked up under ``root`` and ``root/ImageSets/Segmentation`` (``"val.txt"`` and
            ``"val"`` both work).
        class_spec: the label space (default VOC).
        label_source: ``"xml"`` (upstream: ``Annotations/<id>.xml``), ``"mask"`` (classes present
            in the ground-truth PNG) or ``"auto"`` (the XML where it exists, else the mask; each
            sample records which in ``Sample.label_source``).
        gt_dir: folder of ground-truth PNGs; default ``root/SegmentationClassAug`` if it exists,
            else ``root/SegmentationClass``. A relative path is tried from the current directory,
            then under ``root``.
        max_pixels: pixel limit of the images the dataset-level stages read
            (:func:`sample_image`); None: no limit. Default :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        DatasetError: ``root`` is not a VOC root, or it lacks the folder ``label_source`` needs.
        FileNotFoundError: the split file does not exist.
        ValueError: ``label_source`` is not one of ``auto``, ``xml``, ``mask``.

    Example:
        >>> ds = VOCDataset("VOC2012", "train.txt", label_source="auto")  # doctest: +SKIP
        >>> ds.label_source_counts  # doctest: +SKIP
        {'xml': 311, 'mask': 352, 'missing': 0}
        >>> for sample in ds.iter_samples(skip_errors=True):  # doctest: +SKIP
        ...     image = load_image(sample.image_path)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split_file: str | os.PathLike[str] | None = None,
        *,
        class_spec: ClassSpec = VOC,
        label_source: str = "auto",
        gt_dir: str | os.PathLike[str] | None = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ) -> None:
        check_choice("label_source", label_source, LABEL_SOURCES)
        self.max_pixels = check_max_pixels(max_pixels)
        self.root = _check_voc_root(root)
        self.class_spec = class_spec
        self.label_source = label_source
        self.image_dir = self.root / "JPEGImages"
        self.annotation_dir = self.root / "Annotations"
        self.gt_dir = self._resolve_gt_dir(gt_dir)

        if label_source == "xml" and not self.annotation_dir.is_dir():
            raise DatasetError(
                self.annotation_dir, "label_source='xml' but the VOC root has no Annotations/",
                "use label_source='mask' or 'auto' to take labels from the ground-truth masks",
            )
        if label_source == "mask" and not self.gt_dir.is_dir():
            raise DatasetError(
                self.gt_dir, "label_source='mask' but the ground-truth folder does not exist",
                "pass gt_dir=... or use label_source='xml'",
            )
        if (label_source == "auto" and not self.annotation_dir.is_dir()
                and not self.gt_dir.is_dir()):
            raise DatasetError(
                self.root,
                "neither Annotations/ nor a ground-truth mask folder "
                f"({self.gt_dir.name}/) exists, so no image-level labels can be derived",
                _VOC_LAYOUT,
            )

        if split_file is None:
            self.split_file = self.root / "ImageSets" / "Segmentation" / "train.txt"
        else:
            self.split_file = resolve_split_file(
                split_file, [self.root, self.root / "ImageSets" / "Segmentation"])
        self._ids = read_split(self.split_file)
        self._cache: Dict[int, Sample] = {}
        self._counts: Optional[Dict[str, int]] = None

    def _resolve_gt_dir(self, gt_dir: str | os.PathLike[str] | None) -> Path:
        if gt_dir is None:
            aug = self.root / "SegmentationClassAug"
            return aug if aug.is_dir() else self.root / "SegmentationClass"
        given = Path(gt_dir)
        if not given.exists() and not given.is_absolute() and (self.root / given).is_dir():
            given = self.root / given
        if not given.is_dir():
            raise DatasetError(given, "gt_dir does not exist",
                               "give the folder of ground-truth PNGs, or leave gt_dir unset")
        return given

    def __repr__(self) -> str:
        return (f"VOCDataset(root='{self.root}', split_file='{self.split_file}', "
                f"n={len(self)}, label_source='{self.label_source}')")

    def xml_path(self, image_id: str) -> Path:
        """``root/Annotations/<id>.xml``."""
        return self.annotation_dir / f"{image_id}.xml"

    def mask_path(self, image_id: str) -> Path:
        """``gt_dir/<id>.png``."""
        return self.gt_dir / f"{image_id}.png"

    def _source_for(self, image_id: str) -> str:
        """``'xml'``, ``'mask'`` or ``'missing'``: where this id's labels would come from."""
        if self.label_source in ("auto", "xml") and self.xml_path(image_id).is_file():
            return "xml"
        if self.label_source in ("auto", "mask") and self.mask_path(image_id).is_file():
            return "mask"
        return "missing"

    @property
    def label_source_counts(self) -> Dict[str, int]:
        """How many ids take their labels from ``'xml'``, from ``'mask'``, or have none
        (``'missing'``). Computed from file existence only (no parsing); the values sum to
        ``len(self)``."""
        if self._counts is None:
            counts = {"xml": 0, "mask": 0, "missing": 0}
            for image_id in self._ids:
                counts[self._source_for(image_id)] += 1
            self._counts = counts
        return dict(self._counts)

    def _make_sample(self, index: int) -> Sample:
        image_id = self._ids[index]
        image_path = self.image_dir / f"{image_id}.jpg"
        if not image_path.is_file():
            raise DatasetError(
                image_path, "image file does not exist",
                f"check the VOC root, or drop '{image_id}' from {self.split_file.name}",
            )
        source = self._source_for(image_id)
        size = None
        if source == "xml":
            labels, size = parse_voc_xml(self.xml_path(image_id), self.class_spec)
        elif source == "mask":
            labels = labels_from_mask(self.mask_path(image_id), self.class_spec.num_classes)
            if not labels:
                raise DatasetError(
                    self.mask_path(image_id),
                    "mask holds no foreground class, so the image has no image-level labels",
                    f"drop '{image_id}' from {self.split_file.name}",
                )
        else:
            raise DatasetError(self._missing_labels_path(image_id),
                               *self._missing_labels_message(image_id))
        gt_path = self.mask_path(image_id)
        return Sample(
            id=image_id,
            image_path=image_path,
            labels=labels,
            label_source=source,
            gt_path=gt_path if gt_path.is_file() else None,
            size=size,
        )

    def _missing_labels_path(self, image_id: str) -> Path:
        return self.mask_path(image_id) if self.label_source == "mask" else self.xml_path(image_id)

    def _missing_labels_message(self, image_id: str) -> Tuple[str, str]:
        xml = f"Annotations/{image_id}.xml"
        png = f"{self.gt_dir.name}/{image_id}.png"
        drop = f"drop '{image_id}' from {self.split_file.name}"
        if self.label_source == "xml":
            return (f"no {xml}: cannot derive image-level labels",
                    f"use label_source='auto' to fall back to {png}, or {drop}")
        if self.label_source == "mask":
            return (f"no {png}: cannot derive image-level labels",
                    f"use label_source='auto' to use {xml}, or {drop}")
        return (f"no {xml} and no {png}: cannot derive image-level labels",
                f"provide one or {drop}")


def _check_voc_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        where = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetError(path, f"VOC root {where}", _VOC_LAYOUT)
    if not (path / "JPEGImages").is_dir():
        hint = _VOC_LAYOUT
        for guess in ("VOC2012", "VOCdevkit/VOC2012"):
            if (path / guess / "JPEGImages").is_dir():
                hint += f" Did you mean '{path / guess}'?"
                break
        raise DatasetError(path, "not a VOC root: it has no JPEGImages/ folder", hint)
    return path


def image_level_label_mismatches(
    dataset: VOCDataset,
) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Images whose XML labels differ (as sets) from the classes in their ground-truth mask.

    CLIP-ES takes labels from the XML, difficult objects included, so an image may carry a class
    that its segmentation mask lacks. This is for logging, not for changing labels.
    Ids lacking either file, or whose XML or mask cannot be read, are left out.

    Args:
        dataset: a :class:`VOCDataset` (any ``label_source``).

    Returns:
        ``{id: (xml_labels, mask_labels)}`` for each mismatching id, in split order (iterating it
        gives the ids).
    """
    out: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    for image_id in dataset.ids:
        xml_path, mask_path = dataset.xml_path(image_id), dataset.mask_path(image_id)
        if not (xml_path.is_file() and mask_path.is_file()):
            continue
        try:
            xml_labels, _ = parse_voc_xml(xml_path, dataset.class_spec)
            mask_labels = labels_from_mask(mask_path, dataset.class_spec.num_classes)
        except DatasetError as err:
            log.debug("label comparison skipped for %s: %s", image_id, err)
            continue
        if set(xml_labels) != set(mask_labels):
            out[image_id] = (xml_labels, mask_labels)
    return out
