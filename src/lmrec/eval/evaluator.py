"""The evaluator shared by every model family.

A model is evaluated through a *rank function*: given a batch of histories and targets it returns each
target's 0-based rank among all items (``inf`` when not retrieved). Full ranking (text family) and beam
search (generative family) plug in alike, so metrics and splits are the same for both.
Under several processes each rank scores a strided shard of the users and the ranks are gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmrec.data.dataset import Examples
from lmrec.errors import LmrecError
from lmrec.eval.metrics import DEFAULT_KS, compute_metrics
from lmrec.eval.ranking import DEFAULT_CHUNK, target_ranks
from lmrec.progress import progress

RankFn = Callable[[list[np.ndarray], np.ndarray], np.ndarray]


def evaluate(
    rank_fn: RankFn,
    examples: Examples,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    accelerator=None,
    desc: str = "evaluate",
    return_ranks: bool = False,
):
    """Metrics of ``rank_fn`` on ``examples``; with ``return_ranks`` also the per-example ranks."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    shard = np.arange(rank, len(examples), world)
    ranks = np.empty(len(shard), dtype=np.float64)
    show = accelerator is None or accelerator.is_local_main_process
    for start in progress(range(0, len(shard), batch_size), desc, show):
        idx = shard[start : start + batch_size]
        ranks[start : start + len(idx)] = rank_fn([examples.histories[i] for i in idx], examples.targets[idx])
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(list(zip(shard.tolist(), ranks.tolist())))
        full = np.empty(len(examples), dtype=np.float64)
        for i, r in pairs:
            full[i] = r
        ranks = full
    metrics = compute_metrics(ranks, ks)
    return (metrics, ranks) if return_ranks else metrics


def dot_rank_fn(
    encode_queries: Callable[[list[np.ndarray]], torch.Tensor],
    item_vectors: torch.Tensor,
    *,
    exclude_history: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    candidates: np.ndarray | None = None,
) -> RankFn:
    """Rank function for models that score items by a dot product with a query vector. ``candidates``
    (item indices) ranks each target among those items only; every target must be one of them."""
    if candidates is not None:
        remap = np.full(len(item_vectors), -1, dtype=np.int64)
        remap[candidates] = np.arange(len(candidates))
        item_vectors = item_vectors[torch.as_tensor(candidates, device=item_vectors.device)]

    def rank_fn(histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
        q = encode_queries(histories)  # the whole history, whatever the candidates
        exclude = histories if exclude_history else None
        if candidates is not None:
            targets = remap[targets]
            if (targets < 0).any():
                raise LmrecError(f"{int((targets < 0).sum())} target(s) of this batch are not among the "
                                 f"{len(candidates)} candidate items")
            if exclude is not None:
                exclude = [r[r >= 0] for r in (remap[h] for h in exclude)]
        t = torch.as_tensor(targets, device=q.device)
        r = target_ranks(q, item_vectors.to(q.device, q.dtype), t, chunk_size=chunk_size, exclude=exclude)
        return r.cpu().numpy()

    return rank_fn
