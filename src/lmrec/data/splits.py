"""Evaluation splits on chronological per-user item sequences.

Both splits return, per user, the training sequence and the validation/test targets (None when a user has
none). Model inputs are derived from them and never from anything later:

* valid: history = train, target = valid_target;
* test:  history = train + [valid_target], target = test_target (the test input includes the valid item).

``leave_one_out``: last item → test, second-to-last → valid, the rest → train (RecBole/RecFormer protocol).

``cold_start_split``: a seeded random share of the items is *cold*: no cold item appears in any training
or validation sequence. A user's test target is their first cold item, provided at least two warm items
precede it (one to train on, one to validate on); the warm items before it are the history, split as in
leave-one-out, and everything after it is dropped for that user, so that nothing from the future leaks
into the history. Users with no usable cold item keep their warm items for training and validation only.
This measures what text-based recommenders exist for: recommending items never seen in training.
"""

from __future__ import annotations

import numpy as np


def leave_one_out(sequences: list[np.ndarray]) -> dict:
    train, valid, test = [], [], []
    for s in sequences:
        train.append(np.asarray(s[:-2], dtype=np.int32))
        valid.append(int(s[-2]))
        test.append(int(s[-1]))
    return {"train": train, "valid_target": valid, "test_target": test}


def cold_items_for(n_items: int, ratio: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_cold = max(1, int(round(ratio * n_items)))
    return np.sort(rng.choice(n_items, size=n_cold, replace=False))


def cold_start_split(sequences: list[np.ndarray], n_items: int, ratio: float, seed: int) -> dict:
    cold = cold_items_for(n_items, ratio, seed)
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold] = True
    train, valid, test = [], [], []
    for s in sequences:
        s = np.asarray(s)
        flags = is_cold[s]
        first = int(np.argmax(flags)) if flags.any() else -1
        if first >= 2:
            warm = s[:first]
            target = int(s[first])
        else:
            warm = s[~flags]
            target = None
        if len(warm) >= 2:
            train.append(warm[:-1].astype(np.int32))
            valid.append(int(warm[-1]))
            test.append(target)
        else:  # too few warm items to validate on: keep them for training only
            train.append(warm.astype(np.int32))
            valid.append(None)
            test.append(None)
    return {"train": train, "valid_target": valid, "test_target": test, "cold_items": cold}
