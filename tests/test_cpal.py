"""CLIP-CPAL: the functional core against planted clusters and float64 loops, the context bank,
the adapter's pass 1 / pass 2 and `vpl cams --adapter clip-cpal`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpl_plugin.adapters.cpal_bank import build_context_bank
from vpl_plugin.cpal import (
    ContextBank,
    align_prototypes,
    context_aware_maps,
    fuse_maps,
    head_cams,
    instance_prototypes,
    max_normalise,
    prototype_maps,
    soft_neighbours,
    spherical_kmeans,
    train_cam_head,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# -- spherical k-means --------------------------------------------------------------------------------
def _planted(seed=0, per=25, dim=16, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    truth = F.normalize(torch.randn(4, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(4).repeat_interleave(per)
    x = F.normalize(truth[labels] + noise * torch.randn(4 * per, dim, generator=g, dtype=torch.float64), dim=1)
    perm = torch.randperm(4 * per, generator=g)
    return x[perm], labels[perm], truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters(seed):
    x, labels, truth = _planted(seed)
    centres, assign = spherical_kmeans(x, 4, seed=seed)
    # the found partition is the planted one up to a relabelling
    table = torch.zeros(4, 4, dtype=torch.long)
    table.index_put_((labels, assign), torch.ones_like(labels), accumulate=True)
    assert sorted(table.max(dim=1).values.tolist()) == [25] * 4
    match = table.argmax(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    # each centre is the normalised mean of its planted cluster (float64 oracle)
    for c in range(4):
        mean = F.normalize(x[labels == c].sum(0), dim=0)
        assert float(centres[match[c]] @ mean) == pytest.approx(1.0, abs=1e-12)
        assert float(centres[match[c]] @ truth[c]) > 0.98
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_kmeans_is_seeded_handles_small_inputs_and_refuses_bad_ones():
    x, _, _ = _planted(0)
    a = spherical_kmeans(x.float(), 6, seed=5)
    b = spherical_kmeans(x.float(), 6, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    centres, assign = spherical_kmeans(x[:3], 8)  # fewer rows than centres: one centre per row
    assert centres.shape == (3, 16) and sorted(assign.tolist()) == [0, 1, 2]
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # 2 directions, 3 centres
    centres, assign = spherical_kmeans(dup, 3, iters=5)
    assert centres.shape == (3, 2) and torch.isfinite(centres).all()  # a duplicate centre, no NaN
    assert {tuple(c) for c in centres.tolist()} == {(1.0, 0.0), (0.0, 1.0)} and assign.tolist()[3] != assign[0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        spherical_kmeans(x, 0)
    with pytest.raises(ValueError, match="zero rows"):
        spherical_kmeans(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        spherical_kmeans(torch.ones(4), 2)


# -- instance prototypes, neighbours, alignment, maps ------------------------------------------------
def test_instance_prototypes_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 5, generator=g)
    cams = torch.rand(3, 3, 4, generator=g)
    cams[2] = cams[2] * 0.3  # nothing reaches delta_p: zero row
    got = instance_prototypes(feats, cams, 0.4)
    unit = F.normalize(feats.double(), dim=1)
    for c in range(3):
        acc, mass = torch.zeros(5, dtype=torch.float64), 0.0
        for k in range(12):
            w = float(cams[c].flatten()[k])
            if w >= 0.4:
                acc += w * unit[k]
                mass += w
        want = F.normalize(acc / mass, dim=0) if mass > 0 else acc
        torch.testing.assert_close(got[c].double(), want, atol=1e-6, rtol=0)
    assert float(got[2].norm()) == 0.0
    with pytest.raises(ValueError, match="same token grid"):
        instance_prototypes(feats, torch.rand(2, 3, 3))


def _naive_weights(p, ctx, k, tau, cls=None, ctx_cls=None):
    sims = [float(F.normalize(p, dim=0) @ F.normalize(c, dim=0)) for c in ctx]
    top = sorted(range(len(sims)), key=lambda m: -sims[m])[:k]
    z = sum(math.exp(sims[m] / tau) for m in top)
    w = [0.0] * len(sims)
    for m in top:
        w[m] = math.exp(sims[m] / tau) / z * (1.0 if cls is None or ctx_cls[m] == cls else 0.0)
    return torch.tensor(w, dtype=torch.float64)


def test_soft_neighbours_sum_to_one_keep_top_k_and_match_a_loop():
    g = torch.Generator().manual_seed(1)
    p, ctx = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    w = soft_neighbours(p, ctx, k=3, tau=0.1)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert ((w > 0).sum(dim=1) == 3).all()
    for b in range(4):
        torch.testing.assert_close(w[b], _naive_weights(p[b], ctx, 3, 0.1))
    assert soft_neighbours(p, ctx[:2], k=3).shape == (4, 2)  # k > M keeps all M
    torch.testing.assert_close(soft_neighbours(p, ctx[:2], k=3).sum(1), torch.ones(4, dtype=torch.float64))
    # candidates from all classes: other classes' weights are zeroed, not renormalised
    ctx_cls, cls = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]), torch.tensor([0, 1, 2, 0])
    wa = soft_neighbours(p, ctx, k=3, tau=0.1, classes=cls, context_classes=ctx_cls)
    for b in range(4):
        torch.testing.assert_close(wa[b], _naive_weights(p[b], ctx, 3, 0.1, int(cls[b]), ctx_cls.tolist()))
    assert (wa.sum(1) <= 1 + 1e-12).all()
    with pytest.raises(ValueError, match="both classes and context_classes"):
        soft_neighbours(p, ctx, classes=cls)
    with pytest.raises(ValueError, match="tau"):
        soft_neighbours(p, ctx, tau=0.0)


def test_alignment_is_the_identity_at_gamma_zero_and_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    p = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    ctx = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    w = soft_neighbours(p, ctx, k=3, tau=0.1)
    torch.testing.assert_close(align_prototypes(p, ctx, w, 0.0), p, atol=1e-15, rtol=0)
    torch.testing.assert_close(align_prototypes(p, ctx, w, 1.0), F.normalize(w @ ctx, dim=1))
    for gamma in (0.25, 0.5):
        q = align_prototypes(p, ctx, w, gamma)
        for b in range(3):
            c_hat = sum(float(w[b, m]) * ctx[m] for m in range(5))
            want = p[b] + gamma * (c_hat - p[b])
            torch.testing.assert_close(q[b], want / want.norm())
    # no neighbour (all weights zero): no shift
    torch.testing.assert_close(align_prototypes(p, ctx, torch.zeros(3, 5, dtype=torch.float64), 0.5), p)
    with pytest.raises(ValueError, match="gamma"):
        align_prototypes(p, ctx, w, -0.1)


def test_prototype_and_fused_maps_are_normalised_and_match_a_loop():
    g = torch.Generator().manual_seed(3)
    feats, q = torch.randn(12, 5, generator=g), torch.randn(2, 5, generator=g)
    s = prototype_maps(feats, q, (3, 4))
    for c in range(2):
        raw = [max(0.0, float(F.normalize(feats[k].double(), dim=0) @ F.normalize(q[c].double(), dim=0)))
               for k in range(12)]
        want = torch.tensor(raw).reshape(3, 4) / max(raw)
        torch.testing.assert_close(s[c].double(), want.double(), atol=1e-6, rtol=0)
    cams = torch.rand(2, 3, 4, generator=g)
    for mode in ("mean", "max"):
        fused = fuse_maps(cams, s, mode)
        assert fused.min() >= 0
        torch.testing.assert_close(fused.flatten(1).max(1).values, torch.ones(2))
    torch.testing.assert_close(fuse_maps(cams, s, "mean"), max_normalise((cams + s) / 2))
    torch.testing.assert_close(fuse_maps(cams, s, "max"), max_normalise(torch.maximum(cams, s)))
    assert torch.equal(max_normalise(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        fuse_maps(cams, s, "sum")
    with pytest.raises(ValueError, match="same"):
        fuse_maps(cams, s[:1])


# -- context bank -----------------------------------------------------------------------------------
def _bank(settings=None):
    x, labels, _ = _planted(0)
    return ContextBank.from_instances(x.float(), labels % 3, 3, num_context=2,
                                      settings=settings or {"features": "ln1"}, ids=["a", "b"])


def test_bank_clusters_per_class_and_round_trips_atomically(tmp_path):
    bank = _bank()
    assert bank.centres.shape == (6, 16) and bank.centre_classes.tolist() == [0, 0, 1, 1, 2, 2]
    few = ContextBank.from_instances(torch.eye(3, 4), torch.tensor([0, 0, 2]), 4, num_context=8)
    assert few.context(0).shape == (2, 4) and few.context(1).shape == (0, 4) and few.counts() == [2, 0, 1, 0]
    bank.save(tmp_path / "bank.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]
    back = ContextBank.load(tmp_path / "bank.pt", num_classes=3, dim=16, settings={"features": "ln1"})
    for key in ("instances", "instance_classes", "centres", "centre_classes"):
        assert torch.equal(getattr(back, key), getattr(bank, key))
    assert back.settings == bank.settings and back.ids == ["a", "b"]
    re = bank.recluster(num_context=3, kmeans_iters=10, kmeans_seed=0)
    assert re.centres.shape[0] == 9 and re.settings["num_context"] == 3 and re.settings["features"] == "ln1"


def test_bank_load_names_every_mismatch(tmp_path):
    _bank().save(tmp_path / "bank.pt")
    with pytest.raises(ValueError, match=r"class count: 3 in the bank, 20 expected.*feature dimension: 16"):
        ContextBank.load(tmp_path / "bank.pt", num_classes=20, dim=768)
    with pytest.raises(ValueError, match="features: 'ln1' in the bank, 'proj' now.*--cpal-bank"):
        ContextBank.load(tmp_path / "bank.pt", settings={"features": "proj"})
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP-CPAL context bank"):
        ContextBank.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="build_context_bank"):
        ContextBank.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="instance_classes must lie in 0..1"):
        ContextBank.from_instances(torch.eye(3), torch.tensor([0, 1, 2]), 2)


# -- trained CAM head (docs/clip_cpal.md) ----------------------------------------------------------
def _planted_tokens(n_images=24, seed=0):
    """Images of 16 tokens (4x4): background along e_7, objects of class c (0..2) along e_c."""
    g = torch.Generator().manual_seed(seed)
    tokens, labels, masks = [], [], []
    for i in range(n_images):
        present = sorted({i % 3, (i * 7 + 1) % 3}) if i % 2 else [i % 3]
        owner = torch.full((16,), -1)
        for c in present:
            owner[torch.randperm(16, generator=g)[:4]] = c
        base = torch.where(owner[:, None] >= 0, F.one_hot(owner.clamp_min(0), 8).float(),
                           F.one_hot(torch.full((16,), 7), 8).float())
        tokens.append(F.normalize(base + 0.05 * torch.randn(16, 8, generator=g), dim=1))
        labels.append(present)
        masks.append(owner)
    return tokens, labels, masks


def test_head_cams_follow_their_definition():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 4, generator=g), torch.randn(3, 4, generator=g)
    got = head_cams(x, w)
    raw = torch.relu(torch.einsum("bnd,kd->bkn", x.double(), w.double()))
    # float32 result against a float64 oracle: float32 tolerances
    torch.testing.assert_close(got.double(), raw / (raw.amax(-1, keepdim=True) + 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_trained_head_localises_planted_classes(lam):
    tokens, labels, masks = _planted_tokens()
    w, hist = train_cam_head(tokens, labels, 3, iters=120, lr=0.05, lambda_self=lam, recluster_every=20,
                             pacam={"num_context": 2})
    assert len(hist["loss"]) == 120 and hist["loss"][-1] < hist["loss"][0]
    for x, lab, owner in zip(tokens, labels, masks):
        cams = head_cams(x, w)
        for c in lab:
            inside, outside = cams[c][owner == c], cams[c][owner != c]
            assert inside.min() > outside.max(), (c, lab)
    looped, _ = train_cam_head(tokens, labels, 3, iters=120, lr=0.05, lambda_self=lam, recluster_every=20,
                               pacam={"num_context": 2}, batched=False)
    torch.testing.assert_close(looped, w, atol=1e-4, rtol=1e-4)  # batched L_self = per-image loop
    with pytest.raises(ValueError, match="one entry per image"):
        train_cam_head(tokens, labels[:-1], 3)


def test_context_aware_maps_equal_the_composed_core():
    tokens, labels, _ = _planted_tokens(6)
    bank = ContextBank.from_instances(torch.cat(tokens), torch.arange(96) % 3, 3, num_context=2)
    cams = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    got = context_aware_maps(tokens[1], cams, [0, 2], bank, gamma=0.5)
    p = instance_prototypes(tokens[1], cams, 0.4)
    for j, c in enumerate([0, 2]):
        w = soft_neighbours(p[j:j + 1], bank.context(c), k=3, tau=0.1)
        q = align_prototypes(p[j:j + 1], bank.context(c), w, 0.5)
        torch.testing.assert_close(got["aligned"][j:j + 1], q)
        s = prototype_maps(tokens[1], q, (4, 4))
        torch.testing.assert_close(got["fused"][j], fuse_maps(cams[j:j + 1], s)[0])


def test_bank_keeps_the_head(tmp_path):
    bank = ContextBank.from_instances(torch.eye(3, 4), torch.tensor([0, 1, 2]), 3, head=torch.ones(3, 4))
    bank.save(tmp_path / "b.pt")
    assert torch.equal(ContextBank.load(tmp_path / "b.pt").head, torch.ones(3, 4))
    assert ContextBank.from_instances(torch.eye(3, 4), torch.tensor([0, 1, 2]), 3).head is None
    with pytest.raises(ValueError, match=r"head must have shape \(3, 4\)"):
        ContextBank.from_instances(torch.eye(3, 4), torch.tensor([0, 1, 2]), 3, head=torch.ones(2, 4))


# -- the adapter -------------------------------------------------------------------------------------
pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
pytest.importorskip("clip", reason="OpenAI CLIP code (pip install clip-anytorch) is needed")

from vpl_plugin.adapters import CLIPCPALAdapter, CLIPESAdapter  # noqa: E402
from vpl_plugin.data.synthetic import SYNTHETIC, SceneWorld, export_voc  # noqa: E402


@pytest.fixture(scope="module")
def samples():
    from PIL import Image

    return [SimpleNamespace(image=Image.fromarray(sc.image), labels=list(sc.labels))
            for sc in SceneWorld(seed=11).batch(0, 8)]


@pytest.fixture(scope="module")
def cpal(tiny_encoder, samples):
    adapter = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=2)
    adapter.set_bank(build_context_bank(adapter, samples, progress=False))
    return adapter


def test_pass_two_is_clip_es_with_the_fused_map_refined(cpal, tiny_encoder, samples):
    """Oracle: ln_1 tokens from a separate trunk forward, CLIP-ES's GradCAM, the functional core."""
    sample = next(s for s in samples if len(s.labels) >= 2)
    x, _ = tiny_encoder.preprocess(sample.image)
    es = CLIPESAdapter(tiny_encoder, SYNTHETIC)
    res = es.gradcams(x, sample.labels)
    with torch.no_grad():
        tokens, _ = tiny_encoder.trunk(x[None])
        ln1 = tiny_encoder.visual.transformer.resblocks[-1].ln_1(tokens)[1:, 0].float()
    p = instance_prototypes(ln1, res.cams, 0.4)
    fused = []
    for j, c in enumerate(sample.labels):
        ctx = cpal.bank.context(c)
        w = soft_neighbours(p[j:j + 1], ctx, k=3, tau=0.1)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))
        q = align_prototypes(p[j:j + 1], ctx, w, 0.5)
        fused.append(fuse_maps(res.cams[j:j + 1], prototype_maps(ln1, q, res.grid), "mean")[0])
    got = cpal(sample.image, sample.labels)
    torch.testing.assert_close(got.cams, torch.stack(fused), atol=1e-5, rtol=0)
    refined = es.refine(res, torch.stack(fused))
    from vpl_plugin.cam import resize_maps

    np.testing.assert_allclose(got.attn_highres.astype(np.float32),
                               resize_maps(refined, (sample.image.height, sample.image.width)), atol=2e-3)


def test_gamma_zero_keeps_the_instance_prototype(tiny_encoder, samples, cpal):
    still = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=2, gamma=0.0, bank=cpal.bank)
    sample = samples[0]
    result, _, labels = still.analyse(sample.image, sample.labels)
    parts = still.cpal_maps(result, labels, still.base_maps(result, labels))
    torch.testing.assert_close(parts["aligned"], parts["instance"], atol=1e-6, rtol=0)
    for w in parts["weights"]:
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_the_bank_must_exist_and_match_the_adapter(tiny_encoder, samples, cpal):
    bare = CLIPCPALAdapter(tiny_encoder, SYNTHETIC)
    with pytest.raises(ValueError, match="build_context_bank"):
        bare(samples[0].image, samples[0].labels)
    with pytest.raises(ValueError, match="features: 'ln1' in the bank, 'proj' now"):
        CLIPCPALAdapter(tiny_encoder, SYNTHETIC, features="proj", bank=cpal.bank)
    # VPL: a bank made from the text GradCAMs cannot serve vision prototypes
    # (docs/clip_cpal.md#clip-cpal--vpl)
    text = cpal.text_prototypes
    from vpl_plugin.prototypes import PrototypeSet

    vision = PrototypeSet(F.normalize(text.prototypes + 0.1, dim=1), text.class_names, text.background_names,
                          tau=0.03, kind="vision")
    with pytest.raises(ValueError, match="gradcam_prototypes: 'text' in the bank, 'vision' now"):
        CLIPCPALAdapter(tiny_encoder, SYNTHETIC, prototypes=vision, bank=cpal.bank)
    # a refused swap keeps the prototypes the bank was built with
    swapped = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, bank=cpal.bank)
    with pytest.raises(ValueError, match="'text' in the bank, 'vision' now"):
        swapped.set_prototypes(vision)
    assert swapped.prototypes.kind == "text" and torch.equal(swapped.prototypes.prototypes, text.prototypes)
    vpl = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, prototypes=vision, num_context=2)
    vpl.set_bank(build_context_bank(vpl, samples[:4], progress=False))
    assert vpl(samples[0].image, samples[0].labels).attn_highres.shape[0] == len(samples[0].labels)
    # other clustering settings re-cluster the stored instance prototypes instead of failing
    wide = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=1, bank=cpal.bank)
    assert wide.bank.settings["num_context"] == 1 and wide.bank.centres.shape[0] <= 10
    for bad, match in (({"fusion": "sum"}, "fusion"), ({"gamma": -1.0}, "gamma"), ({"num_context": 0}, "num_context"),
                       ({"features": "cls"}, "features"), ({"tau_s": 0.0}, "tau_s")):
        with pytest.raises(ValueError, match=match):
            CLIPCPALAdapter(tiny_encoder, SYNTHETIC, **bad)
    assert CLIPCPALAdapter(tiny_encoder, SYNTHETIC).num_context == 8
    from vpl_plugin.data.classes import COCO

    assert CLIPCPALAdapter(tiny_encoder, COCO).num_context == 4


def test_trained_head_mode_fuses_clip_es_with_the_head_pacam(tiny_encoder, samples, cpal):
    head = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=2, head=True, head_iters=30)
    with pytest.raises(ValueError, match="head: False in the bank, True now"):
        head.set_bank(cpal.bank)
    bank = build_context_bank(head, samples, progress=False)
    assert bank.head is not None and bank.head.shape == (10, tiny_encoder.width)
    head.set_bank(bank)
    sample = next(s for s in samples if len(s.labels) >= 2)
    result, _, labels = head.analyse(sample.image, sample.labels)
    base = head.base_maps(result, labels)
    cam = head_cams(result.tokens, bank.head)[labels].reshape(len(labels), *result.grid)
    pa = context_aware_maps(result.tokens, cam, labels, bank, k=3, tau=0.1, gamma=0.5, delta_p=0.4)["fused"]
    torch.testing.assert_close(head.fuse(result, labels), fuse_maps(base, pa, "mean"))
    out = head(sample.image, sample.labels)
    assert out.attn_highres.shape == (len(labels), 64, 64) and out.attn_highres.dtype == np.float16


class _Interrupting:
    """A dataset that stops the run at one index (like Ctrl-C) and counts what was read."""

    def __init__(self, samples, stop_at=None):
        self.samples, self.stop_at, self.read = samples, stop_at, []
        self.ids = [f"img{i}" for i in range(len(samples))]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if i == self.stop_at:
            raise KeyboardInterrupt
        self.read.append(i)
        return self.samples[i]


def test_pass_one_resumes_from_its_partial_file(tiny_encoder, samples, cpal, tmp_path):
    adapter = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, num_context=2)
    partial = tmp_path / "bank.pt.partial"
    with pytest.raises(KeyboardInterrupt):
        build_context_bank(adapter, _Interrupting(samples, stop_at=5), partial=partial, checkpoint_every=2,
                           progress=False)
    assert partial.is_file()
    rest = _Interrupting(samples)
    bank = build_context_bank(adapter, rest, partial=partial, checkpoint_every=2, progress=False)
    assert rest.read == [4, 5, 6, 7] and not partial.exists()
    assert torch.equal(bank.centres, cpal.bank.centres) and torch.equal(bank.instances, cpal.bank.instances)
    # a resume file written under other settings is refused
    other = CLIPCPALAdapter(tiny_encoder, SYNTHETIC, delta_p=0.6)
    with pytest.raises(KeyboardInterrupt):
        build_context_bank(adapter, _Interrupting(samples, stop_at=3), partial=partial, checkpoint_every=1,
                           progress=False)
    with pytest.raises(ValueError, match="delta_p: 0.4 there, 0.6 now"):
        build_context_bank(other, _Interrupting(samples), partial=partial, progress=False)


# -- the command ------------------------------------------------------------------------------------
def test_vpl_cams_clip_cpal_builds_saves_and_reuses_the_bank(tiny_checkpoint, tmp_path, capsys):
    from vpl_plugin.cli import EXIT_OK, EXIT_USAGE, main

    root = export_voc(SceneWorld(seed=13), tmp_path / "syn", {"train": (0, 6)})
    data = ["--clip", tiny_checkpoint, "--dataset", "synthetic", "--root", root, "--split-file", "train.txt",
            "--no-progress"]
    run = lambda cmd, *a: main([cmd, *(str(v) for v in [*data, *a])])  # noqa: E731
    assert run("cams", "--adapter", "clip-cpal", "--out", tmp_path / "a", "--cpal-m", "2") == EXIT_OK
    bank = tmp_path / "a" / "cpal_bank.pt"
    assert bank.is_file() and len(list((tmp_path / "a").glob("syn_*.npy"))) == 6
    assert run("cams", "--adapter", "clip-cpal", "--out", tmp_path / "b", "--cpal-m", "2",
               "--cpal-bank", bank) == EXIT_OK
    for f in (tmp_path / "a").glob("syn_*.npy"):
        a = np.load(f, allow_pickle=True).item()
        b = np.load(tmp_path / "b" / f.name, allow_pickle=True).item()
        np.testing.assert_array_equal(a["attn_highres"], b["attn_highres"])
    assert "cpal_bank.pt" in (tmp_path / "a" / "vpl_cams.yaml").read_text() or \
        "context_prototypes" in (tmp_path / "a" / "vpl_cams.yaml").read_text()
    capsys.readouterr()
    assert run("cams", "--adapter", "clip-cpal", "--out", tmp_path / "c", "--cpal-features", "proj",
               "--cpal-bank", bank) == EXIT_USAGE
    assert "features: 'ln1' in the bank, 'proj' now" in capsys.readouterr().err
    assert run("cams", "--adapter", "clip-cpal", "--out", tmp_path / "h", "--cpal-m", "2", "--cpal-head",
               "--cpal-head-iters", "20") == EXIT_OK
    assert ContextBank.load(tmp_path / "h" / "cpal_bank.pt").head is not None
    assert run("cams", "--out", tmp_path / "d", "--cpal-gamma", "0.2") == EXIT_USAGE
    assert "--cpal-gamma only applies to --adapter clip-cpal" in capsys.readouterr().err
    assert run("cams", "--adapter", "clip-cpal", "--out", tmp_path / "e", "--cpal-gamma", "-1") == EXIT_USAGE
    assert "gamma" in capsys.readouterr().err


def test_every_cpal_setting_has_exactly_one_cams_flag_and_back():
    """``vpl cams --cpal-*`` is generated from CLIPCPALConfig's field metadata: every CPAL field has a
    flag, and each flag, given a value other than the default, reaches exactly its field."""
    from vpl_plugin import cli
    from vpl_plugin.adapters.clip_cpal import CPAL_FIELDS, CLIPCPALConfig
    from vpl_plugin.cli.options import options_of
    from vpl_plugin.cli.shared import cpal_overrides

    options = {n: o for n, o in options_of(CLIPCPALConfig).items() if n in CPAL_FIELDS}  # + CLIP-ES's own
    assert sorted(options) == sorted(CPAL_FIELDS)
    values = {"features": "proj", "candidates": "all", "fusion": "max", "num_context": 5, "neighbours": 2,
              "tau_s": 0.2, "gamma": 0.25, "delta_p": 0.3, "kmeans_iters": 4, "kmeans_seed": 7,
              "head": True, "head_iters": 9, "head_lr": 0.5, "head_lambda": 0.0}
    assert sorted(values) == sorted(CPAL_FIELDS)
    argv = ["cams", "--adapter", "clip-cpal", "--clip", "c.pt", "--root", "r", "--out", "o"]
    for name, value in values.items():
        assert value != getattr(CLIPCPALConfig(), name)
        argv += [options[name].flag] if value is True else [options[name].flag, str(value)]
    assert cpal_overrides(cli.parse_args(argv)) == values
    assert cpal_overrides(cli.parse_args(argv[:9])) == {}  # not given: the dataclass defaults apply
    parser = cli.build_parser().commands["cams"]
    flags = {flag for o in parser.options for flag in o.action.option_strings if flag.startswith("--cpal-")}
    assert flags == {o.flag for o in options.values()} | {"--cpal-bank"}
