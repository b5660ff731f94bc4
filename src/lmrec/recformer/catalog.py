"""The catalog a RecFormer :class:`~lmrec.recformer.recommender.Recommender` ranks, and how it grows after
training.

A :class:`Catalog` is the items in index order: their ids, their key/value text, that text tokenized (what
the encoder reads), and id → index. Items added after training (``Recommender.add_items``, the service's
``POST /items``) join at its end: checked (new ids, some text), kept in the item store as records whose
payload is the encoded vector (:mod:`lmrec.data.item_store`), and appended to the item table through a
:class:`TableBuffer` in O(added) amortised. Encoding items and ranking them are the Recommender's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmrec.data.item_store import StoredItem, check_new_ids, decode_vector, encode_vector
from lmrec.data.readers import ItemText
from lmrec.errors import DataError, LmrecError
from lmrec.recformer.tokenization_recformer import ItemTokens, RecformerTokenizer


class Catalog:
    """Items in index order: ``item_ids``, ``item_text``, ``item_tokens`` and ``item_index`` (id → index).
    ``extend`` grows these in place, so whoever holds one of them (the service, a collator) sees the added
    items."""

    def __init__(self, tokenizer: RecformerTokenizer, item_ids: Sequence[str], item_text: Sequence[ItemText]):
        self.tokenizer = tokenizer
        self.item_ids = list(item_ids)
        self.item_text = list(item_text)
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.item_tokens: list[ItemTokens] = tokenizer.encode_items(self.item_text)

    def __len__(self) -> int:
        return len(self.item_ids)

    def checked_new(self, item_ids: Sequence[str], item_text: Sequence[ItemText]
                    ) -> tuple[list[str], list[ItemText]]:
        """New items as lists, once checked: as many texts as ids, ids not in the catalog, some text each."""
        item_ids, item_text = [str(i) for i in item_ids], [list(t) for t in item_text]
        if len(item_ids) != len(item_text):
            raise LmrecError(f"{len(item_ids)} item ids for {len(item_text)} item texts")
        check_new_ids(item_ids, self.item_index)
        for it, text in zip(item_ids, item_text):
            if not text or not any(v.strip() for _, v in text):
                raise DataError(f"item {it!r} has no text (expected key/value attributes)", file="items")
        return item_ids, item_text

    def unseen(self, items: Sequence[StoredItem]) -> list[StoredItem]:
        """The stored items whose ids are not in the catalog (an id already there keeps the catalog's entry)."""
        return [it for it in items if it.item_id not in self.item_index]

    def extend(self, item_ids: list[str], item_text: list[ItemText]) -> None:
        start = len(self.item_ids)
        self.item_ids += item_ids
        self.item_text += item_text
        self.item_index.update({it: start + j for j, it in enumerate(item_ids)})
        self.item_tokens += self.tokenizer.encode_items(item_text)


def store_records(item_ids: list[str], item_text: list[ItemText], vectors: np.ndarray) -> list[StoredItem]:
    """New items as item-store records, each with its encoded vector (an item table row) as the payload."""
    return [StoredItem(it, t, {"vector": encode_vector(v)}) for it, t, v in zip(item_ids, item_text, vectors)]


def stored_vectors(items: Sequence[StoredItem], width: int) -> torch.Tensor:
    """The vectors of stored items, (N, ``width``); vectors of another width come from another model's store."""
    vectors = torch.from_numpy(np.stack([decode_vector(it.payload["vector"]) for it in items]))
    if vectors.shape[1] != width:
        raise LmrecError(f"stored item {items[0].item_id!r}: a vector of width {vectors.shape[1]} for a model "
                         f"of hidden size {width} (an item store of another model?)")
    return vectors


class TableBuffer:
    """The item table grown row by row in O(added) amortised: the table is a view of a buffer that doubles
    when full."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def grown(self, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``table`` with ``vectors`` appended as its last rows."""
        n, m = table.shape[0], vectors.shape[0]
        buf = self._buffer
        # a table that is not this buffer's view (re-encoded, loaded, another dtype) starts a new buffer
        if buf is None or buf.shape[0] < n + m or buf.data_ptr() != table.data_ptr() or buf.dtype != table.dtype:
            buf = torch.empty(max(2 * (n + m), 64), table.shape[1], dtype=table.dtype, device=table.device)
            buf[:n] = table
            self._buffer = buf
        buf[n : n + m] = vectors.to(buf.device, buf.dtype)
        return buf[: n + m]
