"""Bootstrap intervals of mIoU against a naive loop over the same draws (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from vpl_plugin.bootstrap import (
    bootstrap_miou,
    hierarchical_mean_difference,
    miou_of_sums,
    paired_bootstrap,
    resample_counts,
)
from vpl_plugin.metrics import iou_from_confusion


def _confusions(n=30, c=4, seed=0, absent=()):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 40, size=(n, c, c))
    for k in absent:  # a class absent from some images' ground truth
        conf[: n // 2, k, :] = 0
    return conf


def _naive_best(cands, draw):
    """mIoU of the best candidate on one resample: build the image list, sum, score each."""
    images = [i for i, k in enumerate(draw) for _ in range(k)]
    scores = [iou_from_confusion(c[images].sum(axis=0))["miou"] for c in cands]
    return max(scores)  # ties: any maximum has the same value


def test_miou_of_sums_equals_iou_from_confusion_also_with_absent_classes():
    conf = _confusions(absent=(2,))
    for m in list(conf[:20]) + [conf.sum(axis=0)]:
        want = iou_from_confusion(m)["miou"]
        assert miou_of_sums(m) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert np.allclose(miou_of_sums(conf), [iou_from_confusion(m)["miou"] for m in conf])


def test_draws_are_multinomial_counts_and_repeat_with_the_seed():
    counts = resample_counts(25, 100, seed=3)
    assert counts.shape == (100, 25) and (counts.sum(axis=1) == 25).all() and counts.min() >= 0
    assert np.array_equal(counts, resample_counts(25, 100, seed=3))
    assert not np.array_equal(counts, resample_counts(25, 100, seed=4))


def test_interval_is_the_percentile_of_the_naive_resampled_scores():
    conf = _confusions(absent=(1,))
    counts = resample_counts(len(conf), 300, seed=0)
    naive = np.array([_naive_best([conf], d) for d in counts])
    got = bootstrap_miou(conf, counts=counts)
    assert got["miou"] == pytest.approx(iou_from_confusion(conf.sum(axis=0))["miou"], rel=1e-12)
    assert got["ci95"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])), rel=1e-12)
    assert got["ci95"][0] < got["miou"] < got["ci95"][1]


def test_a_threshold_search_is_repeated_inside_every_resample():
    cands = np.stack([_confusions(seed=s) for s in (1, 2, 3)])  # three candidate thresholds
    counts = resample_counts(cands.shape[1], 200, seed=1)
    naive = np.array([_naive_best(cands, d) for d in counts])
    got = bootstrap_miou(cands, counts=counts)
    assert got["miou"] == pytest.approx(max(iou_from_confusion(c.sum(axis=0))["miou"] for c in cands))
    assert got["ci95"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])), rel=1e-12)


def test_paired_difference_uses_the_same_draws_for_both_methods():
    a, b = _confusions(seed=5), _confusions(seed=6)
    counts = resample_counts(len(a), 300, seed=2)
    naive = np.array([_naive_best([a], d) - _naive_best([b], d) for d in counts])
    got = paired_bootstrap(a, b, counts=counts)
    assert got["difference"] == pytest.approx(got["a"] - got["b"])
    assert got["ci95"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])), rel=1e-12)
    # identical methods: every paired resample differs by exactly 0 (unpaired draws would not)
    same = paired_bootstrap(a, a.copy(), resamples=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]


def test_paired_interval_is_narrower_than_the_unpaired_one_for_correlated_methods():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 60, size=(60, 3, 3))
    better = base.copy()
    better[:, np.arange(3), np.arange(3)] += 3  # the same images, a little more right everywhere
    paired = paired_bootstrap(better, base, resamples=500)
    lo_a, hi_a = bootstrap_miou(better, resamples=500, seed=1)["ci95"]
    lo_b, hi_b = bootstrap_miou(base, resamples=500, seed=2)["ci95"]
    assert paired["ci95"][0] > 0  # a consistent gain is resolved
    assert paired["ci95"][1] - paired["ci95"][0] < min(hi_a - lo_a, hi_b - lo_b)


def test_hierarchical_mean_over_groups():
    pairs = [(_confusions(seed=10 + g), _confusions(seed=20 + g)) for g in range(3)]
    got = hierarchical_mean_difference(pairs, resamples=400, seed=0)
    single = [paired_bootstrap(a, b, resamples=10)["difference"] for a, b in pairs]
    assert got["per_group"] == pytest.approx(single)
    assert got["mean"] == pytest.approx(np.mean(single))
    lo, hi = got["ci95"]
    assert lo <= got["mean"] <= hi
    # one group: the two-level bootstrap reduces to the paired bootstrap of that group (same law)
    one = hierarchical_mean_difference(pairs[:1], resamples=2000, seed=0)
    ref = paired_bootstrap(*pairs[0], resamples=2000, seed=1)
    assert one["ci95"] == pytest.approx(ref["ci95"], abs=0.01)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shape"):
        bootstrap_miou(np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.zeros((3, 2, 2)), np.zeros((4, 2, 2)))
