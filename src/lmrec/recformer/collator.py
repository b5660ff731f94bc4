"""RecFormer's batches: item-index histories → padded model inputs, and the training batches of
finetuning and pretraining built from them. The :class:`~lmrec.recformer.recommender.Recommender` (inference)
uses :func:`history_inputs` too, so training and inference tokenize a history the same way.

Which loss ``RecformerForSeqRec.forward`` computes follows from the keys a finetuning batch carries, one
mode of :class:`FinetuneCollator` each (``train.item_grad``):

* ``none``: ``candidates`` (rows of the frozen item table) — RecFormer's finetuning;
* ``batch``: ``candidates`` + ``target_inputs`` (the batch's target items, encoded with gradient);
* ``all``: ``item_inputs`` / ``item_order`` (the whole known catalog, encoded with gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmrec.recformer.masking import WholeWordMasker
from lmrec.recformer.tokenization_recformer import ItemTokens, RecformerTokenizer


def history_inputs(tokenizer: RecformerTokenizer, item_tokens: Sequence[ItemTokens],
                   histories: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Item-index histories (oldest → newest) → padded model inputs (CPU tensors)."""
    return tokenizer.pad([tokenizer.build_sequence([item_tokens[i] for i in h]) for h in histories])


def catalog_inputs(tokenizer: RecformerTokenizer, item_tokens: Sequence[ItemTokens], items: np.ndarray,
                   chunk_size: int = 256) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """``items`` as one-item histories in length-sorted chunks (little padding), and for each of them in
    chunk order its position in ``items``: the ``item_inputs`` / ``item_order`` of the model's forward."""
    order = np.argsort([len(item_tokens[i][0]) for i in items], kind="stable")
    chunks = [history_inputs(tokenizer, item_tokens, [[int(i)] for i in items[order[s : s + chunk_size]]])
              for s in range(0, len(order), chunk_size)]
    return chunks, torch.as_tensor(order)


class FinetuneCollator:
    """(history, target) pairs → a finetuning batch: ``labels`` are positions in ``candidates`` (the items
    known at training time: the softmax never sees a cold item), plus what ``item_grad`` needs (above)."""

    def __init__(self, tokenizer: RecformerTokenizer, item_tokens: Sequence[ItemTokens], num_items: int,
                 candidates: np.ndarray, item_grad: str, item_batch_size: int = 256):
        self.tokenizer, self.item_tokens, self.item_grad = tokenizer, item_tokens, item_grad
        self.position = np.full(num_items, -1)
        self.position[candidates] = np.arange(len(candidates))
        self.candidates = torch.as_tensor(candidates)
        self.catalog = (catalog_inputs(tokenizer, item_tokens, np.asarray(candidates), item_batch_size)
                        if item_grad == "all" else None)

    def __call__(self, pairs: Sequence[tuple[Sequence[int], int]]) -> dict:
        out = history_inputs(self.tokenizer, self.item_tokens, [h for h, _ in pairs])
        out["labels"] = torch.as_tensor(self.position[[int(t) for _, t in pairs]])
        if self.item_grad == "all":
            out["item_inputs"], out["item_order"] = self.catalog
            return out
        out["candidates"] = self.candidates
        if self.item_grad == "batch":
            out["target_inputs"] = history_inputs(self.tokenizer, self.item_tokens, [[int(t)] for _, t in pairs])
        return out


class PretrainCollator:
    """A batch ``(batch index, [(dataset, history, target), ...])`` → pretraining inputs: the histories and
    the targets (``item_inputs``), both whole-word masked with ``mlm_labels``. The masking RNG is seeded by
    (seed, epoch, batch index), so a resumed run masks the same batch the same way."""

    def __init__(self, tokenizer: RecformerTokenizer, item_tokens: list[list[ItemTokens]], masker: WholeWordMasker,
                 seed: int, epoch: int):
        self.tokenizer, self.item_tokens, self.masker = tokenizer, item_tokens, masker
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch) -> dict:
        b, pairs = batch
        rng = np.random.default_rng([self.seed, self.epoch, b])
        tok = self.tokenizer
        hist = tok.pad([tok.build_sequence([self.item_tokens[d][i] for i in h]) for d, h, _ in pairs])
        tgt = tok.pad([tok.build_sequence([self.item_tokens[d][t]]) for d, _, t in pairs])
        for x in (hist, tgt):
            x["input_ids"], x["mlm_labels"] = self.masker(x["input_ids"], x["attention_mask"], x.pop("word_starts"),
                                                          rng)
        return {**hist, "item_inputs": tgt}
