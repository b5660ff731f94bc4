"""RecFormer's input layout, built around any HF tokenizer (composition, not subclassing).

An item is its key/value attributes: ``key tokens`` (type 1) + ``value tokens`` (type 2) per attribute,
each attribute truncated to ``max_attr_length`` tokens, at most ``max_attr_num`` attributes.
A history is flattened newest item first: ``[start] item_1 item_2 ...`` (item_1 = most recent), with

* token types: 0 start, 1 key, 2 value, 3 pad;
* item positions: 0 for the start token, j for the tokens of the j-th most recent item;
* token positions: 0, 1, 2, ... over the whole flattened sequence (the model adds the layout's offset);
* global attention on the start token only;

and truncated to ``max_token_num`` tokens (so the oldest items are the ones cut). The start token is the
backbone's own (``<s>`` for RoBERTa/Longformer, ``[CLS]`` for BERT), and so is the pad token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmrec.errors import LmrecError
from lmrec.recformer.masking import word_starts as starts_of

START, KEY, VALUE, PAD = 0, 1, 2, 3
# (token ids, token types[, word-start flags]) of one item, no start token
ItemTokens = tuple[list[int], list[int]] | tuple[list[int], list[int], list[bool]]


class RecformerTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_attr_num: int, max_attr_length: int,
                 max_token_num: int, max_item_embeddings: int):
        self.tokenizer = tokenizer
        self.max_attr_num = max_attr_num
        self.max_attr_length = max_attr_length
        self.max_token_num = max_token_num
        self.max_items = max_item_embeddings - 1  # item position 0 is the start token
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        if start is None or tokenizer.pad_token_id is None:
            raise LmrecError(f"tokenizer {type(tokenizer).__name__} has no start (cls/bos) or pad token; "
                             "RecFormer needs both")
        self.start_token_id: int = start
        self.pad_token_id: int = tokenizer.pad_token_id
        # Byte-level BPE (RoBERTa/Longformer) marks word starts with a leading space; WordPiece ignores it.
        self._prefix = " "

    @classmethod
    def from_pretrained(cls, path: str | Path, config) -> RecformerTokenizer:
        tok = AutoTokenizer.from_pretrained(str(path))
        return cls(tok, config.max_attr_num, config.max_attr_length, config.max_token_num,
                   config.max_item_embeddings)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    def __len__(self) -> int:
        return len(self.tokenizer)

    # ------------------------------------------------------------------------------------------ items
    def encode_items(self, items: Sequence[Sequence[tuple[str, str]]], word_starts: bool = False
                     ) -> list[ItemTokens]:
        """Tokenize many items at once (one batched call to the fast tokenizer). ``word_starts``: each item
        also carries a word-start flag per token (whole-word masking; see ``lmrec.recformer.masking``)."""
        texts: list[str] = []
        for attrs in items:
            for key, value in list(attrs)[: self.max_attr_num]:
                texts += [self._prefix + key, self._prefix + value]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=word_starts) if texts else None
        ids = enc["input_ids"] if enc is not None else []
        if word_starts:
            flags = starts_of(enc.encodings, texts) if texts else []
        out, pos = [], 0
        for attrs in items:
            item_ids: list[int] = []
            item_types: list[int] = []
            item_starts: list[bool] = []
            for _ in list(attrs)[: self.max_attr_num]:
                k, v = ids[pos], ids[pos + 1]
                item_ids += (k + v)[: self.max_attr_length]
                item_types += ([KEY] * len(k) + [VALUE] * len(v))[: self.max_attr_length]
                if word_starts:
                    item_starts += (flags[pos] + flags[pos + 1])[: self.max_attr_length]
                pos += 2
            out.append((item_ids, item_types, item_starts) if word_starts else (item_ids, item_types))
        return out

    # ------------------------------------------------------------------------------------------ sequences
    def build_sequence(self, history: Sequence[ItemTokens]) -> dict[str, list[int]]:
        """One history (oldest → newest item tokens) → unpadded model inputs."""
        ids, types, item_pos, starts = [self.start_token_id], [START], [0], [True]
        for j, item in enumerate(reversed(history[-self.max_items :]), start=1):
            room = self.max_token_num - len(ids)
            if room <= 0:
                break
            ids += item[0][:room]
            types += item[1][:room]
            item_pos += [j] * min(len(item[0]), room)
            if len(item) > 2:
                starts += ([True] + list(item[2][1:]))[: min(len(item[0]), room)]  # an item starts a word
        out = {"input_ids": ids, "token_type_ids": types, "item_position_ids": item_pos}
        if len(starts) == len(ids):
            out["word_starts"] = starts
        return out

    def pad(self, sequences: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest sequence; adds attention, global-attention and position ids."""
        B, L = len(sequences), max(len(s["input_ids"]) for s in sequences)
        input_ids = np.full((B, L), self.pad_token_id, dtype=np.int64)
        token_type_ids = np.full((B, L), PAD, dtype=np.int64)
        item_position_ids = np.zeros((B, L), dtype=np.int64)
        attention_mask = np.zeros((B, L), dtype=np.int64)
        for b, s in enumerate(sequences):
            n = len(s["input_ids"])
            input_ids[b, :n] = s["input_ids"]
            token_type_ids[b, :n] = s["token_type_ids"]
            item_position_ids[b, :n] = s["item_position_ids"]
            attention_mask[b, :n] = 1
        if all("word_starts" in s for s in sequences):
            starts = np.ones((B, L), dtype=bool)
            for b, s in enumerate(sequences):
                starts[b, : len(s["word_starts"])] = s["word_starts"]
        global_attention_mask = np.zeros((B, L), dtype=np.int64)
        global_attention_mask[:, 0] = 1
        position_ids = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)) * attention_mask
        arrays = dict(input_ids=input_ids, attention_mask=attention_mask,
                      global_attention_mask=global_attention_mask, token_type_ids=token_type_ids,
                      item_position_ids=item_position_ids, position_ids=position_ids)
        if all("word_starts" in s for s in sequences):
            arrays["word_starts"] = starts
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    def __call__(self, histories: Sequence[Sequence[Sequence[tuple[str, str]]]]) -> dict[str, torch.Tensor]:
        """Convenience: raw item text histories (oldest → newest) → a padded batch."""
        return self.pad([self.build_sequence(self.encode_items(h)) for h in histories])
