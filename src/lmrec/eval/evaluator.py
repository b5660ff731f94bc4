"""The evaluator shared by every model family.

A model is evaluated through a *rank function*: given a batch of histories and targets it returns each
target's 0-based rank among all items (``inf`` when not retrieved), or ``(ranks, nonfinite)`` where
``nonfinite`` flags the users whose scores were not all finite (NaN or infinite: a diverged or broken
model). Full ranking (text family) and beam search (generative family) plug in alike, so metrics and splits
are the same for both. Under several processes each rank scores a strided shard of the users and the ranks
are gathered.

Non-finite scores rank last (never first: every comparison with NaN is false), the metrics count the users
who had them (``nonfinite``, present only when there were any) and a warning names them; training never
keeps an epoch whose validation had any (``lmrec.training.loop``). Evaluation goes on rather than stopping:
a few users whose history overflows still leave meaningful metrics for the others, and a run whose
validation diverged must still be able to finish with the best earlier model.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lmrec.data.dataset import Examples
from lmrec.errors import LmrecError
from lmrec.eval.metrics import DEFAULT_KS, compute_metrics
from lmrec.eval.ranking import DEFAULT_CHUNK, target_ranks
from lmrec.io import atomic_file
from lmrec.progress import progress

RankFn = Callable[[list[np.ndarray], np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
logger = logging.getLogger(__name__)


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
    bad = np.zeros(len(shard), dtype=bool)
    show = accelerator is None or accelerator.is_local_main_process
    for start in progress(range(0, len(shard), batch_size), desc, show):
        idx = shard[start : start + batch_size]
        out = rank_fn([examples.histories[i] for i in idx], examples.targets[idx])
        if isinstance(out, tuple):
            out, bad[start : start + len(idx)] = out
        ranks[start : start + len(idx)] = out
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(list(zip(shard.tolist(), ranks.tolist(), bad.tolist())))
        ranks, bad = np.empty(len(examples), dtype=np.float64), np.zeros(len(examples), dtype=bool)
        for i, r, b in pairs:
            ranks[i], bad[i] = r, b
    metrics = compute_metrics(ranks, ks)
    if bad.any():
        metrics["nonfinite"] = int(bad.sum())
        if show:
            logger.warning(f"{desc}: {metrics['nonfinite']} of {len(ranks)} users had non-finite scores (NaN or "
                           "infinite: the model diverged or its weights are broken); those scores rank last")
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
    (item indices) ranks each target among those items only; every target must be one of them. Returns
    ``(ranks, nonfinite)`` (see the module docstring)."""
    if candidates is not None:
        remap = np.full(len(item_vectors), -1, dtype=np.int64)
        remap[candidates] = np.arange(len(candidates))
        item_vectors = item_vectors[torch.as_tensor(candidates, device=item_vectors.device)]

    def rank_fn(histories: list[np.ndarray], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        r, bad = target_ranks(q, item_vectors.to(q.device, q.dtype), t, chunk_size=chunk_size, exclude=exclude,
                              return_nonfinite=True)
        return r.cpu().numpy(), bad.cpu().numpy()

    return rank_fn


RANKS_FILE = "test_ranks.npz"  # a run's per-user test ranks, next to its metrics.json


def save_ranks(path: str | Path, examples: Examples, ranks: np.ndarray) -> Path:
    """A split's users, targets and 0-based ranks (``inf``: not retrieved), written atomically: what a paired
    comparison of two runs over the same users reads (``lmrec compare``)."""
    if len(ranks) != len(examples):
        raise ValueError(f"{len(ranks)} ranks for {len(examples)} examples")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
            np.savez(f, users=np.asarray(examples.users), targets=np.asarray(examples.targets),
                     ranks=np.asarray(ranks, dtype=np.float64))

    return atomic_file(path, write)


def read_ranks(path: str | Path) -> dict[str, np.ndarray]:
    """``{"users", "targets", "ranks"}`` of :func:`save_ranks`; a file that is not one is named."""
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in ("users", "targets", "ranks")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise LmrecError(f"{path}: not a per-user ranks file written by lmrec (users, targets, ranks): {e}") from e
    if not len(out["users"]) == len(out["targets"]) == len(out["ranks"]):
        raise LmrecError(f"{path}: users, targets and ranks of different lengths")
    return out
