"""`vpl demo`: CLIP-ES vs CLIP-ES + VPL on the synthetic world, with controls and sweeps.

Generates a learning split (image-level labels only) and an evaluation split (masks) of held-out
scenes, runs CLIP-ES with text prototypes and with vision prototypes, and CLIP-CPAL (context bank
from the learning split) with both, turns CAMs into CRF pseudo masks, and reports Table-1-style
rows (seed and pseudo-mask mIoU), a seed sweep of CLIP-CPAL's interpretations, a Table-5-style tau_I sweep, a
Table-6-style Phi sweep, the modality gap of every prototype set, controls (prototypes learned
from ground-truth masks, ground-truth class centroids, text prototypes shifted by the mean gap,
the softmax scale alone), and the rate at which co-occurring context is mistaken for the object.
Nothing in the evaluation split is used to learn or choose anything.

The rows are a table of :class:`RowSpec` (which prototype set, which map, CAA or not, CLIP-ES or
CLIP-CPAL), evaluated in order by one loop (:func:`table_rows`, :func:`control_rows`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from vpl_plugin._io import write_json, write_text
from vpl_plugin.adapters.clip_cpal import CLIPCPALAdapter
from vpl_plugin.adapters.clip_es import CLIPESAdapter
from vpl_plugin.backbones.clip import TrunkCache
from vpl_plugin.bootstrap import BOOTSTRAP_RESAMPLES
from vpl_plugin.adapters.cpal_bank import build_context_bank
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld
from vpl_plugin.demo.evaluation import (
    DEMO_TEMPLATES,
    evaluate_adapter,
    label_set_accuracy,
    pil_image,
    text_gradcam_seed_miou,
)
from vpl_plugin.demo.figures import GridColumn, PrototypeCloud, bars_figure, gap_figure, grid_figure, save_figure
from vpl_plugin.demo.intervals import (
    CLIP_ES,
    PAPER_LITERAL,
    RECOMMENDED,
    TEXT_NO_CAA,
    SceneBootstrap,
    difference_report,
    save_confusions,
)
from vpl_plugin.demo.learning import (
    class_centroids,
    gt_targets,
    probe_scenes,
    region_targets,
    seed_labels,
    seed_targets,
)
from vpl_plugin.prototypes import PrototypeSet, learn_vision_prototypes, modality_gap, shift_text_prototypes

__all__ = ["DEFAULT_CHECKPOINT", "DEMO_TEMPLATES", "DemoConfig", "RowSpec", "control_rows", "label_set_accuracy",
           "learning_split", "run_demo", "table_rows", "text_gradcam_seed_miou"]
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo_clip.pt"


@dataclass
class DemoConfig:
    """What the demo runs (``quick`` shrinks the splits and the sweeps)."""

    # learning split: as many scenes as give `learn_tokens` patch tokens (1,000 scenes of 8x8 tokens
    # at patch 8, 250 of 16x16 at patch 4), so the learning problem keeps its size across CLIPs;
    # an explicit `train_scenes` overrides it
    train_scenes: Optional[int] = None
    learn_tokens: int = 64_000
    eval_scenes: int = 300
    world_seed: int = 7  # the demo CLIP was trained on world seed 1: these scenes are held out
    tau: float = 0.03
    phi: float = 0.4
    lr: float = 10.0
    iters: int = 3000
    taus: Tuple[float, ...] = (0.01, 0.02, 0.03, 0.04, 0.05)
    phis: Tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    grid_scenes: int = 8
    cpal_sweep: Tuple[Tuple[str, Any], ...] = (
        ("features", "proj"), ("fusion", "max"), ("candidates", "all"), ("gamma", 0.0), ("gamma", 1.0),
        ("delta_p", 0.6), ("num_context", 4), ("tau_s", 1.0))
    # CLIP-CPAL interpretations chosen on separate validation scenes (masks used for this choice
    # only; never the evaluation scenes): features x delta_p x gamma, mean fusion
    cpal_val_scenes: Optional[int] = None  # None: as many as eval_scenes
    cpal_grid: Tuple[Tuple[str, float, float], ...] = tuple(
        (f, d, g) for f in ("ln1", "proj") for d in (0.4, 0.6) for g in (0.5, 1.0))
    # the CLIP-CPAL interpretation sweep and the validation-scene choice (24 context banks over the
    # learning scenes): off by default to keep `vpl demo` within 10 minutes; `--cpal-studies`
    cpal_studies: bool = False
    # 95 % bootstrap intervals over the evaluation scenes (fixed seed; vpl_plugin.demo.intervals)
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = 0

    @classmethod
    def quick_config(cls) -> "DemoConfig":
        return cls(learn_tokens=19_200, eval_scenes=100, taus=(0.01, 0.03, 0.05), phis=(0.3, 0.4, 0.5))

    def learning_scenes(self, encoder: Any, size: int) -> int:
        """Scenes in the learning split for ``encoder`` on ``size`` x ``size`` scenes."""
        if self.train_scenes is not None:
            return self.train_scenes
        h, w = encoder.padded_size(size, size)
        tokens = (h // encoder.patch_size) * (w // encoder.patch_size)
        return max(1, -(-self.learn_tokens // tokens))


def learning_split(encoder: Any, cfg: DemoConfig) -> Tuple[DemoConfig, SceneWorld, List[Any]]:
    """``(cfg, world, scenes)``: the demo's world, ``cfg`` with the learning split sized for
    ``encoder`` (:meth:`DemoConfig.learning_scenes`) and the learning scenes."""
    world = SceneWorld(seed=cfg.world_seed)
    scenes = cfg.learning_scenes(encoder, world.size)
    return replace(cfg, train_scenes=scenes), world, world.batch(0, scenes)




# -- the rows -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    """One row of the demo's table: what is evaluated on the evaluation scenes.

    Attributes:
        name: the row's name in the report.
        prototypes: the prototype set (``text``, ``paper-literal``, ``vpl``, ``region``, ``gt``,
            ``centroids``, ``shifted``, ``scaled``; built once, when a row first needs it).
        map_mode: the map that enters refinement (``gradcam``, ``dense``, ``fused``).
        refine: CAA refinement (CLIP-ES always refines).
        cpal: None for CLIP-ES; CLIP-CPAL's settings (``()``: its defaults) otherwise, with the
            context bank from the learning scenes.
        note: the report's note.
        heading: a log line printed before the row (the start of a block).
    """

    name: str
    prototypes: str
    map_mode: str = "gradcam"
    refine: bool = True
    cpal: Optional[Tuple[Tuple[str, Any], ...]] = None
    note: str = ""
    heading: str = ""


def table_rows(cfg: DemoConfig) -> List[RowSpec]:
    """Table 1 (CLIP-ES with text and vision prototypes), the rows without CAA, and CLIP-CPAL."""
    region = "VPL region-pooled (tau_I 0.1)"
    return [
        RowSpec("CLIP-ES (text prototypes)", "text",
                heading="Table 1 (seed / pseudo-mask mIoU on the evaluation scenes):"),
        RowSpec("CLIP-ES + VPL, paper-literal (halving, GradCAM)", "paper-literal",
                note=f"tau {cfg.tau}, lr {cfg.lr}, {cfg.iters} it, seed-hardened targets, Phi {cfg.phi}"),
        RowSpec("CLIP-ES + VPL (bb rule, GradCAM)", "vpl", note="converged optimiser, same objective"),
        RowSpec("VPL prototypes, dense map", "vpl", "dense"),
        RowSpec("VPL prototypes, text GradCAM x dense", "vpl", "fused"),
        RowSpec("text prototypes, dense map (control)", "text", "dense"),
        RowSpec("text prototypes, text GradCAM x dense (control)", "text", "fused"),
        RowSpec(f"{region}, GradCAM", "region", note="research candidate"),
        RowSpec(f"{region}, dense map", "region", "dense", note="research candidate"),
        RowSpec(f"{region}, text GradCAM x dense", "region", "fused", note="research candidate"),
        # CLIP-ES always refines with CAA; both maps without it (the text row's seed is the second
        # gate; the VPL row is the recommended configuration: CAA off was chosen on the validation
        # scenes, benchmarks/caa_choice_validation.py)
        RowSpec("text prototypes, GradCAM, no CAA", "text", refine=False, note="CAA off",
                heading="Without CAA refinement (CLIP-ES always refines):"),
        RowSpec(f"{region}, dense map, no CAA", "region", "dense", refine=False,
                note="recommended: CAA off chosen on validation scenes"),
        RowSpec("CLIP-CPAL (text prototypes, GradCAM)", "text", cpal=(),
                note="default interpretations: ln_1 tokens, same-class, M 8, k 3, tau_s 0.1, gamma 0.5, mean",
                heading="CLIP-CPAL (training-free reconstruction, docs/clip_cpal.md; bank from the learning "
                        "scenes):"),
        RowSpec("CLIP-CPAL + VPL, paper-literal (GradCAM)", "paper-literal", cpal=(),
                note="CPAL on the paper-literal VPL GradCAMs"),
        RowSpec("CLIP-CPAL + VPL recommended (region-pooled, dense map)", "region", "dense", cpal=(),
                note="CPAL on the recommended VPL dense maps"),
        RowSpec("CLIP-CPAL, trained head (lambda 1)", "text", cpal=(("head", True),),
                note="1x1-conv CAM head on frozen ln_1 tokens, L_BCE + L_self, 200 Adam steps"),
        RowSpec("CLIP-CPAL, trained head, BCE only (lambda 0)", "text", cpal=(("head", True), ("head_lambda", 0.0)),
                note="the same head without L_self"),
    ]


def control_rows(cfg: DemoConfig) -> List[RowSpec]:
    """Controls: prototypes from ground-truth masks, class centroids, shifted text, the scale alone."""
    masks = "upper bound: uses masks"
    return [
        RowSpec("prototypes learned from GT masks, GradCAM", "gt", note=masks, heading="Controls:"),
        RowSpec("prototypes learned from GT masks, dense map", "gt", "dense", note=masks),
        RowSpec("prototypes learned from GT masks, dense map, no CAA", "gt", "dense", refine=False, note=masks),
        RowSpec("GT class centroids, GradCAM", "centroids", note="uses masks"),
        RowSpec("text shifted by the mean gap (Liang et al.)", "shifted", note="lambda 0.5"),
        RowSpec("text prototypes with logit scale 1/tau_I only", "scaled", note="no learning"),
    ]


@dataclass
class _Row:
    name: str
    seed_miou: float
    mask_miou: float
    bg_threshold: float
    context_false_activation: float
    gap: Optional[float] = None
    note: str = ""
    seed_ci95: Optional[List[float]] = None
    mask_ci95: Optional[List[float]] = None
    prototypes: str = ""


class _DemoRun:
    """The state one demo run shares between its rows: the encoder, the splits, the probes, the
    prototype sets built so far, CLIP-CPAL's context banks and the seeds the sweeps revisit."""

    def __init__(self, encoder: Any, cfg: DemoConfig, world: SceneWorld, train: list, test: list,
                 log: Callable[[str], None]) -> None:
        self.encoder, self.cfg, self.world, self.train, self.test, self.log = encoder, cfg, world, train, test, log
        adapter = CLIPESAdapter(encoder, SYNTHETIC, templates=DEMO_TEMPLATES)
        self.text = adapter.text_prototypes
        self.gates: Dict[str, Any] = {"label_set_accuracy": label_set_accuracy(encoder, test)}
        self.probes = probe_scenes(adapter, train)
        eval_probes = probe_scenes(adapter, test)
        self.eval_feats = torch.cat([p.features for p in eval_probes])
        self.eval_seed = torch.cat([seed_labels(p, cfg.phi) for p in eval_probes])
        self.learned: Dict[Tuple[float, float, str], Tuple[PrototypeSet, dict]] = {}  # sweeps revisit (Phi, tau_I)
        self.sets: Dict[str, PrototypeSet] = {}
        self.histories: Dict[str, dict] = {}
        self.rows: List[_Row] = []
        self.grids: Dict[str, List[np.ndarray]] = {}
        self.learn_samples = [SimpleNamespace(image=pil_image(sc.image), labels=list(sc.labels)) for sc in train]
        self.banks: Dict[tuple, Any] = {}
        # (prototype set, map mode, CAA) -> seed and its interval; the value keeps the set alive,
        # so ids stay unique
        self.seeds_of: Dict[Tuple[int, str, bool], Tuple[PrototypeSet, float, List[float]]] = {}
        self.boot = SceneBootstrap(cfg.bootstrap_resamples, cfg.bootstrap_seed)
        # row name -> per-scene (seed confusions per exponent, mask confusions), and the exponents
        self.confusions: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.exponents: Dict[str, List[float]] = {}
        self.cpal_val_base_ci: Dict[str, List[float]] = {}

    def learn(self, phi: float, tau: float, step_rule: str = "bb", targets=None) -> Tuple[PrototypeSet, dict]:
        """VPL prototypes from the seed-hardened targets at ``phi`` (or from ``targets``)."""
        cfg, text = self.cfg, self.text
        if targets is None and (phi, tau, step_rule) in self.learned:
            return self.learned[phi, tau, step_rule]
        x, q, c = targets if targets is not None else seed_targets(self.probes, text, phi)
        w, hist = learn_vision_prototypes(x, q, text.prototypes, c, tau=tau, lr=cfg.lr, iters=cfg.iters,
                                          step_rule=step_rule, return_history=True)
        ps = PrototypeSet(w, text.class_names, text.background_names, tau=tau, kind="vision",
                          provenance={"phi": phi, "step_rule": step_rule, "iters": len(hist["loss"]) - 1,
                                      "loss": [hist["loss"][0], hist["loss"][-1]]})
        if targets is None:
            self.learned[phi, tau, step_rule] = ps, hist
        return ps, hist

    def prototypes(self, key: str) -> PrototypeSet:
        """The prototype set ``key`` of :class:`RowSpec`, built when first asked for."""
        if key not in self.sets:
            self.sets[key] = self._build(key)
        return self.sets[key]

    def _build(self, key: str) -> PrototypeSet:
        cfg, text = self.cfg, self.text
        if key == "text":
            return text
        if key in ("paper-literal", "vpl", "region", "gt"):
            args = {"paper-literal": (cfg.phi, cfg.tau, "halving"), "vpl": (cfg.phi, cfg.tau, "bb"),
                    "region": (cfg.phi, 0.1, "bb"), "gt": (cfg.phi, cfg.tau, "bb")}[key]
            targets = {"region": lambda: region_targets(self.probes, text, cfg.phi),
                       "gt": lambda: gt_targets(self.probes, text)}.get(key, lambda: None)()
            ps, self.histories[key] = self.learn(*args, targets=targets)
            return ps
        if key == "centroids":
            return PrototypeSet(class_centroids(self.probes, text, [sc.background for sc in self.train]),
                                text.class_names, text.background_names, tau=cfg.tau, kind="vision")
        if key == "shifted":
            return PrototypeSet(shift_text_prototypes(text.prototypes, torch.cat([p.features for p in self.probes])),
                                text.class_names, text.background_names, tau=float(text.tau), kind="text",
                                logit_scale_override=float(text.logit_scale))
        if key == "scaled":
            return PrototypeSet(text.prototypes.clone(), text.class_names, text.background_names, tau=cfg.tau,
                                kind="vision")
        raise ValueError(f"unknown prototype set {key!r} in a demo row specification.")

    def cpal_adapter(self, ps: PrototypeSet, map_mode: str = "gradcam", **cpal) -> CLIPCPALAdapter:
        """CLIP-CPAL with its context bank from the learning scenes (pass 1, cached per setting)."""
        ad = CLIPCPALAdapter(self.encoder, SYNTHETIC, prototypes=ps, templates=DEMO_TEMPLATES, map_mode=map_mode,
                             **cpal)
        key = tuple(sorted(ad.bank_settings().items(), key=lambda kv: kv[0]))
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in key)
        if key not in self.banks:
            self.banks[key] = build_context_bank(ad, self.learn_samples, progress=False)
        ad.set_bank(self.banks[key])
        return ad

    def sweep_seed(self, ps: PrototypeSet, map_mode: str) -> Tuple[float, List[float]]:
        """Seed mIoU (0-1) of a CLIP-ES map and its interval (mIoU points); the sweeps revisit
        the main rows' prototype sets."""
        key = (id(ps), map_mode, True)
        if key not in self.seeds_of:
            ad = CLIPESAdapter(self.encoder, SYNTHETIC, prototypes=ps, templates=DEMO_TEMPLATES, map_mode=map_mode)
            ev = evaluate_adapter(ad, self.test, crf=False)
            self.seeds_of[key] = ps, ev.seed, self.boot.miou(ev.seed_confusion)
        return self.seeds_of[key][1], self.seeds_of[key][2]

    def evaluate(self, spec: RowSpec) -> _Row:
        """Evaluate one row on the evaluation scenes, log it and add it to the table."""
        if spec.heading:
            self.log(spec.heading)
        ps = self.prototypes(spec.prototypes)
        if spec.cpal is None:
            ad = CLIPESAdapter(self.encoder, SYNTHETIC, prototypes=ps, templates=DEMO_TEMPLATES,
                               map_mode=spec.map_mode, refine=spec.refine)
        else:
            ad = self.cpal_adapter(ps, spec.map_mode, **dict(spec.cpal))
        ev = evaluate_adapter(ad, self.test, keep=self.cfg.grid_scenes)
        seed_ci = self.boot.miou(ev.seed_confusion)
        if spec.cpal is None:
            self.seeds_of[id(ps), spec.map_mode, spec.refine] = ps, ev.seed, seed_ci
        self.grids[spec.name] = ev.kept
        self.confusions[spec.name] = ev.seed_confusion, ev.mask_confusion
        self.exponents[spec.name] = list(ev.sweep)
        gap = modality_gap(self.eval_feats, self.eval_seed, ps.prototypes)
        row = _Row(spec.name, 100 * ev.seed, 100 * ev.mask, ev.threshold, ev.context_false_activation, gap, spec.note,
                   seed_ci, self.boot.miou(ev.mask_confusion), spec.prototypes)
        self.rows.append(row)
        self.log(f"  {spec.name:<48s} seed {row.seed_miou:5.1f}  mask {row.mask_miou:5.1f}  gap {gap:.3f}")
        return row

    def cpal_studies(self) -> Tuple[list, list, dict]:
        """CLIP-CPAL's interpretation sweep (evaluation scenes, seeds only) and its choice on separate
        validation scenes (``cpal_studies``), with the rows of the chosen interpretations."""
        cfg = self.cfg
        cpal_rows = []
        for key, value in (cfg.cpal_sweep if cfg.cpal_studies else ()):
            ev = evaluate_adapter(self.cpal_adapter(self.text, **{key: value}), self.test, crf=False)
            seed = ev.seed
            cpal_rows.append({"setting": f"{key}={value}", "seed": 100 * seed,
                              "seed_ci95": self.boot.miou(ev.seed_confusion)})
            self.log(f"  CLIP-CPAL {key}={value}: seed {100 * seed:5.1f}")
        val = self.world.batch(20_000_000, cfg.cpal_val_scenes or cfg.eval_scenes) if cfg.cpal_studies else []
        cpal_selection, cpal_val_base = [], {}
        studies = (("text", "text", "gradcam"), ("VPL recommended", "region", "dense")) if cfg.cpal_studies else ()
        for label, key, mode in studies:
            ps = self.prototypes(key)
            no_cpal = CLIPESAdapter(self.encoder, SYNTHETIC, prototypes=ps, templates=DEMO_TEMPLATES, map_mode=mode)
            ev = evaluate_adapter(no_cpal, val, crf=False)
            cpal_val_base[label] = 100 * ev.seed
            self.cpal_val_base_ci[label] = self.boot.miou(ev.seed_confusion)
            scores = []
            for feats, delta, gamma in cfg.cpal_grid:
                kw = {"features": feats, "delta_p": delta, "gamma": gamma}
                ev = evaluate_adapter(self.cpal_adapter(ps, mode, **kw), val, crf=False)
                seed = ev.seed
                scores.append((100 * seed, kw))
                cpal_selection.append({"prototypes": label, **kw, "validation_seed": 100 * seed,
                                       "validation_seed_ci95": self.boot.miou(ev.seed_confusion)})
            best_seed, best = max(scores, key=lambda t: t[0])  # ties -> first (the documented default first)
            self.log(f"  chosen on {len(val)} validation scenes ({label}): {best} (validation seed {best_seed:.1f}; "
                     f"without CPAL {cpal_val_base[label]:.1f})")
            name = ("CLIP-CPAL, interpretation chosen on validation scenes" if label == "text" else
                    "CLIP-CPAL + VPL recommended, interpretation chosen on validation scenes")
            self.evaluate(RowSpec(name, key, mode, cpal=tuple(best.items()),
                                  note=", ".join(f"{k} {v}" for k, v in best.items())))
        return cpal_rows, cpal_selection, cpal_val_base

    def sweeps(self) -> Tuple[list, list]:
        """The tau_I sweep (Table 5 style) and the Phi sweep (Table 6 style), seeds of VPL bb."""
        cfg = self.cfg
        self.log("Table 5 (tau_I sweep, VPL bb, GradCAM | dense):")
        tau_rows = []
        for tau in cfg.taus:
            ps, _ = self.learn(cfg.phi, tau)
            (g, g_ci), (d, d_ci) = self.sweep_seed(ps, "gradcam"), self.sweep_seed(ps, "dense")
            tau_rows.append({"tau": tau, "seed_gradcam": 100 * g, "seed_dense": 100 * d,
                             "gap": modality_gap(self.eval_feats, self.eval_seed, ps.prototypes),
                             "seed_gradcam_ci95": g_ci, "seed_dense_ci95": d_ci})
            self.log(f"  tau {tau:.2f}: GradCAM {100 * g:5.1f}  dense {100 * d:5.1f}  gap {tau_rows[-1]['gap']:.3f}")
        self.log("Table 6 (Phi sweep, VPL bb, GradCAM | dense):")
        phi_rows = []
        for phi in cfg.phis:
            ps, _ = self.learn(phi, cfg.tau)
            (g, g_ci), (d, d_ci) = self.sweep_seed(ps, "gradcam"), self.sweep_seed(ps, "dense")
            phi_rows.append({"phi": phi, "seed_gradcam": 100 * g, "seed_dense": 100 * d,
                             "seed_gradcam_ci95": g_ci, "seed_dense_ci95": d_ci})
            self.log(f"  Phi {phi:.1f}: GradCAM {100 * g:5.1f}  dense {100 * d:5.1f}")
        return tau_rows, phi_rows


# -- the demo -----------------------------------------------------------------------------------------
def run_demo(out: Path, *, clip: Optional[str] = None, quick: bool = False, device: str = "cpu",
             config: Optional[DemoConfig] = None, log: Callable[[str], None] = print,
             cpal_studies: bool = False) -> Dict[str, Any]:
    """Run the demo and write ``report.json``, ``report.md``, ``confusion.npz`` and the figures
    ``grid.png``, ``bars.png`` and ``gap.png`` into ``out``.

    ``cpal_studies`` adds the CLIP-CPAL interpretation sweep and the choice of its settings on
    separate validation scenes (several extra minutes).

    Every seed and pseudo-mask mIoU comes with a 95 % bootstrap interval over the evaluation
    scenes, and the differences the README states with paired intervals
    (:mod:`vpl_plugin.demo.intervals`); ``confusion.npz`` holds the per-scene confusion matrices
    they are computed from. ``grid.png``: one row per (scene, class), columns image, ground truth,
    then the class's CAM of CLIP-ES, the text GradCAM without CAA, paper-literal VPL and the
    recommended configuration (:data:`GRID_COLUMNS`); ``bars.png``: every row's numbers with their
    intervals; ``gap.png``: the modality gap (:mod:`vpl_plugin.demo.figures`).
    """
    threads = torch.get_num_threads()
    if str(device).startswith("cpu"):
        # 64-token images: extra threads only add synchronisation (measured 20x slower under load)
        torch.set_num_threads(1)
    try:
        if cpal_studies:
            config = replace(config or (DemoConfig.quick_config() if quick else DemoConfig()), cpal_studies=True)
        return _run_demo(out, clip=clip, quick=quick, device=device, config=config, log=log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, *, clip: Optional[str], quick: bool, device: str,
              config: Optional[DemoConfig], log: Callable[[str], None]) -> Dict[str, Any]:
    from vpl_plugin.backbones import load_clip

    start = time.time()
    cfg = config or (DemoConfig.quick_config() if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(clip) if clip else DEFAULT_CHECKPOINT
    if not ckpt.exists():
        raise FileNotFoundError(
            f"demo CLIP checkpoint {ckpt} not found; train it with `vpl train-clip --out {ckpt}` "
            f"or pass --clip PATH.")
    encoder = load_clip(str(ckpt), device)
    # every row sends the same scenes through the same frozen blocks: run them once per scene
    encoder.trunk_cache = TrunkCache()
    cfg, world, train = learning_split(encoder, cfg)
    test = world.batch(10_000_000, cfg.eval_scenes)
    log(f"demo: {len(train)} learning scenes (labels only), {len(test)} evaluation scenes, CLIP {ckpt.name}")
    run = _DemoRun(encoder, cfg, world, train, test, log)
    for spec in table_rows(cfg):
        run.evaluate(spec)
    cpal_rows, cpal_selection, cpal_val_base = run.cpal_studies()
    for spec in control_rows(cfg):
        run.evaluate(spec)
    tau_rows, phi_rows = run.sweeps()

    rows, gates = run.rows, run.gates
    # the gate is on the text-prototype GradCAM itself (no CAA, no CRF), the measure of the probes
    # that set its level; CLIP-ES's seed (with CAA) is reported beside it
    text_raw = next(r for r in rows if r.name == "text prototypes, GradCAM, no CAA")
    gates["text_gradcam_seed_miou"] = text_raw.seed_miou  # = text_gradcam_seed_miou(encoder, test)
    gates["clip_es_seed_miou_with_caa"] = rows[0].seed_miou
    for what, value, need in (("zero-shot label-set accuracy", gates["label_set_accuracy"], 0.95),
                              ("text GradCAM seed mIoU (no CAA)", gates["text_gradcam_seed_miou"], 35.0)):
        log(f"gate: {what} {value:.3f} (>= {need} wanted): {'met' if value >= need else 'NOT MET'}")
    log(f"  (CLIP-ES seed with CAA refinement: {rows[0].seed_miou:.1f})")
    lit_hist, vpl_hist = run.histories["paper-literal"], run.histories["vpl"]
    report = {
        "config": asdict(cfg), "checkpoint": str(ckpt), "device": device, "gates": gates,
        "gates_passed": {"label_set_accuracy>=0.95": gates["label_set_accuracy"] >= 0.95,
                         "text_seed_miou>=35": gates["text_gradcam_seed_miou"] >= 35},
        "rows": [asdict(r) for r in rows], "tau_sweep": tau_rows, "phi_sweep": phi_rows,
        "cpal_sweep": cpal_rows, "cpal_selection": cpal_selection,
        "cpal_validation_without_cpal": cpal_val_base,
        "learning": {"paper_literal_loss": [lit_hist["loss"][0], lit_hist["loss"][-1]],
                     "bb_loss": [vpl_hist["loss"][0], vpl_hist["loss"][-1]],
                     "bb_iterations": len(vpl_hist["loss"]) - 1},
        "bootstrap": run.boot.describe(),
        "differences": difference_report(run.boot, [asdict(r) for r in rows], run.confusions),
        "cpal_validation_without_cpal_ci95": run.cpal_val_base_ci,
        "confusions": "confusion.npz",
        "seconds": round(time.time() - start, 1),
    }
    save_confusions(out / "confusion.npz", [r.name for r in rows], run.confusions, run.exponents)
    figures = _write_figures(out, run, report)
    report["figures"] = figures
    write_json(out / "report.json", report)
    write_text(out / "report.md", _markdown(report))
    log(f"demo: wrote {out / 'report.md'}, {out / 'report.json'}, {', '.join(figures)}, "
        f"{out / 'confusion.npz'} ({report['seconds']:.0f} s)")
    return report


#: the grid's CAM columns: (title, demo row)
GRID_COLUMNS = (GridColumn("CLIP-ES", CLIP_ES), GridColumn("text GradCAM, no CAA", TEXT_NO_CAA),
                GridColumn("paper-literal VPL", PAPER_LITERAL), GridColumn("recommended VPL", RECOMMENDED))


def _write_figures(out: Path, run: "_DemoRun", report: Dict[str, Any]) -> Dict[str, str]:
    """Write grid.png, bars.png and gap.png; returns ``{file: what it shows}`` for the report."""
    names = list(SYNTHETIC.names)
    scenes = run.test[: run.cfg.grid_scenes]
    save_figure(grid_figure(scenes, run.grids, GRID_COLUMNS, names), out / "grid.png")
    key_rows = {d["a"] for d in report["differences"]} | {d["b"] for d in report["differences"]}
    save_figure(bars_figure(report["rows"], title=f"{len(run.test)} evaluation scenes (bold: rows the README "
                            "compares)", highlight=sorted(key_rows)), out / "bars.png")
    gaps = {r["name"]: r["gap"] for r in report["rows"]}
    sets = [PrototypeCloud("text prototypes", run.prototypes("text").prototypes.numpy(), gaps[CLIP_ES], "^"),
            PrototypeCloud("paper-literal VPL prototypes", run.prototypes("paper-literal").prototypes.numpy(),
                           gaps[PAPER_LITERAL], "s"),
            PrototypeCloud("recommended VPL prototypes", run.prototypes("region").prototypes.numpy(),
                           gaps[RECOMMENDED], "*")]
    save_figure(gap_figure(run.eval_feats.numpy(), run.eval_seed.numpy(), sets, names), out / "gap.png")
    return {
        "grid.png": "one row per (scene, class) of the first scenes: the image, the class's ground truth, "
                    "then the class's CAM of " + ", ".join(f"{c.title} ({c.row})" for c in GRID_COLUMNS)
                    + ", overlaid on the image, each map min-max scaled",
        "bars.png": "every row's seed and pseudo-mask mIoU with its 95 % bootstrap interval",
        "gap.png": "2-D PCA of the seed-labelled pixel features, the text prototypes and the paper-literal "
                   "and recommended VPL prototypes, with each set's modality gap",
    }


def _ci(value: float, ci: Optional[List[float]], sign: bool = False) -> str:
    """``30.0 [28.1, 31.9]`` (a number with its interval; ``+`` on differences)."""
    fmt = "{:+.1f}" if sign else "{:.1f}"
    if not ci:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _markdown(r: Dict[str, Any]) -> str:
    boot = r.get("bootstrap") or {}
    lines = ["# vpl demo: CLIP-ES vs CLIP-ES + VPL on the synthetic world", "",
             f"Evaluation: {r['config']['eval_scenes']} held-out scenes with masks; prototypes learned "
             f"on {r['config']['train_scenes']} other scenes with image-level labels only. "
             f"Checkpoint `{Path(r['checkpoint']).name}`; {r['seconds']:.0f} s.", "",
             "Gates: zero-shot label-set accuracy "
             f"{r['gates']['label_set_accuracy']:.3f} (want >= 0.95), text GradCAM seed mIoU "
             f"(no CAA, no CRF) {r['gates']['text_gradcam_seed_miou']:.1f} (want >= 35); CLIP-ES's "
             f"seed with CAA refinement {r['gates']['clip_es_seed_miou_with_caa']:.1f}.", "",
             f"Brackets: {100 * boot.get('level', 0.95):.0f} % bootstrap intervals over the evaluation scenes "
             f"({boot.get('resamples', 'n/a')} resamples, seed {boot.get('seed', 'n/a')}; mIoU recomputed from "
             "resampled sums of per-scene confusion matrices, the background-exponent search repeated "
             "inside each resample; per-scene matrices in `confusion.npz`).", "",
             "| row | seed mIoU | pseudo-mask mIoU | gap | context false activation | note |",
             "|---|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['name']} | {_ci(row['seed_miou'], row.get('seed_ci95'))} | "
                     f"{_ci(row['mask_miou'], row.get('mask_ci95'))} | "
                     f"{row['gap']:.3f} | {100 * row['context_false_activation']:.1f}% | {row['note']} |")
    lines += _markdown_differences(r) + _markdown_cpal(r) + _markdown_sweeps(r) + _markdown_figures(r)
    lines += ["", "Seeds: best background power of upstream's eval_cam.py search for the map type: "
              "{1, 2} for CAA-refined maps (attn_highres), {1, ..., 10} for the rows without CAA "
              "(upstream's raw-GradCAM type, highres); pseudo masks: dense CRF "
              "(CLIP-ES parameters) scored on all pixels like upstream's --eval_only. Context false "
              "activation: share of background pixels predicted as a present class whose usual "
              "background this is (seeds)."]
    return "\n".join(lines) + "\n"


def _markdown_differences(r: Dict[str, Any]) -> List[str]:
    if not r.get("differences"):
        return []
    lines = ["", "Differences (row a - row b, mIoU points; paired bootstrap: both rows scored on the same "
             "resampled scenes):", "", "| difference | a | b | seed mIoU | pseudo-mask mIoU |",
             "|---|---|---|---:|---:|"]
    for d in r["differences"]:
        lines.append(f"| {d['name']} | {d['a']} | {d['b']} | {_ci(d['seed']['difference'], d['seed']['ci95'], True)} | "
                     f"{_ci(d['mask']['difference'], d['mask']['ci95'], True)} |")
    return lines


def _markdown_cpal(r: Dict[str, Any]) -> List[str]:
    lines: List[str] = []
    if r.get("cpal_sweep"):
        base = next((row["seed_miou"] for row in r["rows"] if row["name"].startswith("CLIP-CPAL (")), None)
        base = "n/a" if base is None else f"{base:.1f}"
        lines += ["", "CLIP-CPAL interpretations (text prototypes, seeds; one change from the default "
                  f"interpretations, whose seed is {base}; measured on the evaluation scenes, so not "
                  "a selection):", "", "| setting | seed mIoU |", "|---|---:|"]
        for t in r["cpal_sweep"]:
            lines.append(f"| {t['setting']} | {_ci(t['seed'], t.get('seed_ci95'))} |")
    if r.get("cpal_selection"):
        n_val = r["config"].get("cpal_val_scenes") or r["config"]["eval_scenes"]
        lines += ["", f"CLIP-CPAL interpretations on {n_val} separate validation "
                  "scenes (seeds; the best of each block gives the 'chosen on validation scenes' rows):",
                  "", "| GradCAM prototypes | features | delta_p | gamma | validation seed mIoU |",
                  "|---|---|---:|---:|---:|"]
        base_ci = r.get("cpal_validation_without_cpal_ci95") or {}
        for label, seed in (r.get("cpal_validation_without_cpal") or {}).items():
            lines.append(f"| {label} | (no CPAL) | | | {_ci(seed, base_ci.get(label))} |")
        for t in r["cpal_selection"]:
            lines.append(f"| {t['prototypes']} | {t['features']} | {t['delta_p']} | {t['gamma']} | "
                         f"{_ci(t['validation_seed'], t.get('validation_seed_ci95'))} |")
    return lines


def _markdown_sweeps(r: Dict[str, Any]) -> List[str]:
    lines = ["", "tau_I sweep (Table 5 style):", "", "| tau_I | seed (GradCAM) | seed (dense) | gap |",
             "|---:|---:|---:|---:|"]
    for t in r["tau_sweep"]:
        lines.append(f"| {t['tau']:.2f} | {_ci(t['seed_gradcam'], t.get('seed_gradcam_ci95'))} | "
                     f"{_ci(t['seed_dense'], t.get('seed_dense_ci95'))} | {t['gap']:.3f} |")
    lines += ["", "Phi sweep (Table 6 style):", "", "| Phi | seed (GradCAM) | seed (dense) |", "|---:|---:|---:|"]
    for t in r["phi_sweep"]:
        lines.append(f"| {t['phi']:.1f} | {_ci(t['seed_gradcam'], t.get('seed_gradcam_ci95'))} | "
                     f"{_ci(t['seed_dense'], t.get('seed_dense_ci95'))} |")
    return lines


def _markdown_figures(r: Dict[str, Any]) -> List[str]:
    figures = r.get("figures") or {}
    if not figures:
        return []
    return ["", "Figures:", ""] + [f"- `{name}`: {what}" for name, what in figures.items()]
