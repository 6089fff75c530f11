"""The demo's figures (matplotlib, drawn off-screen with the Agg canvas; no pyplot state).

* :func:`grid_figure` - the CAMs of several rows side by side: one figure row per (scene, class)
  pair, columns image, ground truth of that class, then each row's CAM of that class overlaid on
  the image (jet colour map at half opacity, as pytorch-grad-cam's ``show_cam_on_image``), every
  map min-max scaled on its own (as upstream scales a CAM), with a colour bar.
* :func:`bars_figure` - every row's seed and pseudo-mask mIoU with its bootstrap interval.
* :func:`gap_figure` - the modality gap: a 2-D PCA projection (fitted on all drawn points) of the
  seed-labelled pixel features, the text prototypes and vision prototypes, with each prototype
  set's gap (:func:`vpl_plugin.prototypes.modality_gap`) in the legend.

Each function returns the :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

import numpy as np

from vpl_plugin._imports import require

__all__ = ["GridColumn", "PrototypeCloud", "bars_figure", "gap_figure", "grid_figure", "normalise_map",
           "pca_2d", "save_figure"]

DPI = 100


def _figure(width: float, height: float) -> Any:
    figure_module = require("matplotlib.figure")
    backend = require("matplotlib.backends.backend_agg")
    fig = figure_module.Figure(figsize=(width, height), dpi=DPI)
    backend.FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` (atomically; its size is ``figsize x dpi``)."""
    from vpl_plugin._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Min-max scale one map to [0, 1] (pytorch-grad-cam's ``scale_cam_image``; a flat map gives 0)."""
    m = np.asarray(cam, dtype=np.float64)
    m = m - m.min()
    return m / (1e-7 + m.max())


@dataclass(frozen=True)
class GridColumn:
    """A CAM column of the grid: its title and the demo row whose kept CAMs it shows."""

    title: str
    row: str


def grid_figure(scenes: Sequence[Any], cams: Mapping[str, List[np.ndarray]], columns: Sequence[GridColumn],
                class_names: Sequence[str], max_rows: int = 12) -> Any:
    """The CAM grid (see the module docstring); at most ``max_rows`` (scene, class) rows.

    Args:
        scenes: synthetic scenes (``image``, ``mask``, ``labels``).
        cams: demo row name -> the kept ``(k, H, W)`` CAMs of the first scenes (order of ``labels``).
        columns: the CAM columns, in order.
        class_names: thing class names (0-based, as ``labels``).
    """
    pairs = [(i, j) for i, sc in enumerate(scenes) for j in range(len(sc.labels))][:max_rows]
    n_cols = 2 + len(columns)
    fig = _figure(1.6 * n_cols + 1.1, 1.6 * max(len(pairs), 1) + 0.5)
    grid = fig.add_gridspec(max(len(pairs), 1), n_cols + 1, width_ratios=[1] * n_cols + [0.08],
                            left=0.8 / fig.get_figwidth(), right=1 - 0.5 / fig.get_figwidth(),
                            top=1 - 0.35 / fig.get_figheight(), bottom=0.1 / fig.get_figheight(),
                            wspace=0.05, hspace=0.08)
    image = None
    for r, (i, j) in enumerate(pairs):
        sc = scenes[i]
        cls = int(sc.labels[j])
        panels = [("image", None), ("ground truth", (sc.mask == cls + 1).astype(np.float64))]
        for col in columns:
            kept = cams.get(col.row, [])
            panels.append((col.title, normalise_map(kept[i][j]) if i < len(kept) else None))
        for c, (title, overlay) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            if c == 1:  # the class's pixels at full brightness, the rest dimmed, a white outline
                dim = (0.25 + 0.75 * overlay)[..., None]
                ax.imshow((sc.image * dim).astype(np.uint8), interpolation="nearest")
                if overlay.any():
                    ax.contour(overlay, levels=[0.5], colors="white", linewidths=1.0)
            else:
                ax.imshow(sc.image, interpolation="nearest")
            if c > 1 and overlay is not None:
                image = ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"scene {i}\n{class_names[cls]}", fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_subplot(grid[:, n_cols], label="colour bar"))
        bar.set_label("CAM (min-max scaled per map)", fontsize=9)
    return fig


def bars_figure(rows: Sequence[Mapping[str, Any]], title: str = "", highlight: Sequence[str] = ()) -> Any:
    """Horizontal bars of every row's seed and pseudo-mask mIoU with their 95 % intervals (the
    rows named in ``highlight`` in bold)."""
    n = len(rows)
    fig = _figure(9.0, 0.32 * n + 1.4)
    ax = fig.add_axes((0.42, 0.9 / fig.get_figheight(), 0.55, 1 - 1.4 / fig.get_figheight()))
    y = np.arange(n)
    for offset, key, label, colour in ((-0.2, "seed", "seed mIoU", "tab:blue"),
                                       (0.2, "mask", "pseudo-mask mIoU", "tab:orange")):
        values = np.array([r[f"{key}_miou"] for r in rows], dtype=np.float64)
        ci = np.array([r.get(f"{key}_ci95") or [v, v] for r, v in zip(rows, values)], dtype=np.float64)
        err = np.stack([values - ci[:, 0], ci[:, 1] - values])
        ax.barh(y + offset, values, height=0.4, color=colour, label=label, xerr=err,
                error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks(y)
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
    for label in ax.get_yticklabels():
        if label.get_text() in highlight:
            label.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("mIoU (%), bars: 95 % bootstrap interval over the evaluation scenes", fontsize=8)
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def pca_2d(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The mean and the first two principal axes ``(2, D)`` of ``points`` (float64 SVD)."""
    x = np.asarray(points, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:2]


@dataclass(frozen=True)
class PrototypeCloud:
    """One prototype set of the gap figure: its label, ``(classes, D)`` rows, gap and marker."""

    label: str
    prototypes: np.ndarray
    gap: float
    marker: str


def gap_figure(features: np.ndarray, seed_labels: np.ndarray, sets: Sequence[PrototypeCloud],
               class_names: Sequence[str], max_points: int = 3000, seed: int = 0) -> Any:
    """The modality-gap figure (see the module docstring).

    Args:
        features: ``(K, D)`` pixel features; ``seed_labels``: ``(K,)`` their seed class (``< 0``
            left out).
        sets: prototype sets; the rows of the seed classes (``0..len(class_names)-1``) are drawn.
        max_points: pixel features drawn (a fixed random subset; the projection is fitted on
            all seed-labelled features and all prototypes).
    """
    keep = np.asarray(seed_labels) >= 0
    x, lab = np.asarray(features, dtype=np.float64)[keep], np.asarray(seed_labels)[keep]
    n_cls = len(class_names)
    protos = [np.asarray(s.prototypes, dtype=np.float64)[:n_cls] for s in sets]
    mean, axes = pca_2d(np.concatenate([x] + protos))
    pick = np.random.default_rng(seed).permutation(len(x))[:max_points]
    fig = _figure(12.0, 6.5)
    ax = fig.add_axes((0.06, 0.08, 0.5, 0.86))
    colours = [require("matplotlib").colormaps["tab10"](c % 10) for c in range(n_cls)]
    line = require("matplotlib.lines").Line2D
    xy = (x[pick] - mean) @ axes.T
    ax.scatter(xy[:, 0], xy[:, 1], s=5, c=[colours[c] for c in lab[pick]], alpha=0.35, linewidths=0)
    centre = (x.mean(axis=0) - mean) @ axes.T
    counts = np.bincount(lab, minlength=n_cls)[:n_cls].astype(np.float64)
    handles = [line([], [], marker="o", linestyle="", color="grey", markersize=4,
                    label=f"pixel features (seed-labelled; {len(pick)} of {len(x)} drawn)")]
    for s, w in zip(sets, protos):
        pw = (w - mean) @ axes.T
        ax.scatter(pw[:, 0], pw[:, 1], s=110, marker=s.marker, c=colours, edgecolors="black", linewidths=0.8,
                   zorder=3)
        end = (counts @ w / counts.sum() - mean) @ axes.T  # the mean of the seed classes' prototypes
        ax.plot([centre[0], end[0]], [centre[1], end[1]], linestyle="--", color="black", linewidth=1.6, zorder=5)
        ax.scatter([end[0]], [end[1]], s=130, marker=s.marker, c="white", edgecolors="black", linewidths=1.2,
                   zorder=6)
        handles.append(line([], [], marker=s.marker, linestyle="", markerfacecolor="lightgrey",
                            markeredgecolor="black", markersize=10, label=f"{s.label} (gap {s.gap:.3f})"))
    ax.scatter([centre[0]], [centre[1]], s=160, marker="X", c="white", edgecolors="black", linewidths=1.2,
               zorder=4)
    handles.append(line([], [], marker="X", linestyle="", markerfacecolor="white", markeredgecolor="black",
                        markersize=10, label="mean of the pixel features"))
    handles.append(line([], [], linestyle="--", color="black",
                        label="gap vector: pixel mean to a set's class-\nweighted prototype mean (white marker)"))
    ax.set_xlabel("PC 1 (fitted on all points)")
    ax.set_ylabel("PC 2")
    ax.set_title("Modality gap: pixel features vs text and vision prototypes", fontsize=10)
    first = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                      title="gap: distance from the pixel features' mean to the mean of\ntheir seed classes' "
                            "prototypes (lower = closer)", title_fontsize=8)
    ax.add_artist(first)
    classes = [line([], [], marker="o", linestyle="", color=colours[c], label=class_names[c]) for c in range(n_cls)]
    ax.legend(handles=classes, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8, title="classes",
              title_fontsize=8)
    return fig
