"""Chat-format training samples from a prepared dataset, and their tokenization with assistant-only labels.

Tasks: ``next_item`` (history as semantic IDs, optionally with titles → the next item's semantic ID),
``sid2title`` and ``title2sid`` (item ↔ text alignment). Stored as parquet with a ``messages`` column of
``{role, content}`` turns, the format chat SFT tools read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.generative.sid import SemanticIds

PROMPT = "Recent items, oldest first: {history}. Next item?"


def align_sids(ds: PreparedDataset, sids: SemanticIds) -> SemanticIds:
    """Reorder the semantic IDs to the dataset's item order (every item must have one)."""
    pos = {it: i for i, it in enumerate(sids.item_ids)}
    missing = [it for it in ds.item_ids if it not in pos]
    if missing:
        raise LmrecError(f"{len(missing)} items of {ds.path} have no semantic ID (first: {missing[0]!r}); "
                         "build them on this dataset's items")
    order = np.array([pos[it] for it in ds.item_ids])
    return SemanticIds(list(ds.item_ids), sids.codes[order], sids.config, sids.report)


def _title(ds: PreparedDataset, i: int) -> str:
    return ds.item_text[i][0][1] if ds.item_text[i] else ds.item_ids[i]


def history_text(ds, sids, history, with_titles: bool) -> str:
    parts = [sids.item_string(int(i)) + (f" {_title(ds, int(i))}" if with_titles else "") for i in history]
    return ", ".join(parts)


def next_item_messages(ds, sids, history, target, with_titles: bool = False) -> list[dict]:
    msgs = [{"role": "user", "content": PROMPT.format(history=history_text(ds, sids, history, with_titles))}]
    if target is not None:
        msgs.append({"role": "assistant", "content": sids.item_string(int(target))})
    return msgs


def build_samples(ds: PreparedDataset, sids: SemanticIds, *, split: str = "train", max_history: int = 20,
                  targets_per_user: int = 10, with_titles: bool = False, alignment: bool = True) -> list[dict]:
    """``train``: the last ``targets_per_user`` positions of each training sequence (+ alignment samples);
    ``valid``/``test``: the evaluation examples."""
    rows = []
    if split == "train":
        for u, tr in enumerate(ds.train):
            for cut in range(max(1, len(tr) - targets_per_user), len(tr)):
                rows.append({"task": "next_item", "user": ds.user_ids[u], "target": ds.item_ids[tr[cut]],
                             "messages": next_item_messages(ds, sids, tr[max(0, cut - max_history):cut], tr[cut],
                                                            with_titles)})
        if alignment:
            known = ds.train_items()
            for i in known:
                s, t = sids.item_string(int(i)), _title(ds, int(i))
                rows.append({"task": "sid2title", "user": "", "target": ds.item_ids[i], "messages": [
                    {"role": "user", "content": f"Title of {s}?"}, {"role": "assistant", "content": t}]})
                rows.append({"task": "title2sid", "user": "", "target": ds.item_ids[i], "messages": [
                    {"role": "user", "content": f"Item for: {t}"}, {"role": "assistant", "content": s}]})
    else:
        ex = ds.examples(split)
        for u, h, t in zip(ex.users, ex.histories, ex.targets):
            rows.append({"task": "next_item", "user": ds.user_ids[u], "target": ds.item_ids[t],
                         "messages": next_item_messages(ds, sids, h[-max_history:], t, with_titles)})
    return rows


def write_samples(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(path)
    return path


def tokenize_seq2seq(tokenizer, messages: list[dict], max_length: int = 1024) -> dict[str, list[int]]:
    """Encoder-decoder (T5): encoder input = the user turn as plain text, labels = the assistant turn."""
    enc = tokenizer(messages[0]["content"], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": enc, "decoder_labels": tokenizer(messages[-1]["content"])["input_ids"]}


def tokenize_chat(tokenizer, messages: list[dict], max_length: int = 1024) -> dict[str, list[int]]:
    """input_ids of the whole conversation and labels = input_ids on the last assistant turn, -100 elsewhere."""
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    if full[: len(prompt)] != prompt:
        raise LmrecError("the chat template does not render the prompt as a prefix of the conversation")
    full, n = full[-max_length:], len(prompt) - max(0, len(full) - max_length)
    return {"input_ids": full, "labels": [-100] * max(0, n) + full[max(0, n):]}


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
