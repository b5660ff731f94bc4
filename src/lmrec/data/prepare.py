"""Raw interactions → a prepared-dataset directory (Parquet + a JSON manifest).

Layout of a prepared directory::

    items.parquet         item_index, item_id, attrs: list<struct<key, value>> (ordered item text)
    sequences.parquet     user_index, user_id, items: list<int32>, timestamps: list<float64>
    split.parquet         user_index, train: list<int32>, valid_target: int32?, test_target: int32?
    manifest.json         counts, source, options, split kind

Order: each user's interactions are sorted by timestamp with a *stable* sort, so ties keep the order of
the source file (RecBole's convention; in ml-100k most interactions tie with another of the same user).

The directory is written under a temporary name and renamed at the end: a failed run leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmrec.data.readers import RawData
from lmrec.data.splits import cold_start_split, leave_one_out
from lmrec.errors import DataError, LmrecError

FORMAT_VERSION = 1


@dataclass
class PrepareOptions:
    k_core: int = 0  # keep users and items with at least k interactions (iterated to a fixed point); 0 = off
    max_history_len: int = 50  # items of history given to a model (the most recent ones)
    split: str = "loo"  # "loo" (leave-one-out) or "cold" (cold-start items)
    cold_ratio: float = 0.1  # share of items held out as cold, for split="cold"
    seed: int = 42

    def __post_init__(self):
        if self.split not in ("loo", "cold"):
            raise LmrecError(f"split must be 'loo' or 'cold', got {self.split!r}")
        if not 0.0 < self.cold_ratio < 1.0:
            raise LmrecError(f"cold_ratio must be in (0, 1), got {self.cold_ratio}")
        if self.max_history_len < 1:
            raise LmrecError(f"max_history_len must be >= 1, got {self.max_history_len}")


def _k_core(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(len(u), dtype=bool)
    if k <= 1:
        return keep
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1)
        ic = np.bincount(i[keep], minlength=i.max() + 1)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def build_sequences(raw: RawData, opts: PrepareOptions) -> dict:
    """Index users/items, filter, and sort each user's interactions chronologically (stable)."""
    user_ids, u = np.unique(np.asarray(raw.users, dtype=object), return_inverse=True)
    item_ids, i = np.unique(np.asarray(raw.items, dtype=object), return_inverse=True)
    t = np.asarray(raw.timestamps, dtype=np.float64)
    keep = _k_core(u, i, opts.k_core)
    # Users need 3 interactions for leave-one-out (train, valid, test).
    counts = np.bincount(u[keep], minlength=len(user_ids))
    keep &= counts[u] >= 3
    if not keep.any():
        raise DataError(f"no user is left after filtering (k_core={opts.k_core}, at least 3 interactions per user)")
    u, i, t = u[keep], i[keep], t[keep]
    # np.lexsort is stable: ties in (user, time) keep the source order.
    order = np.lexsort((t, u))
    u, i, t = u[order], i[order], t[order]
    used_items = np.unique(i)
    remap = np.full(len(item_ids), -1, dtype=np.int64)
    remap[used_items] = np.arange(len(used_items))
    i = remap[i]
    used_users, u = np.unique(u, return_inverse=True)
    bounds = np.flatnonzero(np.diff(u)) + 1
    return {
        "user_ids": [str(x) for x in user_ids[used_users]],
        "item_ids": [str(x) for x in item_ids[used_items]],
        "sequences": [s.astype(np.int32) for s in np.split(i, bounds)],
        "timestamps": np.split(t, bounds),
        "dropped_interactions": int(len(keep) - keep.sum()),
    }


def prepare(raw: RawData, out_dir: str | Path, opts: PrepareOptions | None = None, *, overwrite=False) -> Path:
    """Write a prepared dataset to ``out_dir`` (atomically) and return its path."""
    opts = opts or PrepareOptions()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LmrecError(f"{out_dir} already exists (pass overwrite / --overwrite to replace it)")
    seqs = build_sequences(raw, opts)
    if opts.split == "loo":
        split = leave_one_out(seqs["sequences"])
    else:
        split = cold_start_split(seqs["sequences"], len(seqs["item_ids"]), opts.cold_ratio, opts.seed)
    n_users, n_items = len(seqs["user_ids"]), len(seqs["item_ids"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": raw.source,
        "options": asdict(opts),
        "counts": {
            "users": n_users,
            "items": n_items,
            "interactions": int(sum(len(s) for s in seqs["sequences"])),
            "dropped_interactions": seqs["dropped_interactions"],
            "valid_users": int(sum(v is not None for v in split["valid_target"])),
            "test_users": int(sum(v is not None for v in split["test_target"])),
            **raw.notes,
        },
    }
    if opts.split == "cold":
        manifest["counts"]["cold_items"] = len(split["cold_items"])
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_items(tmp / "items.parquet", seqs["item_ids"], [raw.item_text[it] for it in seqs["item_ids"]])
        pq.write_table(pa.table({
            "user_index": pa.array(np.arange(n_users, dtype=np.int32)),
            "user_id": pa.array(seqs["user_ids"], pa.string()),
            "items": pa.array(seqs["sequences"], pa.list_(pa.int32())),
            "timestamps": pa.array(seqs["timestamps"], pa.list_(pa.float64())),
        }), tmp / "sequences.parquet")
        pq.write_table(pa.table({
            "user_index": pa.array(np.arange(n_users, dtype=np.int32)),
            "train": pa.array(split["train"], pa.list_(pa.int32())),
            "valid_target": pa.array(split["valid_target"], pa.int32()),
            "test_target": pa.array(split["test_target"], pa.int32()),
        }), tmp / "split.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_items(path: Path, item_ids: list[str], item_text: list[list[tuple[str, str]]],
                extra: dict[str, list] | None = None) -> None:
    """``items.parquet``: item_index, item_id, attrs (ordered key/value text), and the ``extra`` columns
    (a vector or codes per item). Read back by :func:`read_items`."""
    struct = pa.struct([("key", pa.string()), ("value", pa.string())])
    pq.write_table(pa.table({
        "item_index": pa.array(np.arange(len(item_ids), dtype=np.int32)),
        "item_id": pa.array(item_ids, pa.string()),
        "attrs": pa.array([[{"key": k, "value": v} for k, v in t] for t in item_text], pa.list_(struct)),
        **(extra or {}),
    }), path)


def read_items(path: Path) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """(item ids, item text) from an ``items.parquet`` written by :func:`write_items`."""
    items = pq.read_table(path).to_pydict()
    return items["item_id"], [[(a["key"], a["value"]) for a in attrs] for attrs in items["attrs"]]
