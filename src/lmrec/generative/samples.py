"""Chat-format training samples from a prepared dataset (prompts from ``prompts``), and their batches.

Tasks: ``next_item`` (history as semantic IDs, optionally with titles → the next item's semantic ID),
``sid2title`` and ``title2sid`` (item ↔ text alignment). Stored as parquet with a ``messages`` column of
``{role, content}`` turns, the format chat SFT tools read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmrec.config import GenDataConfig
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.generative.prompts import PromptFormat, alignment_messages, next_item_messages, sequence_windows
from lmrec.generative.sid import SemanticIds


def align_sids(ds: PreparedDataset, sids: SemanticIds) -> SemanticIds:
    """Reorder the semantic IDs to the dataset's item order (every item must have one)."""
    pos = {it: i for i, it in enumerate(sids.item_ids)}
    missing = [it for it in ds.item_ids if it not in pos]
    if missing:
        raise LmrecError(f"{len(missing)} items of {ds.path} have no semantic ID (first: {missing[0]!r}); "
                         "build them on this dataset's items")
    order = np.array([pos[it] for it in ds.item_ids])
    return SemanticIds(list(ds.item_ids), sids.codes[order], sids.config, sids.report)


def build_samples(ds: PreparedDataset, sids: SemanticIds, dc: GenDataConfig, split: str = "train") -> list[dict]:
    """``train``: the last ``dc.targets_per_user`` positions of each training sequence — or, with
    ``dc.format == "sequence"``, windows of each sequence with every position a target — (+ alignment samples
    when ``dc.alignment``); ``valid``/``test``: the evaluation examples. Prompts as ``dc`` says."""
    fmt = PromptFormat.from_config(dc)
    rows = []
    if split != "train":
        ex = ds.examples(split)
        for u, h, t in zip(ex.users, ex.histories, ex.targets):
            rows.append({"task": "next_item", "user": ds.user_ids[u], "target": ds.item_ids[t],
                         "messages": next_item_messages(ds, sids, h, t, fmt)})
        return rows
    if fmt.kind == "sequence":  # every position of each user's sequence, in windows
        for u, tr in enumerate(ds.train):
            for items, first in sequence_windows(tr, dc.max_history, dc.sequence_stride):
                rows.append({"task": "sequence", "user": ds.user_ids[u], "target": ds.item_ids[items[-1]],
                             "items": items, "first_target": first, "messages": None,
                             "segments": ["".join(sids.item_string(i) for i in items)]})
    for u, tr in enumerate(ds.train if fmt.kind == "chat" else []):
        for cut in range(max(1, len(tr) - dc.targets_per_user), len(tr)):
            rows.append({"task": "next_item", "user": ds.user_ids[u], "target": ds.item_ids[tr[cut]],
                         "messages": next_item_messages(ds, sids, tr[:cut], tr[cut], fmt)})
    if dc.alignment:
        for i in ds.train_items():
            rows += [{"task": task, "user": "", "target": ds.item_ids[i], "messages": msgs}
                     for task, msgs in alignment_messages(ds, sids, int(i))]
    return rows


def write_samples(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(path)
    return path


def pad_batch(items: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    if items and "decoder_labels" in items[0]:  # encoder-decoder: labels are the decoder's target
        enc = pad_batch([{"input_ids": x["input_ids"]} for x in items], pad_id)
        dec = pad_batch([{"input_ids": x["decoder_labels"]} for x in items], pad_id)
        enc["labels"] = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
        return enc
    L = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long) if "labels" in items[0] else None
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        sl = slice(L - n, L) if left else slice(0, n)
        ids[b, sl] = torch.as_tensor(x["input_ids"])
        mask[b, sl] = 1
        if labels is not None:
            labels[b, sl] = torch.as_tensor(x["labels"])
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    return out
