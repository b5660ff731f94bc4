"""Ranking metrics as pure functions of 0-based ranks.

A target's rank is the number of items scoring strictly higher than it (0 = top). A rank of ``inf``
means the target was not retrieved at all (e.g. beyond the beam of a generative model) and counts as a
miss at every cut-off and as 0 reciprocal rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (10, 20, 50)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    # One relevant item per user, so IDCG = 1 and NDCG = 1 / log2(rank + 2) inside the cut-off.
    hit = ranks < k
    gains = np.zeros(len(ranks))
    gains[hit] = 1.0 / np.log2(ranks[hit] + 2.0)
    return float(np.mean(gains))


def mrr(ranks: np.ndarray, k: int | None = None) -> float:
    rr = 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)
    if k is not None:
        rr = np.where(ranks < k, rr, 0.0)
    return float(np.mean(rr))


def compute_metrics(ranks: Sequence[float] | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"recall@10": …, "ndcg@10": …, "mrr@10": …, …, "mrr": …, "users": n}``."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return {"users": 0}
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(r, k)
        out[f"ndcg@{k}"] = ndcg_at_k(r, k)
        out[f"mrr@{k}"] = mrr(r, k)
    out["mrr"] = mrr(r)
    out["users"] = int(r.size)
    return out
