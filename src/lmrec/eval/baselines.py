"""Non-learned baselines, ranked by the same evaluator on the same split."""

from __future__ import annotations

import numpy as np
import torch

from lmrec.data.dataset import PreparedDataset
from lmrec.eval.evaluator import RankFn, dot_rank_fn


def popularity_rank_fn(dataset: PreparedDataset, *, exclude_history: bool = False) -> RankFn:
    """Score = number of interactions with the item in the training part only (no valid/test leakage)."""
    counts = torch.as_tensor(dataset.train_item_counts(), dtype=torch.float64)[:, None]  # (N, 1)

    def queries(histories: list[np.ndarray]) -> torch.Tensor:
        return torch.ones(len(histories), 1, dtype=torch.float64)

    return dot_rank_fn(queries, counts, exclude_history=exclude_history)
