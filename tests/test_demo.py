"""The demo CLIP's training and the `vpl demo` report, on tiny configurations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")
pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")

from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig, contrastive_loss, train_demo_clip  # noqa: E402

TINY = DemoCLIPConfig(embed_dim=32, vision_layers=2, vision_width=64, transformer_width=64,
                      transformer_heads=1, transformer_layers=1, context_length=24)


def test_contrastive_loss_matches_a_float64_loop():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    sets = [0, 1, 0, 2, 1]
    pos = torch.tensor([[float(a == b) for b in sets] for a in sets])
    scale = torch.tensor(np.log(10.0))
    got = contrastive_loss(img, txt, scale, pos)
    i, t = img.double(), txt.double()
    i, t = i / i.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    logits = 10.0 * i @ t.t()
    total = 0.0
    for r in range(5):
        row = [-float(torch.log_softmax(logits[r], 0)[c]) for c in range(5) if sets[c] == sets[r]]
        col = [-float(torch.log_softmax(logits[:, r], 0)[c]) for c in range(5) if sets[c] == sets[r]]
        total += np.mean(row) / 5 / 2 + np.mean(col) / 5 / 2
    assert float(got) == pytest.approx(total, rel=1e-5)
    # with only the diagonal positive it is CLIP's own loss
    eye = torch.eye(5)
    clip_loss = (torch.nn.functional.cross_entropy(10 * torch.nn.functional.normalize(img) @ torch.nn.functional.normalize(txt).t(), torch.arange(5))
                 + torch.nn.functional.cross_entropy(10 * torch.nn.functional.normalize(txt) @ torch.nn.functional.normalize(img).t(), torch.arange(5))) / 2
    assert float(contrastive_loss(img, txt, scale, eye)) == pytest.approx(float(clip_loss), rel=1e-5)


def test_training_resumes_to_the_same_weights_and_loads_as_openai_clip(tmp_path):
    from vpl_plugin.backbones import load_clip

    cfg = dict(batch_size=8, warmup=2, checkpoint_every=2, log_every=1)
    straight = train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=4, **cfg),
                               progress=False, log=None)
    train_demo_clip(tmp_path / "b.pt", arch=TINY, config=DemoTrainConfig(steps=2, **cfg), progress=False, log=None)
    resumed = train_demo_clip(tmp_path / "b.pt", arch=TINY, config=DemoTrainConfig(steps=4, **cfg), progress=False,
                              log=None)
    a = torch.load(tmp_path / "a.pt.train.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b.pt.train.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [c["step"] for c in resumed["curve"]] == [1, 2, 3, 4]
    assert straight["curve"][-1]["loss"] == pytest.approx(resumed["curve"][-1]["loss"], rel=1e-5)
    enc = load_clip(str(tmp_path / "a.pt"))
    assert (enc.patch_size, enc.pretrain_grid, enc.embed_dim) == (8, 8, 32)
    assert json.loads((tmp_path / "a.pt.curve.json").read_text())["curve"][0]["step"] == 1


def test_dense_and_fused_maps_follow_their_definitions(tiny_encoder):
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.cam import minmax_scale

    torch.manual_seed(0)
    image = torch.randn(3, 48, 64)
    dense = CLIPESAdapter(tiny_encoder, map_mode="dense")
    res = dense.gradcams(image, [3, 7])
    maps = dense.fuse(res, [3, 7])
    protos = dense.stacked_prototypes([3, 7]).double()
    protos = protos / protos.norm(dim=1, keepdim=True)
    post = (res.features.double() @ protos.t() * dense.prototypes.logit_scale).softmax(-1)[:, :2]
    ref = minmax_scale(post.t().reshape(2, 3, 4).float())
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=0)
    fused = CLIPESAdapter(tiny_encoder, map_mode="fused").fuse(res, [3, 7])
    torch.testing.assert_close(fused, minmax_scale(res.cams * ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="map_mode"):
        CLIPESAdapter(tiny_encoder, map_mode="magic")


def test_demo_report_on_a_tiny_model(tmp_path):
    from vpl_plugin.demo.report import DemoConfig, control_rows, run_demo, table_rows
    from vpl_plugin.demo.train_clip import build_demo_clip
    from vpl_plugin.backbones import save_checkpoint

    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(build_demo_clip(TINY), ckpt)
    cfg = DemoConfig(train_scenes=12, eval_scenes=6, taus=(0.03,), phis=(0.4,), iters=10, grid_scenes=2,
                     bootstrap_resamples=200)
    report = run_demo(tmp_path / "out", clip=str(ckpt), config=cfg, log=lambda m: None)
    _check_intervals_and_figures(report, tmp_path / "out", cfg)
    names = [r["name"] for r in report["rows"]]
    assert names[0] == "CLIP-ES (text prototypes)" and any("paper-literal" in n for n in names)
    assert names == [spec.name for spec in table_rows(cfg) + control_rows(cfg)]  # the table, in order
    for r in report["rows"]:
        assert 0 <= r["seed_miou"] <= 100 and 0 <= r["mask_miou"] <= 100
    assert (tmp_path / "out" / "grid.png").exists() and "| tau_I |" in (tmp_path / "out" / "report.md").read_text()
    assert set(report["gates_passed"]) == {"label_set_accuracy>=0.95", "text_seed_miou>=35"}
    assert report["cpal_sweep"] == [] and report["cpal_selection"] == []  # studies are opt-in
    assert any(n.startswith("CLIP-CPAL (") for n in names)
    # the second gate is the no-CAA text row, recomputed here from its definition
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.data.synthetic import SceneWorld
    from vpl_plugin.demo.report import text_gradcam_seed_miou

    raw = next(r for r in report["rows"] if r["name"] == "text prototypes, GradCAM, no CAA")
    scenes = SceneWorld(seed=cfg.world_seed).batch(10_000_000, cfg.eval_scenes)
    assert report["gates"]["text_gradcam_seed_miou"] == raw["seed_miou"]
    assert raw["seed_miou"] == pytest.approx(text_gradcam_seed_miou(load_clip(str(ckpt)), scenes), abs=1e-9)
    assert "VPL region-pooled (tau_I 0.1), dense map, no CAA" in names
    studies = run_demo(tmp_path / "studies", clip=str(ckpt), log=lambda m: None, cpal_studies=True,
                       config=DemoConfig(train_scenes=8, eval_scenes=4, taus=(0.03,), phis=(0.4,), iters=5,
                                         grid_scenes=1, cpal_val_scenes=4,
                                         cpal_grid=(("ln1", 0.4, 0.5), ("proj", 0.6, 1.0))))
    assert [r["setting"] for r in studies["cpal_sweep"]] == [f"{k}={v}" for k, v in DemoConfig.cpal_sweep]
    assert len(studies["cpal_selection"]) == 4 and all(0 <= t["validation_seed"] <= 100
                                                       for t in studies["cpal_selection"])


def _check_intervals_and_figures(report, out, cfg):
    """Every seed and mask number has an interval that contains it and that the per-scene
    confusion matrices the demo saved reproduce (bootstrap module, same draws); the figures are
    written and listed."""
    from vpl_plugin.bootstrap import bootstrap_miou, paired_bootstrap
    from vpl_plugin.demo.intervals import load_confusions
    from vpl_plugin.metrics import iou_from_confusion

    conf = load_confusions(out / "confusion.npz")
    assert list(conf) == [r["name"] for r in report["rows"]]
    for r in report["rows"]:
        seeds, masks = conf[r["name"]]
        assert seeds.shape[:2] == ((2 if "no CAA" not in r["name"] else 10), cfg.eval_scenes)
        point = max(iou_from_confusion(seeds[t].sum(0))["miou"] for t in range(len(seeds)))
        assert 100 * point == pytest.approx(r["seed_miou"], abs=1e-9)
        assert 100 * iou_from_confusion(masks.sum(0))["miou"] == pytest.approx(r["mask_miou"], abs=1e-9)
        for key, c in (("seed", seeds), ("mask", masks)):
            lo, hi = r[f"{key}_ci95"]
            assert lo - 1e-9 <= r[f"{key}_miou"] <= hi + 1e-9
            ref = bootstrap_miou(c, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)["ci95"]
            assert [lo, hi] == pytest.approx([100 * v for v in ref], abs=1e-9)
    for t in report["tau_sweep"] + report["phi_sweep"]:
        for key in ("seed_gradcam", "seed_dense"):
            assert t[f"{key}_ci95"][0] - 1e-9 <= t[key] <= t[f"{key}_ci95"][1] + 1e-9
    assert report["bootstrap"]["resamples"] == cfg.bootstrap_resamples
    diffs = {d["name"]: d for d in report["differences"]}
    assert {"recommended VPL - best text-prototype row", "recommended VPL - CLIP-ES",
            "paper-literal VPL - CLIP-ES"} <= set(diffs)
    d = diffs["paper-literal VPL - CLIP-ES"]
    ref = paired_bootstrap(conf[d["a"]][0], conf[d["b"]][0], resamples=cfg.bootstrap_resamples,
                           seed=cfg.bootstrap_seed)
    assert d["seed"]["ci95"] == pytest.approx([100 * v for v in ref["ci95"]], abs=1e-9)
    assert d["seed"]["difference"] == pytest.approx(100 * ref["difference"], abs=1e-9)
    md = (out / "report.md").read_text()
    assert "paper-literal VPL - CLIP-ES" in md and "bootstrap" in md
    assert set(report["figures"]) == {"grid.png", "bars.png", "gap.png"}
    for name in report["figures"]:
        assert (out / name).stat().st_size > 0 and f"`{name}`" in md


def test_trunk_cache_runs_each_scene_once_and_changes_nothing():
    from vpl_plugin.adapters.clip_es import CLIPESAdapter
    from vpl_plugin.backbones import CLIPDense, TrunkCache
    from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld
    from vpl_plugin.demo.evaluation import DEMO_TEMPLATES, pil_image
    from vpl_plugin.demo.train_clip import build_demo_clip

    model = build_demo_clip(TINY, seed=3).eval()
    plain, cached = CLIPDense(model, device="cpu"), CLIPDense(model, device="cpu", trunk_cache=TrunkCache())
    calls = {"plain": 0, "cached": 0}  # trunk forwards (the patch embedding runs once per forward)
    hooks = [enc.visual.conv1.register_forward_hook(lambda *args, n=name: calls.__setitem__(n, calls[n] + 1))
             for name, enc in (("plain", plain), ("cached", cached))]
    scenes = SceneWorld(seed=5).batch(0, 3)
    for mode in ("gradcam", "dense", "fused"):  # three rows over the same scenes
        a = CLIPESAdapter(plain, SYNTHETIC, templates=DEMO_TEMPLATES, map_mode=mode)
        b = CLIPESAdapter(cached, SYNTHETIC, templates=DEMO_TEMPLATES, map_mode=mode)
        for sc in scenes:
            x = a(pil_image(sc.image), list(sc.labels))
            y = b(pil_image(sc.image), list(sc.labels))
            assert np.array_equal(x.attn_highres, y.attn_highres) and torch.equal(x.cams, y.cams)
    for hook in hooks:
        hook.remove()
    assert calls == {"plain": 9, "cached": 3}  # the plain encoder every time, the cached one once per scene
    assert len(cached.trunk_cache) == 3 and plain.trunk_cache is None


def test_demo_modules_import_without_a_cycle():
    # every import between the demo's modules, also inside functions: the demo CLIP's training
    # needs the demo's evaluation, never the report (which needs both)
    import ast
    from pathlib import Path

    import vpl_plugin.demo

    folder = Path(vpl_plugin.demo.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            deps |= {n.split(".")[2] for n in names if n.startswith("vpl_plugin.demo.")}
        graph[path.stem] = deps
    assert "report" not in graph["train_clip"] and "evaluation" in graph["train_clip"]

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)], graph


def test_learning_split_keeps_its_token_count_across_patch_sizes():
    from vpl_plugin.backbones import CLIPDense
    from vpl_plugin.demo.report import DemoConfig
    from vpl_plugin.demo.train_clip import build_demo_clip

    p8 = CLIPDense(build_demo_clip(TINY), device="cpu")
    p4 = CLIPDense(build_demo_clip(DemoCLIPConfig(**{**TINY.__dict__, "patch_size": 4})), device="cpu")
    assert (DemoConfig().learning_scenes(p8, 64), DemoConfig().learning_scenes(p4, 64)) == (1000, 250)
    quick = DemoConfig.quick_config()
    assert (quick.learning_scenes(p8, 64), quick.learning_scenes(p4, 64)) == (300, 75)
    assert DemoConfig(learn_tokens=100).learning_scenes(p4, 64) == 1  # rounded up: ceil(100 / 256)
    assert DemoConfig(train_scenes=7).learning_scenes(p4, 64) == 7


def test_data_loader_workers_leave_the_weights_unchanged(tmp_path):
    # the batches are a function of the step: drawing them in 2 worker processes (and resuming
    # half-way with workers) gives the weights of the in-process run exactly
    cfg = dict(batch_size=8, warmup=2, checkpoint_every=2, log_every=1)
    train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=4, **cfg), progress=False, log=None)
    train_demo_clip(tmp_path / "b.pt", arch=TINY, config=DemoTrainConfig(steps=2, **cfg), progress=False, log=None,
                    workers=2)
    rec = train_demo_clip(tmp_path / "b.pt", arch=TINY, config=DemoTrainConfig(steps=4, **cfg), progress=False,
                          log=None, workers=2)
    a = torch.load(tmp_path / "a.pt.train.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b.pt.train.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [c["step"] for c in rec["curve"]] == [1, 2, 3, 4]
    # an unfinished run's state exports to the checkpoint the finished run writes
    from vpl_plugin.demo.train_clip import export_training_state

    assert export_training_state(tmp_path / "b.pt.train.pt", tmp_path / "e.pt") == {"step": 4, "selected": False}
    written, exported = torch.load(tmp_path / "b.pt"), torch.load(tmp_path / "e.pt")
    assert written.keys() == exported.keys() and all(torch.equal(written[k], exported[k]) for k in written)
    with pytest.raises(ValueError, match="workers"):
        train_demo_clip(tmp_path / "c.pt", arch=TINY, config=DemoTrainConfig(steps=1, **cfg), progress=False,
                        log=None, workers=-1)


@pytest.mark.parametrize("refine", [True, False])
def test_demo_seeds_search_upstreams_exponents_for_the_map_type(tmp_path, refine):
    # the demo scores CAA maps like upstream's eval_cam.py scores attn_highres ({1, 2}) and maps
    # without CAA like its raw-GradCAM type highres ({1..10}); oracle: the file evaluator on the
    # same maps written as CAM files
    from PIL import Image

    from vpl_plugin.adapters.clip_es import CLIPESAdapter
    from vpl_plugin.backbones import load_clip, save_checkpoint
    from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld
    from vpl_plugin.demo.evaluation import DEMO_TEMPLATES, evaluate_adapter, pil_image
    from vpl_plugin.demo.train_clip import build_demo_clip
    from vpl_plugin.metrics import evaluate_cams

    torch.manual_seed(0)
    save_checkpoint(build_demo_clip(TINY), tmp_path / "tiny.pt")
    adapter = CLIPESAdapter(load_clip(str(tmp_path / "tiny.pt")), SYNTHETIC, templates=DEMO_TEMPLATES,
                            refine=refine)
    scenes = SceneWorld(seed=3).batch(0, 5)
    ev = evaluate_adapter(adapter, scenes, crf=False)
    seed, best, sweep = ev.seed, ev.threshold, ev.sweep
    key = "attn_highres" if refine else "highres"
    (tmp_path / "cams").mkdir()
    (tmp_path / "gt").mkdir()
    for i, sc in enumerate(scenes):
        out = adapter(pil_image(sc.image), list(sc.labels))
        np.save(tmp_path / "cams" / f"{i}.npy", {"keys": out.keys, key: out.attn_highres})
        Image.fromarray(sc.mask).save(tmp_path / "gt" / f"{i}.png")
    ref = evaluate_cams(tmp_path / "cams", tmp_path / "gt", [str(i) for i in range(5)],
                        num_classes=SYNTHETIC.num_classes, cam_key=key, progress=False)
    assert list(sweep) == list(ref["sweep"]) == ([1.0, 2.0] if refine else [float(k) for k in range(1, 11)])
    for e in sweep:
        assert sweep[e] == pytest.approx(ref["sweep"][e], abs=1e-12)
    assert best == ref["best_threshold"] and seed == pytest.approx(ref["miou"], abs=1e-12)


def test_shipped_demo_clip_recognises_held_out_scenes():
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.data.synthetic import SceneWorld
    from vpl_plugin.demo.report import DEFAULT_CHECKPOINT, label_set_accuracy

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"shipped demo CLIP {DEFAULT_CHECKPOINT} absent (train it with `vpl train-clip`)")
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 1024 * 1024
    enc = load_clip(str(DEFAULT_CHECKPOINT))
    assert (enc.patch_size, enc.pretrain_grid) == (4, 16)
    scenes = SceneWorld(seed=7).batch(10_000_000, 100)
    # measured 0.993 on the demo's 300 evaluation scenes (patch-4 CLIP); the gate is 0.95
    assert label_set_accuracy(enc, scenes) >= 0.95


def test_resume_refuses_a_state_of_another_architecture(tmp_path):
    cfg = dict(batch_size=4, warmup=1, checkpoint_every=1, log_every=1)
    train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=1, **cfg), progress=False, log=None)
    wider = DemoCLIPConfig(**{**TINY.__dict__, "vision_width": TINY.vision_width + 64})
    with pytest.raises(ValueError, match="different settings"):
        train_demo_clip(tmp_path / "a.pt", arch=wider, config=DemoTrainConfig(steps=2, **cfg), progress=False, log=None)


def test_checkpoint_selection_keeps_the_best_scored_state_and_leaves_training_alone(tmp_path):
    """``select_every``: each scored state is the saved checkpoint as ``load_clip`` reads it (score
    recomputed from the file), the kept one is the first best, training itself is unchanged, and an
    interrupted run resumes to the same selection."""
    from vpl_plugin.backbones import load_clip
    from vpl_plugin.data.synthetic import SceneWorld
    from vpl_plugin.demo.report import text_gradcam_seed_miou

    cfg = dict(batch_size=4, warmup=1, checkpoint_every=1, log_every=1, lr=2e-2)
    sel = dict(select_every=1, select_scenes=6, select_offset=1000)
    plain = train_demo_clip(tmp_path / "p.pt", arch=TINY, config=DemoTrainConfig(steps=6, **cfg), progress=False, log=None)
    chosen = train_demo_clip(tmp_path / "s.pt", arch=TINY, config=DemoTrainConfig(steps=6, **cfg, **sel),
                             progress=False, log=None)
    a = torch.load(tmp_path / "p.pt.train.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "s.pt.train.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert plain["selected_step"] == 6 and plain["selection"] == []
    steps = [s["step"] for s in chosen["selection"]]
    scores = [s["text_gradcam_seed_miou"] for s in chosen["selection"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert chosen["selected_step"] == steps[scores.index(max(scores))]
    assert chosen["selected_step"] != 6, "this recipe's best state is an early one (measured: step 3)"
    scenes = SceneWorld(seed=1).batch(1000, 6)
    kept = text_gradcam_seed_miou(load_clip(str(tmp_path / "s.pt")), scenes)
    assert kept == pytest.approx(max(scores), abs=1e-3)
    from vpl_plugin.demo.train_clip import export_training_state  # the kept state, from the state file

    assert export_training_state(tmp_path / "s.pt.train.pt", tmp_path / "x.pt") == {
        "step": chosen["selected_step"], "selected": True}
    written, exported = torch.load(tmp_path / "s.pt"), torch.load(tmp_path / "x.pt")
    assert written.keys() == exported.keys() and all(torch.equal(written[k], exported[k]) for k in written)

    def crash_at_step_4(msg: str) -> None:
        if msg.startswith("step 4/"):
            raise KeyboardInterrupt  # after step 3's state was saved, before step 4's

    with pytest.raises(KeyboardInterrupt):
        train_demo_clip(tmp_path / "r.pt", arch=TINY, config=DemoTrainConfig(steps=6, **cfg, **sel),
                        progress=False, log=crash_at_step_4)
    resumed = train_demo_clip(tmp_path / "r.pt", arch=TINY, config=DemoTrainConfig(steps=6, **cfg, **sel),
                              progress=False, log=None)
    assert resumed["selection"] == chosen["selection"]
    assert resumed["selected_step"] == chosen["selected_step"]
    with pytest.raises(ValueError, match="selection scenes"):
        DemoTrainConfig(steps=300, batch_size=4, select_every=10, select_offset=1000)


def test_a_state_from_before_checkpoint_selection_still_resumes(tmp_path):
    """Training states written before ``select_*`` existed lack those keys: they resume (the
    settings were at their defaults then), and a run asking for selection is refused."""
    cfg = dict(batch_size=4, warmup=1, checkpoint_every=1, log_every=1)
    train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=1, **cfg), progress=False, log=None)
    state_path = tmp_path / "a.pt.train.pt"
    state = torch.load(state_path, weights_only=False)
    for key in ("select_every", "select_scenes", "select_offset"):
        del state["config"][key]
    del state["selection"], state["best"]
    torch.save(state, state_path)
    record = train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=2, **cfg), progress=False,
                             log=None)
    assert [c["step"] for c in record["curve"]] == [1, 2] and record["selection"] == []
    with pytest.raises(ValueError, match="different settings"):
        train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=3, select_every=1, **cfg),
                        progress=False, log=None)


def test_progress_bar_shows_each_steps_loss_also_on_logging_steps(tmp_path, monkeypatch):
    """The bar's loss is the step's own loss (the curve's mean over a 1-step window is the oracle); it
    used to read 0.000 on every logging step, where the window had just been emptied."""
    import vpl_plugin.demo.train_clip as tc

    shown = []

    class Recorder:
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            shown.append(float(kw["loss"]))

        def close(self):
            pass

    monkeypatch.setattr(tc, "progress_bar", lambda **kw: Recorder())
    rec = train_demo_clip(tmp_path / "a.pt", arch=TINY, config=DemoTrainConfig(steps=3, batch_size=8, warmup=1,
                                                                               log_every=1), progress=True, log=None)
    assert shown == pytest.approx([round(c["loss"], 3) for c in rec["curve"]], abs=1e-3)
    assert min(shown) > 0
