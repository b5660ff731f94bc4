"""A trained generative recommender: the language model with its itemic tokens, the item codes, and the
prompt format it was trained with; constrained beam search, ranks for the evaluator, recommendations.

On disk a model directory is a ``save_pretrained`` directory of the model and its tokenizer, plus
``sid_vocab.json`` (which token is which code) and ``prompt_config.json`` (the prompt format); a LoRA
adapter directory also holds its ``base_model/``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.evaluator import RankFn
from lmrec.generative.beam import SidTrie, constrained_beam_search
from lmrec.generative.prompts import PromptFormat, encode_generation, next_item_messages
from lmrec.generative.samples import align_sids, pad_batch
from lmrec.generative.sid import SemanticIds
from lmrec.generative.vocab import META, load_lm, read_meta
from lmrec.io import atomic_dir


class GenerativeRecommender:
    """A language model with itemic tokens + the item codes: prompts, beam search, ranks."""

    def __init__(self, model, tokenizer, meta: dict, sids: SemanticIds, ds: PreparedDataset, fmt: PromptFormat):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.sids, self.ds, self.fmt = sids, ds, fmt
        self.trie = SidTrie(sids.codes, meta["level_token_ids"])

    @classmethod
    def load(cls, model_dir, data, sids_dir, max_history: int | None = None) -> GenerativeRecommender:
        """A saved model with the prompt format it was trained with (``max_history`` overrides it)."""
        ds = PreparedDataset(data)
        model, tok = load_generative(model_dir)
        fmt = PromptFormat.load(model_dir)
        if max_history is not None:
            fmt = dataclasses.replace(fmt, max_history=max_history)
        return cls(model, tok, read_meta(model_dir), align_sids(ds, SemanticIds.load(sids_dir)), ds, fmt)

    def prompts(self, histories) -> dict[str, torch.Tensor]:
        seq2seq = getattr(self.model.config, "is_encoder_decoder", False)
        rows = [encode_generation(self.tokenizer, next_item_messages(self.ds, self.sids, h, None, self.fmt),
                                  self.meta["sid_begin"], seq2seq=seq2seq) for h in histories]
        batch = pad_batch(rows, self.tokenizer.pad_token_id, left=not seq2seq)
        if seq2seq:
            start = self.model.config.decoder_start_token_id
            batch["decoder_input_ids"] = torch.tensor([[start, self.meta["sid_begin"]]] * len(rows))
        return batch

    def beam_search(self, histories, beams: int):
        was = self.model.training
        self.model.eval()
        items, scores = constrained_beam_search(self.model, self.trie, self.prompts(histories), beams)
        self.model.train(was)
        return items, scores

    def rank_fn(self, beams: int) -> RankFn:
        def rank(histories, targets):
            items, _ = self.beam_search(histories, beams)
            hit = items.numpy() == np.asarray(targets)[:, None]
            return np.where(hit.any(1), hit.argmax(1), np.inf).astype(np.float64)

        return rank

    def recommend(self, history_ids: list[str], k: int = 10, beams: int | None = None):
        if k < 1:
            raise LmrecError(f"-k must be at least 1, got {k}")
        idx = self.ds.resolve_history(history_ids, source="--history")
        items, scores = self.beam_search([idx], max(k, beams or k))
        out = []
        for i, s in zip(items[0].tolist(), scores[0].tolist()):
            if i >= 0 and len(out) < k:
                out.append((self.ds.item_ids[i], self.ds.item_text[i], s))
        return out


def save_generative(model, tokenizer, meta_dir: Path, out: Path, *, fmt: PromptFormat | None = None,
                    base: Path | None = None) -> Path:
    """model + tokenizer + ``sid_vocab.json`` (from ``meta_dir``) + the prompt format (default: the one
    saved in ``meta_dir``) + the LoRA base model, under a temporary name, then renamed."""
    fmt = fmt or PromptFormat.load(meta_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy2(Path(meta_dir) / META, tmp / META)
        fmt.save(tmp)
        if base is not None:
            shutil.copytree(base, tmp / "base_model")

    return atomic_dir(out, write)


def load_generative(model_dir: str | Path):
    """A trained (or expanded) model directory; LoRA adapters are loaded onto their base model."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = model_dir / "base_model"
        if not base_dir.exists():
            raise LmrecError(f"{model_dir} is a LoRA adapter without its base_model/ directory")
        base, tok = load_lm(base_dir)
        return PeftModel.from_pretrained(base, str(model_dir)), tok
    return load_lm(model_dir)
