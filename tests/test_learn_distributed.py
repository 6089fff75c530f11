"""Prototype learning shared among processes, simulated in one process: ranks run in threads and
sum their statistics through an in-memory stand-in for ``all_reduce``. Checked against a float64
loop over all rows (the statistics) and against one process holding every row (the learned
prototypes)."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, List, Tuple

import pytest
import torch

from vpl_plugin.pipeline import chunk_pieces
from vpl_plugin.prototypes import (ChunkShare, NonFiniteRowsError, learn_vision_prototypes,
                                   prototype_gradient, prototype_loss)

D, N_FG, N_BG = 12, 3, 3
N = N_FG + N_BG


class ThreadGroup:
    """``world`` ranks in threads; ``reduce_sum(rank)`` sums a tensor over them in rank order (so
    every rank gets the same bits, as with a real all_reduce) and counts the calls."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: List[Any] = [None] * world
        self.calls = [0] * world

    def reduce_sum(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()
            t.copy_(total)
            return t
        return reduce

    def share(self, rank: int) -> ChunkShare:
        """A :class:`ChunkShare` whose ``all_gather`` goes through the same slots (counted too)."""
        def all_gather(t: torch.Tensor) -> List[torch.Tensor]:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            out = [s.clone() for s in self.slots]
            self.barrier.wait()
            return out
        return ChunkShare(rank, self.world, all_gather)

    def run(self, fn: Callable[[int, Callable], Any]) -> Tuple[List[Any], List[Any]]:
        """``fn(rank, reduce_sum)`` on every rank at once; (results, exceptions) in rank order."""
        results: List[Any] = [None] * self.world
        errors: List[Any] = [None] * self.world

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.reduce_sum(rank))
            except Exception as err:  # noqa: BLE001 - handed to the test
                errors[rank] = err

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors


def _images(seed: int = 0, count: int = 7, dtype=torch.float64):
    """Per-image features ``(n_i, D)``, targets ``(n_i, N)`` and candidate masks ``(N,)`` of a small
    clustered world with a modality gap (every image: some classes + every background concept)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    gap = torch.randn(D, generator=g, dtype=torch.float64)
    feats, targets, cands = [], [], []
    for _ in range(count):
        n_i = int(torch.randint(4, 30, (1,), generator=g))
        cand = torch.zeros(N, dtype=torch.bool)
        cand[torch.randperm(N_FG, generator=g)[:int(torch.randint(1, N_FG + 1, (1,), generator=g))]] = True
        cand[N_FG:] = True
        idx = torch.multinomial(cand.double(), n_i, replacement=True, generator=g)
        x = torch.nn.functional.normalize(z[idx] + 0.6 * gap + 0.5 * torch.randn(n_i, D, generator=g,
                                                                                 dtype=torch.float64), dim=1)
        q = torch.softmax((x @ z.T / 0.01).masked_fill(~cand, -math.inf), dim=1)  # sharper than tau_I
        feats.append(x.to(dtype))
        targets.append(q.to(dtype))
        cands.append(cand)
    return feats, targets, cands, z


def _share(items: List[Any], rank: int, world: int) -> List[Any]:
    return items[rank::world]  # the image sharding of `vpl learn` under torchrun


def _naive(feats, targets, cands, w, tau):
    """Mean loss and gradient, a float64 loop over every row."""
    loss, grad, k = 0.0, torch.zeros(N, D, dtype=torch.float64), 0
    for x_i, q_i, c_i in zip(feats, targets, cands):
        for x, q in zip(x_i.double(), q_i.double()):
            p = torch.softmax((w.double() @ x / tau).masked_fill(~c_i, -math.inf), dim=0)
            keep = q > 0
            loss -= float((q[keep] * p[keep].log()).sum())
            grad += torch.outer(p * q.sum() - q, x)
            k += 1
    return loss / k, grad / (k * tau)


def test_statistics_summed_over_shares_equal_a_float64_loop_over_all_rows():
    feats, targets, cands, z = _images(seed=1)
    w = torch.nn.functional.normalize(z + 0.1, dim=1)
    group = ThreadGroup(2)
    results, errors = group.run(lambda r, red: (
        prototype_loss(_share(feats, r, 2), _share(targets, r, 2), w, _share(cands, r, 2), tau=0.07,
                       chunk_size=5, dtype=torch.float64, reduce_sum=red),
        prototype_gradient(_share(feats, r, 2), _share(targets, r, 2), w, _share(cands, r, 2), tau=0.07,
                           chunk_size=5, dtype=torch.float64, reduce_sum=red)))
    assert errors == [None, None]
    loss, grad = _naive(feats, targets, cands, w, 0.07)
    for got_loss, got_grad in results:
        assert got_loss == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(got_grad, grad, rtol=1e-10, atol=1e-13)
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("step_rule,level", [("bb", "instance"), ("halving", "instance"), ("bb", "class")])
def test_two_simulated_ranks_learn_the_prototypes_of_one_process(step_rule, level):
    feats, targets, cands, z = _images(seed=2)
    kw = dict(tau=0.05, lr=10.0, iters=25, step_rule=step_rule, level=level, chunk_size=16,
              dtype=torch.float64, return_history=True)
    w_one, h_one = learn_vision_prototypes(feats, targets, z, cands, **kw)
    group = ThreadGroup(2)
    results, errors = group.run(lambda r, red: learn_vision_prototypes(
        _share(feats, r, 2), _share(targets, r, 2), z, _share(cands, r, 2), reduce_sum=red, **kw))
    assert errors == [None, None]
    (w0, h0), (w1, h1) = results
    assert torch.equal(w0, w1) and h0["loss"] == h1["loss"]  # every rank took the same steps
    torch.testing.assert_close(w0, w_one, rtol=0, atol=1e-10)
    assert h0["iterations"] == h_one["iterations"] and h0["evaluations"] == h_one["evaluations"]
    assert h0["loss"] == pytest.approx(h_one["loss"], rel=1e-10)
    # instance level: one collective per pass over the data ("evaluations" counts the first one
    # too) and one for the row count; class level: the row count and the anchors, then every rank
    # holds the whole (small) anchor problem
    expected = 2 if level == "class" else h0["evaluations"][-1] + 1
    assert group.calls == [expected, expected]


def test_float32_shares_agree_with_one_process_within_rounding():
    """In float32 the shares sum their chunks in another order than one process does, which moves
    the result as much as another chunk size moves one process's (the step-size rule amplifies any
    such rounding difference with the iterations, so this compares after a few)."""
    feats, targets, cands, z = _images(seed=3, count=9, dtype=torch.float32)
    kw = dict(tau=0.03, iters=10, chunk_size=32, return_history=True)
    w_one, h_one = learn_vision_prototypes(feats, targets, z, cands, **kw)
    w_chunks = learn_vision_prototypes(feats, targets, z, cands, **{**kw, "chunk_size": 7})[0]
    results, errors = ThreadGroup(2).run(lambda r, red: learn_vision_prototypes(
        _share(feats, r, 2), _share(targets, r, 2), z, _share(cands, r, 2), reduce_sum=red, **kw))
    assert errors == [None, None]
    spread = float((w_chunks - w_one).abs().max())
    assert 0 < spread < 2e-6
    torch.testing.assert_close(results[0][0], w_one, rtol=0, atol=max(2 * spread, 1e-6))
    assert results[0][1]["loss"] == pytest.approx(h_one["loss"], rel=2e-5)


def test_a_rank_without_rows_still_takes_part():
    feats, targets, cands, z = _images(seed=4, count=2)
    kw = dict(tau=0.05, iters=10, dtype=torch.float64)
    w_one = learn_vision_prototypes(feats, targets, z, cands, **kw)

    def rank(r, red):
        if r == 2:  # the list had fewer images than processes
            return learn_vision_prototypes(torch.zeros(0, D, dtype=torch.float64),
                                           torch.zeros(0, N, dtype=torch.float64), z,
                                           torch.zeros(0, N, dtype=torch.bool), reduce_sum=red, **kw)
        return learn_vision_prototypes([feats[r]], [targets[r]], z, [cands[r]], reduce_sum=red, **kw)

    results, errors = ThreadGroup(3).run(rank)
    assert errors == [None] * 3
    for w in results:
        torch.testing.assert_close(w, w_one, rtol=0, atol=1e-10)


def test_no_rows_anywhere_is_refused():
    empty = (torch.zeros(0, D), torch.zeros(0, N))
    _, errors = ThreadGroup(2).run(lambda r, red: learn_vision_prototypes(
        *empty, torch.eye(N, D), reduce_sum=red, iters=1))
    assert all(isinstance(e, ValueError) and "in any process" in str(e) for e in errors)


def test_nan_rows_in_one_share_stop_every_rank_and_the_owner_names_its_row():
    feats, targets, cands, z = _images(seed=5, count=4)
    feats[3] = feats[3].clone()
    feats[3][2, 0] = float("nan")  # rank 1 holds images 1 and 3: its row n_1 + 2
    results, errors = ThreadGroup(2).run(lambda r, red: learn_vision_prototypes(
        _share(feats, r, 2), _share(targets, r, 2), z, _share(cands, r, 2), reduce_sum=red, iters=3,
        dtype=torch.float64))
    assert isinstance(errors[1], NonFiniteRowsError) and errors[1].row == feats[1].shape[0] + 2
    assert isinstance(errors[0], ValueError) and "other process" in str(errors[0])


def _chunk_share(feats, targets, cands, chunk: int, rank: int, world: int):
    """Rows of global chunks ``rank, rank + world, ...`` of the concatenated set."""
    x, q = torch.cat(feats), torch.cat(targets)
    m = torch.cat([c[None].expand(len(f), -1) for f, c in zip(feats, cands)])
    keep = [torch.arange(a, min(a + chunk, len(x))) for a in range(rank * chunk, len(x), world * chunk)]
    rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return x[rows], q[rows], m[rows]


@pytest.mark.parametrize("world,level", [(2, "instance"), (3, "instance"), (2, "class")])
def test_chunk_shares_learn_bit_for_bit_the_prototypes_of_one_process(world, level):
    """float32, the default rule run to its own stop: the share's sums are added in chunk order,
    so nothing differs from one process, not even in the last bit."""
    feats, targets, cands, z = _images(seed=6, count=11, dtype=torch.float32)
    kw = dict(tau=0.03, iters=400, chunk_size=37, level=level, return_history=True)
    w_one, h_one = learn_vision_prototypes(feats, targets, z, cands, **kw)
    assert h_one["iterations"] > 30
    group = ThreadGroup(world)

    def rank(r, _):
        x, q, m = _chunk_share(feats, targets, cands, 37, r, world)
        return learn_vision_prototypes(x, q, z, m, share=group.share(r), **kw)

    results, errors = group.run(rank)
    assert errors == [None] * world
    for w, h in results:
        assert torch.equal(w, w_one)
        assert h["loss"] == h_one["loss"] and h["stopped"] == h_one["stopped"]


def test_chunk_share_refuses_rows_that_are_not_whole_chunks():
    feats, targets, cands, z = _images(seed=7, count=5)
    group = ThreadGroup(2)
    # rank 0 holds the first 20 rows although the chunks are 16 rows long

    def rank(r, _):
        x, q, m = (t[:20] if r == 0 else t[20:] for t in _chunk_share(feats, targets, cands, 10 ** 6, 0, 1))
        return learn_vision_prototypes(x, q, z, m, share=group.share(r), chunk_size=16, iters=1)

    _, errors = group.run(rank)
    assert all(isinstance(e, ValueError) and "global chunks" in str(e) for e in errors)


@pytest.mark.parametrize("chunk,world", [(1, 2), (4, 2), (5, 3), (7, 2), (100, 2)])
def test_chunk_pieces_give_each_rank_every_world_th_chunk_of_the_rows(chunk, world):
    images = [("a", 3), ("b", 0), ("c", 9), ("d", 1), ("e", 6)]
    # oracle: label every row of the concatenated set, row by row
    rows = [(image_id, r) for image_id, n in images for r in range(n)]
    covered = []
    for rank in range(world):
        pieces = chunk_pieces(images, chunk, rank, world)
        got = [(image_id, r) for image_id, a, b in pieces for r in range(a, b)]
        expected = [row for k, row in enumerate(rows) if (k // chunk) % world == rank]
        assert got == expected
        assert all(b > a for _, a, b in pieces)
        covered += got
    assert sorted(covered) == sorted(rows)


def test_a_feature_cache_other_processes_cannot_see_is_refused_by_name(voc_root, tiny_encoder, tmp_path,
                                                                        monkeypatch):
    """Chunk shares read every process's records from the one cache: a process that does not see
    them (no shared file system) is told so, not handed a confusing unreadable-record error."""
    pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
    from vpl_plugin import distributed
    from vpl_plugin.adapters import CLIPESAdapter
    from vpl_plugin.data.voc import VOCDataset
    from vpl_plugin.pipeline import collect_learning_set

    dataset = VOCDataset(voc_root, "train.txt")
    # rank 1 (simulated) reports the second image, written into a cache this process cannot see
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [mine, [(dataset.ids[1], 500)]])
    with pytest.raises(ValueError, match="cannot see 1 record.*every process must see one cache"):
        collect_learning_set(CLIPESAdapter(tiny_encoder), dataset, limit=2, progress=False,
                             cache_dir=tmp_path / "cache", rank=0, world_size=2, chunk_size=100)
    assert (tmp_path / "cache" / f"{dataset.ids[0]}.npz").is_file()  # its own image was done
