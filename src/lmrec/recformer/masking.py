"""Whole-word masking for MLM (English and Chinese).

A word is a run of tokens. English (and any text without CJK characters): the tokenizer's own words —
the sub-word pieces of one pre-tokenized word (``word_ids`` of a fast tokenizer). Text with CJK characters:
jieba's segmentation mapped onto the tokens through their character offsets (a Chinese BERT tokenizer
splits every character into its own token; whole-word masking masks all characters of a jieba word, as
Chinese-BERT-wwm and Longformer_ZH do). Words are marked by a ``word start`` flag per token.

Masking picks ``round(p × words)`` words (at least one) of a sequence uniformly, never special tokens, and
treats each chosen word as a whole: 80 % of the words become ``[MASK]`` tokens, 10 % random tokens, 10 %
stay as they are; labels are the original ids of every token of every chosen word (-100 elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")


@lru_cache(maxsize=1)
def _jieba():
    import logging

    from lmrec.errors import optional

    jieba = optional("jieba", "zh", "Chinese whole-word masking (jieba's words)")
    jieba.setLogLevel(logging.WARNING)
    return jieba


def jieba_word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of jieba's words (whitespace-only pieces dropped)."""
    return [(s, e) for w, s, e in _jieba().tokenize(text) if w.strip()]


def word_starts(encodings, texts: Sequence[str]) -> list[list[bool]]:
    """Per text, one flag per token: does this token start a word? ``encodings``: the fast tokenizer's
    output for ``texts`` (``add_special_tokens=False``, with offsets)."""
    out = []
    for b, text in enumerate(texts):
        enc = encodings[b]
        if CJK.search(text):
            spans = jieba_word_spans(text)
            starts = np.array([s for s, _ in spans])
            prev, flags = -1, []
            for s, _ in enc.offsets:
                w = int(np.searchsorted(starts, s, side="right")) - 1 if len(starts) else 0
                flags.append(w != prev)
                prev = w
        else:
            prev, flags = None, []
            for w in enc.word_ids:
                flags.append(w is None or w != prev)
                prev = w
        if flags:
            flags[0] = True
        out.append(flags)
    return out


def whole_word_mask(ids: np.ndarray, starts: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, *,
                    mask_id: int, random_ids: np.ndarray, p: float = 0.15, mask_ratio: float = 0.8,
                    random_ratio: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """One sequence → (masked ids, labels). ``starts``: word-start flags; ``maskable``: False for special
    and padding tokens (never masked; they also end words). ``random_ids``: the ids random replacement
    draws from."""
    ids = np.asarray(ids)
    n = len(ids)
    maskable = np.asarray(maskable, dtype=bool)
    boundary = np.asarray(starts, dtype=bool) | ~maskable  # a special token is its own "word" ...
    boundary[1:] |= ~maskable[:-1]  # ... and the token after it starts one
    word = np.cumsum(boundary) - 1  # so every word is all maskable or a single special token
    candidates = np.unique(word[maskable])
    labels = np.full(n, -100, dtype=np.int64)
    out = ids.copy()
    if len(candidates) == 0:
        return out, labels
    k = max(1, int(round(p * len(candidates))))
    chosen = rng.choice(candidates, size=min(k, len(candidates)), replace=False)
    action = np.full(int(word[-1]) + 1, -1.0)  # per word: < mask_ratio → [MASK], next random_ratio → random, else keep
    action[chosen] = rng.random(len(chosen))
    a = action[word]
    picked = a >= 0
    labels[picked] = ids[picked]
    out[picked & (a < mask_ratio)] = mask_id
    rand = picked & (a >= mask_ratio) & (a < mask_ratio + random_ratio)
    out[rand] = rng.choice(random_ids, size=int(rand.sum()))
    return out, labels


class WholeWordMasker:
    """Masks padded batches (``input_ids``, ``attention_mask``, ``word_starts``) with a tokenizer's ids."""

    def __init__(self, tokenizer, p: float = 0.15):
        self.p = p
        mask = tokenizer.mask_token_id
        if mask is None:
            from lmrec.errors import LmrecError

            raise LmrecError(f"tokenizer {type(tokenizer).__name__} has no mask token: MLM needs one")
        self.mask_id = mask
        self.special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        vocab = np.arange(len(tokenizer))
        self.random_ids = vocab[~np.isin(vocab, self.special)]

    def __call__(self, input_ids, attention_mask, starts, rng: np.random.Generator):
        """Tensors (B, L) → (masked input_ids, labels) tensors."""
        import torch

        ids, att, st = (np.asarray(x) for x in (input_ids, attention_mask, starts))
        maskable = att.astype(bool) & ~np.isin(ids, self.special)
        out, labels = np.empty_like(ids), np.empty_like(ids)
        for b in range(len(ids)):
            out[b], labels[b] = whole_word_mask(ids[b], st[b], maskable[b], rng, mask_id=self.mask_id,
                                                random_ids=self.random_ids, p=self.p)
        return torch.as_tensor(out), torch.as_tensor(labels)
