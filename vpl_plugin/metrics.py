"""Segmentation metrics: confusion matrix, mean IoU accumulator, CAM threshold sweep.

The functional core (:func:`confusion_matrix`, :func:`iou_from_confusion`, :func:`mean_iou`,
:func:`cams_to_label`) needs only numpy (torch tensors are accepted and moved to the CPU);
:class:`MeanIoU` is the stateful accumulator twin. :func:`evaluate_cams` and
:func:`evaluate_masks` score CAM files / mask PNGs on disk exactly as upstream CLIP-ES
``eval_cam.py`` does (``docs/upstream_clip_es.md#evaluation-and-its-threshold-search``); they read
PNGs with Pillow, imported lazily.

Conventions (as upstream ``eval_cam.py`` / deeplab-pytorch ``scores``):

* one confusion matrix accumulated over all pixels of all images (never a mean of per-image
  scores); rows are ground truth, columns are predictions;
* ground-truth pixels outside ``[0, num_classes)`` (255 = void) are ignored;
* ``IoU_c = hist[c, c] / (rowsum_c + colsum_c - hist[c, c])``; the mean IoU is taken over the
  classes present in the ground truth (``rowsum > 0``) only, so a class that is predicted but
  absent from every ground truth does not enter the mean.

Example:
    >>> import numpy as np
    >>> gt = np.array([[0, 0, 1], [1, 2, 255]])
    >>> pred = np.array([[0, 1, 1], [1, 2, 2]])
    >>> round(mean_iou(pred, gt, num_classes=3)["miou"], 4)
    0.7222
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch


from vpl_plugin._checks import check_choice, check_ndim
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.data.labels import read_label_png

__all__ = [
    "confusion_matrix",
    "iou_from_confusion",
    "mean_iou",
    "MeanIoU",
    "cams_to_label",
    "auto_thresholds",
    "evaluate_cams",
    "evaluate_masks",
]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

#: Upstream's candidate lists for the background threshold search
#: (docs/upstream_clip_es.md#threshold-search).
POWER_CANDIDATES: Tuple[float, ...] = (1.0, 2.0)  # upstream's exponents for 'attn*' CAM types
# upstream's exponents for every other CAM type (e.g. the raw GradCAM saved as 'highres')
POWER_CANDIDATES_RAW: Tuple[float, ...] = tuple(float(k) for k in range(1, 11))
CONSTANT_CANDIDATES: Tuple[float, ...] = tuple(round(k * 0.05, 2) for k in range(1, 13))


# --------------------------------------------------------------------------------------------
# confusion matrix and scores
# --------------------------------------------------------------------------------------------


def _to_numpy(name: str, x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric numpy array or torch tensor; got dtype object.")
    return arr


def _check_integer(name: str, arr: np.ndarray) -> None:
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(
            f"{name} must hold integer class ids; got dtype {arr.dtype}. Convert scores to labels "
            f"first, e.g. `scores.argmax(0)`."
        )


def _valid_mask(target: np.ndarray, num_classes: int, ignore_index: Optional[int]) -> np.ndarray:
    valid = target < num_classes
    if np.issubdtype(target.dtype, np.signedinteger):
        valid &= target >= 0
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        valid &= target != ignore_index
    return valid


def _hist_from_valid(target_v: np.ndarray, pred_v: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix of already-filtered 1-D labels; raises on prediction ids out of range."""
    pred_v = pred_v.astype(np.int64, copy=False)
    bad = (pred_v < 0) | (pred_v >= num_classes)
    if bad.any():
        values = np.unique(pred_v[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if values.size > 10 else "")
        raise ValueError(
            f"pred holds class ids outside [0, {num_classes}) at {int(bad.sum())} counted "
            f"pixel(s): {shown}. Predictions must be class ids < num_classes={num_classes}; "
            f"map 'no prediction' values (e.g. 255) away or use evaluate_masks, which excludes "
            f"them."
        )
    idx = num_classes * target_v.astype(np.int64, copy=False) + pred_v
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_matrix(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    ignore_index: Optional[int] = 255,
) -> np.ndarray:
    """Confusion matrix of one prediction/ground-truth pair (upstream ``_fast_hist``).

    Pixels whose target lies outside ``[0, num_classes)`` (e.g. the void label 255) or equals
    ``ignore_index`` are not counted. Prediction ids are only checked at counted pixels.

    Args:
        pred: integer class ids, any shape ``(*)``; numpy array or torch tensor.
        target: integer ground-truth ids with the same shape as ``pred``.
        num_classes: number of classes ``C`` (VOC: 21, COCO: 81).
        ignore_index: an extra target value to ignore (values ``>= C`` are always ignored).

    Returns:
        ``(C, C)`` int64 array; rows are ground truth, columns are predictions.

    Raises:
        ValueError: on a shape mismatch, or if a counted pixel's prediction is outside
            ``[0, C)`` (the message lists the offending values).
        TypeError: if ``pred`` or ``target`` is not integer-valued.

    Example:
        >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 255]), 2).tolist()
        [[1, 0], [0, 1]]
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    num_classes = int(num_classes)
    pred_np = _to_numpy("pred", pred)
    target_np = _to_numpy("target", target)
    if pred_np.shape != target_np.shape:
        raise ValueError(
            f"pred and target must have the same shape; got pred {tuple(pred_np.shape)} and "
            f"target {tuple(target_np.shape)}."
        )
    _check_integer("pred", pred_np)
    _check_integer("target", target_np)
    valid = _valid_mask(target_np, num_classes, ignore_index)
    return _hist_from_valid(target_np[valid], pred_np[valid], num_classes)


def iou_from_confusion(hist: ArrayLike) -> Dict[str, Any]:
    """Scores of a confusion matrix, as upstream ``eval_cam.py`` (deeplab-pytorch ``scores``).

    Args:
        hist: ``(C, C)`` confusion matrix, rows = ground truth, columns = prediction.

    Returns:
        dict with

        * ``iou``: ``(C,)`` float64 per-class IoU, NaN for classes absent from the ground truth
          (``rowsum == 0``);
        * ``miou``: mean of ``iou`` over classes with ``rowsum > 0`` (NaN if there are none);
        * ``pixel_accuracy``: ``trace / total``;
        * ``mean_accuracy``: mean over GT-present classes of ``hist[c, c] / rowsum_c``;
        * ``fw_iou``: frequency-weighted IoU ``sum_c rowsum_c / total * IoU_c``;
        * ``valid``: ``(C,)`` bool, the classes that entered the mean.

    Example:
        >>> r = iou_from_confusion(np.array([[1, 1], [0, 2]]))
        >>> [round(v, 4) for v in r["iou"].tolist()], round(r["miou"], 4)
        ([0.5, 0.6667], 0.5833)
    """
    h = _to_numpy("hist", hist)
    check_ndim("hist", h, 2, "(C, C)")
    if h.shape[0] != h.shape[1]:
        raise ValueError(f"hist must be square (C, C); got shape {tuple(h.shape)}.")
    h = h.astype(np.float64)
    diag = np.diag(h)
    rows = h.sum(axis=1)
    cols = h.sum(axis=0)
    total = h.sum()
    valid = rows > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (rows + cols - diag)
        acc_cls = diag / rows
    iou = np.where(valid, iou, np.nan)
    if valid.any():
        miou = float(np.mean(iou[valid]))
        mean_acc = float(np.mean(acc_cls[valid]))
        pixel_acc = float(diag.sum() / total)
        freq = rows / total
        fw_iou = float((freq[valid] * iou[valid]).sum())
    else:
        miou = mean_acc = pixel_acc = fw_iou = float("nan")
    return {
        "iou": iou,
        "miou": miou,
        "pixel_accuracy": pixel_acc,
        "mean_accuracy": mean_acc,
        "fw_iou": fw_iou,
        "valid": valid,
    }


def _per_class(iou: np.ndarray, class_names: Optional[Sequence[str]]) -> Dict[Any, float]:
    keys: Sequence[Any] = class_names if class_names is not None else range(len(iou))
    return {k: float(v) for k, v in zip(keys, iou)}


def _check_class_names(class_names: Optional[Sequence[str]], num_classes: int) -> None:
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} entries but num_classes is {num_classes}; give "
            f"one name per class, background included."
        )


def mean_iou(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    ignore_index: Optional[int] = 255,
    class_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Mean IoU of one prediction/ground-truth pair (functional twin of :class:`MeanIoU`).

    Args:
        pred: integer class ids ``(*)``.
        target: ground truth ``(*)``, 255 (or any value ``>= num_classes``) ignored.
        num_classes: number of classes ``C``.
        ignore_index: an extra target value to ignore.
        class_names: optional ``C`` names used as keys of ``per_class``.

    Returns:
        :func:`iou_from_confusion`'s dict plus ``per_class`` ({name or index: IoU}) and
        ``confusion`` (``(C, C)`` int64).
    """
    _check_class_names(class_names, num_classes)
    hist = confusion_matrix(pred, target, num_classes, ignore_index)
    out = iou_from_confusion(hist)
    out["per_class"] = _per_class(out["iou"], class_names)
    out["confusion"] = hist
    return out


class MeanIoU:
    """Accumulates one confusion matrix over many images and reports IoU scores.

    Args:
        num_classes: number of classes ``C`` (background included).
        ignore_index: target value to ignore (values ``>= C`` are always ignored).
        class_names: optional ``C`` names used as keys of ``per_class`` in :meth:`compute`.

    Attributes:
        confusion: ``(C, C)`` int64 running confusion matrix (rows GT, columns prediction).

    Example:
        >>> metric = MeanIoU(num_classes=3)
        >>> metric.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
        >>> metric.update(np.array([2, 2]), np.array([2, 255]))
        >>> round(metric.compute()["miou"], 4)
        0.6667
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: Optional[int] = 255,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
        _check_class_names(class_names, int(num_classes))
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one prediction/target pair of any matching shape, e.g. ``(H, W)``, ``(N, H, W)``."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> Dict[str, Any]:
        """:func:`iou_from_confusion`'s dict plus ``per_class`` and ``confusion`` (a copy)."""
        out = iou_from_confusion(self.confusion)
        out["per_class"] = _per_class(out["iou"], self.class_names)
        out["confusion"] = self.confusion.copy()
        return out

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion[...] = 0

    def __repr__(self) -> str:
        return (f"MeanIoU(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"pixels={int(self.confusion.sum())})")


# --------------------------------------------------------------------------------------------
# CAM -> label (upstream eval_cam.py)
# --------------------------------------------------------------------------------------------


_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def _count_non_finite(arr: np.ndarray) -> int:
    """Number of NaN/inf values of a floating array (0 quickly when there are none).

    For float16/float32 (CAM files) the all-ones exponent is tested on the raw bits: one integer
    reduction, about 0.2 ms for a 3 x 375 x 500 float16 array against 1.8 ms for ``np.isfinite``.
    """
    if not arr.size:
        return 0
    bits = _EXPONENT_BITS.get(arr.dtype)
    if bits is not None:
        uint, mask = bits
        exponent = np.bitwise_and(arr.view(uint), uint(mask))
        if exponent.max() != mask:
            return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def check_cams_keys(cams: Any, keys: Any, num_classes: Optional[int] = None,
                     source: Optional[Union[str, os.PathLike]] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Validate one image's CAMs and keys; ``source`` (the CAM file) prefixes every message.

    Refuses a wrong shape or dtype, non-finite CAM values (NaN/inf: a CRF or an argmax would turn
    them into a clean-looking mask) and keys outside the label space: ``0..253`` always, and
    ``0..num_classes - 2`` (the dataset's foreground classes) when ``num_classes`` is given.
    """
    where = f"{source}: " if source is not None else ""
    cams_np = _to_numpy("cams", cams)
    keys_np = _to_numpy("keys", keys)
    check_ndim("cams", cams_np, 3, "(n, H, W)")
    if keys_np.ndim != 1 or keys_np.shape[0] != cams_np.shape[0]:
        raise ValueError(
            f"{where}keys must have shape (n,) with n = cams.shape[0] = {cams_np.shape[0]}; got "
            f"shape {tuple(keys_np.shape)}."
        )
    if not np.issubdtype(cams_np.dtype, np.floating):
        raise TypeError(f"{where}cams must be floating point (float16 as stored); got "
                        f"{cams_np.dtype}.")
    bad = _count_non_finite(cams_np)
    if bad:
        nan = int(np.isnan(cams_np).sum())
        raise ValueError(
            f"{where}CAMs hold {bad:,} non-finite values ({nan:,} NaN, {bad - nan:,} inf) of "
            f"{cams_np.size:,}; they cannot be turned into labels. Recompute this image's CAMs "
            f"(NaN CAMs usually come from an all-zero GradCAM or a numerical overflow)."
        )
    if keys_np.size:
        _check_integer("keys", keys_np)
        if keys_np.min() < 0 or keys_np.max() > 253:
            raise ValueError(
                f"{where}keys must be 0-based foreground class indices in [0, 253] (label = key + "
                f"1); got values in [{keys_np.min()}, {keys_np.max()}]."
            )
        if num_classes is not None:
            outside = sorted({int(k) for k in keys_np if not 0 <= int(k) <= int(num_classes) - 2})
            if outside:
                raise ValueError(
                    f"{where}keys {outside} are not foreground classes of this dataset "
                    f"({int(num_classes) - 1} classes: keys 0..{int(num_classes) - 2}); were "
                    f"these CAMs made for another dataset or class list?"
                )
    return cams_np, keys_np


def label_lut(keys: np.ndarray) -> np.ndarray:
    """``keys' = [0, keys + 1]`` as uint8 (plane index -> class label)."""
    return np.concatenate([[0], keys.astype(np.int64) + 1]).astype(np.uint8)


def _bg_plane(cmax: np.ndarray, thr: float, mode: str) -> np.ndarray:
    """Background score in the CAMs' dtype: ``(1 - cmax) ** thr`` or the constant ``thr``."""
    dt = cmax.dtype.type
    if mode == "power":
        return np.power(dt(1) - cmax, dt(thr))
    return np.full(cmax.shape, thr, dtype=cmax.dtype)


def _select(cmax: np.ndarray, fg_label: np.ndarray, bg: np.ndarray) -> np.ndarray:
    # Identical to lut[argmax([bg; cams], 0)] including ties (-> bg) and NaNs (np.argmax
    # returns the first NaN): bg wins iff bg is NaN or bg >= max_c cams (a NaN max -> first NaN
    # CAM, which is what argmax over the CAMs alone returns).
    bg_wins = np.isnan(bg) | (bg >= cmax)
    return np.where(bg_wins, np.uint8(0), fg_label)


def _infer_mode(thr: float) -> str:
    return "constant" if thr < 1 else "power"


def cams_to_label(
    cams: ArrayLike,
    keys: ArrayLike,
    bg_threshold: float,
    mode: Optional[str] = "power",
) -> np.ndarray:
    """Turn per-class CAMs into a label map, bit-faithful to upstream ``eval_cam.py``.

    A background plane is prepended to the CAMs and the label is the argmax over
    ``[bg; cams]`` (ties go to the lowest index, i.e. background first), mapped through
    ``keys' = [0, keys + 1]``. All arithmetic happens in the CAMs' dtype (float16 for files
    written by CLIP-ES), so a float16 threshold rounding is reproduced exactly.

    * ``mode="power"``: ``bg = (1 - max_c cams) ** bg_threshold`` (upstream default, exponent 2
      for the search start; candidates 1 and 2 for ``attn*`` maps, 1..10 for others);
    * ``mode="constant"``: ``bg = bg_threshold`` rounded to the CAMs' dtype;
    * ``mode=None``: upstream's switch, constant if ``bg_threshold < 1`` else power.

    Args:
        cams: ``(n, H, W)`` floating CAMs (``attn_highres``), one plane per key.
        keys: ``(n,)`` int 0-based foreground class indices (label = key + 1).
        bg_threshold: the exponent (power mode) or the constant background score.
        mode: ``"power"``, ``"constant"`` or ``None``.

    Returns:
        ``(H, W)`` uint8 labels; all zeros (background) when ``n == 0``.

    Example:
        >>> cams = np.array([[[0.9, 0.5, 0.2]]], dtype=np.float16)
        >>> cams_to_label(cams, np.array([4]), 1, "power").tolist()  # 0.5 vs 0.5: tie -> bg
        [[5, 0, 0]]
    """
    cams_np, keys_np = check_cams_keys(cams, keys)
    thr = float(bg_threshold)
    if not math.isfinite(thr):
        raise ValueError(f"bg_threshold must be finite; got {bg_threshold!r}.")
    if mode is None:
        mode = _infer_mode(thr)
    check_choice("mode", mode, ("power", "constant"))
    if cams_np.shape[0] == 0:
        return np.zeros(cams_np.shape[1:], dtype=np.uint8)
    cmax = cams_np.max(axis=0)
    fg_label = label_lut(keys_np)[1:][cams_np.argmax(axis=0)]
    return _select(cmax, fg_label, _bg_plane(cmax, thr, mode))


# --------------------------------------------------------------------------------------------
# file-based evaluation
# --------------------------------------------------------------------------------------------


def auto_thresholds(mode: str, cam_key: str = "attn_highres") -> List[float]:
    """Upstream's (``eval_cam.py``) candidate list for a CAM type.

    Power mode: exponents ``[1, 2]`` when ``'attn'`` is in ``cam_key`` (the CAA-refined
    ``attn_highres``), ``[1, 2, ..., 10]`` for any other key (e.g. the raw GradCAM, ``highres``).
    Constant mode: ``[0.05, 0.10, ..., 0.60]`` for every key.

    Example:
        >>> auto_thresholds("power"), len(auto_thresholds("power", "highres"))
        ([1.0, 2.0], 10)
    """
    check_choice("mode", mode, ("power", "constant"))
    if mode == "constant":
        return list(CONSTANT_CANDIDATES)
    return list(POWER_CANDIDATES if "attn" in cam_key else POWER_CANDIDATES_RAW)


def _resolve_thresholds(
    bg_thresholds: Union[str, float, Sequence[float]], mode: Optional[str],
    cam_key: str = "attn_highres",
) -> List[Tuple[float, str]]:
    if mode is not None:
        check_choice("mode", mode, ("power", "constant"))
    if isinstance(bg_thresholds, str):
        if bg_thresholds != "auto":
            raise ValueError(
                f"bg_thresholds must be 'auto', a number or a list of numbers; got "
                f"{bg_thresholds!r}."
            )
        m = mode or "power"
        return [(t, m) for t in auto_thresholds(m, cam_key)]
    if isinstance(bg_thresholds, (int, float, np.integer, np.floating)):
        values = [float(bg_thresholds)]
    else:
        values = [float(t) for t in bg_thresholds]
    if not values:
        raise ValueError("bg_thresholds is empty; give at least one threshold or 'auto'.")
    if len(set(values)) != len(values):
        raise ValueError(f"bg_thresholds has duplicates: {values}.")
    for t in values:
        if not math.isfinite(t):
            raise ValueError(f"bg_thresholds must be finite numbers; got {t}.")
    return [(t, mode or _infer_mode(t)) for t in values]


def _default_class_names(num_classes: int, class_names: Optional[Sequence[str]]):
    if class_names is not None:
        _check_class_names(class_names, num_classes)
        return tuple(class_names)
    if num_classes == 21:
        from vpl_plugin.data.classes import VOC_CLASSES

        return ("background",) + tuple(VOC_CLASSES)
    return None


def _load_cam(path: Path, cam_key: str) -> Tuple[np.ndarray, np.ndarray]:
    from vpl_plugin.data.cam_files import read_cam_file  # runs nothing from the file

    d = read_cam_file(path)
    if not isinstance(d, dict) or "keys" not in d or cam_key not in d:
        found = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise KeyError(f"{path} must hold a dict with 'keys' and {cam_key!r}; found {found}.")
    return np.asarray(d[cam_key]), np.asarray(d["keys"])


def _scores_dict(hist: np.ndarray, class_names) -> Dict[str, Any]:
    out = iou_from_confusion(hist)
    out["per_class"] = _per_class(out["iou"], class_names)
    out["confusion"] = hist
    return out


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _warn_missing(missing: List[Dict[str, str]], what: str) -> None:
    if missing:
        logger.warning("%s: %d image(s) skipped (first: %s: %s)", what, len(missing),
                       missing[0]["path"], missing[0]["reason"])


def evaluate_cams(
    cam_dir: Union[str, os.PathLike],
    gt_dir: Union[str, os.PathLike],
    ids: Sequence[str],
    num_classes: int = 21,
    bg_thresholds: Union[str, float, Sequence[float]] = "auto",
    mode: Optional[str] = None,
    cam_key: str = "attn_highres",
    class_names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Score CLIP-ES CAM files against ground-truth PNGs with upstream's threshold search.

    Reads ``<cam_dir>/<id>.npy`` (pickled dict with ``keys`` and ``cam_key``) and
    ``<gt_dir>/<id>.png`` (stored values = class ids, 255 = void) once each, turns the CAMs into
    labels with :func:`cams_to_label` for every candidate threshold and accumulates one confusion
    matrix per candidate. The best threshold is the first one with a strictly greater mIoU in
    candidate order (upstream's rule).

    Thresholds: ``"auto"`` = upstream's candidates for ``mode`` and the CAM type
    (:func:`auto_thresholds`; power, the default when ``mode`` is None: ``[1, 2]`` for ``'attn'``
    keys such as ``attn_highres``, ``[1, ..., 10]`` for others such as the raw GradCAM
    ``highres``; constant: ``[0.05, 0.10, ..., 0.60]``). A number or a list of numbers is scored
    as given; with ``mode=None`` each value picks its mode by upstream's switch (``< 1`` constant,
    ``>= 1`` power). CAM types whose name contains ``'bg'`` carry their own background plane,
    which upstream scores without a search; they are refused with an error.

    A missing or unreadable CAM/GT file, or a CAM/GT size mismatch, does not stop the run: the
    image is skipped and listed in ``missing`` with the reason (a warning is logged). Unusable,
    and so listed instead of scored: CAMs holding NaN/inf, keys that are not foreground classes
    of the ``num_classes`` label space, and ground truth that is not an 8-bit P/L PNG or holds
    values outside ``0..num_classes - 1`` and 255
    (:func:`vpl_plugin.data.labels.read_label_png`).

    Args:
        cam_dir: directory of ``<id>.npy`` CAM files.
        gt_dir: directory of ``<id>.png`` ground-truth label PNGs (P or L mode).
        ids: image ids.
        num_classes: 21 (VOC) or 81 (COCO).
        bg_thresholds: ``"auto"``, a number, or a sequence of numbers.
        mode: ``"power"``, ``"constant"`` or None (see above).
        cam_key: key of the maps in the CAM dict.
        class_names: names for ``per_class``; default VOC names when ``num_classes == 21``,
            class indices otherwise.
        progress: show a tqdm bar (silently none if tqdm is not installed).

    Returns:
        dict with ``best_threshold``, ``mode`` (of the best), ``miou``, ``iou`` ``(C,)``,
        ``per_class``, ``pixel_accuracy``, ``mean_accuracy``, ``fw_iou``, ``valid``,
        ``confusion`` ``(C, C)`` (all for the best threshold), ``sweep`` ({threshold: mIoU} in
        candidate order), ``modes`` ({threshold: mode}), ``n_images`` (images scored) and
        ``missing`` (list of ``{"id", "path", "reason"}``).
    """
    if "bg" in cam_key:
        raise ValueError(
            f"cam_key {cam_key!r}: CAM types with 'bg' in the name carry their own background plane "
            "(upstream's eval_cam.py scores them without a threshold search); this evaluator adds the "
            "background plane itself. Evaluate a key without a background plane, e.g. 'attn_highres'."
        )
    candidates = _resolve_thresholds(bg_thresholds, mode, cam_key)
    names = _default_class_names(num_classes, class_names)
    cam_dir, gt_dir = Path(cam_dir), Path(gt_dir)
    ids = [str(i) for i in ids]
    hists = [np.zeros((num_classes, num_classes), dtype=np.int64) for _ in candidates]
    missing: List[Dict[str, str]] = []
    n_images = 0
    for img_id in progress_bar(ids, desc="eval cams", enabled=progress):
        cam_path, gt_path = cam_dir / f"{img_id}.npy", gt_dir / f"{img_id}.png"
        if not cam_path.is_file():
            missing.append({"id": img_id, "path": str(cam_path), "reason": "CAM file not found"})
            continue
        if not gt_path.is_file():
            missing.append({"id": img_id, "path": str(gt_path), "reason": "GT file not found"})
            continue
        try:
            cams, keys = _load_cam(cam_path, cam_key)
            cams, keys = check_cams_keys(cams, keys, num_classes, source=cam_path)
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            missing.append({"id": img_id, "path": str(cam_path), "reason": _reason(err)})
            continue
        try:
            gt = read_label_png(gt_path, num_classes, what="ground truth")
        except Exception as err:  # noqa: BLE001
            missing.append({"id": img_id, "path": str(gt_path), "reason": _reason(err)})
            continue
        if cams.shape[1:] != gt.shape:
            missing.append({
                "id": img_id, "path": str(cam_path),
                "reason": (f"CAM size {tuple(cams.shape[1:])} != GT size {tuple(gt.shape)} "
                           f"({gt_path})"),
            })
            continue
        valid = _valid_mask(gt, num_classes, 255)
        gt_v = gt[valid]
        if cams.shape[0] == 0:
            zeros = np.zeros(gt_v.shape, dtype=np.uint8)
            for h in hists:
                h += _hist_from_valid(gt_v, zeros, num_classes)
        else:
            cmax = cams.max(axis=0)[valid]
            fg_label = label_lut(keys)[1:][cams.argmax(axis=0)[valid]]
            for h, (thr, m) in zip(hists, candidates):
                pred_v = _select(cmax, fg_label, _bg_plane(cmax, thr, m))
                h += _hist_from_valid(gt_v, pred_v, num_classes)
        n_images += 1
    _warn_missing(missing, "evaluate_cams")

    sweep: Dict[float, float] = {}
    best = 0
    for i, ((thr, _), h) in enumerate(zip(candidates, hists)):
        sweep[thr] = iou_from_confusion(h)["miou"]
        if sweep[thr] > sweep[candidates[best][0]]:
            best = i
    out = _scores_dict(hists[best], names)
    out.update(
        best_threshold=candidates[best][0],
        mode=candidates[best][1],
        sweep=sweep,
        modes={t: m for t, m in candidates},
        n_images=n_images,
        missing=missing,
    )
    return out


def evaluate_masks(
    mask_dir: Union[str, os.PathLike],
    gt_dir: Union[str, os.PathLike],
    ids: Sequence[str],
    num_classes: int = 21,
    class_names: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Score label PNGs (e.g. CRF pseudo masks) against ground-truth PNGs.

    Prediction value 255 means "no prediction" (the confidence-filtered pixels of a pseudo mask):
    those pixels are **excluded** from the confusion matrix (neither right nor wrong), and
    ``ignored_fraction`` reports their share of the GT-valid pixels. Scoring the raw CRF labels
    as upstream ``--eval_only`` does therefore requires masks written with ``conf=None``.
    Both files are read by :func:`vpl_plugin.data.labels.read_label_png`: a prediction or ground
    truth that is not an 8-bit P/L PNG, or holds a value ``>= num_classes`` other than 255, makes
    the image unusable; it is listed in ``missing`` with the file and the values found.

    Args:
        mask_dir: directory of ``<id>.png`` predicted label PNGs.
        gt_dir: directory of ``<id>.png`` ground-truth PNGs.
        ids: image ids.
        num_classes: 21 (VOC) or 81 (COCO).
        class_names: names for ``per_class`` (default VOC names when ``num_classes == 21``).
        progress: show a tqdm bar.

    Returns:
        dict with ``miou``, ``iou``, ``per_class``, ``pixel_accuracy``, ``mean_accuracy``,
        ``fw_iou``, ``valid``, ``confusion``, ``ignored_fraction``, ``n_images``, ``missing``.
    """
    names = _default_class_names(num_classes, class_names)
    mask_dir, gt_dir = Path(mask_dir), Path(gt_dir)
    ids = [str(i) for i in ids]
    hist = np.zeros((num_classes, num_classes), dtype=np.int64)
    missing: List[Dict[str, str]] = []
    n_images = n_valid = n_ignored = 0
    for img_id in progress_bar(ids, desc="eval masks", enabled=progress):
        pred_path, gt_path = mask_dir / f"{img_id}.png", gt_dir / f"{img_id}.png"
        arrays = []
        for p, what, kind in ((pred_path, "mask", "prediction"), (gt_path, "GT", "ground truth")):
            if not p.is_file():
                missing.append({"id": img_id, "path": str(p), "reason": f"{what} file not found"})
                break
            try:
                arrays.append(read_label_png(p, num_classes, what=kind))
            except Exception as err:  # noqa: BLE001
                missing.append({"id": img_id, "path": str(p), "reason": _reason(err)})
                break
        if len(arrays) != 2:
            continue
        pred, gt = arrays
        if pred.shape != gt.shape:
            missing.append({"id": img_id, "path": str(pred_path),
                            "reason": f"mask size {pred.shape} != GT size {gt.shape} ({gt_path})"})
            continue
        valid = _valid_mask(gt, num_classes, 255)
        no_pred = pred == 255
        n_valid += int(valid.sum())
        n_ignored += int((valid & no_pred).sum())
        keep = valid & ~no_pred
        hist += _hist_from_valid(gt[keep], pred[keep], num_classes)  # values checked on reading
        n_images += 1
    _warn_missing(missing, "evaluate_masks")
    out = _scores_dict(hist, names)
    out.update(
        ignored_fraction=(n_ignored / n_valid) if n_valid else float("nan"),
        n_images=n_images,
        missing=missing,
    )
    return out
