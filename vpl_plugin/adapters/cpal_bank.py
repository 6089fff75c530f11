"""CLIP-CPAL's pass 1 over a dataset: the context bank (``docs/clip_cpal.md#pass-1-the-context-bank``).

:func:`build_context_bank` runs an adapter's ``pass_one`` over every image of a dataset and turns
the records into a :class:`~vpl_plugin.cpal.ContextBank` (spherical k-means per class, or the
trained CAM head). It is resumable: the records are saved to ``partial`` as it goes, and a resume
file made under other settings is ignored.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Protocol, Sequence, Union

import torch

from vpl_plugin._checks import check_settings
from vpl_plugin._io import atomic_path
from vpl_plugin._unpickle import check_tensor_sizes
from vpl_plugin.cpal import ContextBank, head_cams, instance_prototypes, plain_settings, train_cam_head

if TYPE_CHECKING:
    from vpl_plugin.data.voc import SampleDataset
    from vpl_plugin.pipeline import RunSummary

__all__ = ["ContextBankSource", "build_context_bank"]

log = logging.getLogger("vpl_plugin")


# -- pass 1 over a dataset --------------------------------------------------------------------------
def _sample_image(dataset, sample):
    image = getattr(sample, "image", None)
    if image is not None:
        return image
    from vpl_plugin.data.voc import sample_image

    return sample_image(dataset, sample)  # the dataset's pixel limit


def _read_partial(path: Path) -> Optional[Dict[str, Any]]:
    """The resume state in ``path``, or None (with a warning naming it) if it cannot be used.

    A file that does not load or lacks the expected structure (a crash mid-copy, a foreign file)
    is ignored and the bank is rebuilt from the start; it is overwritten at the next checkpoint.
    """
    try:
        state = check_tensor_sizes(torch.load(path, map_location="cpu", weights_only=True), path,
                                   "context-bank resume file")
        ok = (isinstance(state, dict) and isinstance(state.get("settings"), dict)
              and isinstance(state.get("ids"), list) and isinstance(state.get("records"), list)
              and len(state["ids"]) == len(state["records"])
              and all(isinstance(r, dict) for r in state["records"]))
        problem = "" if ok else "not a context-bank resume file (unexpected contents)"
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        problem = f"{type(err).__name__}: {err}"
    if problem:
        log.warning("ignoring the resume file %s and starting over: %s", path, problem)
        return None
    return state


class ContextBankSource(Protocol):
    """What :func:`build_context_bank` uses of an adapter (``CLIPCPALAdapter`` provides it).

    Written as a protocol so that this module of tensor functions does not depend on the adapter
    layer above it.
    """

    config: Any
    class_spec: Any

    @property
    def dense_dim(self) -> int: ...  # noqa: D102

    @property
    def num_context(self) -> int: ...  # noqa: D102

    def bank_settings(self) -> Dict[str, Any]: ...  # noqa: D102

    def pass_one(self, image: Any, labels: Sequence[int]) -> Any: ...  # noqa: D102


def build_context_bank(adapter: ContextBankSource, dataset: "SampleDataset", *, limit: Optional[int] = None,
                       progress: bool = True,
                       partial: Optional[Union[str, os.PathLike]] = None, checkpoint_every: int = 100,
                       summary: Optional["RunSummary"] = None) -> ContextBank:
    """Pass 1 of CLIP-CPAL: instance prototypes of every image of ``dataset``, then k-means.

    With ``adapter.config.head`` (``docs/clip_cpal.md#the-trained-head-alternative``) it keeps every
    image's
    dense features in memory (and in the resume file), trains the CAM head on them
    (:func:`train_cam_head`) and builds the bank from the head's CAMs; the head is stored in the bank.

    Args:
        adapter: a :class:`~vpl_plugin.adapters.clip_cpal.CLIPCPALAdapter` (its GradCAM prototypes,
            map mode and CPAL settings define the bank).
        dataset: indexable of samples with ``labels`` and either ``image`` (a PIL image) or
            ``image_path``; ``dataset.ids`` names them (else their indices).
        limit: only the first ``limit`` samples.
        partial: resume file: the instance prototypes gathered so far are written there every
            ``checkpoint_every`` images (atomically) and a rerun continues from it; it is removed
            when the bank is complete. A resume file of other settings is refused; one that
            cannot be read is ignored with a warning naming it (the bank is rebuilt).
        summary: a :class:`~vpl_plugin.pipeline.RunSummary` to fill (counts, skipped images).

    Returns:
        The :class:`ContextBank` (``adapter.set_bank`` it, or save it).
    """
    from vpl_plugin._progress import progress as progress_bar
    from vpl_plugin.pipeline import RunSummary, failure_text

    summary = summary if summary is not None else RunSummary()
    cfg = adapter.config
    settings = adapter.bank_settings()
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    ids = list(getattr(dataset, "ids", [str(i) for i in range(len(dataset))]))[:n]
    done: Dict[str, Dict[str, torch.Tensor]] = {}
    partial_path = Path(partial) if partial is not None else None
    state = _read_partial(partial_path) if partial_path is not None and partial_path.is_file() else None
    if state is not None:
        check_settings(state.get("settings", {}), plain_settings(settings),
                       f"resume file {partial_path} was written under other settings", "delete it to start over.",
                       item="{key}: {then!r} there, {now!r} now")
        for image_id, record in zip(state["ids"], state["records"]):
            done[image_id] = record
        log.info("cpal bank: resuming from %s (%d images done)", partial_path, len(done))

    def save_partial() -> None:
        if partial_path is None:
            return
        keys = list(done)
        with atomic_path(partial_path) as tmp:
            torch.save({"settings": plain_settings(settings), "ids": keys, "records": [done[k] for k in keys]}, tmp)

    summary.total = n
    start = time.time()
    since = 0
    for i in progress_bar(range(n), desc="cpal bank", enabled=progress):
        image_id = ids[i]
        if image_id in done:
            summary.skipped_existing += 1
            continue
        sample = None
        try:
            sample = dataset[i]
            record = adapter.pass_one(_sample_image(dataset, sample), sample.labels)
        except Exception as err:  # noqa: BLE001 - any per-image failure is recorded, the run goes on
            summary.failed.append((image_id, failure_text(err, getattr(sample, "image_path", None))))
            continue
        done[image_id] = record
        summary.done += 1
        since += 1
        if since >= checkpoint_every:
            save_partial()
            since = 0
    summary.seconds = time.time() - start
    order = [i for i in ids if i in done]
    records = [done[i] for i in order]
    dim = adapter.dense_dim
    num_classes = len(adapter.class_spec.names)
    head = None
    if cfg.head:
        if not records:
            raise ValueError("the trained CAM head needs at least one readable image with labels.")
        tokens = [r["tokens"] for r in records]
        labels = [r["labels"].tolist() for r in records]
        grids = [tuple(r["grid"].tolist()) for r in records]
        pacam = {"candidates": cfg.candidates, "k": cfg.neighbours, "tau": cfg.tau_s, "gamma": cfg.gamma,
                 "delta_p": cfg.delta_p, "fusion": cfg.fusion, "num_context": adapter.num_context}
        head, _ = train_cam_head(tokens, labels, num_classes, iters=cfg.head_iters, lr=cfg.head_lr,
                                 lambda_self=cfg.head_lambda, grid=grids, pacam=pacam)
        records = []
        for x, lab, g in zip(tokens, labels, grids):
            p = instance_prototypes(x, head_cams(x, head)[lab].reshape(len(lab), *g), cfg.delta_p)
            keep = p.norm(dim=1) > 0
            records.append({"protos": p[keep], "classes": torch.as_tensor(lab, dtype=torch.long)[keep]})
    protos = torch.cat([r["protos"] for r in records]) if records else torch.zeros(0, dim)
    classes = torch.cat([r["classes"] for r in records]) if records else torch.zeros(0, dtype=torch.long)
    bank = ContextBank.from_instances(protos, classes, num_classes,
                                      num_context=adapter.num_context, kmeans_iters=cfg.kmeans_iters,
                                      kmeans_seed=cfg.kmeans_seed, settings=settings, ids=order, head=head)
    if partial_path is not None and partial_path.exists():
        partial_path.unlink()
    return bank
