import math

import numpy as np
import pytest
import torch

from lmrec.eval.metrics import compute_metrics, ndcg_per_user, paired_difference
from lmrec.eval.ranking import target_ranks, top_k


def test_metrics_on_hand_computed_ranks():
    ranks = np.array([0, 1, 4, 12, np.inf])
    m = compute_metrics(ranks, ks=[5, 10])
    assert m["recall@5"] == 3 / 5
    assert m["recall@10"] == 3 / 5
    assert math.isclose(m["ndcg@5"], (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert math.isclose(m["mrr@5"], (1 + 1 / 2 + 1 / 5) / 5)
    assert math.isclose(m["mrr"], (1 + 1 / 2 + 1 / 5 + 1 / 13 + 0) / 5)
    assert m["users"] == 5


def test_rank_counts_strictly_higher_scores_in_chunks():
    torch.manual_seed(0)
    q, items = torch.randn(7, 4), torch.randn(23, 4)
    items[5] = items[3]  # item 5 ties with target 3 (and 3 with target 5): half a rank each
    targets = torch.tensor([3, 5, 0, 22, 10, 11, 3])
    scores = q @ items.T
    expected = (scores > scores.gather(1, targets[:, None])).sum(1).double()
    expected[[0, 1, 6]] += 0.5
    for chunk in (1, 4, 23, 100):
        assert torch.equal(target_ranks(q, items, targets, chunk_size=chunk), expected)


def test_a_collapsed_model_does_not_look_perfect():
    q, items = torch.ones(3, 4), torch.ones(100, 4)  # every item scores the same
    ranks = target_ranks(q, items, torch.tensor([0, 50, 99]))
    assert ranks.tolist() == [49.5] * 3


def test_exclude_history_removes_only_history_items():
    q = torch.tensor([[1.0]])
    items = torch.tensor([[5.0], [4.0], [3.0], [2.0]])
    assert target_ranks(q, items, torch.tensor([2])).item() == 2
    assert target_ranks(q, items, torch.tensor([2]), exclude=[[0]], chunk_size=3).item() == 1
    s, i = top_k(q, items, 2, exclude=[[0, 1]], chunk_size=1)
    assert i.tolist() == [[2, 3]] and s.tolist() == [[3.0, 2.0]]


def test_top_k_matches_full_sort():
    torch.manual_seed(1)
    q, items = torch.randn(5, 8), torch.randn(101, 8)
    s, i = top_k(q, items, 10, chunk_size=17)
    ref_s, ref_i = (q @ items.T).topk(10, dim=-1)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)


def test_random_expectation_matches_random_scores_through_the_ranker():
    """The exact expectation against the mean over many random scorings ranked by target_ranks (which does
    its own exclusion): the candidate counting, with and without history exclusion, must agree."""
    from lmrec.data.dataset import Examples
    from lmrec.eval.baselines import random_expectation

    n_items, ks = 12, [1, 3, 5]
    histories = [np.array([0, 1, 2]), np.array([3, 3, 4, 5, 6, 7]), np.array([8]), np.array([9, 10, 11, 0])]
    targets = np.array([5, 4, 9, 0])  # user 1 and 3: the target is in the history (it is never excluded)
    ex = Examples(np.arange(4), histories, targets)
    gen = torch.Generator().manual_seed(0)
    for exclude in (False, True):
        expected = random_expectation(ex, n_items, ks=ks, exclude_history=exclude)
        draws = []
        for _ in range(3000):
            items = torch.rand(n_items, 1, generator=gen, dtype=torch.float64)
            r = target_ranks(torch.ones(4, 1, dtype=torch.float64), items, torch.as_tensor(targets),
                             exclude=histories if exclude else None)
            draws.append(compute_metrics(r.numpy(), ks))
        for key in ("recall@1", "recall@5", "ndcg@3", "mrr@5", "mrr"):
            mc = np.mean([d[key] for d in draws])
            se = np.std([d[key] for d in draws]) / math.sqrt(len(draws))
            assert abs(mc - expected[key]) < 4 * se + 1e-9, (exclude, key, mc, expected[key])
        assert expected["users"] == 4
    # by hand, no exclusion: 12 candidates for everyone
    full = random_expectation(ex, n_items, ks=ks)
    assert math.isclose(full["recall@5"], 5 / 12) and math.isclose(full["mrr"], sum(1 / r for r in range(1, 13)) / 12)
    # with exclusion: 9, 8 (3 is repeated, the target 4 stays), 11, 9 (the target 0 stays) candidates
    excl = random_expectation(ex, n_items, ks=ks, exclude_history=True)
    assert math.isclose(excl["recall@1"], (1 / 9 + 1 / 8 + 1 / 11 + 1 / 9) / 4)


def test_ranking_among_candidates_equals_ranking_the_sub_catalog():
    from lmrec.errors import LmrecError
    from lmrec.eval.evaluator import dot_rank_fn

    g = torch.Generator().manual_seed(1)
    items, users = torch.randn(40, 8, generator=g), torch.randn(3, 8, generator=g)
    cand = np.array([2, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    histories = [np.array([5, 6, 2]), np.array([0, 1]), np.array([7, 31, 13])]
    targets = np.array([7, 11, 13])  # user 3's target is in the history (never excluded)
    queries = dict(zip(map(id, histories), users))
    fn = dot_rank_fn(lambda hs: torch.stack([queries[id(h)] for h in hs]), items, candidates=cand,
                     exclude_history=True)
    got, nonfinite = fn(histories, targets)
    assert not nonfinite.any()
    for u in range(3):  # by hand: scores on the candidates only, history candidates other than the target out
        pool = [c for c in cand if c == targets[u] or c not in histories[u]]
        s = {c: float(users[u] @ items[c]) for c in pool}
        assert got[u] == sum(v > s[targets[u]] for v in s.values())
    with pytest.raises(LmrecError, match="not among the 10 candidate items"):
        fn(histories, np.array([7, 3, 13]))


def test_the_paired_comparison_takes_the_user_as_its_unit():
    """Each user's NDCG@10 (1 / log2(rank + 2) inside the cut-off), and the paired difference's standard error
    is that of the users' seed-averaged differences (the seeds share the users and targets of the split)."""
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 30, size=(6, 500)) + rng.choice([0.0, 0.5], size=(6, 500))  # ties: half ranks
    ranks[0, :5] = np.inf  # not retrieved (beyond a generative model's beams)
    g = np.stack([ndcg_per_user(r, 10) for r in ranks])
    assert np.allclose(g, [[1 / math.log2(x + 2) if x < 10 else 0.0 for x in r] for r in ranks])
    assert g.mean(axis=1).tolist() == [compute_metrics(r, ks=[10])["ndcg@10"] for r in ranks]
    a, b = g[0::2], g[1::2]
    r = paired_difference(a, b)
    per_user = [sum(a[s, u] - b[s, u] for s in range(3)) / 3 for u in range(500)]
    mean = sum(per_user) / 500
    se = (sum((x - mean) ** 2 for x in per_user) / 499 / 500) ** 0.5
    assert r["diff"] == pytest.approx(a.mean() - b.mean()) == pytest.approx(mean)
    assert r["se"] == pytest.approx(se) and r["low"] == pytest.approx(mean - 1.96 * se)
    assert r["per_seed"] == pytest.approx([a[s].mean() - b[s].mean() for s in range(3)])
    same = paired_difference(a, a)
    assert same["diff"] == same["se"] == same["low"] == same["high"] == 0
    # one seed's differences repeated three times: the users are still 500, the error that of one seed
    one = paired_difference(a[:1], b[:1])["se"]
    assert paired_difference(np.repeat(a[:1], 3, 0), np.repeat(b[:1], 3, 0))["se"] == pytest.approx(one)
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(a, b[:, :400])


def test_a_runs_ranks_file_round_trips_and_a_bad_one_is_named(tmp_path):
    from lmrec.data.dataset import Examples
    from lmrec.errors import LmrecError
    from lmrec.eval.evaluator import read_ranks, save_ranks

    ex = Examples(np.array([3, 1, 2]), [np.array([0]), np.array([1, 2]), np.array([4])], np.array([5, 6, 7]))
    path = save_ranks(tmp_path / "test_ranks.npz", ex, np.array([0.0, 12.5, np.inf]))
    back = read_ranks(path)
    assert back["users"].tolist() == [3, 1, 2] and back["targets"].tolist() == [5, 6, 7]
    assert back["ranks"].tolist() == [0.0, 12.5, np.inf] and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="2 ranks for 3 examples"):
        save_ranks(tmp_path / "short.npz", ex, np.array([0.0, 1.0]))
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(LmrecError, match=r"bad.npz: not a per-user ranks file written by lmrec"):
        read_ranks(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", users=np.arange(3), ranks=np.zeros(3))
    with pytest.raises(LmrecError, match=r"other.npz: not a per-user ranks file"):
        read_ranks(tmp_path / "other.npz")
