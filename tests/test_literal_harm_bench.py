"""The analysis of ``benchmarks/literal_harm_factorial.py`` against naive references."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from bench_helpers import import_bench

from vpl_plugin.bootstrap import bootstrap_miou, paired_bootstrap, resample_counts
from vpl_plugin.metrics import iou_from_confusion
from vpl_plugin.prototypes import PrototypeSet


def _module():
    return import_bench("literal_harm_factorial")


def _stack(rng, candidates: int, n: int = 25, c: int = 4) -> np.ndarray:
    return rng.integers(0, 40, size=(candidates, n, c, c)).astype(np.int32)


def test_resampled_matches_the_library_bootstrap():
    lh = _module()
    rng = np.random.default_rng(3)
    a, b = _stack(rng, 2), _stack(rng, 2)
    counts = resample_counts(25, 300, seed=5)
    lh.check_oracle(a, b, counts)  # raises on any mismatch
    assert abs(lh.point(a) - bootstrap_miou(a, counts=counts)["miou"]) < 1e-12
    diff = lh.resampled(a, counts) - lh.resampled(b, counts)
    assert np.allclose(np.nanpercentile(diff, [2.5, 97.5]), paired_bootstrap(a, b, counts=counts)["ci95"])
    # the point value is the best candidate's mIoU of the summed matrices (a naive loop)
    best = max(iou_from_confusion(a[t].sum(axis=0))["miou"] for t in range(a.shape[0]))
    assert abs(lh.point(a) - best) < 1e-12


def test_cube_effects_equal_naive_means_of_paired_differences():
    lh = _module()
    rng = np.random.default_rng(0)
    results = {}
    for fg, bg, s in itertools.product(("text", "vision"), ("text", "vision"), ("clip", "tau0.03")):
        results[lh.cell(fg, bg, s, "token")] = {m: _stack(rng, 2) for m in lh.MEASURES}
    scorer = lh.Scorer(results, resample_counts(25, 200, seed=1))
    eff = lh.cube_effects(scorer, "token")
    y = {k: lh.point(v["seed"]) for k, v in results.items()}
    main_a = np.mean([y[lh.cell("vision", bg, s)] - y[lh.cell("text", bg, s)]
                      for bg in ("text", "vision") for s in ("clip", "tau0.03")])
    assert abs(eff["A fg vision"]["seed"]["value"] - round(100 * main_a, 2)) < 1e-9
    ab = np.mean([(y[lh.cell("vision", "vision", s)] - y[lh.cell("text", "vision", s)])
                  - (y[lh.cell("vision", "text", s)] - y[lh.cell("text", "text", s)])
                  for s in ("clip", "tau0.03")]) / 2
    assert abs(eff["AxB"]["seed"]["value"] - round(100 * ab, 2)) < 1e-9
    lo, hi = eff["A fg vision"]["seed"]["ci95"]
    assert lo <= eff["A fg vision"]["seed"]["value"] <= hi


def test_cell_set_takes_foreground_and_background_rows_from_their_sources():
    lh = _module()
    text = PrototypeSet(torch.eye(5)[:, :4] + 0.1, ["a", "b"], ["x", "y", "z"], tau=0.01, kind="text")
    vision = PrototypeSet(-torch.eye(5)[:, :4] - 0.2, ["a", "b"], ["x", "y", "z"], tau=0.03)
    world = lh.World(None, text, 100.0, [], [], [])
    ps = lh.cell_set(world, vision, "vision", "text", 25.0)
    assert torch.equal(ps.prototypes[:2], vision.prototypes[:2])
    assert torch.equal(ps.prototypes[2:], text.prototypes[2:])
    assert ps.logit_scale == 25.0
    assert torch.equal(lh.cell_set(world, None, "text", "text", 10.0).prototypes, text.prototypes)
