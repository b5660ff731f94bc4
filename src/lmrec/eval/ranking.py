"""Full ranking over all items in bounded memory.

Scores are dot products between query vectors (users) and item vectors, computed one item chunk at a
time, so memory is O(batch × chunk) however large the catalog (RecFormer's code materialised a
users × items matrix and ran out of memory at 1.5M items). Both the text family (cosine = dot of unit
vectors) and the popularity baseline (a 1-d "vector" per item) go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Items scored per matrix product. Large chunks spill the (batch × chunk) score block and its comparison
# masks out of the CPU caches; 8,192 sits in the middle of the range of sizes where the time stops improving
# (identical ranks at any chunk; bench/bench_serve.py, part "chunks", measures it against 65,536).
DEFAULT_CHUNK = 8192


def _exclude_mask(histories: Sequence[Sequence[int]], start: int, stop: int, device) -> tuple[torch.Tensor, ...]:
    rows, cols = [], []
    for b, h in enumerate(histories):
        for it in h:
            if start <= it < stop:
                rows.append(b)
                cols.append(it - start)
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)


@torch.no_grad()
def target_ranks(
    queries: torch.Tensor,  # (B, H)
    items: torch.Tensor,  # (N, H)
    targets: torch.Tensor,  # (B,)
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    return_nonfinite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rank of each target among dot-product scores: :func:`chunk_ranks` with ``queries @ items.T``."""
    return chunk_ranks(lambda start, stop: queries @ items[start:stop].T, items.shape[0],
                       (queries * items[targets]).sum(-1), targets, exclude=exclude, chunk_size=chunk_size,
                       return_nonfinite=return_nonfinite)


@torch.no_grad()
def chunk_ranks(
    score_chunk: Callable[[int, int], torch.Tensor],  # (start, stop) -> (B, stop - start) scores
    num_items: int,
    target_scores: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B,)
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    return_nonfinite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rank of each target = number of items scoring strictly higher, plus half the items tied with it
    (the expected rank under random tie-breaking). Excluded items never count. Scores come one item chunk at
    a time from ``score_chunk``; ``target_scores`` are the targets' own.

    With continuous scores ties do not occur and this is the plain "strictly higher" count. Counting ties as
    not-higher would let a collapsed model (every item the same vector) score NDCG 1.0 — we saw it happen —
    and flatter baselines with many equal scores. The target's own score may come from another kernel than
    the chunk scores, so scores within a few ulps of it count as ties, and the target never counts at all.

    Non-finite scores (NaN, ±inf: a diverged model) rank below every finite score and tie with each other:
    every comparison with NaN is false, so a plain count would rank a NaN target first, and a model with
    every weight NaN would score 1.0. With ``return_nonfinite`` also (B,) bool: the user had a non-finite
    score (of the target or any item). Returned as float64: ranks may be x.5."""
    target_scores = target_scores.reshape(-1, 1)  # (B, 1)
    device = target_scores.device
    bad_target = ~torch.isfinite(target_scores)
    tol = 16 * torch.finfo(target_scores.dtype).eps * target_scores.masked_fill(bad_target, 0.0).abs().clamp(min=1.0)
    # non-finite → -inf: never above a finite target; a -inf target has every finite item above it
    target_scores = target_scores.masked_fill(bad_target, float("-inf"))
    any_bad_target = bool(bad_target.any())
    ranks = torch.zeros(len(target_scores), dtype=torch.float64, device=device)
    nonfinite = bad_target[:, 0].clone()
    rows = torch.arange(len(target_scores), device=device)
    for start in range(0, num_items, chunk_size):
        scores = score_chunk(start, min(start + chunk_size, num_items))  # (B, C)
        # a non-finite score makes its row's sum non-finite: one reduction finds them, the masks only then
        if any_bad_target or not bool(torch.isfinite(scores.sum(-1)).all()):
            bad = ~torch.isfinite(scores)
            nonfinite |= bad.any(-1)
            scores.masked_fill_(bad, float("-inf"))
        higher = scores > target_scores + tol
        tied = (scores - target_scores).abs() <= tol  # -inf against -inf is NaN here: those ties come next
        if any_bad_target:
            tied |= bad & bad_target
        inside = (targets >= start) & (targets < start + scores.shape[1])
        tied[rows[inside], targets[inside] - start] = False
        if exclude is not None:
            r, c = _exclude_mask(exclude, start, start + scores.shape[1], device)
            higher[r, c] = False
            tied[r, c] = False
        ranks += higher.sum(-1) + 0.5 * tied.sum(-1)
    return (ranks, nonfinite) if return_nonfinite else ranks


@torch.no_grad()
def top_k(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k best items per query by dot product: :func:`chunk_top_k`."""
    return chunk_top_k(lambda start, stop: queries @ items[start:stop].T, items.shape[0], len(queries), k,
                       exclude=exclude, chunk_size=chunk_size, device=queries.device)


@torch.no_grad()
def chunk_top_k(
    score_chunk: Callable[[int, int], torch.Tensor],
    num_items: int,
    num_queries: int,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k best items per query, merged chunk by chunk: (B, k) each. Excluded items
    and items with a non-finite score never appear (torch's topk would rank NaN first): rows that run out of
    items end with score -inf and index -1."""
    k = min(k, num_items)
    best_s = torch.full((num_queries, 0), float("-inf"), device=device)
    best_i = torch.zeros((num_queries, 0), dtype=torch.long, device=device)
    for start in range(0, num_items, chunk_size):
        scores = score_chunk(start, min(start + chunk_size, num_items))
        scores = scores.masked_fill(~torch.isfinite(scores), float("-inf"))
        if exclude is not None:
            r, c = _exclude_mask(exclude, start, start + scores.shape[1], device)
            scores[r, c] = float("-inf")
        s, i = scores.topk(min(k, scores.shape[1]), dim=-1)
        best_s, order = torch.cat([best_s.to(s.dtype), s], -1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=-1)
        best_i = torch.cat([best_i, i + start], -1).gather(-1, order)
    return best_s, best_i.masked_fill(best_s == float("-inf"), -1)
