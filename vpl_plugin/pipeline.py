"""Dataset-level stages: CAM generation, VPL learning-set collection and prototype learning.

Each stage is resumable and never loses finished work: CAM files are written atomically and a
rerun skips images whose file exists and is complete (an empty or truncated one is recomputed);
a per-image failure of any kind (unreadable or oversized image, missing annotation, unknown class,
out of memory) is recorded with the file and the reason (``TypeName: message``), and the run goes
on with the rest. Only an interruption (Ctrl-C, ``SystemExit``) stops it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vpl_plugin._checks import check_positive, describe_diff, settings_diff
from vpl_plugin._io import atomic_path
from vpl_plugin._progress import progress as progress_bar
from vpl_plugin.data.cam_files import write_cam_file
from vpl_plugin.data.voc import SampleDataset, sample_image
from vpl_plugin.prototypes import (ChunkShare, NonFiniteRowsError, PrototypeSet, build_targets,
                                   learn_vision_prototypes, region_pool, seeds_from_cams)

if TYPE_CHECKING:  # the adapters import this module's callers; the contract is needed for types only
    from vpl_plugin.adapters.base import CAMAdapter

__all__ = ["RunSummary", "chunk_pieces", "collect_learning_set", "generate_cams", "learn_from_dataset",
           "learn_from_text_prototypes", "learning_rows", "LearningSet", "merge_summaries",
           "subsample_rows"]

log = logging.getLogger(__name__)

_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_STOP = b"."  # the last byte of every pickle stream


@dataclass
class RunSummary:
    """What a dataset stage did: counts and the images it had to skip, with reasons."""

    total: int = 0
    done: int = 0
    skipped_existing: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "done": self.done, "skipped_existing": self.skipped_existing,
                "failed": [{"id": i, "reason": r} for i, r in self.failed], "seconds": round(self.seconds, 2)}

    def line(self) -> str:
        return (f"{self.done} done, {self.skipped_existing} already there, {len(self.failed)} failed "
                f"of {self.total} in {self.seconds:.1f} s")


def merge_summaries(parts: Sequence[RunSummary], ids: Sequence[str]) -> RunSummary:
    """One summary from the per-rank summaries of a sharded run (counts summed, the wall time of
    the slowest rank, failures in list order, so the merged summary lists them as a one-process
    run over ``ids`` would).

    Example:
        >>> a = RunSummary(total=2, done=1, failed=[("y", "bad")], seconds=2.0)
        >>> b = RunSummary(total=1, done=1, seconds=3.0)
        >>> merge_summaries([a, b], ["x", "y", "z"]).line()
        '2 done, 0 already there, 1 failed of 3 in 3.0 s'
    """
    position = {image_id: i for i, image_id in enumerate(ids)}
    failed = [f for part in parts for f in part.failed]
    failed.sort(key=lambda f: position.get(f[0], len(position)))
    return RunSummary(total=sum(p.total for p in parts), done=sum(p.done for p in parts),
                      skipped_existing=sum(p.skipped_existing for p in parts), failed=failed,
                      seconds=max((p.seconds for p in parts), default=0.0))


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


def failure_text(err: BaseException, path: Any = None) -> str:
    """``TypeName: message`` of a per-image failure, with the image file when it is not named."""
    text = f"{type(err).__name__}: {err}"
    if path is not None and str(path) not in text:
        text += f" (image {path})"
    return text


def _incomplete_npy(path: Path) -> Optional[str]:
    """Why an existing ``.npy`` output cannot be trusted as done, or None if it looks complete.

    Cheap (a header read and the last byte): empty file, no ``.npy`` magic, unreadable header,
    or a pickled (object) array whose pickle stream lacks its final STOP byte (a truncated copy).
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as fh:
            if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                return "not a .npy file (no magic bytes)"
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(fh)
            if header[2].hasobject:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != _PICKLE_STOP:
                    return "truncated (the pickled data does not end)"
    except (OSError, ValueError) as err:
        return f"unreadable header ({err})"
    return None


def generate_cams(adapter: CAMAdapter, dataset: SampleDataset, out_dir: Union[str, os.PathLike], *,
                  limit: Optional[int] = None, skip_existing: bool = True, progress: bool = True, rank: int = 0,
                  world_size: int = 1, batch_size: int = 1) -> RunSummary:
    """Write ``<out_dir>/<id>.npy`` (upstream CLIP-ES format) for every image of ``dataset``.

    Args:
        adapter: a :class:`~vpl_plugin.adapters.CAMAdapter`: called once per image, or through
            ``call_batch`` when its ``supports_batch`` is true and ``batch_size > 1``.
        dataset: a :class:`~vpl_plugin.data.voc.SampleDataset` (``VOCDataset``, ``COCODataset``). Its
            ``max_pixels`` (``VOCDataset(..., max_pixels=N)``; default
            :data:`~vpl_plugin.data.voc.DEFAULT_MAX_PIXELS`) refuses larger images by name before
            they are decoded (:func:`~vpl_plugin.data.voc.sample_image`).
        limit: only the first ``limit`` images of the list.
        skip_existing: resume: images whose output exists are not recomputed (an empty or
            truncated output file is logged and recomputed).
        rank, world_size: process only every ``world_size``-th image starting at ``rank``.
        batch_size: with an adapter whose ``supports_batch`` is true (CLIP-ES), images of equal
            preprocessed size are gathered (in list order, per size) into batches of up to this many
            and run together; meant for GPUs. At most ``4 * batch_size`` images wait for a full
            batch (then the oldest group runs as it is). A batch that fails is retried image by
            image, so a bad image is reported alone.

    Returns:
        The :class:`RunSummary`. A failure of any kind for one image (``DatasetError``,
        ``MemoryError``, an allocator's ``RuntimeError``, ...) is listed in ``failed`` as
        ``(id, "TypeName: message")`` naming the image file, and the run goes on; only
        ``KeyboardInterrupt``/``SystemExit`` stop it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = _shard(n, rank, world_size)
    summary = RunSummary(total=len(indices))
    start = time.time()
    batched = batch_size > 1 and adapter.supports_batch
    pending: Dict[Tuple[int, int], List[Tuple[str, Any, Any]]] = {}

    def run(items: List[Tuple[str, Any, Any]]) -> None:
        outs = None
        if len(items) > 1:
            try:
                outs = adapter.call_batch([im for _, im, _ in items], [s.labels for _, _, s in items])
            except Exception:  # noqa: BLE001 - retried one by one below, so the failing image is named alone
                outs = None
        for j, (image_id, image, sample) in enumerate(items):
            try:
                out = outs[j] if outs is not None else adapter(image, sample.labels)
            except Exception as err:  # noqa: BLE001 - any per-image failure is recorded, the run goes on
                summary.failed.append((image_id, failure_text(err, sample.image_path)))
                continue
            write_cam_file(out_dir / f"{image_id}.npy", out.to_upstream())
            summary.done += 1

    bar = progress_bar(total=len(indices), desc="cams", enabled=progress)

    def tick(k: int = 1) -> None:
        if bar is not None:
            bar.update(k)

    for i in indices:
        image_id = dataset.ids[i]
        if skip_existing and _done_already(out_dir / f"{image_id}.npy"):
            summary.skipped_existing += 1
            tick()
            continue
        sample = None
        try:
            sample = dataset[i]
            image = sample_image(dataset, sample)
        except Exception as err:  # noqa: BLE001 - any per-image failure is recorded, the run goes on
            summary.failed.append((image_id, failure_text(err, getattr(sample, "image_path", None))))
            tick()
            continue
        if not batched:
            run([(image_id, image, sample)])
            tick()
            continue
        key = adapter.encoder.padded_size(image.size[1], image.size[0])
        pending.setdefault(key, []).append((image_id, image, sample))
        if len(pending[key]) >= batch_size:
            run(pending.pop(key))
            tick(batch_size)
        elif sum(len(v) for v in pending.values()) > 4 * batch_size:
            # many distinct sizes: bound the images held in memory by running the oldest group
            items = pending.pop(next(iter(pending)))
            run(items)
            tick(len(items))
    for items in pending.values():
        run(items)
        tick(len(items))
    if bar is not None:
        bar.close()
    summary.seconds = time.time() - start
    return summary


def _done_already(path: Path) -> bool:
    """Whether a CAM output exists and is complete; an incomplete one is logged and redone."""
    if not path.exists():
        return False
    problem = _incomplete_npy(path)
    if problem is None:
        return True
    log.warning("recomputing %s: the existing file cannot be a finished CAM file (%s)", path, problem)
    return False


@dataclass
class LearningSet:
    """Pixel features, targets and candidates of VPL phase 1.

    See ``docs/vpl.md#pixel-features`` and ``docs/vpl.md#targets``.

    Attributes:
        features: ``(K, D)`` float32 tensor, or a float16 ``np.memmap`` for large sets.
        targets: ``(K, N)`` float32 tensor or float32 ``np.memmap``.
        candidates: ``(K, N)`` bool tensor or ``np.memmap``.
        seeds: ``(K,)`` seed labels (0 background, ``c + 1`` for class ``c``), for the gap measure.
        sizes: pixels per image, in the order of ``ids``.
        ids: image ids.
        offsets: per entry of ``ids``, its first row within the image (all 0 unless the set is a
            chunk share, whose first and last image may be cut).
        chunk_size: set when the rows are this process's chunks of a set shared chunk by chunk
            (:class:`~vpl_plugin.prototypes.ChunkShare`), of this many rows.
        total_images, total_pixels: of the whole shared set (chunk shares only).
    """

    features: Any
    targets: Any
    candidates: Any
    seeds: torch.Tensor
    sizes: List[int]
    ids: List[str]
    offsets: Optional[List[int]] = None
    chunk_size: Optional[int] = None
    total_images: Optional[int] = None
    total_pixels: Optional[int] = None

    @property
    def num_pixels(self) -> int:
        return int(sum(self.sizes))


def learning_rows(features: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, text: PrototypeSet, *,
                  phi: float, target_mode: str, candidates: str, pooling: str,
                  tau_text: float) -> Dict[str, np.ndarray]:
    """VPL learning rows of one image from its text GradCAMs (shared by ``vpl learn`` and the
    CLIP-ES drop-in).

    Args:
        features: ``(n, D)`` unit patch features.
        cams: ``(k, n)`` text GradCAMs of the image's classes.
        labels: ``(k,)`` the classes.
        pooling: ``token`` (one row per patch) or ``region`` (see
            :func:`~vpl_plugin.prototypes.region_pool`).

    Returns:
        ``features`` (float16), ``targets``, ``candidates`` (``(N,)``, the image's set) and ``seeds``
        (0 background, ``c + 1`` class ``c``; one per row).
    """
    if pooling not in ("token", "region"):
        raise ValueError(f"pooling must be 'token' or 'region'; got {pooling!r}.")
    rows = seeds_from_cams(cams, phi)  # index into labels, -1 background
    if pooling == "region":
        x, q, c = region_pool(features, rows, labels, text.prototypes, text.num_fg,
                              tau_text=tau_text, candidates=candidates)
        fg = q[:, :text.num_fg]
        seed = torch.where(fg.sum(dim=1) > 0, fg.argmax(dim=1) + 1, torch.zeros(len(q), dtype=torch.long))
        cand = c[0] if len(c) else torch.zeros(text.prototypes.shape[0], dtype=torch.bool)
        return {"features": x.half().numpy(), "targets": q.float().numpy(),
                "candidates": cand.bool().numpy(), "seeds": seed.numpy().astype(np.int16)}
    q, cand = build_targets(features, text.prototypes, cams, labels, text.num_fg, phi=phi,
                            tau_text=tau_text, mode=target_mode, candidates=candidates)
    seed = torch.where(rows >= 0, labels[rows.clamp_min(0)] + 1, torch.zeros_like(rows)) if len(labels) \
        else torch.zeros_like(rows)
    return {"features": features.half().numpy(), "targets": q.float().numpy(),
            "candidates": cand.bool().numpy(), "seeds": seed.numpy().astype(np.int16)}


def subsample_rows(record: Dict[str, np.ndarray], count: Optional[int], *, seed: int = 0,
                   key: str = "") -> Dict[str, np.ndarray]:
    """Keep ``count`` rows of one image's learning record, chosen uniformly without replacement.

    The choice depends only on ``(seed, key, number of rows)``, never on the order or the process
    the images are handled in, so a rerun, a resumed run and a sharded run pick the same rows. Rows
    keep their original order. ``docs/vpl.md#learning-set-size-and-memory``: COCO learns from at
    most 1e7 tokens,
    an equal count per image, with a fixed seed.

    Args:
        record: ``features`` ``(n, D)``, ``targets`` ``(n, N)``, ``seeds`` ``(n,)`` (row-wise) and
            ``candidates`` ``(N,)`` (per image, kept as is).
        count: rows to keep; ``None`` or ``>= n`` keeps every row.
        key: the image id (mixed into the seed).

    Example:
        >>> rec = {"features": np.arange(10.0)[:, None], "targets": np.ones((10, 2)),
        ...        "seeds": np.zeros(10), "candidates": np.ones(2, bool)}
        >>> out = subsample_rows(rec, 3, seed=0, key="img")
        >>> out["features"].shape, bool(np.all(np.diff(out["features"][:, 0]) > 0))
        ((3, 1), True)
    """
    n = int(record["seeds"].shape[0])
    if count is None or count >= n:
        return record
    if count < 1:
        raise ValueError(f"count must be >= 1 row per image; got {count}.")
    import zlib

    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])
    keep = np.sort(rng.choice(n, size=count, replace=False))
    return {name: (value if name == "candidates" else value[keep]) for name, value in record.items()}


def _image_learning_record(adapter: CAMAdapter, text: PrototypeSet, sample, image, *, phi, target_mode, candidates,
                           seed_source, tau_text, pooling="token") -> Dict[str, np.ndarray]:
    x, _ = adapter.encoder.preprocess(image)
    labels = torch.as_tensor(list(sample.labels), dtype=torch.long)
    result = adapter.gradcams(x, labels.tolist(), prototypes=text)
    maps = result.cams  # seeds come from the text-prototype GradCAMs (docs/vpl.md#seeds)
    if seed_source == "refined":
        maps = adapter.refine(result, maps)
    return learning_rows(result.features, maps.reshape(len(labels), -1).float(), labels, text, phi=phi,
                         target_mode=target_mode, candidates=candidates, pooling=pooling,
                         tau_text=tau_text)


def collect_learning_set(adapter: CAMAdapter, dataset: SampleDataset, *, phi: float = 0.4,
                         target_mode: str = "seed_hardened", candidates: str = "image", seed_source: str = "gradcam",
                         limit: Optional[int] = None, progress: bool = True,
                         summary: Optional[RunSummary] = None,
                         cache_dir: Optional[Union[str, os.PathLike]] = None,
                         memmap: Optional[bool] = None, pooling: str = "token",
                         max_tokens: Optional[int] = None, token_seed: int = 0, rank: int = 0,
                         world_size: int = 1, chunk_size: Optional[int] = None) -> LearningSet:
    """One pass with text prototypes: pixel features, text GradCAM seeds and target distributions.

    Args:
        adapter: a :class:`~vpl_plugin.adapters.CAMAdapter`; its ``text_prototypes`` are used
            (whatever prototypes it holds) through its ``gradcams`` hook, and ``refine`` with
            ``seed_source="refined"``.
        phi: seed threshold on the GradCAM (0.4).
        target_mode: ``seed_hardened``, ``inmap``, ``cam`` or ``kl`` (``docs/vpl.md#targets``).
        candidates: ``image`` (GT classes + background, like CLIP-ES's softmax) or ``all``.
        seed_source: ``gradcam`` (raw map, the default reading) or ``refined`` (CAA map at patch
            resolution).
        cache_dir: keep one ``<id>.npz`` per image here (written atomically; a rerun reuses them,
            so an interrupted collection resumes) and assemble the set from them. A cached record
            that cannot be read (truncated, not a zip, members missing or of the wrong shape) is
            logged and recomputed.
        memmap: assemble into ``np.memmap`` files in ``cache_dir`` instead of memory (default: when
            the features would exceed 2 GB), so VOC train_aug-sized sets stream from disk.
        pooling: ``token`` (each patch token is a row: the paper's instance level) or ``region``
            (one row per seed region and one for the background, see
            :func:`~vpl_plugin.prototypes.region_pool`).
        max_tokens: learn from at most this many rows in all: every image keeps
            ``max_tokens // images`` of its rows (all of them when it has fewer), drawn by
            :func:`subsample_rows` with ``token_seed``
            (``docs/vpl.md#learning-set-size-and-memory``: at most 1e7
            tokens for COCO). ``None``: every row.
        token_seed: seed of that draw.
        rank, world_size: this process takes every ``world_size``-th image of the list, starting
            at ``rank`` (under torchrun), and returns the learning set of those images; ``summary``
            counts them only. The rows an image gives do not depend on the process count, so
            several processes share one ``cache_dir`` (and a rerun with another process count
            reuses it); each process assembles its own memory-mapped files there
            (``features.rank<R>-of-<W>.npy``, ...; ``features.npy`` in a single process).
        chunk_size: with ``world_size > 1`` and a ``cache_dir`` (which every process must see):
            once every process has finished its images, return this process's chunk share of the
            whole set instead of the rows of its own images: the rows of all images in list order,
            cut into chunks of ``chunk_size`` rows, chunks ``rank``, ``rank + world_size``, ...
            (read from the cache; learn with a :class:`~vpl_plugin.prototypes.ChunkShare` and the
            same chunk size for the prototypes of one process, bit for bit). A collective call:
            every process must make it.
    """
    if seed_source not in ("gradcam", "refined"):
        raise ValueError(f"seed_source must be 'gradcam' or 'refined'; got {seed_source!r}.")
    text = adapter.text_prototypes
    tau_text = 1.0 / float(text.logit_scale)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per_image = None
    if max_tokens is not None:
        if max_tokens < max(n, 1):
            raise ValueError(f"max_tokens must be at least one row per image ({n} images); got "
                             f"{max_tokens}. Raise it or learn on fewer images (limit).")
        per_image = int(max_tokens) // max(n, 1)
    summary = summary if summary is not None else RunSummary()
    indices = _shard(n, rank, world_size)
    summary.total = len(indices)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        _check_cache(cache, {"phi": phi, "target_mode": target_mode, "candidates": candidates,
                             "seed_source": seed_source, "pooling": pooling,
                             "rows_per_image": per_image, "token_seed": token_seed if per_image else None,
                             "model": adapter.encoder.fingerprint(),
                             "templates": list(text.provenance.get("templates", [])),
                             "text_prototypes": float(text.prototypes.double().sum()),
                             # only under upstream's numerics: caches of the former exact-fp32
                             # default (no such key) stay valid under --exact-fp32
                             **({} if getattr(adapter.encoder, "exact_fp32", True)
                                else {"numerics": "upstream"})})
    records: Dict[str, Any] = {}
    start = time.time()
    shape = (int(text.prototypes.shape[0]), int(text.prototypes.shape[1]))
    for i in progress_bar(indices, desc="features", enabled=progress):
        image_id = dataset.ids[i]
        path = cache / f"{image_id}.npz" if cache is not None else None
        if path is not None and path.exists():
            problem = _record_problem(path, shape)
            if problem is None:
                records[image_id] = path
                summary.skipped_existing += 1
                continue
            log.warning("recomputing %s: the cached record cannot be used (%s)", path, problem)
        sample = None
        try:
            sample = dataset[i]
            rec = _image_learning_record(adapter, text, sample, sample_image(dataset, sample), phi=phi,
                                         target_mode=target_mode, candidates=candidates,
                                         seed_source=seed_source, tau_text=tau_text, pooling=pooling)
        except Exception as err:  # noqa: BLE001 - any per-image failure is recorded, the run goes on
            summary.failed.append((image_id, failure_text(err, getattr(sample, "image_path", None))))
            continue
        rec = subsample_rows(rec, per_image, seed=token_seed, key=image_id)
        if path is not None:
            with atomic_path(path) as tmp:
                np.savez(tmp, **rec)  # type: ignore[arg-type]  # numpy's stubs mistype **arrays
            records[image_id] = path
        else:
            records[image_id] = rec
        summary.done += 1
    summary.seconds = time.time() - start
    suffix = "" if world_size == 1 else f".rank{rank}-of-{world_size}"
    sizes = _record_sizes(records)
    if chunk_size is None or world_size == 1 or cache is None:
        pieces = [(image_id, 0, size) for image_id, size in zip(records, sizes)]
        return assemble_learning_set(records, text.prototypes.shape, cache, memmap, suffix, pieces)
    from vpl_plugin import distributed

    position = {image_id: i for i, image_id in enumerate(dataset.ids[:n])}
    everyone = [entry for part in distributed.all_gather_object(list(zip(records, sizes))) for entry in part]
    everyone.sort(key=lambda entry: position[entry[0]])
    pieces = chunk_pieces(everyone, chunk_size, rank, world_size)
    every_record = {image_id: cache / f"{image_id}.npz" for image_id, _ in everyone}
    unseen = [str(path) for path in every_record.values() if not path.is_file()]
    if unseen:
        raise ValueError(f"process {rank} cannot see {len(unseen)} record(s) the other processes wrote "
                         f"into the feature cache {cache} (first: {unseen[0]}); every process must see one "
                         f"cache folder (a shared file system across machines), or pass --no-cache.")
    lset = assemble_learning_set(every_record, text.prototypes.shape, cache, memmap, suffix, pieces)
    lset.chunk_size = int(chunk_size)
    lset.total_images = len(everyone)
    lset.total_pixels = int(sum(size for _, size in everyone))
    return lset


def chunk_pieces(images: Sequence[Tuple[str, int]], chunk_size: int, rank: int, world_size: int
                 ) -> List[Tuple[str, int, int]]:
    """The rows of chunks ``rank``, ``rank + world_size``, ... of a set made of ``images`` (``(id,
    rows)`` in order) cut into chunks of ``chunk_size`` rows, as ``(id, first row, end row)`` pieces
    in order.

    Example:
        >>> chunk_pieces([("a", 3), ("b", 4), ("c", 2)], 4, 1, 2)
        [('b', 1, 4), ('c', 0, 1)]
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    pieces: List[Tuple[str, int, int]] = []
    start = 0
    for image_id, size in images:
        a = start
        while a < start + size:
            chunk = a // chunk_size
            b = min(start + size, (chunk + 1) * chunk_size)
            if chunk % world_size == rank:
                pieces.append((image_id, a - start, b - start))
            a = b
        start += size
    return pieces


def _check_cache(cache: Path, settings: Dict[str, Any]) -> None:
    """A cache holds rows of one configuration: refuse to mix settings in one folder."""
    import json

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diff = settings_diff(saved, settings)
        if diff:
            hint = ""
            if "numerics" in diff:
                hint = (" Its features were computed in exact fp32 (the default before upstream's "
                        "numerics became the default): rerun with --exact-fp32 to use them, or")
            text = describe_diff(diff, "{key}: {then!r} there, {now!r} now")
            raise ValueError(
                f"the feature cache {cache} was written with other settings ({text});"
                f"{hint} pass another --cache-dir or delete that folder.")
    else:
        from vpl_plugin._io import write_json

        write_json(path, settings)


_RECORD_KEYS = ("features", "targets", "candidates", "seeds")


def _member_shape(z: Any, name: str) -> Tuple[int, ...]:
    """Shape of an ``.npz`` member from its ``.npy`` header alone (the data is not read)."""
    with z.zip.open(f"{name}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return tuple(read(fh)[0])


def _record_problem(path: Path, proto_shape: Tuple[int, int]) -> Optional[str]:
    """Why a cached learning record cannot be used, or None.

    Reads the zip directory and the members' ``.npy`` headers only (not the data, which
    :func:`assemble_learning_set` reads once): catches empty, truncated and foreign files, missing members and
    shapes that do not fit the prototype set ``(N, D)``.
    """
    n_proto, dim = proto_shape
    try:
        with np.load(path) as z:
            missing = [k for k in _RECORD_KEYS if k not in z.files]
            if missing:
                return f"members {missing} missing"
            feats, targets = _member_shape(z, "features"), _member_shape(z, "targets")
            cands, seeds = _member_shape(z, "candidates"), _member_shape(z, "seeds")
    except Exception as err:  # noqa: BLE001 - zipfile, numpy and OS errors alike mean "redo it"
        return f"{type(err).__name__}: {err}"
    rows = feats[0] if len(feats) == 2 else -1
    if (len(feats) != 2 or feats[1] != dim or targets != (rows, n_proto) or cands != (n_proto,)
            or seeds != (rows,)):
        return (f"shapes features {feats}, targets {targets}, candidates {cands}, seeds {seeds} do "
                f"not fit {n_proto} prototypes of dimension {dim}")
    return None


def _load_record(rec) -> Dict[str, np.ndarray]:
    if isinstance(rec, dict):
        return rec
    try:
        with np.load(rec) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - a record damaged after its header was checked
        raise ValueError(f"the cached learning record {rec} cannot be read ({type(err).__name__}: "
                         f"{err}); delete it and rerun, which recomputes it.") from err


def _record_sizes(records: Dict[str, Any]) -> List[int]:
    """Rows of each record (an in-memory dict or a cached ``.npz``, whose header alone is read)."""
    sizes = []
    for rec in records.values():
        if isinstance(rec, dict):
            sizes.append(int(rec["features"].shape[0]))
        else:
            with np.load(rec) as z:
                sizes.append(int(_member_shape(z, "seeds")[0]))
    return sizes


def assemble_learning_set(records: Dict[str, Any], proto_shape: Sequence[int], cache: Optional[Path],
                          memmap: Optional[bool], suffix: str = "",
                          pieces: Optional[Sequence[Tuple[str, int, int]]] = None) -> LearningSet:
    """The learning set of ``pieces`` (``(image id, first row, end row)`` of ``records``, in order;
    default: every row of every record)."""
    if pieces is None:
        pieces = [(image_id, 0, size) for image_id, size in zip(records, _record_sizes(records))]
    sizes = [b - a for _, a, b in pieces]
    seeds = []
    k = int(sum(sizes))
    n_proto, dim = int(proto_shape[0]), int(proto_shape[1])
    if memmap is None:
        memmap = cache is not None and k * dim * 4 > 2 * 1024 ** 3
    if memmap and cache is None:
        raise ValueError("memmap=True needs a cache_dir for the memory-mapped files.")
    memmap = memmap and k > 0  # a process whose share gave no rows maps nothing
    if memmap:
        assert cache is not None
        feats: Any = np.lib.format.open_memmap(cache / f"features{suffix}.npy", "w+", np.float16, (k, dim))
        targets: Any = np.lib.format.open_memmap(cache / f"targets{suffix}.npy", "w+", np.float32, (k, n_proto))
        cands: Any = np.lib.format.open_memmap(cache / f"candidates{suffix}.npy", "w+", np.bool_, (k, n_proto))
    else:
        feats = torch.empty(k, dim, dtype=torch.float32)
        targets = torch.empty(k, n_proto, dtype=torch.float32)
        cands = torch.empty(k, n_proto, dtype=torch.bool)
    pos = 0
    for image_id, a, b in pieces:
        rec = _load_record(records[image_id])
        sl = slice(pos, pos + b - a)
        if memmap:
            feats[sl] = rec["features"][a:b]
            targets[sl] = rec["targets"][a:b]
            cands[sl] = rec["candidates"][None, :]
        else:
            feats[sl] = torch.from_numpy(rec["features"][a:b].astype(np.float32))
            targets[sl] = torch.from_numpy(rec["targets"][a:b])
            cands[sl] = torch.from_numpy(rec["candidates"])[None, :]
        seeds.append(torch.from_numpy(rec["seeds"][a:b].astype(np.int64)))
        pos += b - a
    if memmap:
        for arr in (feats, targets, cands):
            arr.flush()
    seed = torch.cat(seeds) if seeds else torch.zeros(0, dtype=torch.long)
    return LearningSet(feats, targets, cands, seed, sizes, [p[0] for p in pieces],
                       offsets=[p[1] for p in pieces])


def _row_owner(learning_set: LearningSet, row: int) -> Tuple[str, int]:
    """``(image id, row within the image)`` of row ``row`` of a learning set."""
    start = 0
    offsets = learning_set.offsets or [0] * len(learning_set.ids)
    for image_id, size, offset in zip(learning_set.ids, learning_set.sizes, offsets):
        if row < start + size:
            return image_id, row - start + offset
        start += size
    return "?", row


def learn_from_dataset(adapter: CAMAdapter, learning_set: LearningSet, *,
                       tau: Union[float, str] = 0.03, lr: float = 10.0, iters: int = 3000,
                       step_rule: Optional[str] = None, level: str = "instance",
                       chunk_size: int = 65536, device: Optional[Union[str, torch.device]] = None,
                       progress: bool = True, provenance: Optional[dict] = None,
                       reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       share: Optional[ChunkShare] = None) -> Tuple[PrototypeSet, Dict[str, Any]]:
    """Learn vision prototypes from a :class:`LearningSet`, initialised at the adapter's
    ``text_prototypes`` (the only hook used): :func:`learn_from_text_prototypes` with them."""
    return learn_from_text_prototypes(adapter.text_prototypes, learning_set, tau=tau, lr=lr,
                                      iters=iters, step_rule=step_rule, level=level,
                                      chunk_size=chunk_size, device=device, progress=progress,
                                      provenance=provenance, reduce_sum=reduce_sum, share=share)


def learn_from_text_prototypes(text: PrototypeSet, learning_set: LearningSet, *,
                               tau: Union[float, str] = 0.03, lr: float = 10.0, iters: int = 3000,
                               step_rule: Optional[str] = None, level: str = "instance",
                               chunk_size: int = 65536,
                               device: Optional[Union[str, torch.device]] = None,
                               progress: bool = True, provenance: Optional[dict] = None,
                               reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                               share: Optional[ChunkShare] = None
                               ) -> Tuple[PrototypeSet, Dict[str, Any]]:
    """Learn vision prototypes from a :class:`LearningSet`, initialised at the text prototypes
    ``text`` (whose class and background names and temperature the result carries).

    Args:
        tau: ``tau_I`` (0.03), or ``"clip"`` for CLIP's own temperature (then the set carries
            CLIP's exact logit scale, so zero iterations reproduce the text CAMs exactly).
        lr: the first step (paper 10); a finite number > 0.
        reduce_sum: ``learning_set`` is this process's share (see :func:`collect_learning_set`'s
            ``rank``): sum over the processes with this function (see
            :func:`~vpl_plugin.prototypes.learn_vision_prototypes`); every process gets the same set.
        share: ``learning_set`` is this process's chunk share (``collect_learning_set(...,
            chunk_size=C)`` with ``chunk_size`` equal to ``C``): every process gets the set of one
            process, bit for bit.

    Returns:
        the :class:`PrototypeSet` and the optimisation history.

    Raises:
        ValueError: ``tau`` or ``lr`` is not a finite number > 0, the set is empty, or a row of
            the set holds NaN/inf (the message names the image it came from).
    """
    scale_override = None
    if isinstance(tau, str):
        if tau != "clip":
            raise ValueError(f"tau must be a positive number or 'clip'; got {tau!r}.")
        scale_override = float(text.logit_scale)
        tau_value = 1.0 / scale_override
    else:
        tau_value = check_positive("tau", tau)
    check_positive("lr", lr)
    images, pixels = len(learning_set.ids), learning_set.num_pixels
    if share is not None:
        if learning_set.chunk_size != chunk_size:
            raise ValueError(f"the learning set is not a share of {chunk_size}-row chunks (chunk size "
                             f"{learning_set.chunk_size}); collect it with chunk_size={chunk_size}.")
        images, pixels = int(learning_set.total_images or 0), int(learning_set.total_pixels or 0)
    elif reduce_sum is not None:
        counts = torch.tensor([float(images), float(pixels)], dtype=torch.float64,
                              device=torch.device(device) if device is not None else "cpu")
        images, pixels = (int(v) for v in reduce_sum(counts).tolist())
    if not images:
        raise ValueError("the learning set is empty: no image could be processed (see the failures).")
    kwargs: Dict[str, Any] = {} if step_rule is None else {"step_rule": step_rule}
    if reduce_sum is not None:
        kwargs["reduce_sum"] = reduce_sum
    if share is not None:
        kwargs["share"] = share
    try:
        w, history = learn_vision_prototypes(
            learning_set.features, learning_set.targets, text.prototypes, learning_set.candidates,
            tau=tau_value, lr=lr, iters=iters, level=level, tau_text=1.0 / float(text.logit_scale),
            chunk_size=chunk_size, device=device, progress=progress, return_history=True, **kwargs)
    except NonFiniteRowsError as err:
        image_id, offset = _row_owner(learning_set, err.row)
        raise ValueError(f"the learning set's {err.name} hold NaN/inf at row {err.row}, row {offset} "
                         f"of image {image_id!r}; learning from it would give NaN prototypes. Delete "
                         f"that image's cached record (or the cache) and collect again.") from err
    record = {
        "tau": tau_value, "lr": lr, "iters": iters, "level": level,
        "step_rule": step_rule or "default", "images": images,
        "pixels": pixels, "text_model": text.provenance.get("model"),
        "final_loss": float(history["loss"][-1]) if history.get("loss") else None,
        "initial_loss": float(history["loss"][0]) if history.get("loss") else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record.update(provenance or {})
    ps = PrototypeSet(w, text.class_names, text.background_names, tau=tau_value, kind="vision",
                      provenance=record, logit_scale_override=scale_override)
    return ps, history
