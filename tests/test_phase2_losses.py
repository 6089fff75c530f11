"""Phase-2 losses against their definitions (docs/vpl.md#loss).

Oracles are float64 naive loops over the definitions; the claim that ``P_r = w_{n_r}`` is a
minimiser of RSC is deliberately not tested: it is false in general.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpl_plugin.phase2 import (
    Phase2Loss,
    RSCLoss,
    masked_average_pool,
    rsc_from_similarity,
    rsc_loss,
    segmentation_logits,
)

# -------------------------------------------------------------------------------------------------
# reference implementations (float64 loops over the definitions)
# -------------------------------------------------------------------------------------------------


def naive_rsc_pairs(regions, prototypes, classes, tau):
    """RSC, pairs form: S[r,s] = cos(P_r, w_{n_s}) / tau; same-class off-diagonals dropped; symmetric CE."""
    P = [F.normalize(r.double(), dim=0) for r in regions]
    W = [F.normalize(w.double(), dim=0) for w in prototypes]
    c = [int(x) for x in classes]
    R = len(P)
    if R < 2:
        return 0.0
    S = [[float(P[r] @ W[s]) / tau for s in range(R)] for r in range(R)]
    allowed = [[r == s or c[r] != c[s] for s in range(R)] for r in range(R)]
    row = 0.0
    for r in range(R):
        terms = [S[r][s] for s in range(R) if allowed[r][s]]
        m = max(terms)
        row += -(S[r][r] - (m + math.log(sum(math.exp(t - m) for t in terms))))
    col = 0.0
    for s in range(R):
        terms = [S[r][s] for r in range(R) if allowed[r][s]]
        m = max(terms)
        col += -(S[s][s] - (m + math.log(sum(math.exp(t - m) for t in terms))))
    return 0.5 * row / R + 0.5 * col / R


def naive_rsc_class(regions, classes, all_prototypes, tau):
    """RSC, class form: row CE over all prototypes; column multi-positive CE over regions per class."""
    P = [F.normalize(r.double(), dim=0) for r in regions]
    W = [F.normalize(w.double(), dim=0) for w in all_prototypes]
    c = [int(x) for x in classes]
    R, N = len(P), len(W)
    logit = [[float(P[r] @ W[n]) / tau for n in range(N)] for r in range(R)]
    row = 0.0
    for r in range(R):
        lse = math.log(sum(math.exp(v) for v in logit[r]))
        row += -(logit[r][c[r]] - lse)
    row /= R
    present = sorted(set(c))
    col = 0.0
    for n in present:
        lse = math.log(sum(math.exp(logit[r][n]) for r in range(R)))
        pos = [r for r in range(R) if c[r] == n]
        col += sum(-(logit[r][n] - lse) for r in pos) / len(pos)
    col /= len(present)
    return 0.5 * row + 0.5 * col


def unit(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def separated_prototypes(n, d=64, seed=0, max_cos=0.9):
    w = unit(n, d, seed)
    cos = w @ w.t() - torch.eye(n, dtype=w.dtype)
    assert float(cos.max()) <= max_cos  # random directions in 64-d are well separated
    return w


# -------------------------------------------------------------------------------------------------
# 12: masked average pooling (Eq. 12)
# -------------------------------------------------------------------------------------------------


def test_map_one_hot_mask_gives_region_mean():
    f = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    m = torch.zeros(2, 1, 4, 6, dtype=torch.float64)
    m[0, 0, 1:3, 2:5] = 1
    m[1, 0, 0, 0] = 1
    pooled = masked_average_pool(f, m, eps=0.0, normalize=False)
    torch.testing.assert_close(pooled[0, 0], f[0, :, 1:3, 2:5].mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled[1, 0], f[1, :, 0, 0], rtol=1e-12, atol=1e-12)
    # with the default eps the difference is of order eps / mass
    pooled_eps = masked_average_pool(f, m, normalize=False)
    torch.testing.assert_close(pooled_eps, pooled, rtol=1e-5, atol=1e-6)


def test_map_all_ones_gives_global_mean_and_unit_norm():
    f = torch.randn(3, 7, 5, 5, dtype=torch.float64)
    ones = torch.ones(3, 2, 5, 5, dtype=torch.float64)
    raw = masked_average_pool(f, ones, eps=0.0, normalize=False)
    torch.testing.assert_close(raw[:, 0], f.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw[:, 1], f.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    normed = masked_average_pool(f, torch.rand(3, 4, 5, 5, dtype=torch.float64))
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e4])
def test_map_invariant_to_mask_scale(c):
    f = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    w = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    torch.testing.assert_close(masked_average_pool(f, c * w, eps=0.0), masked_average_pool(f, w, eps=0.0),
                               rtol=1e-12, atol=1e-12)
    # and with the default eps, to within eps / mass
    torch.testing.assert_close(masked_average_pool(f, c * w), masked_average_pool(f, w), rtol=1e-4, atol=1e-5)


def test_map_validates_inputs():
    f = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="non-negative"):
        masked_average_pool(f, -torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="spatial size"):
        masked_average_pool(f, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        masked_average_pool(f, torch.ones(4, 4))


def test_map_gradient_reaches_features_and_weights():
    f = torch.randn(1, 3, 4, 4, requires_grad=True)
    w = torch.rand(1, 2, 4, 4, requires_grad=True)
    masked_average_pool(f, w).sum().backward()
    assert f.grad is not None and w.grad is not None and w.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------
# 13: regional semantic contrast
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [[0, 1, 2], [0, 1, 1, 2, 0], [3, 3, 1, 0, 2, 3, 1]])
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_rsc_pairs_equals_naive_definition(classes, tau):
    classes_t = torch.tensor(classes)
    w = unit(4, 16, seed=1)
    regions = torch.randn(len(classes), 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = rsc_loss(regions, w[classes_t], classes_t, tau=tau)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(naive_rsc_pairs(regions, w[classes_t], classes, tau), rel=1e-10, abs=1e-12)


def test_rsc_13a_matched_regions_diagonal_is_max_and_bound():
    classes = torch.tensor([0, 1, 2, 0, 3, 4, 1])
    w = separated_prototypes(5)
    regions = w[classes]
    S = regions @ w[classes].t()
    same = classes[:, None] == classes[None, :]
    S_masked = S.masked_fill(same & ~torch.eye(len(classes), dtype=torch.bool), -math.inf)
    diag = torch.diagonal(S_masked)
    assert torch.all(diag >= S_masked.max(dim=1).values)
    assert torch.all(diag >= S_masked.max(dim=0).values)
    r = len(classes)
    loss = float(rsc_loss(regions, w[classes], classes, tau=0.01))
    assert 0 <= loss <= (r - 1) * math.exp(-10)
    # -> 0 as tau -> 0, monotonically
    values = [float(rsc_loss(regions, w[classes], classes, tau=t)) for t in (1.0, 0.3, 0.1, 0.05, 0.03, 0.003)]
    assert all(a > b for a, b in zip(values[:-1], values[1:-1])), values
    assert values[-1] <= values[-2] and values[-1] < 1e-30


def test_rsc_13b_swapping_two_regions_of_different_classes_increases_loss():
    classes = torch.tensor([0, 1, 2, 3, 1])
    w = separated_prototypes(4, seed=3)
    g = torch.Generator().manual_seed(4)
    regions = F.normalize(w[classes] + 0.05 * torch.randn(5, 64, dtype=torch.float64, generator=g), dim=-1)
    base = float(rsc_loss(regions, w[classes], classes, tau=0.01))
    for a, b in [(0, 1), (2, 3), (0, 4), (3, 4)]:
        swapped = regions.clone()
        swapped[[a, b]] = regions[[b, a]]
        assert float(rsc_loss(swapped, w[classes], classes, tau=0.01)) > base


def test_rsc_13c_one_class_or_one_region_is_zero():
    w = unit(3, 8)
    regions = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    classes = torch.full((4,), 2)
    loss = rsc_loss(regions, w[classes], classes)
    assert float(loss.detach()) == 0.0
    loss.backward()  # stays on the graph
    assert float(regions.grad.abs().sum()) == 0.0
    assert float(rsc_loss(regions[:1], w[:1], torch.tensor([0])).detach()) == 0.0
    assert float(rsc_loss(regions[:0], w[:0], torch.tensor([], dtype=torch.long)).detach()) == 0.0


def test_rsc_13d_permutation_and_transpose_invariance():
    classes = torch.tensor([0, 1, 1, 2, 3, 0])
    w = unit(4, 12, seed=5)
    regions = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    base = rsc_loss(regions, w[classes], classes, tau=0.05)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(7))
    permuted = rsc_loss(regions[perm], w[classes][perm], classes[perm], tau=0.05)
    torch.testing.assert_close(permuted, base, rtol=1e-12, atol=1e-12)
    S = torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(rsc_from_similarity(S, classes), rsc_from_similarity(S.t(), classes),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("classes", [[0, 1, 2], [0, 1, 1, 2, 0], [4, 4]])
def test_rsc_class_form_equals_naive_definition(classes):
    classes_t = torch.tensor(classes)
    w = unit(5, 16, seed=8)
    regions = torch.randn(len(classes), 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = rsc_loss(regions, w[classes_t], classes_t, tau=0.07, form="class", all_prototypes=w)
    assert float(got) == pytest.approx(naive_rsc_class(regions, classes, w, 0.07), rel=1e-10)
    with pytest.raises(ValueError, match="all_prototypes"):
        rsc_loss(regions, w[classes_t], classes_t, form="class")


def test_rsc_literal_form_keeps_one_region_per_image():
    w = unit(4, 8, seed=10)
    regions = torch.randn(5, 8, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 3, 1])
    groups = torch.tensor([0, 0, 1, 2, 2])
    got = rsc_loss(regions, w[classes], classes, form="literal", groups=groups,
                   generator=torch.Generator().manual_seed(0))
    # the chosen subset is one region per image; the loss is the pairs form on some such subset
    candidates = []
    for i in (0, 1):
        for k in (3, 4):
            idx = torch.tensor([i, 2, k])
            candidates.append(naive_rsc_pairs(regions[idx], w[classes[idx]], classes[idx].tolist(), 0.01))
    assert any(float(got) == pytest.approx(c, rel=1e-10) for c in candidates)
    # without groups it is the pairs form
    torch.testing.assert_close(rsc_loss(regions, w[classes], classes, form="literal"),
                               rsc_loss(regions, w[classes], classes))


def test_rsc_module_twin_and_validation():
    w = unit(3, 8)
    classes = torch.tensor([0, 1, 2])
    regions = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(RSCLoss(tau=0.03)(regions, w, classes), rsc_loss(regions, w, classes, tau=0.03))
    with pytest.raises(ValueError, match="form"):
        RSCLoss(form="bogus")
    with pytest.raises(ValueError, match="tau"):
        rsc_loss(regions, w, classes, tau=0.0)
    with pytest.raises(ValueError, match="matched prototype"):
        rsc_loss(regions, w[:2], classes)
    with pytest.raises(TypeError, match="integer"):
        rsc_loss(regions, w, classes.double())


def test_rsc_gradient_matches_finite_differences():
    w = unit(3, 6, seed=11)
    classes = torch.tensor([0, 1, 2, 1])
    regions = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: rsc_loss(r, w[classes], classes, tau=0.1), (regions,))


# -------------------------------------------------------------------------------------------------
# 14: segmentation logits and cross-entropy
# -------------------------------------------------------------------------------------------------


def test_background_probability_is_sum_of_background_concepts():
    a = torch.randn(2, 7, 3, 4, dtype=torch.float64) * 5
    seg = segmentation_logits(a, num_fg=3)
    assert seg.shape == (2, 4, 3, 4)
    p_concepts = torch.softmax(a, dim=1)
    p_seg = torch.softmax(seg, dim=1)
    torch.testing.assert_close(p_seg[:, 0], p_concepts[:, 3:].sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_seg[:, 1:], p_concepts[:, :3], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="background"):
        segmentation_logits(a, num_fg=7)


def test_ce_ignores_255_with_zero_loss_and_zero_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 5), generator=g)
    ignore = torch.rand(2, 6, 5, generator=g) < 0.4
    target[ignore] = 255
    crit = Phase2Loss(lambda_rsc=0.0)
    loss = crit.ce(logits, target)
    loss.backward()
    grad_ignored = logits.grad.permute(0, 2, 3, 1)[ignore]
    assert float(grad_ignored.abs().max()) == 0.0
    assert float(logits.grad.permute(0, 2, 3, 1)[~ignore].abs().sum()) > 0
    # changing the logits of ignored pixels does not change the loss
    with torch.no_grad():
        changed = logits.detach().clone()
        changed.permute(0, 2, 3, 1)[ignore] = 100.0 * torch.randn(int(ignore.sum()), 4, dtype=torch.float64)
        assert float(crit.ce(changed, target)) == pytest.approx(float(loss), rel=1e-12)
    # the loss is the mean over valid pixels of -log softmax
    logp = torch.log_softmax(logits.detach(), 1).permute(0, 2, 3, 1)
    valid = ~ignore
    expected = -logp[valid].gather(1, target[valid][:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12)


def test_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = Phase2Loss(lambda_rsc=0.0).ce(logits, torch.full((1, 8, 8), 255))
    assert float(loss) == 0.0
    loss.backward()
    assert float(logits.grad.abs().sum()) == 0.0


def test_ce_upsamples_bilinearly_to_the_target_size():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 16, 20))
    up = F.interpolate(logits, size=(16, 20), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target, ignore_index=255)
    torch.testing.assert_close(Phase2Loss().ce(logits, target), expected)
    with pytest.raises(ValueError, match="outside"):
        Phase2Loss().ce(logits, torch.full((2, 16, 20), 7))


# -------------------------------------------------------------------------------------------------
# the final loss
# -------------------------------------------------------------------------------------------------


def _outputs(seed=0, b=3, n_fg=4, n_bg=3, d=16, h=5, w=6, tau=0.03):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(b, d, h, w, dtype=torch.float64, generator=g), dim=1).requires_grad_(True)
    protos = unit(n_fg + n_bg, d, seed=seed + 1)
    plog = torch.einsum("nd,bdhw->bnhw", protos, feats) / tau
    return {"logits": segmentation_logits(plog, n_fg), "prototype_logits": plog, "features": feats,
            "prototypes": protos}


def naive_regions(outputs, labels, include_background=False):
    feats, logits, protos = outputs["features"], outputs["logits"], outputs["prototypes"]
    n_fg = logits.shape[1] - 1
    a_hat = torch.softmax(logits, 1)
    regions, matched, classes = [], [], []
    for i in range(feats.shape[0]):
        items = [(n, a_hat[i, n + 1], protos[n]) for n in range(n_fg) if labels[i, n]]
        if include_background:
            items.append((n_fg, a_hat[i, 0], F.normalize(protos[n_fg:].mean(0), dim=0)))
        for n, mask, proto in items:
            p = (mask[None] * feats[i]).sum((1, 2)) / (mask.sum() + 1e-6)
            regions.append(F.normalize(p, dim=0))
            matched.append(proto)
            classes.append(n)
    return torch.stack(regions), torch.stack(matched), classes


@pytest.mark.parametrize("include_background", [False, True])
def test_phase2_loss_rsc_equals_naive_pooling_and_contrast(include_background):
    out = _outputs()
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    target = torch.randint(0, 5, (3, 20, 24))
    crit = Phase2Loss(lambda_ce=0.7, lambda_rsc=1.3, tau_rsc=0.07, include_background=include_background)
    loss, parts = crit(out, target, labels)
    regions, matched, classes = naive_regions(out, labels, include_background)
    expected_rsc = naive_rsc_pairs(regions.detach(), matched, classes, 0.07)
    assert parts["rsc"] == pytest.approx(expected_rsc, rel=1e-9)
    assert parts["ce"] == pytest.approx(float(crit.ce(out["logits"], target)), rel=1e-12)
    assert float(loss) == pytest.approx(0.7 * parts["ce"] + 1.3 * parts["rsc"], rel=1e-12)
    loss.backward()
    assert out["features"].grad is not None


def test_phase2_loss_detach_weights_changes_only_the_gradient():
    labels = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    target = torch.randint(0, 5, (3, 10, 12))
    grads, values = [], []
    for detach in (False, True):
        out = _outputs(seed=3)
        loss, parts = Phase2Loss(lambda_ce=0.0, tau_rsc=0.5, detach_weights=detach)(out, target, labels)
        loss.backward()
        grads.append(out["features"].grad.clone())
        values.append(parts["rsc"])
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("form", ["class", "literal"])
def test_phase2_loss_other_forms_run(form):
    out = _outputs(seed=5)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    loss, parts = Phase2Loss(rsc_form=form, tau_rsc=0.1, generator=torch.Generator().manual_seed(0))(
        out, torch.randint(0, 5, (3, 10, 12)), labels)
    assert math.isfinite(float(loss)) and parts["rsc"] > 0


def test_phase2_loss_validates_labels_and_needs_prototypes():
    out = _outputs()
    target = torch.zeros(3, 10, 12, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, N_fg\)"):
        Phase2Loss()(out, target, torch.ones(3, 5))
    no_protos = {k: v for k, v in out.items() if k != "prototypes"}
    with pytest.raises(ValueError, match="prototypes"):
        Phase2Loss()(no_protos, target, torch.ones(3, 4))
    loss, _ = Phase2Loss(prototypes=out["prototypes"])(no_protos, target, torch.ones(3, 4))
    assert math.isfinite(float(loss))


def test_phase2_loss_runs_in_float32_inside_autocast():
    out = {k: (v.float().detach() if v.is_floating_point() else v) for k, v in _outputs(seed=7, tau=0.1).items()}
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    target = torch.randint(0, 5, (3, 10, 12), generator=torch.Generator().manual_seed(0))
    crit = Phase2Loss(tau_rsc=0.1)
    plain, parts = crit(out, target, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mixed_parts = crit(out, target, labels)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain) and mixed_parts == parts
    # half-precision inputs are promoted
    half = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in out.items()}
    assert crit(half, target, labels)[0].dtype == torch.float32
