"""Why the paper-literal VPL swap lowers CLIP-ES's seeds on the demo world: a factorial experiment.

Question. On the demo world with the shipped demo CLIP, CLIP-ES with its text prototypes gives a
seed mIoU of about 30 (with CAA), and the paper-literal VPL (vision prototypes learned on patch
tokens, seed-hardened targets, tau_I 0.03, lr 10, 3000 halving steps, swapped into CLIP-ES's GradCAM with
logit scale 1/tau_I) about 19. Three explanations were offered: (1) the learned prototypes leave
the region of the pooled image embedding, which is what GradCAM's image-level softmax scores
(they are fitted to single patch tokens); (2) the background prototypes take the image-level
softmax (they now sit on the background tokens, which dominate the pooled embedding); (3) the
temperature (logit scale 1/0.03 = 33.3 instead of CLIP's own, 25.3 for the demo CLIP).

Design (fixed before the run). Every cell is CLIP-ES's GradCAM (+ CAA, box mask, CRF pseudo
masks; nothing else changed) on the demo's evaluation scenes, with a prototype set assembled from
four factors:

* A, foreground prototypes: text | vision.
* B, background prototypes: text | vision.
* C, logit scale of the GradCAM softmax: CLIP's own (the text one, 25.3) | 1/0.03 (the literal
  one); also 10 (1/0.1) and 100 as a range.
* D, how the vision prototypes were obtained (applies to the vision rows of A and B):
  ``token`` the paper-literal set (token rows, seed-hardened targets, tau_I 0.03, lr 10, 3000 iterations,
  halving rule); ``region`` the same recipe on region-pooled rows (each seed region and the rest of
  the image pooled into one normalised mean feature, as GradCAM pools the image), nothing else
  changed; ``shift`` the literal set moved toward the pooled embeddings: ``w' = normalise(w +
  mean(pooled image embeddings) - mean(patch features))``, both means over the learning scenes;
  ``recommended`` the project's recommended prototypes (region rows, tau_I 0.1, ``bb`` rule).

Cells: the 2 text/text cells per C level (D does not apply) and the 3 other A x B cells for every
D level and C level: 4 x (1 + 3 x 4) = 52 cells. Prototypes are learned once (cached) on the
demo's learning scenes with image-level labels only.

Measures per cell: seed mIoU with CAA (upstream's background exponents {1, 2}; the measure of the
README's 30.0 / 18.6 rows), pseudo-mask mIoU (dense CRF, CLIP-ES parameters, all pixels), seed mIoU
of the raw GradCAM without CAA (exponents 1..10), and two readings of the image-level softmax: the
mean probability mass on the image's classes, and the share of (scene, class) pairs whose class
beats every background concept. Per-scene confusion matrices; 95 % percentile bootstrap intervals
over scenes (2,000 resamples, the same draws for every cell, the exponent chosen inside every
resample), so every difference and contrast below is paired.

Analysis (fixed before the run):

* Harm: literal cell (A, B vision, C 1/0.03, D token) minus CLIP-ES (A, B text, C CLIP's).
* Recovery by each cause, from the literal cell, one factor put back: the text scale (C), text
  background prototypes (B), text foreground prototypes (A), and the region / shift / recommended
  sets instead of the literal one (D). A cause counts as a cause when its recovery's interval lies
  above 0, as the main cause when its recovery is also at least half the harm.
* Factorial effects for each D level on the 2 x 2 x 2 cube A x B x C (C: CLIP's vs 1/0.03): main
  effects (mean of the four paired differences), two-way interactions and the three-way one
  (contrast coefficients +-1/4), each with its paired interval.
* A variant "removes the harm" when it uses vision foreground prototypes learned without masks and
  its difference from CLIP-ES has an interval whose upper end is at or above 0. Any such variant is
  found on the evaluation scenes, so it is re-measured on the demo's 300 validation scenes
  (disjoint; masks used only for this check) and reported only if it passes there too.

Runtime: 2,126 s measured on the shared 2-core machine under load (load average about 14; 1
thread): learning 3 prototype sets (the literal one 210 s), 52 cells x 300 scenes with CRF (23-87 s
a cell), the validation check and the bootstrap::

    python benchmarks/literal_harm_factorial.py        # the shipped demo CLIP

Writes benchmarks/results/literal_harm.json and literal_harm.md; caches prototype sets and
per-cell confusion matrices in ``--cache`` (default: the system temporary folder).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine

WORLD_SEED = 7  # the demo's world (the demo CLIP was trained on world seed 1)
EVAL_START, VAL_START = 10_000_000, 20_000_000  # the demo's evaluation / validation scenes
LEARN_TOKENS = 64_000  # the demo's learning split: as many scenes as give this many tokens
TEMPLATES = ("a photo of a {}.",)  # the demo's prompt
PHI, LR, ITERS, TAU_LITERAL = 0.4, 10.0, 3000, 0.03
D_LEVELS = ("token", "region", "shift", "recommended")
AB_LEVELS = (("text", "text"), ("vision", "text"), ("text", "vision"), ("vision", "vision"))
SEED_EXPONENTS_CAA = (1.0, 2.0)
SEED_EXPONENTS_RAW = tuple(float(e) for e in range(1, 11))
MEASURES = ("seed", "mask", "seed_raw")


@dataclass
class World:
    """The demo CLIP, its text prototypes and the scenes of every split."""

    encoder: Any
    text: Any  # PrototypeSet
    clip_scale: float
    learn: list
    evaluation: list
    validation: list


def load_world(clip: str | None, eval_scenes: int, val_scenes: int) -> World:
    """Load the demo CLIP (memoised trunk) and draw the demo's splits."""
    from vpl_plugin.adapters.clip_es import text_prototype_set
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld

    ckpt = Path(clip) if clip else Path(__import__("vpl_plugin").__file__).parent / "demo" / "assets" / "demo_clip.pt"
    encoder = load_clip(str(ckpt), "cpu")
    memoise_trunk(encoder)
    world = SceneWorld(seed=WORLD_SEED)
    h, w = encoder.padded_size(world.size, world.size)
    n_learn = -(-LEARN_TOKENS // ((h // encoder.patch_size) * (w // encoder.patch_size)))
    text = text_prototype_set(encoder, SYNTHETIC, TEMPLATES)
    return World(encoder, text, float(text.logit_scale), world.batch(0, n_learn),
                 world.batch(EVAL_START, eval_scenes), world.batch(VAL_START, val_scenes))


def memoise_trunk(encoder) -> None:
    """Run the frozen trunk once per scene: only the last block depends on the prototypes."""
    import hashlib

    trunk, memo = encoder.trunk, {}

    def remembered(images: torch.Tensor, keep_attention: int = 8):
        key = (hashlib.blake2b(images.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest(),
               tuple(images.shape), keep_attention)
        if key not in memo:
            memo[key] = trunk(images, keep_attention=keep_attention)
        return memo[key]

    encoder.trunk = remembered


# -- prototype sets ------------------------------------------------------------------------------------
def learning_probes(world: World) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per learning scene: unit patch features, text GradCAMs ``(k, n)``, labels, pooled embedding."""
    from vpl_plugin.adapters.clip_es import CLIPESAdapter
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.demo.train_clip import images_to_tensor

    adapter = CLIPESAdapter(world.encoder, SYNTHETIC, templates=TEMPLATES)
    probes = []
    for sc in world.learn:
        x = images_to_tensor([sc.image])[0]
        res = adapter.gradcams(x, list(sc.labels), prototypes=world.text)
        with torch.no_grad():
            tokens, _ = world.encoder.trunk(x[None], keep_attention=8)
            pooled = world.encoder.last_block(tokens).image_embedding[0].detach().float().cpu()
        probes.append((res.features, res.cams.reshape(len(sc.labels), -1),
                       torch.tensor(sc.labels, dtype=torch.long), pooled))
    return probes


def learn_set(probes, text, pooling: str, tau: float, step_rule: str):
    """Vision prototypes from the learning scenes (image-level labels only)."""
    from vpl_plugin.prototypes import (
        PrototypeSet,
        build_targets,
        learn_vision_prototypes,
        region_pool,
        seeds_from_cams,
    )

    tau_text = 1.0 / float(text.logit_scale)
    xs, qs, cs = [], [], []
    for feats, cams, labels, _ in probes:
        if pooling == "region":
            x, q, c = region_pool(feats, seeds_from_cams(cams, PHI), labels, text.prototypes, text.num_fg,
                                  tau_text=tau_text)
        else:
            q, cand = build_targets(feats, text.prototypes, cams, labels, text.num_fg, phi=PHI,
                                    tau_text=tau_text, mode="seed_hardened")
            x, c = feats, cand[None].expand(q.shape[0], -1)
        xs.append(x)
        qs.append(q)
        cs.append(c)
    w, hist = learn_vision_prototypes(torch.cat(xs), torch.cat(qs), text.prototypes, torch.cat(cs), tau=tau,
                                      lr=LR, iters=ITERS, step_rule=step_rule, return_history=True)
    prov = {"pooling": pooling, "step_rule": step_rule, "phi": PHI, "lr": LR, "iters": ITERS,
            "rows": int(sum(len(x) for x in xs)), "loss": [float(hist["loss"][0]), float(hist["loss"][-1])]}
    return PrototypeSet(w, text.class_names, text.background_names, tau=tau, kind="vision", provenance=prov)


def pooled_shift(ps, probes):
    """``ps`` moved by the mean gap between pooled image embeddings and patch features."""
    from vpl_plugin.prototypes import PrototypeSet

    pooled = torch.stack([torch.nn.functional.normalize(p[3], dim=0) for p in probes]).double().mean(0)
    tokens = torch.cat([p[0] for p in probes]).double().mean(0)
    w = torch.nn.functional.normalize(ps.prototypes.double() + (pooled - tokens), dim=1).float()
    return PrototypeSet(w, ps.class_names, ps.background_names, tau=ps.tau, kind="vision",
                        provenance={**ps.provenance, "shift_norm": float((pooled - tokens).norm())})


def vision_sets(world: World, cache: Path, log) -> dict[str, Any]:
    """The four D levels, learned once and cached in ``cache``."""
    from vpl_plugin.prototypes import PrototypeSet

    recipes = {"token": ("token", TAU_LITERAL, "halving"), "region": ("region", TAU_LITERAL, "halving"),
               "recommended": ("region", 0.1, "bb")}
    out: dict[str, Any] = {}
    probes = None
    for name in D_LEVELS:
        path = cache / f"prototypes_{name}.pt"
        if path.exists():
            out[name] = PrototypeSet.load(path)
            continue
        if probes is None:
            probes = learning_probes(world)
        start = time.time()
        out[name] = pooled_shift(out["token"], probes) if name == "shift" else learn_set(probes, world.text,
                                                                                          *recipes[name])
        out[name].save(path)
        log(f"learned {name}: {time.time() - start:.0f} s, {out[name].provenance}")
    return out


def cell_set(world: World, vision, fg: str, bg: str, scale: float):
    """Prototype set with foreground rows from ``fg`` and background rows from ``bg``, at ``scale``."""
    from vpl_plugin.prototypes import PrototypeSet

    src = {"text": world.text.prototypes, "vision": vision.prototypes if vision is not None else None}
    nf = world.text.num_fg
    rows = torch.cat([src[fg][:nf], src[bg][nf:]]).float()
    return PrototypeSet(rows, world.text.class_names, world.text.background_names, tau=1.0 / scale,
                        kind="vision", logit_scale_override=scale)


# -- cells -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One factor combination (``d`` is ``None`` for the text/text cells)."""

    fg: str
    bg: str
    scale: str  # key of the scale levels
    d: str | None

    @property
    def key(self) -> str:
        return f"fg-{self.fg}_bg-{self.bg}_scale-{self.scale}_d-{self.d or 'none'}"


def all_cells(scales: Sequence[str]) -> list[Cell]:
    """The 52 cells of the design (4 scale levels x (1 text/text + 3 A x B cells x 4 D levels))."""
    cells = []
    for s in scales:
        cells.append(Cell("text", "text", s, None))
        for d, (fg, bg) in itertools.product(D_LEVELS, AB_LEVELS[1:]):
            cells.append(Cell(fg, bg, s, d))
    return cells


def score_cell(world: World, ps, scenes) -> dict[str, np.ndarray]:
    """Per-scene confusion matrices (seed with CAA, CRF mask, raw-GradCAM seed) and softmax readings."""
    from PIL import Image

    from vpl_plugin.adapters.clip_es import CLIPESAdapter
    from vpl_plugin.data.synthetic import SYNTHETIC
    from vpl_plugin.metrics import cams_to_label, confusion_matrix
    from vpl_plugin.pseudo_masks import cams_to_pseudo_mask

    n_cls = SYNTHETIC.num_classes
    adapter = CLIPESAdapter(world.encoder, SYNTHETIC, prototypes=ps, templates=TEMPLATES, save_gradcam=True)
    seed = np.zeros((len(SEED_EXPONENTS_CAA), len(scenes), n_cls, n_cls), np.int32)
    raw = np.zeros((len(SEED_EXPONENTS_RAW), len(scenes), n_cls, n_cls), np.int32)
    mask = np.zeros((1, len(scenes), n_cls, n_cls), np.int32)
    fg_mass, fg_wins = np.zeros(len(scenes)), []
    for i, sc in enumerate(scenes):
        out = adapter(Image.fromarray(sc.image), list(sc.labels))
        for j, e in enumerate(SEED_EXPONENTS_CAA):
            seed[j, i] = confusion_matrix(cams_to_label(out.attn_highres, out.keys, e, "power"), sc.mask, n_cls)
        for j, e in enumerate(SEED_EXPONENTS_RAW):
            raw[j, i] = confusion_matrix(cams_to_label(out.extra["highres"], out.keys, e, "power"), sc.mask, n_cls)
        bgr = np.ascontiguousarray(sc.image[:, :, ::-1])
        mask[0, i] = confusion_matrix(cams_to_pseudo_mask(out.attn_highres, out.keys, bgr, crf=True, conf=None),
                                      sc.mask, n_cls)
        p, k = out.probabilities.double(), len(sc.labels)
        fg_mass[i] = float(p[:k].sum())
        fg_wins += [float(p[c] > p[k:].max()) for c in range(k)]
    return {"seed": seed, "mask": mask, "seed_raw": raw, "fg_mass": fg_mass, "fg_wins": np.asarray(fg_wins)}


def run_cells(world: World, vision: dict[str, Any], cells: Sequence[Cell], scales: dict[str, float],
              scenes, cache: Path, log) -> dict[Cell, dict[str, np.ndarray]]:
    """Score every cell (per-cell results cached as ``.npz`` in ``cache``)."""
    results = {}
    for n, cell in enumerate(cells):
        path = cache / f"{cell.key}.npz"
        if path.exists():
            with np.load(path) as z:
                results[cell] = {k: z[k] for k in z.files}
            continue
        start = time.time()
        ps = cell_set(world, vision.get(cell.d) if cell.d else None, cell.fg, cell.bg, scales[cell.scale])
        results[cell] = score_cell(world, ps, scenes)
        np.savez_compressed(path, **results[cell])
        log(f"[{n + 1}/{len(cells)}] {cell.key}: seed {100 * point(results[cell]['seed']):.1f} "
            f"mask {100 * point(results[cell]['mask']):.1f} raw {100 * point(results[cell]['seed_raw']):.1f} "
            f"fg mass {results[cell]['fg_mass'].mean():.3f} ({time.time() - start:.0f} s)")
    return results


# -- bootstrap ---------------------------------------------------------------------------------------------
def point(stack: np.ndarray) -> float:
    """mIoU (0-1) of the best candidate (first maximum) on all scenes."""
    return float(resampled(stack, None)[0])


def resampled(stack: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """mIoU of the best candidate for every resample (``counts`` ``(B, n)``), or for all scenes (None).

    The same computation as :func:`vpl_plugin.bootstrap.bootstrap_miou` (checked in :func:`check_oracle`),
    kept here because contrasts of several cells need the per-resample values themselves.
    """
    from vpl_plugin.bootstrap import miou_of_sums

    t, n, c, _ = stack.shape
    flat = stack.reshape(t, n, c * c).astype(np.float64)
    sums = flat.sum(axis=1)[None] if counts is None else np.einsum("bn,tnk->btk", counts.astype(np.float64), flat)
    miou = miou_of_sums(sums.reshape(*sums.shape[:2], c, c))
    best = np.argmax(np.where(np.isnan(miou), -np.inf, miou), axis=1)
    return miou[np.arange(len(miou)), best]


def check_oracle(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> None:
    """The per-resample values reproduce the library's bootstrap on the same draws."""
    from vpl_plugin.bootstrap import bootstrap_miou, paired_bootstrap

    mine = np.nanpercentile(resampled(a, counts), [2.5, 97.5])
    lib = bootstrap_miou(a, counts=counts)
    diff = np.nanpercentile(resampled(a, counts) - resampled(b, counts), [2.5, 97.5])
    lib_diff = paired_bootstrap(a, b, counts=counts)
    if not (np.allclose(mine, lib["ci95"], atol=1e-12) and abs(point(a) - lib["miou"]) < 1e-12
            and np.allclose(diff, lib_diff["ci95"], atol=1e-12)):
        raise AssertionError(f"bootstrap mismatch: {mine} vs {lib['ci95']}, {diff} vs {lib_diff['ci95']}")


def interval(full: float, samples: np.ndarray) -> dict[str, Any]:
    """``{"value", "ci95"}`` in mIoU points (x100)."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return {"value": round(100 * full, 2), "ci95": [round(100 * float(lo), 2), round(100 * float(hi), 2)]}


# -- analysis --------------------------------------------------------------------------------------------
SCALE_KEYS = ("clip", "tau0.03", "tau0.1", "tau0.01")  # CLIP's own, 1/0.03 (literal), 10, 100


def cell(fg: str, bg: str, scale: str, d: str | None = "token") -> Cell:
    """The cell of these levels (text/text cells carry no D level)."""
    return Cell(fg, bg, scale, None if fg == bg == "text" else d)


CLIP_ES = cell("text", "text", "clip")
LITERAL = cell("vision", "vision", "tau0.03", "token")


class Scorer:
    """Point values and per-resample values of cells, and of linear contrasts between them."""

    def __init__(self, results: dict[Cell, dict[str, np.ndarray]], counts: np.ndarray) -> None:
        self.results, self.counts = results, counts
        self._cache: dict[tuple[Cell, str], tuple[float, np.ndarray]] = {}

    def values(self, c: Cell, measure: str) -> tuple[float, np.ndarray]:
        if (c, measure) not in self._cache:
            stack = self.results[c][measure]
            self._cache[c, measure] = point(stack), resampled(stack, self.counts)
        return self._cache[c, measure]

    def contrast(self, weights: dict[Cell, float], measure: str) -> dict[str, Any]:
        full = sum(w * self.values(c, measure)[0] for c, w in weights.items())
        samples = sum(w * self.values(c, measure)[1] for c, w in weights.items())
        return interval(full, samples)

    def all_measures(self, weights: dict[Cell, float]) -> dict[str, Any]:
        return {m: self.contrast(weights, m) for m in MEASURES}


def cube_effects(scorer: Scorer, d: str) -> dict[str, Any]:
    """Main effects and interactions of A (fg), B (bg), C (scale: CLIP's -> 1/0.03) at D level ``d``."""
    sign = {"text": -1, "vision": 1, "clip": -1, "tau0.03": 1}
    cube = [(fg, bg, s) for fg in ("text", "vision") for bg in ("text", "vision") for s in ("clip", "tau0.03")]
    terms = {"A fg vision": (0,), "B bg vision": (1,), "C scale 1/0.03": (2,), "AxB": (0, 1), "AxC": (0, 2),
             "BxC": (1, 2), "AxBxC": (0, 1, 2)}
    out = {}
    for name, idx in terms.items():
        weights = {cell(*lv, d=d): np.prod([sign[lv[i]] for i in idx]) / 4.0 for lv in cube}
        out[name] = scorer.all_measures(weights)
    return out


def recoveries(scorer: Scorer) -> dict[str, Any]:
    """From the literal cell, one factor put back (and the resulting cell against CLIP-ES)."""
    changes = {"C: CLIP's scale": cell("vision", "vision", "clip"),
               "B: text background prototypes": cell("vision", "text", "tau0.03"),
               "A: text foreground prototypes": cell("text", "vision", "tau0.03"),
               "D: region-pooled rows (same recipe)": cell("vision", "vision", "tau0.03", "region"),
               "D: shifted to the pooled embeddings": cell("vision", "vision", "tau0.03", "shift"),
               "D: recommended prototypes": cell("vision", "vision", "tau0.03", "recommended"),
               "B + C: text background and CLIP's scale": cell("vision", "text", "clip")}
    return {name: {"cell": c.key, "recovery": scorer.all_measures({c: 1.0, LITERAL: -1.0}),
                   "vs_clip_es": scorer.all_measures({c: 1.0, CLIP_ES: -1.0})} for name, c in changes.items()}


def verdicts(harm: dict[str, Any], rec: dict[str, Any]) -> dict[str, str]:
    """The pre-registered reading of each recovery (seed mIoU with CAA)."""
    size = -harm["seed"]["value"]
    out = {}
    for name, r in rec.items():
        v, (lo, hi) = r["recovery"]["seed"]["value"], r["recovery"]["seed"]["ci95"]
        if lo > 0 and v >= size / 2:
            out[name] = "main cause (recovers at least half the harm, interval above 0)"
        elif lo > 0:
            out[name] = "a cause (interval above 0, less than half the harm)"
        elif hi < 0:
            out[name] = "makes it worse (interval below 0)"
        else:
            out[name] = "no measurable effect (interval includes 0)"
        if r["vs_clip_es"]["seed"]["ci95"][1] >= 0:
            out[name] += "; removes the harm (not below CLIP-ES)"
    return out


def harm_removers(scorer: Scorer, cells: Sequence[Cell]) -> list[Cell]:
    """Cells with learned vision foreground prototypes whose seed is not below CLIP-ES's."""
    return [c for c in cells if c.fg == "vision"
            and scorer.contrast({c: 1.0, CLIP_ES: -1.0}, "seed")["ci95"][1] >= 0]


def cell_rows(scorer: Scorer, cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Every cell's measures with intervals and its softmax readings."""
    rows = []
    for c in cells:
        r = scorer.results[c]
        rows.append({"cell": c.key, "fg": c.fg, "bg": c.bg, "scale": c.scale, "d": c.d,
                     **{m: scorer.contrast({c: 1.0}, m) for m in MEASURES},
                     "fg_softmax_mass": round(float(r["fg_mass"].mean()), 4),
                     "fg_beats_every_bg": round(float(r["fg_wins"].mean()), 4)})
    return rows


def validate(world: World, vision, chosen: Sequence[Cell], scales: dict[str, float], cache: Path, log,
             resamples: int) -> dict[str, Any]:
    """Re-measure the harm-removing variants against CLIP-ES on the validation scenes."""
    from vpl_plugin.bootstrap import resample_counts

    vcache = cache / "validation"
    vcache.mkdir(exist_ok=True)
    cells = [CLIP_ES, LITERAL] + [c for c in chosen if c not in (CLIP_ES, LITERAL)]
    res = run_cells(world, vision, cells, scales, world.validation, vcache, log)
    scorer = Scorer(res, resample_counts(len(world.validation), resamples, seed=1))
    out = {}
    for c in cells[1:]:
        diff = scorer.all_measures({c: 1.0, CLIP_ES: -1.0})
        out[c.key] = {"seed": scorer.contrast({c: 1.0}, "seed"), "mask": scorer.contrast({c: 1.0}, "mask"),
                      "vs_clip_es": diff, "passes": diff["seed"]["ci95"][1] >= 0}
    out["clip_es"] = {m: scorer.contrast({CLIP_ES: 1.0}, m) for m in ("seed", "mask")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", default=None, help="demo CLIP checkpoint (default: the shipped one)")
    parser.add_argument("--eval-scenes", type=int, default=300)
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vpl_literal_harm"),
                        help="prototype sets and per-cell confusion matrices (reused by a rerun)")
    parser.add_argument("--name", default="literal_harm", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vpl_plugin.bootstrap import resample_counts

    start = time.time()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    world = load_world(args.clip, args.eval_scenes, args.val_scenes)
    log(f"{len(world.learn)} learning, {len(world.evaluation)} evaluation, {len(world.validation)} validation "
        f"scenes; CLIP's logit scale {world.clip_scale:.3f}")
    scales = {"clip": world.clip_scale, "tau0.03": 1 / TAU_LITERAL, "tau0.1": 10.0, "tau0.01": 100.0}
    vision = vision_sets(world, cache, log)
    cells = all_cells(SCALE_KEYS)
    results = run_cells(world, vision, cells, scales, world.evaluation, cache, log)
    counts = resample_counts(len(world.evaluation), args.resamples, seed=0)
    check_oracle(results[LITERAL]["seed"], results[CLIP_ES]["seed"], counts)
    scorer = Scorer(results, counts)
    harm = scorer.all_measures({LITERAL: 1.0, CLIP_ES: -1.0})
    rec = recoveries(scorer)
    removers = harm_removers(scorer, cells)
    log(f"{len(removers)} cells with vision foreground prototypes not below CLIP-ES; validating")
    report = {
        "design": __doc__, "scales": scales, "scenes": {"learn": len(world.learn), "evaluation": len(world.evaluation),
                                                        "validation": len(world.validation)},
        "resamples": args.resamples, "prototype_sets": {k: v.provenance for k, v in vision.items()},
        "cells": cell_rows(scorer, cells), "harm": harm, "recoveries": rec, "verdicts": verdicts(harm, rec),
        "factorial": {d: cube_effects(scorer, d) for d in D_LEVELS},
        "harm_removers_evaluation": [c.key for c in removers],
        "validation": validate(world, vision, removers, scales, cache, log, args.resamples),
        "seconds": round(time.time() - start, 1), "machine": machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report))
    log(f"wrote {RESULTS / (args.name + '.json')} and .md")


def fmt(x: dict[str, Any]) -> str:
    """``v [lo, hi]`` in mIoU points."""
    return f"{x['value']:.1f} [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}]"


def markdown(r: dict[str, Any]) -> str:
    """The results file: design, cells, harm and recoveries, factorial effects, validation."""
    s = r["scenes"]
    lines = ["# Why the paper-literal VPL swap hurts on the demo world (factorial experiment)", "",
             "`python benchmarks/literal_harm_factorial.py` (design and analysis fixed before the run: the "
             "script's docstring, repeated in `literal_harm.json`). "
             f"{s['learn']} learning scenes (labels only), {s['evaluation']} evaluation scenes, "
             f"{s['validation']} validation scenes; 95 % paired bootstrap intervals over scenes "
             f"({r['resamples']} resamples); mIoU points. Scales: " +
             ", ".join(f"{k} = {v:.2f}" for k, v in r["scales"].items()) + f". {r['seconds']:.0f} s.", "",
             "## Harm and what each cause recovers (seed with CAA | pseudo mask | raw GradCAM seed)", "",
             (f"Harm (literal - CLIP-ES): {fmt(r['harm']['seed'])} | {fmt(r['harm']['mask'])} | "
             f"{fmt(r['harm']['seed_raw'])}"), "",
             ("| from the literal cell, put back | recovery, seed | recovery, mask | recovery, raw seed | "
             "cell - CLIP-ES, seed | reading |"), "|---|---|---|---|---|---|"]
    for name, v in r["recoveries"].items():
        rec = v["recovery"]
        lines.append(f"| {name} | {fmt(rec['seed'])} | {fmt(rec['mask'])} | {fmt(rec['seed_raw'])} | "
                     f"{fmt(v['vs_clip_es']['seed'])} | {r['verdicts'][name]} |")
    lines += ["", ("## Factorial effects (A fg text->vision, B bg text->vision, C scale CLIP's->1/0.03; "
              "contrasts +-1/4 over the 2x2x2 cube), seed with CAA"), "",
              "| D level | " + " | ".join(r["factorial"]["token"].keys()) + " |",
              "|---|" + "---|" * len(r["factorial"]["token"])]
    for d, eff in r["factorial"].items():
        lines.append(f"| {d} | " + " | ".join(fmt(e["seed"]) for e in eff.values()) + " |")
    lines += ["", "Same, pseudo-mask mIoU:", "", "| D level | " + " | ".join(r["factorial"]["token"].keys()) + " |",
              "|---|" + "---|" * len(r["factorial"]["token"])]
    for d, eff in r["factorial"].items():
        lines.append(f"| {d} | " + " | ".join(fmt(e["mask"]) for e in eff.values()) + " |")
    lines += ["", "## Every cell", "", ("| fg | bg | scale | D | seed (CAA) | pseudo mask | raw GradCAM seed | "
              "fg softmax mass | fg beats every bg |"), "|---|---|---|---|---|---|---|---:|---:|"]
    for c in r["cells"]:
        lines.append(f"| {c['fg']} | {c['bg']} | {c['scale']} | {c['d'] or '-'} | {fmt(c['seed'])} | "
                     f"{fmt(c['mask'])} | {fmt(c['seed_raw'])} | {c['fg_softmax_mass']:.3f} | "
                     f"{c['fg_beats_every_bg']:.3f} |")
    lines += ["", "## Variants not below CLIP-ES on the evaluation scenes, re-measured on the validation scenes", ""]
    val = r["validation"]
    lines.append(f"CLIP-ES on the validation scenes: seed {fmt(val['clip_es']['seed'])}, mask {fmt(val['clip_es']['mask'])}.")
    lines += ["", "| cell | seed | mask | seed - CLIP-ES | mask - CLIP-ES | passes |", "|---|---|---|---|---|---|"]
    for key, v in val.items():
        if key != "clip_es":
            lines.append(f"| {key} | {fmt(v['seed'])} | {fmt(v['mask'])} | {fmt(v['vs_clip_es']['seed'])} | "
                         f"{fmt(v['vs_clip_es']['mask'])} | {'yes' if v['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
