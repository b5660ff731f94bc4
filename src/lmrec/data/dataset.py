"""A prepared dataset in memory: item text, id maps, and the examples of each split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmrec.data.prepare import FORMAT_VERSION, read_items
from lmrec.errors import DataError, LmrecError
from lmrec.modelfiles import read_json


@dataclass
class Examples:
    """Histories (oldest → newest, at most ``max_history_len`` items) and their target items."""

    users: np.ndarray  # (n,) user indices
    histories: list[np.ndarray]
    targets: np.ndarray  # (n,) item indices

    def __len__(self) -> int:
        return len(self.targets)

    def head(self, n: int) -> Examples:
        return Examples(self.users[:n], self.histories[:n], self.targets[:n])


class PreparedDataset:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise LmrecError(f"{self.path} is not a prepared dataset (no manifest.json); run `lmrec data prepare`")
        self.manifest = read_json(manifest)
        version = self.manifest.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise DataError(f"written by a newer lmrec (format {version}; this lmrec reads ≤ {FORMAT_VERSION}): "
                            "upgrade lmrec", file=manifest)
        if version != FORMAT_VERSION:
            raise DataError(f"format_version {version} is not supported (expected {FORMAT_VERSION})", file=manifest)
        self.item_ids, self.item_text = read_items(self.path / "items.parquet")
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        seq = pq.read_table(self.path / "sequences.parquet", columns=["user_id"]).to_pydict()
        self.user_ids: list[str] = seq["user_id"]
        split = pq.read_table(self.path / "split.parquet").to_pydict()
        self.train = [np.asarray(x, dtype=np.int64) for x in split["train"]]
        self.valid_target = split["valid_target"]
        self.test_target = split["test_target"]
        self.max_history_len: int = self.manifest["options"]["max_history_len"]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def examples(self, split: str) -> Examples:
        """Evaluation examples of ``split`` ("valid" or "test"), users without a target skipped."""
        if split not in ("valid", "test"):
            raise LmrecError(f"split must be 'valid' or 'test', got {split!r}")
        users, hists, targets = [], [], []
        for u, tr in enumerate(self.train):
            v, t = self.valid_target[u], self.test_target[u]
            if split == "valid" and v is not None:
                users.append(u), hists.append(tr), targets.append(v)
            elif split == "test" and t is not None and v is not None:
                users.append(u), hists.append(np.append(tr, v)), targets.append(t)
        m = self.max_history_len
        return Examples(np.asarray(users, dtype=np.int64), [h[-m:] for h in hists],
                        np.asarray(targets, dtype=np.int64))

    def train_examples(self, rng: np.random.Generator, samples_per_user: int = 1) -> Examples:
        """``samples_per_user`` samples per user (RecFormer: 1), each a random prefix of the training
        sequence → the next item; the cut points of one user are distinct while the sequence allows it.
        Samples are shuffled across users."""
        users, hists, targets = [], [], []
        for u, tr in enumerate(self.train):
            if len(tr) < 2:
                continue
            n = min(samples_per_user, len(tr) - 1)
            for cut in rng.choice(np.arange(1, len(tr)), size=n, replace=False):
                cut = int(cut)
                users.append(u), hists.append(tr[max(0, cut - self.max_history_len):cut]), targets.append(tr[cut])
        order = rng.permutation(len(users))
        return Examples(np.asarray(users, dtype=np.int64)[order], [hists[i] for i in order],
                        np.asarray(targets, dtype=np.int64)[order])

    def train_items(self) -> np.ndarray:
        """Sorted indices of the items that occur in the training part (what a model may know of)."""
        return np.unique(np.concatenate(self.train)) if self.train else np.zeros(0, dtype=np.int64)

    def train_item_text(self) -> list:
        """The text of the training items only (what a tokenizer or codebook may be fit on before training)."""
        return [self.item_text[i] for i in self.train_items()]

    def new_items(self) -> np.ndarray:
        """Sorted indices of the items never seen before test time: in no training sequence and no
        validation target (on a cold-start split, the cold items — and any item without interactions)."""
        seen = np.zeros(self.num_items, dtype=bool)
        seen[self.train_items()] = True
        seen[[v for v in self.valid_target if v is not None]] = True
        return np.flatnonzero(~seen)

    def train_item_counts(self) -> np.ndarray:
        """Interactions per item in the training part only (for the popularity baseline)."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        for tr in self.train:
            np.add.at(counts, tr, 1)
        return counts

    def resolve_history(self, ids: list[str], source: str = "--history") -> list[int]:
        """Item ids → indices; an unknown id is a clear error."""
        out = []
        for pos, it in enumerate(ids, start=1):
            if it not in self.item_index:
                raise DataError(f"unknown item id {it!r} at position {pos} (expected an id from "
                                f"{self.path / 'items.parquet'})", file=source)
            out.append(self.item_index[it])
        if not out:
            raise DataError("empty history (expected at least one item id)", file=source)
        return out


def history_indices(history, item_index: dict[str, int]) -> list[int]:
    """Catalog indices of a history of item ids (oldest → newest), or one :class:`DataError` naming the first
    unknown id and its position, or the empty history."""
    from lmrec.errors import DataError

    unknown = [(p, it) for p, it in enumerate(history, start=1) if it not in item_index]
    if unknown:
        p, it = unknown[0]
        raise DataError(f"unknown item id {it!r} at position {p} of the history (not in this model's catalog of "
                        f"{len(item_index)} items)", file="history")
    if not history:
        raise DataError("empty history (expected at least one item id)", file="history")
    return [item_index[it] for it in history]


def recommendations(rec, history, k: int, exclude_history: bool) -> list[tuple[str, list, float]]:
    """``[(item_id, text, score)]`` of the k best items for one history, from any recommender with
    ``item_index``, ``item_ids``, ``item_text`` and ``top_k`` (fewer than k when the history is excluded)."""
    scores, items = rec.top_k([history_indices(history, rec.item_index)], k, exclude_history=exclude_history)
    return [(rec.item_ids[i], rec.item_text[i], float(s)) for s, i in zip(scores[0].tolist(), items[0].tolist())
            if s > float("-inf")]
