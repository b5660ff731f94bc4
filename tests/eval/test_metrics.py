import math

import numpy as np
import torch

from lmrec.eval.metrics import compute_metrics
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
