"""CRF post-processing and confidence-guided pseudo masks (CLIP-ES ``eval_cam_with_crf.py``).

``docs/upstream_clip_es.md#crf-pseudo-masks``. Per image: background plane ``(1 - max_c cams) ** 1``
is
prepended to the CAMs (float16, *not* normalised to sum 1, as upstream), a dense CRF (pydensecrf,
10 mean-field iterations) refines it, the label is ``keys'[argmax Q]`` with
``keys' = [0, keys + 1]``, and pixels whose max marginal is below 0.95 become 255 (the ignore
label of the confidence-guided segmentation loss). Unlike upstream, ground truth is never read
(``docs/upstream_clip_es.md#crf-reads-ground-truth``).

OpenCV, pydensecrf and Pillow are optional and imported inside the functions that need them.

Example:
    >>> import numpy as np
    >>> cams = np.zeros((1, 4, 6), np.float16); cams[0, :, :3] = 0.9
    >>> cams_to_pseudo_mask(cams, np.array([0]), crf=False, conf=None)[0].tolist()
    [1, 1, 1, 0, 0, 0]
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vpl_plugin._checks import check_choice, check_ndim
from vpl_plugin._imports import require
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.data.labels import VOC_PALETTE, read_label_png, save_label_png, voc_palette
from vpl_plugin.data.voc import DEFAULT_MAX_PIXELS, DatasetError, load_image, read_image_header
from vpl_plugin.metrics import check_cams_keys, label_lut

__all__ = [
    "MEAN_BGR",
    "VOC_PALETTE",
    "voc_palette",
    "save_label_png",
    "load_label_png",
    "read_image_bgr",
    "crf_image",
    "dense_crf",
    "cams_to_pseudo_mask",
    "make_pseudo_masks",
]

logger = logging.getLogger(__name__)

#: The Caffe/deeplab BGR mean that upstream subtracts before building the CRF image.
MEAN_BGR: Tuple[float, float, float] = (104.008, 116.669, 122.675)

CRF_IMAGE_MODES = ("upstream_wrapped", "rgb")

#: PIL modes that OpenCV's ``IMREAD_COLOR`` and PIL's RGB conversion both read as 8-bit colour.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


# --------------------------------------------------------------------------------------------
# PNG and image I/O (the palette and the label-PNG writer live in vpl_plugin.data.labels)
# --------------------------------------------------------------------------------------------


def load_label_png(path: Union[str, os.PathLike],
                   num_classes: Optional[int] = None) -> np.ndarray:
    """Read a single-channel label PNG (P or L mode) as ``(H, W)`` uint8 class ids.

    :func:`vpl_plugin.data.labels.read_label_png` with ``what="label PNG"``: content that is not
    PNG, modes other than P/L and (with ``num_classes``) values outside the class list and 255
    are refused by name.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: (a ValueError) see above.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    return read_label_png(path, num_classes, what="label PNG")


def read_image_bgr(path: Union[str, os.PathLike], *,
                   max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as upstream does: ``cv2.imread(path, IMREAD_COLOR)``.

    The header is read first with the CAM pipeline's rules (:func:`vpl_plugin.data.voc.
    read_image_header`): an image over ``max_pixels`` is refused by name before it is decoded. An
    ordinary 8-bit image is then decoded by OpenCV as upstream does (byte-identical); a 16-bit
    greyscale one goes through :func:`vpl_plugin.data.voc.load_image` (high byte, as for the
    CAMs), so the CRF sees the image the CAMs were made from.

    Note that ``IMREAD_COLOR`` applies a JPEG's EXIF orientation tag, whereas the CAM pipeline
    (PIL) does not: for an image with a rotating orientation tag the CRF image then disagrees
    with the CAMs (a size mismatch is caught by :func:`make_pseudo_masks`; a 180-degree flip is
    not). Upstream has the same behaviour; VOC/COCO images carry no such tag.

    Args:
        path: the image file.
        max_pixels: pixel limit (None: no limit).

    Returns:
        ``(H, W, 3)`` uint8 BGR image.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: (a ValueError) the header cannot be read, the image is over
            ``max_pixels``, its mode has no defined 8-bit range, or a JPEG is truncated.
        ValueError: OpenCV cannot decode it.
    """
    cv2 = require("cv2")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    _, mode = read_image_header(path, max_pixels=max_pixels)
    if mode not in EIGHT_BIT_MODES:
        rgb = np.asarray(load_image(path, max_pixels=max_pixels).convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(rgb[..., ::-1])
    truncated = _jpeg_truncation(path)
    if truncated:
        raise DatasetError(path, truncated, "the file is corrupt; re-download it or drop the id")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"OpenCV could not decode the image {path} (corrupt or unsupported).")
    return img


def _jpeg_truncation(path: Path) -> Optional[str]:
    """Why a JPEG file is cut short, or None (also for any other format).

    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey), while
    :func:`~vpl_plugin.data.voc.load_image` (the CAM images) refuses it; the CRF must not run on
    such an image. A complete JPEG has an end-of-image marker (``FF D9``) after its last
    start-of-scan marker (``FF DA``); inside the compressed data every ``FF`` byte is followed by
    ``00``, so the marker cannot appear there by chance.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 4096))
        tail = fh.read()  # a complete JPEG ends with FF D9: the last 4 KB nearly always decide
        end, scan = tail.rfind(b"\xff\xd9"), tail.rfind(b"\xff\xda")
        if end < 0 and scan < 0:  # inside compressed data, or long trailing bytes: read it all
            fh.seek(0)
            tail = fh.read()
            end, scan = tail.rfind(b"\xff\xd9"), tail.rfind(b"\xff\xda")
    if scan >= 0 and end < scan:
        return f"JPEG data ends before its end-of-image marker ({size:,} bytes; the file is truncated)"
    return None


# --------------------------------------------------------------------------------------------
# CRF
# --------------------------------------------------------------------------------------------


def crf_image(image_bgr_uint8: np.ndarray, mode: str = "upstream_wrapped") -> np.ndarray:
    """The image that the CRF's bilateral kernel sees.

    ``"upstream_wrapped"`` (default, ``docs/upstream_clip_es.md#crf-image``): upstream subtracts the
    BGR mean
    ``(104.008, 116.669, 122.675)`` from the float32 BGR image and then casts the result to
    uint8 before handing it to pydensecrf. Negative values wrap around (on x86 the cast truncates
    toward zero, modulo 256: -1.008 -> 255, -104.008 -> 152), so the bilateral kernel works on a
    scrambled BGR image; the published CRF numbers include this. The cast of out-of-range floats
    is undefined behaviour in C, so it is emulated platform-independently as
    ``uint8(mod(trunc(x), 256))`` (only the negative side can wrap: ``255 - 104.008 < 256``).

    ``"rgb"``: the plain image converted to RGB (the fix; pydensecrf's colour scale ``srgb`` is
    meant for 0..255 intensities).

    Args:
        image_bgr_uint8: ``(H, W, 3)`` uint8 BGR image (as from :func:`read_image_bgr`).
        mode: ``"upstream_wrapped"`` or ``"rgb"``.

    Returns:
        ``(H, W, 3)`` uint8 C-contiguous array, as pydensecrf requires.

    Example:
        >>> crf_image(np.array([[[0, 104, 255]]], np.uint8)).tolist()
        [[[152, 244, 132]]]
    """
    check_choice("mode", mode, CRF_IMAGE_MODES)
    img = np.asarray(image_bgr_uint8)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(
            f"image must be an (H, W, 3) uint8 BGR array; got shape {img.shape}, dtype {img.dtype}."
        )
    if mode == "rgb":
        return np.ascontiguousarray(img[..., ::-1])
    x = img.astype(np.float32)
    x -= np.asarray(MEAN_BGR)  # float64 subtraction stored in float32, as upstream's `img -= mean`
    return np.ascontiguousarray(np.mod(np.trunc(x), 256).astype(np.uint8))


def _unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """``-log(clip(probs, 1e-5, 1))`` in the probs' dtype, then float32 ``(C, H*W)``.

    Identical to pydensecrf ``utils.unary_from_softmax(probs)`` (the clip bounds are weak Python
    scalars, so a float16 input is clipped and logged in float16).
    """
    dt = probs.dtype.type
    sm = np.clip(probs, dt(1e-5), dt(1.0))
    return np.ascontiguousarray((-np.log(sm)).reshape(probs.shape[0], -1).astype(np.float32))


def dense_crf(
    probs: np.ndarray,
    image_uint8: np.ndarray,
    n_iters: int = 10,
    gauss_sxy: float = 1,
    gauss_compat: float = 3,
    bi_sxy: float = 67,
    bi_srgb: float = 3,
    bi_compat: float = 4,
) -> np.ndarray:
    """Fully connected CRF (pydensecrf) over class scores, as deeplab-pytorch's ``DenseCRF``.

    The unary is ``-log(clip(probs, 1e-5, 1))`` computed in ``probs``' own dtype (upstream passes
    float16) and cast to float32; the scores need not sum to 1
    (``docs/upstream_clip_es.md#crf-unnormalised-scores``). Pairwise terms: a
    Gaussian kernel (``gauss_sxy``, ``gauss_compat``) and a bilateral kernel (``bi_sxy``,
    ``bi_srgb``, ``bi_compat``) on ``image_uint8``.

    Args:
        probs: ``(C, H, W)`` floating class scores.
        image_uint8: ``(H, W, 3)`` uint8 image for the bilateral kernel (see :func:`crf_image`).
        n_iters: mean-field iterations.
        gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat: kernel parameters (upstream values).

    Returns:
        ``(C, H, W)`` float32 marginals ``Q`` (sum to 1 over ``C`` at every pixel).
    """
    dcrf = require("pydensecrf.densecrf")
    probs = np.asarray(probs)
    check_ndim("probs", probs, 3, "(C, H, W)")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point; got {probs.dtype}.")
    c, h, w = probs.shape
    if c < 1:
        raise ValueError("probs must have at least one class plane (C >= 1).")
    img = np.asarray(image_uint8)
    if img.shape != (h, w, 3) or img.dtype != np.uint8:
        raise ValueError(
            f"image must be a ({h}, {w}, 3) uint8 array matching probs {probs.shape}; got shape "
            f"{img.shape}, dtype {img.dtype}."
        )
    if int(n_iters) < 0:
        raise ValueError(f"n_iters must be >= 0; got {n_iters}.")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(_unary_from_probs(probs))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=np.ascontiguousarray(img),
                           compat=bi_compat)
    q = d.inference(int(n_iters))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


# --------------------------------------------------------------------------------------------
# pseudo masks
# --------------------------------------------------------------------------------------------


def cams_to_pseudo_mask(
    cams: np.ndarray,
    keys: np.ndarray,
    image_bgr: Optional[np.ndarray] = None,
    *,
    crf: bool = True,
    conf: Optional[float] = 0.95,
    crf_image_mode: str = "upstream_wrapped",
    bg_power: float = 1.0,
    n_iters: int = 10,
    num_classes: Optional[int] = None,
    source: Optional[Union[str, os.PathLike]] = None,
) -> np.ndarray:
    """One image's pseudo mask from its CAMs (upstream ``eval_cam_with_crf.py``).

    Scores ``probs = [(1 - max_c cams) ** bg_power; cams]`` are built in the CAMs' dtype
    (float16 for CLIP-ES files) and not normalised; ``keys' = [0, keys + 1]``.

    * ``crf=True``: ``Q = dense_crf(probs, crf_image(image_bgr, crf_image_mode))``, label
      ``keys'[argmax Q]``; with ``conf`` set, pixels with ``max Q < conf`` become 255.
    * ``crf=False`` (no image needed): label ``keys'[argmax probs]``; with ``conf`` set, pixels
      where the max of ``probs / probs.sum(0)`` (float32) is below ``conf`` become 255. This
      normalisation is a choice of this package (upstream has no CRF-free pseudo masks); pass
      ``conf=None`` to get plain argmax labels, equal to ``cams_to_label(cams, keys, bg_power,
      "power")``.

    Args:
        cams: ``(n, H, W)`` CAMs (``attn_highres``).
        keys: ``(n,)`` 0-based foreground class indices.
        image_bgr: ``(H, W, 3)`` uint8 BGR image (required when ``crf=True``).
        crf: run the dense CRF.
        conf: confidence below which a pixel is set to 255 (upstream 0.95); None disables it.
        crf_image_mode: ``"upstream_wrapped"`` (default) or ``"rgb"``.
        bg_power: exponent of the background plane (upstream 1).
        n_iters: mean-field iterations.
        num_classes: the dataset's label count including background (VOC 21); keys outside its
            foreground classes (``0..num_classes - 2``) are refused. None: only ``0..253``.
        source: the CAM file, named in error messages.

    Returns:
        ``(H, W)`` uint8 labels, 255 = ignore. With ``n == 0`` (no foreground class) all pixels
        are background (0).

    Raises:
        ValueError: CAMs holding NaN/inf (a CRF would turn them into an all-background mask),
            keys outside the label space, or sizes that do not match.
    """
    cams, keys = check_cams_keys(cams, keys, num_classes, source=source)
    if conf is not None:
        conf = float(conf)
    check_choice("crf_image_mode", crf_image_mode, CRF_IMAGE_MODES)
    n, h, w = cams.shape
    if crf:
        if image_bgr is None:
            raise ValueError("image_bgr is required when crf=True (the CRF's bilateral kernel "
                             "needs the image); pass crf=False for CRF-free masks.")
        img = np.asarray(image_bgr)
        if img.shape[:2] != (h, w):
            raise ValueError(f"image size {img.shape[:2]} (H, W) does not match the CAM size "
                             f"{(h, w)}.")
    if n == 0:
        return np.zeros((h, w), dtype=np.uint8)
    lut = label_lut(keys)
    dt = cams.dtype.type
    bg = np.power(dt(1) - cams.max(axis=0, keepdims=True), dt(bg_power))
    probs = np.concatenate([bg, cams], axis=0)
    if crf:
        q = dense_crf(probs, crf_image(img, crf_image_mode), n_iters=n_iters)
        label = lut[q.argmax(axis=0)]
        if conf is not None:
            label[q.max(axis=0) < conf] = 255
        return label
    label = lut[probs.argmax(axis=0)]
    if conf is not None:
        p = probs.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            pmax = p.max(axis=0) / p.sum(axis=0)
        label[~(pmax >= conf)] = 255  # NaN (all-zero scores) -> ignore
    return label


def _pseudo_mask_one(task: Dict[str, Any]) -> Tuple[str, str, str]:
    """Worker: make and write one pseudo mask. Returns ``(id, "done"|"failed", reason)``."""
    from vpl_plugin.data.cam_files import read_cam_file

    img_id = task["id"]
    try:
        cam_path = Path(task["cam_path"])
        if not cam_path.is_file():
            raise FileNotFoundError(f"CAM file not found: {cam_path}")
        d = read_cam_file(cam_path)  # runs nothing from the file
        if not isinstance(d, dict) or "keys" not in d or task["cam_key"] not in d:
            raise KeyError(f"{cam_path} must hold a dict with 'keys' and {task['cam_key']!r}.")
        cams, keys = np.asarray(d[task["cam_key"]]), np.asarray(d["keys"])
        image = None
        if task["crf"]:
            image = read_image_bgr(task["image_path"], max_pixels=task["max_pixels"])
            if cams.ndim == 3 and image.shape[:2] != cams.shape[1:]:
                raise ValueError(
                    f"size mismatch: CAM {cam_path} is {tuple(cams.shape[1:])} (H, W) but image "
                    f"{task['image_path']} is {tuple(image.shape[:2])}."
                )
        label = cams_to_pseudo_mask(
            cams, keys, image, crf=task["crf"], conf=task["conf"],
            crf_image_mode=task["crf_image_mode"], bg_power=task["bg_power"],
            n_iters=task["n_iters"], num_classes=task["num_classes"], source=cam_path,
        )
        save_label_png(task["out_path"], label, palette=task["palette"])
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return img_id, "failed", f"{type(err).__name__}: {err}"
    return img_id, "done", ""


def make_pseudo_masks(
    cam_dir: Union[str, os.PathLike],
    image_dir: Union[str, os.PathLike],
    ids: Sequence[str],
    out_dir: Union[str, os.PathLike],
    *,
    crf: bool = True,
    conf: Optional[float] = 0.95,
    crf_image_mode: str = "upstream_wrapped",
    bg_power: float = 1.0,
    n_iters: int = 10,
    image_ext: str = ".jpg",
    cam_key: str = "attn_highres",
    palette: bool = True,
    workers: int = 1,
    skip_existing: bool = True,
    progress: bool = True,
    num_classes: Optional[int] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> Dict[str, Any]:
    """Write ``<out_dir>/<id>.png`` pseudo masks for many images (resumable, parallel).

    For each id, reads ``<cam_dir>/<id>.npy`` and (with ``crf``) ``<image_dir>/<id><image_ext>``
    and writes :func:`cams_to_pseudo_mask`'s label with :func:`save_label_png` (atomic, so an
    interrupted run never leaves a truncated PNG). Ground truth is not read (unlike upstream).
    With ``skip_existing`` an id whose PNG exists is skipped, so a rerun only computes what is
    missing. A failing image (missing CAM, unreadable image, CAM/image size mismatch) is recorded
    in ``failed`` and the run continues; so is one whose CAMs hold NaN/inf or (with
    ``num_classes``) keys outside the dataset's classes, and one whose image is over
    ``max_pixels``.

    Args:
        cam_dir: directory of ``<id>.npy`` CAM files.
        image_dir: directory of the images (unused when ``crf=False``).
        ids: image ids.
        out_dir: output directory (created).
        crf, conf, crf_image_mode, bg_power, n_iters: see :func:`cams_to_pseudo_mask`.
        image_ext: image file extension (upstream ``.jpg``).
        cam_key: key of the maps in the CAM dict.
        palette: P-mode PNG with the VOC palette (default) or L-mode greyscale (upstream's
            format; see :func:`save_label_png`).
        workers: processes (``ProcessPoolExecutor``) when > 1.
        skip_existing: skip ids whose output PNG already exists.
        progress: show a tqdm bar (none if tqdm is missing).
        num_classes: the dataset's label count including background (VOC 21, COCO 81): CAM keys
            outside its foreground classes fail that image (key 99 would otherwise become label
            100). None: keys are only checked against ``0..253``.
        max_pixels: pixel limit of the images read for the CRF (None: no limit); see
            :func:`vpl_plugin.data.voc.load_image`.

    Returns:
        dict with ``done`` (ids written), ``skipped_existing`` (ids skipped), ``failed``
        (list of ``(id, reason)``) and ``out_dir``.
    """
    check_choice("crf_image_mode", crf_image_mode, CRF_IMAGE_MODES)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    require("PIL.Image")
    if crf:
        require("cv2")
        require("pydensecrf.densecrf")
    cam_dir, image_dir, out_dir = Path(cam_dir), Path(image_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"done": [], "skipped_existing": [], "failed": [],
                               "out_dir": str(out_dir)}
    tasks: List[Dict[str, Any]] = []
    for img_id in (str(i) for i in ids):
        out_path = out_dir / f"{img_id}.png"
        if skip_existing and out_path.is_file():
            summary["skipped_existing"].append(img_id)
            continue
        tasks.append({
            "id": img_id, "cam_path": str(cam_dir / f"{img_id}.npy"),
            "image_path": str(image_dir / f"{img_id}{image_ext}"), "out_path": str(out_path),
            "cam_key": cam_key, "crf": crf, "conf": conf, "crf_image_mode": crf_image_mode,
            "bg_power": bg_power, "n_iters": n_iters, "palette": palette,
            "num_classes": num_classes, "max_pixels": max_pixels,
        })

    def _record(results) -> None:
        for img_id, status, reason in progress_bar(results, total=len(tasks), desc="pseudo masks", enabled=progress):
            if status == "done":
                summary["done"].append(img_id)
            else:
                summary["failed"].append((img_id, reason))

    if int(workers) > 1 and len(tasks) > 1:
        from vpl_plugin._workers import die_with_parent

        with ProcessPoolExecutor(max_workers=min(int(workers), len(tasks)), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            chunk = max(1, len(tasks) // (4 * int(workers)))
            _record(pool.map(_pseudo_mask_one, tasks, chunksize=chunk))
    else:
        _record(map(_pseudo_mask_one, tasks))
    if summary["failed"]:
        logger.warning("make_pseudo_masks: %d image(s) failed (first: %s: %s)",
                       len(summary["failed"]), *summary["failed"][0])
    return summary


