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


def ndcg_per_user(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k. One relevant item per user, so IDCG = 1 and NDCG = 1 / log2(rank + 2) inside the
    cut-off."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < k
    gains = np.zeros(len(ranks))
    gains[hit] = 1.0 / np.log2(ranks[hit] + 2.0)
    return gains


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ndcg_per_user(ranks, k)))


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Is model A's metric above model B's, or within the users' noise? ``a``, ``b``: (seeds, users) per-user
    values of the two models on the same users and targets, one row per seed. Each user's difference is
    averaged over the seeds first — a leave-one-out split gives every seed the same users and targets, so the
    seeds are no independent samples of users: the user is the unit —, then the mean over the users, its
    standard error and a 95 % interval (normal approximation; ``se`` 0 for one user), and each seed's
    difference of the means."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"paired values of one shape (seeds, users) with users, got {a.shape} and {b.shape}")
    d = (a - b).mean(axis=0)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": mean, "se": se, "low": mean - 1.96 * se,
            "high": mean + 1.96 * se, "per_seed": (a - b).mean(axis=1).tolist(), "users": int(a.shape[1])}


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
