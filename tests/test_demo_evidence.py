"""The demo's evidence: bootstrap intervals from per-scene confusion matrices, and its figures."""

from __future__ import annotations

import numpy as np
import pytest

from vpl_plugin.bootstrap import bootstrap_miou, paired_bootstrap, resample_counts
from vpl_plugin.demo.intervals import (
    CLIP_ES,
    PAPER_LITERAL,
    RECOMMENDED,
    TEXT_NO_CAA,
    SceneBootstrap,
    claimed_differences,
    difference_report,
    load_confusions,
    save_confusions,
)
from vpl_plugin.metrics import iou_from_confusion


def _confusions(rng, exponents, scenes, classes=3):
    return rng.integers(0, 40, size=(exponents, scenes, classes, classes)).astype(np.int64)


def test_scene_bootstrap_matches_bootstrap_module_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    seeds = _confusions(rng, 2, 12)  # two background exponents, searched inside each resample
    masks = _confusions(rng, 1, 12)[0]
    boot = SceneBootstrap(resamples=300, seed=4)
    ref = bootstrap_miou(seeds, resamples=300, seed=4)
    assert boot.miou(seeds) == [100 * v for v in ref["ci95"]]
    assert boot.miou(masks) == [100 * v for v in bootstrap_miou(masks, resamples=300, seed=4)["ci95"]]
    # the point estimate: the best exponent's mIoU of the summed matrices, as the demo scores it
    point = max(iou_from_confusion(seeds[t].sum(0))["miou"] for t in range(2))
    lo, hi = boot.miou(seeds)
    assert lo <= 100 * point <= hi and lo < hi
    # paired: the same draws for both rows; a naive loop over the draws is the oracle
    other = _confusions(rng, 2, 12)
    got = boot.difference(seeds, other)
    ref = paired_bootstrap(seeds, other, resamples=300, seed=4)
    assert got == {"difference": 100 * ref["difference"], "ci95": [100 * v for v in ref["ci95"]]}
    counts = resample_counts(12, 300, 4)
    diffs = []
    for draw in counts:
        best = [max(iou_from_confusion(np.tensordot(draw, m[t], axes=1))["miou"] for t in range(2))
                for m in (seeds, other)]
        diffs.append(best[0] - best[1])
    assert got["ci95"] == pytest.approx(list(100 * np.percentile(diffs, [2.5, 97.5])), abs=1e-9)
    assert got["ci95"][0] <= got["difference"] <= got["ci95"][1]


def test_claimed_differences_pick_the_best_text_row_and_skip_missing_rows():
    rows = [{"name": CLIP_ES, "seed_miou": 30.0, "prototypes": "text"},
            {"name": TEXT_NO_CAA, "seed_miou": 40.0, "prototypes": "text"},
            {"name": "text prototypes, dense map (control)", "seed_miou": 10.0, "prototypes": "text"},
            {"name": PAPER_LITERAL, "seed_miou": 18.0, "prototypes": "paper-literal"},
            {"name": RECOMMENDED, "seed_miou": 48.0, "prototypes": "region"}]
    got = {d.name: (d.a, d.b) for d in claimed_differences(rows)}
    assert got["recommended VPL - best text-prototype row"] == (RECOMMENDED, TEXT_NO_CAA)
    assert got["paper-literal VPL - CLIP-ES"] == (PAPER_LITERAL, CLIP_ES)
    assert got["recommended VPL - CLIP-ES"] == (RECOMMENDED, CLIP_ES)
    assert "recommended VPL maps: without CAA - with CAA" not in got  # its 'with CAA' row is absent


def test_confusions_round_trip_and_differences_use_them(tmp_path):
    rng = np.random.default_rng(2)
    names = [CLIP_ES, RECOMMENDED]
    conf = {n: (_confusions(rng, 2, 9), _confusions(rng, 1, 9)[0]) for n in names}
    save_confusions(tmp_path / "c.npz", names, conf, {n: [1.0, 2.0] for n in names})
    back = load_confusions(tmp_path / "c.npz")
    assert list(back) == names and all(np.array_equal(back[n][0], conf[n][0]) for n in names)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        assert data["row01_exponents"].tolist() == [1.0, 2.0]
    boot = SceneBootstrap(200, 0)
    rows = [{"name": n, "seed_miou": 1.0, "prototypes": "text" if n == CLIP_ES else "region"} for n in names]
    (d, *rest) = [x for x in difference_report(boot, rows, back) if x["name"] == "recommended VPL - CLIP-ES"]
    ref = paired_bootstrap(conf[RECOMMENDED][1], conf[CLIP_ES][1], resamples=200, seed=0)
    assert d["mask"]["difference"] == pytest.approx(100 * ref["difference"]) and not rest


# -- figures -------------------------------------------------------------------------------------------
matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (pip install matplotlib) draws the figures")


def _scenes(n=3):
    from vpl_plugin.data.synthetic import SceneWorld

    return SceneWorld(seed=3).batch(0, n)


def test_normalise_map_spans_zero_to_one_without_saturating():
    from vpl_plugin.demo.figures import normalise_map

    m = np.array([[0.90, 0.95], [0.97, 1.0]], dtype=np.float16)  # a near-flat map stays graded
    got = normalise_map(m)
    m64 = m.astype(np.float64)
    ref = (m64 - m64.min()) / (m64.max() - m64.min())
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.unique(np.round(got, 3)).size == 4
    assert np.array_equal(normalise_map(np.full((2, 2), 0.3)), np.zeros((2, 2)))


def test_grid_figure_has_titled_columns_class_rows_and_a_colour_bar(tmp_path):
    from PIL import Image

    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.demo.figures import GridColumn, grid_figure, save_figure

    scenes = _scenes()
    rng = np.random.default_rng(0)
    cams = {row: [rng.random((len(sc.labels), 64, 64)).astype(np.float32) for sc in scenes] for row in "ab"}
    cols = [GridColumn("CLIP-ES", "a"), GridColumn("recommended VPL", "b")]
    fig = grid_figure(scenes, cams, cols, SYNTHETIC.names)
    pairs = [(i, c) for i, sc in enumerate(scenes) for c in sc.labels]
    panels = [a for a in fig.axes if a.get_label() != "colour bar"]
    assert len(panels) == len(pairs) * 4 and len(fig.axes) == len(panels) + 1
    assert [a.get_title() for a in panels[:4]] == ["image", "ground truth", "CLIP-ES", "recommended VPL"]
    assert [panels[4 * r].get_ylabel() for r in range(len(pairs))] == [
        f"scene {i}\n{SYNTHETIC.names[c]}" for i, c in pairs]
    # each CAM panel shows its map min-max scaled on the image (an overlay with range [0, 1])
    overlay = panels[2].get_images()[1].get_array()
    np.testing.assert_allclose(overlay, (cams["a"][0][0] - cams["a"][0][0].min())
                               / (cams["a"][0][0].max() - cams["a"][0][0].min()), atol=1e-5)
    save_figure(fig, tmp_path / "grid.png")
    w, h = fig.get_size_inches() * fig.dpi
    assert Image.open(tmp_path / "grid.png").size == (round(w), round(h))


def test_bars_figure_draws_both_numbers_of_every_row_with_their_intervals():
    from vpl_plugin.demo.figures import bars_figure

    rows = [{"name": f"row {i}", "seed_miou": 10.0 * i + 5, "mask_miou": 10.0 * i + 7,
             "seed_ci95": [10.0 * i + 3, 10.0 * i + 6], "mask_ci95": [10.0 * i + 4, 10.0 * i + 9]} for i in range(4)]
    fig = bars_figure(rows, highlight=["row 2"])
    (ax,) = fig.axes
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == sorted([r["seed_miou"] for r in rows] + [r["mask_miou"] for r in rows])
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    spans = sorted(tuple(np.round(sorted([seg[0][0], seg[1][0]]), 6)) for seg in segments)
    assert spans == sorted([tuple(r["seed_ci95"]) for r in rows] + [tuple(r["mask_ci95"]) for r in rows])
    bold = [t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["row 2"]


def test_gap_figure_projects_with_pca_and_puts_the_gaps_in_the_legend():
    from vpl_plugin.demo.figures import PrototypeCloud, gap_figure, pca_2d

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 5)) * np.array([5.0, 2.0, 0.5, 0.2, 0.1])
    mean, axes = pca_2d(pts)
    cov = np.cov(pts.T)
    vals, vecs = np.linalg.eigh(cov)
    for k in range(2):  # the two leading eigenvectors of the covariance, up to sign
        assert abs(abs(axes[k] @ vecs[:, -1 - k]) - 1) < 1e-9
    feats = rng.normal(size=(300, 5))
    labels = rng.integers(-1, 3, size=300)
    sets = [PrototypeCloud("text prototypes", rng.normal(size=(4, 5)), 0.684, "^"),
            PrototypeCloud("recommended VPL prototypes", rng.normal(size=(4, 5)), 0.447, "*")]
    fig = gap_figure(feats, labels, sets, ["a", "b", "c"], max_points=50)
    (ax,) = fig.axes
    legends = [c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend)]
    texts = [t.get_text() for leg in legends for t in leg.get_texts()]
    assert "text prototypes (gap 0.684)" in texts and "recommended VPL prototypes (gap 0.447)" in texts
    assert {"a", "b", "c"} <= set(texts)
    drawn = ax.collections[0].get_offsets()
    assert len(drawn) == 50  # the pixel features drawn; every prototype of the seed classes after them
    assert [len(c.get_offsets()) for c in ax.collections[1:]] == [3, 1, 3, 1, 1]
