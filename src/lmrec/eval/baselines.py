"""Non-learned baselines, ranked by the same evaluator on the same split."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from lmrec.data.dataset import Examples, PreparedDataset
from lmrec.eval.evaluator import RankFn, dot_rank_fn, evaluate
from lmrec.eval.metrics import DEFAULT_KS, compute_metrics


def popularity_rank_fn(dataset: PreparedDataset, *, exclude_history: bool = False) -> RankFn:
    """Score = number of interactions with the item in the training part only (no valid/test leakage)."""
    counts = torch.as_tensor(dataset.train_item_counts(), dtype=torch.float64)[:, None]  # (N, 1)

    def queries(histories: list[np.ndarray]) -> torch.Tensor:
        return torch.ones(len(histories), 1, dtype=torch.float64)

    return dot_rank_fn(queries, counts, exclude_history=exclude_history)


def random_expectation(examples: Examples, num_items: int, *, ks: Sequence[int] = DEFAULT_KS,
                       exclude_history: bool = False, candidates: np.ndarray | None = None) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking — no sampling. The target's rank is uniform
    over its user's candidates (all items or ``candidates``, less the history items other than the target
    when they are excluded), so each metric is its mean over ranks 0 … n−1, averaged over users. The
    reference a model must beat where popularity cannot be one: on cold items popularity ranks every
    target last."""
    size = num_items if candidates is None else len(candidates)
    if exclude_history:
        pool = None if candidates is None else set(np.asarray(candidates).tolist())
        excluded = [set(h.tolist()) - {int(t)} for h, t in zip(examples.histories, examples.targets)]
        n = np.array([size - len(e if pool is None else e & pool) for e in excluded])
    else:
        n = np.full(len(examples), size)
    values, counts = np.unique(n, return_counts=True)
    out: dict[str, float] = {}
    for v, c in zip(values, counts):
        for key, x in compute_metrics(np.arange(v), ks).items():
            if key != "users":
                out[key] = out.get(key, 0.0) + x * c / len(n)
    out["users"] = int(len(n))
    return out


def baselines(dataset: PreparedDataset, split: str = "test", *, ks: Sequence[int] = DEFAULT_KS,
              exclude_history: bool = False, batch_size: int = 64, accelerator=None) -> dict[str, dict]:
    """Popularity (ranked by the evaluator) and the random expectation, on ``split`` of ``dataset``."""
    examples = dataset.examples(split)
    pop = evaluate(popularity_rank_fn(dataset, exclude_history=exclude_history), examples, ks=ks,
                   batch_size=batch_size, accelerator=accelerator, desc="popularity")
    return {"popularity": pop, "random": random_expectation(examples, dataset.num_items, ks=ks,
                                                            exclude_history=exclude_history)}


def new_items_protocol(dataset: PreparedDataset, make_rank_fn: Callable[[np.ndarray], RankFn], *,
                       ks: Sequence[int] = DEFAULT_KS, exclude_history: bool = False, batch_size: int = 64,
                       accelerator=None) -> dict | None:
    """On a cold-start split, the new-item protocol next to full ranking, for any model: each test target
    ranked among the items never seen before test time (``make_rank_fn(candidates)``), with the random
    expectation for that candidate set. ``{"test": ..., "baselines": {"random": ...}, "candidates": n}``;
    None on other splits."""
    if dataset.manifest["options"].get("split") != "cold":
        return None
    examples, new = dataset.examples("test"), dataset.new_items()
    if not len(examples) or not np.isin(examples.targets, new).all():
        return None
    test = evaluate(make_rank_fn(new), examples, ks=ks, batch_size=batch_size, accelerator=accelerator,
                    desc="test (new items)")
    rnd = random_expectation(examples, dataset.num_items, ks=ks, exclude_history=exclude_history, candidates=new)
    return {"test": test, "baselines": {"random": rnd}, "candidates": int(len(new))}
