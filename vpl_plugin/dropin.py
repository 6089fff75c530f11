"""VPL as a drop-in for an existing CLIP-ES checkout.

Users who keep upstream's ``generate_cams_voc12.py`` already hold a loaded ``model``, the
``fg_text_features`` ``(N_fg, D)`` / ``bg_text_features`` ``(N_bg, D)`` tensors they pass to
GradCAM, and an image list. Three changed lines give them VPL's paper-literal substitution
(``docs/vpl.md#the-method``):

>>> dp = learn_vision_prototypes_for(  # doctest: +SKIP
...     model, fg_text_features, bg_text_features, samples)
>>> fg_text_features, bg_text_features = dp.fg, dp.bg  # doctest: +SKIP
>>> with use_logit_scale(model, dp.logit_scale):  # doctest: +SKIP
...     perform(...)  # upstream's CAM loop, unchanged

The model is duck-typed: a stock OpenAI ``clip.model.CLIP`` and upstream's modified CLIP (whose
``encode_image(image, H, W)`` returns tokens and attention maps) both work, because only their
modules are used (``visual.conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks``, ``ln_post``, ``proj``, ``logit_scale``), through
:class:`~vpl_plugin.backbones.CLIPDense`. The model's own ``encode_image`` /
``forward_last_layer`` are never called and the model is never modified (parameters, dtype,
device and ``requires_grad`` flags are the same afterwards). Neither ``clip`` nor
``pytorch_grad_cam`` is imported here; :func:`check_imports` says which copies the process has
loaded (upstream's vendored ``clip/`` and ``pytorch_grad_cam/`` folders shadow the pip packages
when a script runs from the checkout).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vpl_plugin._checks import check_choice, check_ndim, check_range, check_same
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.prototypes import PrototypeSet

__all__ = [
    "DropInPrototypes",
    "check_imports",
    "dense_cams_for",
    "learn_vision_prototypes_for",
    "use_logit_scale",
    "vision_logit_scale",
]

_WATCHED = ("clip", "clip.model", "pytorch_grad_cam")


# ------------------------------------------------------------------------------------------------
# Which copies of clip / pytorch_grad_cam are loaded
# ------------------------------------------------------------------------------------------------


def check_imports() -> Dict[str, Optional[str]]:
    """Files of the ``clip``, ``clip.model`` and ``pytorch_grad_cam`` modules loaded in this
    process (``None``: not imported). Nothing is imported here.

    Upstream CLIP-ES ships its own ``clip/`` (a modified CLIP) and ``pytorch_grad_cam/`` folders;
    run from the checkout they shadow OpenAI's ``clip`` and jacobgil's ``pytorch-grad-cam``.

    Example:
        >>> sorted(check_imports())
        ['clip', 'clip.model', 'pytorch_grad_cam']
    """
    out: Dict[str, Optional[str]] = {}
    for name in _WATCHED:
        module = sys.modules.get(name)
        out[name] = None if module is None else getattr(module, "__file__", None) or repr(module)
    return out


def _describe_imports() -> str:
    files = check_imports()
    parts = []
    for name in ("clip", "pytorch_grad_cam"):
        path = files[name]
        if path is None:
            parts.append(f"no '{name}' module is imported")
            continue
        where = ("an installed package" if ("site-packages" in path or "dist-packages" in path)
                 else "a local folder (e.g. CLIP-ES's vendored copy)")
        parts.append(f"'{name}' was imported from {path} ({where})")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Model checks
# ------------------------------------------------------------------------------------------------


def _model_error(what: str) -> TypeError:
    return TypeError(
        f"the model does not look like an OpenAI CLIP ViT (as loaded by CLIP-ES's clip.load): "
        f"{what}. The drop-in needs visual.conv1, visual.class_embedding, "
        f"visual.positional_embedding, visual.ln_pre, visual.transformer.resblocks[i].(ln_1, attn, "
        f"mlp, ln_2, attn_mask), visual.ln_post, visual.proj and logit_scale; ResNet CLIPs (RN50, "
        f"...) have no token grid. Imports: {_describe_imports()}. If the wrong 'clip' was "
        f"imported, check sys.path (CLIP-ES's vendored clip/ folder shadows OpenAI's package when "
        f"the script runs from the checkout)."
    )


def _check_model(model: Any) -> None:
    visual = getattr(model, "visual", None)
    if visual is None:
        raise _model_error(f"{type(model).__name__} has no .visual")
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
                 "ln_post", "proj"):
        if getattr(visual, name, None) is None:
            raise _model_error(f"model.visual.{name} is missing")
    blocks = getattr(visual.transformer, "resblocks", None)
    if blocks is None or len(blocks) < 2:
        raise _model_error("model.visual.transformer.resblocks is missing or has < 2 blocks")
    for name in ("ln_1", "attn", "mlp", "ln_2"):
        if getattr(blocks[-1], name, None) is None:
            raise _model_error(f"model.visual.transformer.resblocks[-1].{name} is missing")
    if not hasattr(blocks[-1], "attn_mask"):
        raise _model_error("model.visual.transformer.resblocks[-1].attn_mask is missing")
    if not isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        raise _model_error("model.logit_scale is missing (CLIP's learned log temperature)")


def _model_state(model: torch.nn.Module) -> List[Tuple[str, torch.dtype, torch.device, bool, int]]:
    return [(n, p.dtype, p.device, p.requires_grad, p.data_ptr())
            for n, p in model.named_parameters()]


# ------------------------------------------------------------------------------------------------
# Logit scale
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def use_logit_scale(model: Any, scale: float) -> Iterator[Any]:
    """Make ``model.logit_scale.exp()`` equal ``scale`` inside the block; restore it afterwards.

    CLIP-ES multiplies the normalised image feature by ``model.logit_scale.exp()`` (about 100);
    vision prototypes need ``1/tau_I`` (33.33 for ``tau_I = 0.03``). The parameter's data is
    replaced by ``log(scale)`` in its own dtype (fp32 in CLIP), nudged by an ulp or two when the
    device's ``exp`` would otherwise not return exactly ``float32(scale)``; on exit (also on an
    exception) the original tensor object is put back, bit for bit.

    Args:
        model: a CLIP model (anything with a ``logit_scale`` tensor).
        scale: the scale ``exp(logit_scale)`` must give, e.g. :attr:`DropInPrototypes.logit_scale`.

    Example:
        >>> from types import SimpleNamespace
        >>> m = SimpleNamespace(logit_scale=torch.nn.Parameter(torch.tensor(4.6052)))
        >>> with use_logit_scale(m, 33.333335876464844):
        ...     print(f"{float(m.logit_scale.exp()):.4f}")
        33.3333
        >>> round(float(m.logit_scale), 4)
        4.6052
    """
    param = getattr(model, "logit_scale", None)
    if not isinstance(param, torch.Tensor):
        raise _model_error("model.logit_scale is missing (CLIP's learned log temperature)")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (e.g. 1/tau_I); got {scale}.")
    original = param.data
    new = _log_for_scale(scale, original)
    got = float(new.exp().float().reshape(()))
    if got != float(torch.tensor(scale, dtype=torch.float32)):
        warnings.warn(f"no {original.dtype} value of model.logit_scale gives exactly {scale!r} "
                      f"through exp() on {original.device}; using the closest, {got!r}. Pass a "
                      f"DropInPrototypes.logit_scale (always exact).", RuntimeWarning, stacklevel=3)
    param.data = new
    try:
        yield model
    finally:
        param.data = original


def _log_for_scale(scale: float, like: torch.Tensor) -> torch.Tensor:
    """The value ``v`` (dtype / device / shape of ``like``) within 4 ulps of ``log(scale)`` whose
    ``exp`` on that device is exactly ``float32(scale)``, else the closest one."""
    target = torch.tensor(scale, dtype=torch.float32)
    v = torch.tensor(math.log(scale), dtype=like.dtype, device=like.device)
    cands = [v]
    up, down = v, v
    for _ in range(4):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        cands += [up, down]
    cands_t = torch.stack(cands)
    err = (cands_t.exp().float().cpu() - target).abs()
    best = int(torch.argmin(err))  # first minimum: the plain log when it is exact
    return cands_t[best].reshape(like.shape).clone()


def vision_logit_scale(model: Any, prototypes: "DropInPrototypes") -> ContextManager[None]:
    """``use_logit_scale(model, prototypes.logit_scale)``: the scale that goes with ``prototypes``.

    Example:
        >>> with vision_logit_scale(model, dp):  # doctest: +SKIP
        ...     perform(...)
    """
    return use_logit_scale(model, prototypes.logit_scale)


def _scale_for_tau(tau: float) -> float:
    """The fp32 ``exp(fp32(log(1/tau)))``: exactly what ``logit_scale.exp()`` gives after
    :func:`use_logit_scale` sets it."""
    return float(torch.tensor(math.log(1.0 / tau), dtype=torch.float32).exp())


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------


@dataclass
class DropInPrototypes:
    """Vision prototypes shaped like the text features a CLIP-ES script passes to GradCAM.

    Attributes:
        fg: ``(N_fg, D)`` foreground prototypes, dtype and device of ``fg_text_features``.
        bg: ``(N_bg, D)`` background prototypes, dtype and device of ``bg_text_features``.
        tau: ``tau_I`` the prototypes were learned with.
        logit_scale: the fp32 scale GradCAM must use with them (``1/tau_I`` as
            ``model.logit_scale.exp()`` gives it inside :func:`use_logit_scale`), a Python float.
        history: the optimisation history of :func:`~vpl_plugin.learn_vision_prototypes`.
        provenance: settings and counts (plain values).
    """

    fg: torch.Tensor
    bg: torch.Tensor
    tau: float
    logit_scale: float
    history: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)

    def to_prototype_set(self, class_names: Sequence[str],
                         background_names: Sequence[str]) -> PrototypeSet:
        """A :class:`~vpl_plugin.PrototypeSet` holding exactly ``fg`` / ``bg`` (as fp32) with
        ``logit_scale_override = logit_scale``, so ``vpl cams --prototypes`` uses the same scale.

        Args:
            class_names: the ``N_fg`` class names (VOC: ``vpl_plugin.VOC.names``).
            background_names: the ``N_bg`` background concepts (VOC: ``vpl_plugin.VOC.background``).
        """
        if isinstance(class_names, str) or isinstance(background_names, str):
            raise TypeError("class_names and background_names must be sequences of names.")
        check_same("len(class_names)", len(class_names), "fg.shape[0]", self.fg.shape[0])
        check_same("len(background_names)", len(background_names), "bg.shape[0]", self.bg.shape[0])
        protos = torch.cat([self.fg.detach().float().cpu(), self.bg.detach().float().cpu()], dim=0)
        return PrototypeSet(protos, class_names, background_names, tau=self.tau, kind="vision",
                            provenance=dict(self.provenance), logit_scale_override=self.logit_scale)

    def save(self, path: Union[str, os.PathLike], class_names: Sequence[str],
             background_names: Sequence[str]) -> None:
        """Write :meth:`to_prototype_set` atomically (readable by ``vpl cams --prototypes``)."""
        self.to_prototype_set(class_names, background_names).save(path)


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------


def _model_device(model: Any) -> torch.device:
    return model.visual.conv1.weight.device


def _open_image(image: Any, where: str):
    from vpl_plugin.data.voc import load_image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "size") and hasattr(image, "resize") and hasattr(image, "convert"):
        return image
    raise TypeError(f"{where}: the image must be a PIL image or a path; got "
                    f"{type(image).__name__}.")


def _labels(labels: Any, num_fg: int, where: str, rows: str = "fg_text_features") -> List[int]:
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    try:
        out = [int(c) for c in labels]
    except TypeError:
        raise TypeError(f"{where}: labels must be a list of 0-based foreground class "
                        f"indices; got {labels!r}.") from None
    bad = [c for c in out if not 0 <= c < num_fg]
    if bad:
        raise ValueError(f"{where}: labels {bad} are outside 0..{num_fg - 1} "
                         f"({rows} has {num_fg} rows; labels are 0-based).")
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: labels {out} repeat a class; give each class once "
                         f"(CLIP-ES's label_id_list).")
    return out


def learn_vision_prototypes_for(
    model: Any,
    fg_text_features: torch.Tensor,
    bg_text_features: torch.Tensor,
    samples: Iterable[Tuple[Any, Sequence[int]]],
    *,
    tau: Union[float, str] = 0.03,
    lr: float = 10.0,
    iters: int = 3000,
    phi: float = 0.4,
    target_mode: str = "seed_hardened",
    pooling: str = "token",
    step_rule: Optional[str] = None,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    exact_fp32: bool = False,
    flush_subnormals: bool = True,
) -> DropInPrototypes:
    """Learn VPL vision prototypes from a CLIP-ES script's own model, text features and images.

    For each image: text GradCAMs of its classes with the stacked ``[fg[labels]; bg]`` features
    and the model's exact fp32 ``logit_scale.exp()`` (one trunk forward, one backward, as
    :func:`vpl_plugin.cam.image_gradcams`), then seeds and targets
    (:func:`~vpl_plugin.build_targets` or :func:`~vpl_plugin.prototypes.region_pool`); finally
    :func:`~vpl_plugin.pipeline.learn_from_text_prototypes` (projected gradient descent from the
    text features).

    Args:
        model: OpenAI CLIP ViT or CLIP-ES's modified CLIP (only its modules are used; the model is
            not modified).
        fg_text_features: ``(N_fg, D)`` as built by the script (fp16 on GPU, fp32 on CPU).
        bg_text_features: ``(N_bg, D)``.
        samples: iterable of ``(image, labels)``; image a PIL image or a path, labels 0-based
            foreground indices (CLIP-ES's ``label_id_list``).
        tau: ``tau_I`` (paper 0.03), or ``"clip"`` (CLIP's own temperature: with ``iters=0`` the
            result reproduces the text CAMs exactly).
        lr, iters, step_rule: optimisation (see :func:`~vpl_plugin.learn_vision_prototypes`).
        phi: seed threshold on the text GradCAMs.
        target_mode: ``seed_hardened`` / ``inmap`` / ``cam`` / ``kl`` (see ``build_targets``).
        pooling: ``token`` (paper: one row per patch token) or ``region``.
        progress: progress bars (tqdm, when installed).
        device: where the prototypes are optimised (default: the model's device).
        exact_fp32: GradCAMs with the model's exact fp32 weights and an fp32 positional table
            (``--exact-fp32`` of ``vpl``). By default they use upstream CLIP-ES's numerics, as the
            script's own CAM loop does: fp16 positional table, fp16-rounded weights (a model from
            ``clip.load`` already has them), and on CUDA upstream's fp16 GradCAM arithmetic.
        flush_subnormals: on the CPU, GradCAMs flush subnormal floats to zero (several times
            faster with peaked attention, within one fp16 step of IEEE arithmetic;
            ``--keep-subnormals`` of ``vpl``, see :class:`~vpl_plugin.backbones.CLIPDense`).

    Returns:
        :class:`DropInPrototypes` whose ``fg`` / ``bg`` have the shapes, dtypes and devices of the
        inputs; use them with ``use_logit_scale(model, dp.logit_scale)``.

    Raises:
        TypeError: the model lacks a CLIP ViT module (the message names the loaded ``clip``).
        ValueError: bad shapes, labels or settings.
    """
    from vpl_plugin.backbones.clip import CLIPDense
    from vpl_plugin.cam import image_gradcams
    from vpl_plugin.pipeline import assemble_learning_set, learn_from_text_prototypes, learning_rows

    _check_model(model)
    check_ndim("fg_text_features", fg_text_features, 2, "(N_fg, D)")
    check_ndim("bg_text_features", bg_text_features, 2, "(N_bg, D)")
    check_same("bg_text_features.shape[1]", bg_text_features.shape[1], "fg_text_features.shape[1]",
               fg_text_features.shape[1])
    if bg_text_features.shape[0] == 0:
        raise ValueError("bg_text_features has no rows; VPL's targets need background concepts.")
    check_same("fg_text_features.shape[1]", fg_text_features.shape[1], "model.visual.proj.shape[1]",
               int(model.visual.proj.shape[1]),
               "The text features must come from the same CLIP model.")
    check_range("phi", phi, 0.0)
    check_choice("pooling", pooling, ("token", "region"))
    if isinstance(tau, str) and tau != "clip":
        raise ValueError(f"tau must be a positive number or 'clip'; got {tau!r}.")
    if not isinstance(tau, str):
        check_range("tau", float(tau), 0.0, low_open=True)

    before = _model_state(model) if isinstance(model, torch.nn.Module) else None
    dev = _model_device(model)
    # on the model's own device and with upstream's rounding (what clip.load gives) CLIPDense uses
    # the model as it is; any conversion happens on a copy
    encoder = CLIPDense(model, device=dev, exact_fp32=exact_fp32, flush_subnormals=flush_subnormals)
    scale = encoder.logit_scale  # exact fp32 exp of the model's parameter, computed on its device
    num_fg = int(fg_text_features.shape[0])
    text_rows = torch.cat([fg_text_features.detach().float().cpu(),
                           bg_text_features.detach().float().cpu()], dim=0)
    text = PrototypeSet(text_rows, [f"fg{i}" for i in range(num_fg)],
                        [f"bg{i}" for i in range(bg_text_features.shape[0])],
                        tau=1.0 / float(scale), kind="text", logit_scale_override=float(scale))
    tau_text = 1.0 / float(scale)

    records: Dict[str, Dict[str, Any]] = {}
    for index, sample in enumerate(progress_bar(samples, desc="vpl features", enabled=progress)):
        try:
            image, labels = sample
        except (TypeError, ValueError):
            raise TypeError(f"samples[{index}] must be an (image, labels) pair; got "
                            f"{type(sample).__name__}.") from None
        labels = _labels(labels, num_fg, f"samples[{index}]")
        x, _ = encoder.preprocess(_open_image(image, f"samples[{index}]"))
        idx = torch.as_tensor(labels, dtype=torch.long)
        stacked = torch.cat([text.fg[idx], text.bg], dim=0)
        result = image_gradcams(encoder, x, stacked, list(range(len(labels))), scale)
        rec = learning_rows(result.features, result.cams.reshape(len(labels), -1).float(), idx, text,
                            phi=phi, target_mode=target_mode, candidates="image", pooling=pooling,
                            tau_text=tau_text)
        if rec["features"].shape[0]:
            name = str(image) if isinstance(image, (str, os.PathLike)) else f"sample{index}"
            records[f"{index}:{name}"] = rec
    if not records:
        raise ValueError("samples is empty: give at least one (image, labels) pair.")
    lset = assemble_learning_set(records, text.prototypes.shape, None, False)
    provenance = {"source": "vpl_plugin.dropin", "phi": float(phi), "target_mode": target_mode,
                  "pooling": pooling, "model_class": type(model).__name__,
                  "clip_module": check_imports()["clip"]}
    ps, history = learn_from_text_prototypes(text, lset, tau=tau, lr=lr, iters=iters,
                                             step_rule=step_rule,
                                             device=device if device is not None else dev,
                                             progress=progress, provenance=provenance)
    if before is not None and _model_state(model) != before:  # pragma: no cover - a bug guard
        raise RuntimeError("internal error: learn_vision_prototypes_for changed the model.")
    logit_scale = float(scale) if tau == "clip" else _scale_for_tau(float(tau))
    history = {k: v for k, v in history.items()}
    return DropInPrototypes(
        fg=ps.fg.clone().to(device=fg_text_features.device, dtype=fg_text_features.dtype),
        bg=ps.bg.clone().to(device=bg_text_features.device, dtype=bg_text_features.dtype),
        tau=float(ps.tau), logit_scale=logit_scale, history=history,
        provenance=dict(ps.provenance))


# ------------------------------------------------------------------------------------------------
# The recommended configuration: dense per-token maps, no refinement
# ------------------------------------------------------------------------------------------------


def dense_cams_for(model: Any, image: Any, labels: Sequence[int], prototypes: DropInPrototypes, *,
                   image_features: Optional[torch.Tensor] = None) -> Dict[str, np.ndarray]:
    """One image's CAMs in the recommended VPL configuration, as upstream's ``.npy`` dict.

    The map of class ``c`` is the per-token posterior of ``c`` among the image's classes and the
    background concepts under the vision prototypes at ``prototypes.logit_scale``, min-max
    normalised and resized to the image (``docs/vpl.md#the-recommended-configuration``): no
    GradCAM and no attention-affinity refinement. It equals ``vpl cams --prototypes P
    --map-mode dense --no-refine`` with ``P`` saved by ``prototypes.save(...)`` on the same
    weights (tested within one fp16 step). Learn the prototypes as recommended with
    ``learn_vision_prototypes_for(..., tau=0.1, pooling="region")``.

    Args:
        model: the script's CLIP (upstream's modified CLIP or a stock OpenAI CLIP ViT); used
            through its modules only, never modified, no gradient is written.
        image: the original image (PIL image or path); it gives the output size and, without
            ``image_features``, the model input (upstream's preprocessing: bicubic resize to
            multiples of the patch size, RGB, CLIP normalisation).
        labels: 0-based foreground class indices (upstream's ``label_id_list``).
        prototypes: :class:`DropInPrototypes` from :func:`learn_vision_prototypes_for`.
        image_features: optional, the trunk tokens ``(1 + h*w, 1, width)`` the script already has
            from ``model.encode_image(image, H, W)``; then only the last block runs here.

    Returns:
        ``{"keys": (k,) int64, "attn_highres": (k, H0, W0) float16}``: pass it to ``np.save`` as
        upstream does, and its ``eval_cam.py`` and CRF scripts read the file.

    Raises:
        TypeError: the model lacks a CLIP ViT module, or the image is neither a PIL image nor a
            path.
        ValueError: labels outside the prototype rows or repeated, or ``image_features`` of
            another shape than the image's token grid gives.

    Example:
        >>> out = dense_cams_for(model, image_path, label_id_list, dp)  # doctest: +SKIP
        >>> np.save(os.path.join(args.cam_out_dir, image_id + '.npy'), out)  # doctest: +SKIP
    """
    from vpl_plugin.backbones.clip import CLIPDense
    from vpl_plugin.cam import dense_maps, resize_maps

    _check_model(model)
    labels = _labels(labels, int(prototypes.fg.shape[0]), "dense_cams_for", "prototypes.fg")
    # on the model's own device and with upstream's rounding (what clip.load gives) CLIPDense uses
    # the model as it is (checked once per model); any conversion happens on a copy
    encoder = CLIPDense(model, device=_model_device(model))
    x, size = encoder.preprocess(_open_image(image, "dense_cams_for"))
    p = encoder.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    if image_features is None:
        tokens, _ = encoder.trunk(x[None], keep_attention=1)
    else:
        want = (1 + grid[0] * grid[1], 1, encoder.width)
        if tuple(image_features.shape) != want:
            raise ValueError(f"image_features has shape {tuple(image_features.shape)}; this image "
                             f"({size[1]}x{size[0]}, a {grid[0]}x{grid[1]} token grid) needs the "
                             f"trunk tokens {want} that model.encode_image(image, H, W) returns "
                             f"for it.")
        tokens = image_features.detach().to(encoder.device)
    keys = np.asarray(labels, dtype=np.int64)
    if not labels:
        return {"keys": keys, "attn_highres": np.zeros((0, *size), dtype=np.float16)}
    features = encoder.last_block(tokens).patch_features[0].detach().float()
    features = (features / features.norm(dim=-1, keepdim=True)).cpu()
    idx = torch.as_tensor(labels, dtype=torch.long)
    fg = prototypes.fg.detach().float().cpu()
    stacked = torch.cat([fg[idx], prototypes.bg.detach().float().cpu()], dim=0)
    maps = dense_maps(features, stacked, len(labels), grid, prototypes.logit_scale)
    return {"keys": keys, "attn_highres": resize_maps(maps, size).astype(np.float16)}
