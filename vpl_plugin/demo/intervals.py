"""The demo's confidence intervals: bootstrap over evaluation scenes, from per-scene confusion matrices.

Every seed and pseudo-mask mIoU of the demo is recomputed from resampled sums of per-scene
confusion matrices (:mod:`vpl_plugin.bootstrap`), never from averaged per-scene IoUs; where the
demo searches a background exponent, the search is repeated inside every resample. All numbers
scored on one set of scenes share one set of draws (a fixed seed), so the interval of a
difference between two rows is paired: both rows are scored on the same resampled scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from vpl_plugin.bootstrap import bootstrap_miou, paired_bootstrap, resample_counts

__all__ = ["ClaimedDifference", "SceneBootstrap", "claimed_differences", "difference_report", "load_confusions",
           "save_confusions"]

#: the rows the README's claims compare (names as in the demo's table)
CLIP_ES = "CLIP-ES (text prototypes)"
PAPER_LITERAL = "CLIP-ES + VPL, paper-literal (halving, GradCAM)"
RECOMMENDED = "VPL region-pooled (tau_I 0.1), dense map, no CAA"
RECOMMENDED_WITH_CAA = "VPL region-pooled (tau_I 0.1), dense map"
TEXT_NO_CAA = "text prototypes, GradCAM, no CAA"
VPL_DENSE = "VPL prototypes, dense map"
TEXT_DENSE = "text prototypes, dense map (control)"


class SceneBootstrap:
    """Percentile bootstrap intervals (in mIoU points, 0-100) over scenes, one draw set per scene count.

    Args:
        resamples: draws with replacement of the scenes.
        seed: the draws' seed (:func:`~vpl_plugin.bootstrap.resample_counts`).
        level: the intervals' coverage.
    """

    def __init__(self, resamples: int, seed: int, level: float = 0.95) -> None:
        self.resamples, self.seed, self.level = int(resamples), int(seed), float(level)
        self._counts: Dict[int, np.ndarray] = {}

    def counts(self, scenes: int) -> np.ndarray:
        """The ``(resamples, scenes)`` draws shared by every number scored on ``scenes`` scenes."""
        if scenes not in self._counts:
            self._counts[scenes] = resample_counts(scenes, self.resamples, self.seed)
        return self._counts[scenes]

    def miou(self, confusion: np.ndarray) -> List[float]:
        """Interval of the mIoU of ``(scenes, C, C)`` or ``(exponents, scenes, C, C)`` matrices
        (the best exponent chosen inside every resample)."""
        r = bootstrap_miou(confusion, counts=self.counts(confusion.shape[-3]), level=self.level)
        return [100 * v for v in r["ci95"]]

    def difference(self, a: np.ndarray, b: np.ndarray) -> Dict[str, Any]:
        """``mIoU(a) - mIoU(b)`` on the same scenes, with its paired interval (mIoU points)."""
        r = paired_bootstrap(a, b, counts=self.counts(a.shape[-3]), level=self.level)
        return {"difference": 100 * r["difference"], "ci95": [100 * v for v in r["ci95"]]}

    def describe(self) -> Dict[str, Any]:
        """The settings, for the report."""
        return {"resamples": self.resamples, "seed": self.seed, "level": self.level,
                "over": "evaluation scenes (mIoU recomputed from resampled sums of per-scene confusion "
                        "matrices; the background-exponent search repeated inside each resample)"}


@dataclass(frozen=True)
class ClaimedDifference:
    """A difference between two rows of the demo's table that the README states."""

    name: str
    a: str
    b: str


def claimed_differences(rows: Sequence[Mapping[str, Any]]) -> List[ClaimedDifference]:
    """The differences the README claims, by row name.

    The best text-prototype row is the text-prototype row (CLIP-ES or CLIP-CPAL, any map) with the
    highest seed mIoU on the evaluation scenes (the first on ties); the resamples compare against
    that fixed row.
    """
    text_rows = [r for r in rows if r.get("prototypes") == "text"]
    best = max(text_rows, key=lambda r: r["seed_miou"])["name"] if text_rows else TEXT_NO_CAA
    wanted = [ClaimedDifference("recommended VPL - best text-prototype row", RECOMMENDED, best),
              ClaimedDifference("recommended VPL - CLIP-ES", RECOMMENDED, CLIP_ES),
              ClaimedDifference("paper-literal VPL - CLIP-ES", PAPER_LITERAL, CLIP_ES),
              ClaimedDifference("recommended VPL maps: without CAA - with CAA", RECOMMENDED, RECOMMENDED_WITH_CAA),
              ClaimedDifference("text GradCAM: without CAA - with CAA (CLIP-ES)", TEXT_NO_CAA, CLIP_ES),
              ClaimedDifference("VPL dense map (paper objective) - text dense map", VPL_DENSE, TEXT_DENSE)]
    names = {r["name"] for r in rows}
    return [d for d in wanted if d.a in names and d.b in names]


def difference_report(boot: SceneBootstrap, rows: Sequence[Mapping[str, Any]],
                      confusions: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> List[Dict[str, Any]]:
    """Each claimed difference with its paired seed and pseudo-mask intervals (mIoU points)."""
    out = []
    for d in claimed_differences(rows):
        (sa, ma), (sb, mb) = confusions[d.a], confusions[d.b]
        out.append({"name": d.name, "a": d.a, "b": d.b, "seed": boot.difference(sa, sb),
                    "mask": boot.difference(ma, mb)})
    return out


def save_confusions(path: Path, names: Sequence[str], confusions: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                    exponents: Mapping[str, Sequence[float]]) -> None:
    """Write every row's per-scene confusion matrices to an ``.npz`` (plain arrays, no pickle).

    Keys: ``names`` (the rows, in order), ``row<i>_seed`` ``(exponents, scenes, C, C)``,
    ``row<i>_exponents`` and ``row<i>_mask`` ``(scenes, C, C)``, int32.
    """
    from vpl_plugin._io import atomic_path

    arrays: Dict[str, np.ndarray] = {"names": np.array(list(names), dtype=str)}
    for i, name in enumerate(names):
        seed, mask = confusions[name]
        arrays[f"row{i:02d}_seed"] = seed.astype(np.int32)
        arrays[f"row{i:02d}_exponents"] = np.asarray(exponents[name], dtype=np.float64)
        arrays[f"row{i:02d}_mask"] = mask.astype(np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool


def load_confusions(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{row name: (seed confusions, mask confusions)}`` from :func:`save_confusions`'s file."""
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        return {n: (data[f"row{i:02d}_seed"].astype(np.int64), data[f"row{i:02d}_mask"].astype(np.int64))
                for i, n in enumerate(names)}
