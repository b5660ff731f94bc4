"""How much of some item text a tokenizer cannot read: the share of its tokens that are the unknown token.

A WordPiece tokenizer (BERT, MiniLM, a backbone's trained on English item text) maps every piece outside
its vocabulary to ``[UNK]``: Chinese through an English MiniLM is mostly ``[UNK]``, an encoder then gives
such items nearly the same vector, and nothing fails. Both families check the text where it meets a
tokenizer chosen before the data — ``lmrec sid build`` (the sentence encoder) and the service's
``POST /items`` (the model's own tokenizer) — and warn above :data:`WARN_SHARE`. A byte-level tokenizer
(Qwen, RoBERTa) has no unknown token: every text is readable to it, and nothing is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Above this share of unknown tokens the text is not what the model reads: English item text through an
# English vocabulary stays near zero (an odd symbol, an emoji), text in a script it lacks is far above.
WARN_SHARE = 0.05


@dataclass
class UnknownTokens:
    unknown: int  # unknown tokens over all texts
    tokens: int  # all tokens (no special tokens)
    texts: int
    texts_above: int  # texts whose own share of unknown tokens is above the threshold counted with

    @property
    def share(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0


def count_unknown(tokenizer, texts: Sequence[str], threshold: float = WARN_SHARE, batch_size: int = 4096
                  ) -> UnknownTokens:
    """Unknown tokens of ``texts`` under a Hugging Face tokenizer (its ``unk_token_id``)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return UnknownTokens(0, 0, len(texts), 0)
    unknown = tokens = above = 0
    for s in range(0, len(texts), batch_size):
        for ids in tokenizer(list(texts[s : s + batch_size]), add_special_tokens=False)["input_ids"]:
            n = sum(i == unk for i in ids)
            unknown, tokens, above = unknown + n, tokens + len(ids), above + (n > threshold * len(ids))
    return UnknownTokens(unknown, tokens, len(texts), above)


def unknown_text_warning(tokenizer, texts: Sequence[str], *, what: str, hint: str,
                         threshold: float = WARN_SHARE) -> str | None:
    """A one-line warning when more than ``threshold`` of the tokens of ``texts`` are unknown, else None.
    ``what`` names the text and the tokenizer's owner; ``hint`` says what to do instead."""
    c = count_unknown(tokenizer, texts, threshold)
    if c.share <= threshold:
        return None
    return (f"{c.share:.0%} of the tokens of {what} are unknown to its tokenizer ({c.unknown:,} of {c.tokens:,} "
            f"are {tokenizer.unk_token}; {c.texts_above:,} of {c.texts:,} texts above {threshold:.0%}): it cannot "
            f"read this text (another language or script?), and items it cannot read get nearly the same vector. "
            f"{hint}")
