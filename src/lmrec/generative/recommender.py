"""A trained generative recommender: the language model with its itemic tokens, the item codes, and the
prompt format it was trained with; constrained beam search, ranks for the evaluator, recommendations.

On disk a model directory is a ``save_pretrained`` directory of the model and its tokenizer, plus
``sid_vocab.json`` (which token is which code) and ``prompt_config.json`` (the prompt format); a LoRA
adapter directory also holds its ``base_model/``. Items added after training (:meth:`add_items`) live in
memory; the service keeps them in an item store beside the model (:mod:`lmrec.data.item_store`, payload:
the semantic-ID codes) and appends them with :meth:`GenerativeRecommender.append_stored`. Loading reads the
dataset's catalog only, so offline evaluation ranks the dataset's items.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from lmrec.data.dataset import PreparedDataset
from lmrec.data.item_store import StoredItem, check_new_ids
from lmrec.errors import LmrecError
from lmrec.eval.evaluator import RankFn
from lmrec.generative.beam import SidTrie, constrained_beam_search
from lmrec.generative.prompts import (
    PromptFormat,
    encode_generation,
    next_item_messages,
    sequence_generation,
    sid_token_ids,
)
from lmrec.generative.samples import align_sids, pad_batch
from lmrec.generative.sid import SemanticIds, assign_codes
from lmrec.generative.vocab import META, load_lm, quiet_peft, read_meta
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_format, check_generative, check_sids, loading, write_marker


class GenerativeRecommender:
    """A language model with itemic tokens + the item codes: prompts, beam search, ranks."""

    def __init__(self, model, tokenizer, meta: dict, sids: SemanticIds, ds: PreparedDataset, fmt: PromptFormat):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self._sids, self.ds, self.fmt = sids, ds, fmt
        self._trie = SidTrie(sids.codes, meta["level_token_ids"])
        self._pending: list[np.ndarray] = []  # codes of added items not yet in sids / the trie
        self._taken: dict[tuple, set[int]] | None = None  # occupied last-level buckets (codes_for)
        self.added = 0  # items appended by add_items (the last ``added`` of the catalog)
        self.books: list[np.ndarray] | None = None  # the residual k-means codebooks, for new items

    @classmethod
    def load(cls, model_dir, data, sids_dir, max_history: int | None = None, device="cpu",
             command: str = "lmrec gen evaluate") -> GenerativeRecommender:
        """A saved model with the prompt format it was trained with (``max_history`` overrides it), on
        ``device`` (beam search runs there, its prefix tree too). Its files are checked before any is loaded."""
        ds = PreparedDataset(data)
        check_generative(model_dir, command)
        check_sids(sids_dir)
        with loading(model_dir):
            model, tok = load_generative(model_dir)
            fmt = PromptFormat.load(model_dir)
        model = model.to(device)
        if max_history is not None:
            fmt = dataclasses.replace(fmt, max_history=max_history)
        with loading(sids_dir):
            sids = SemanticIds.load(sids_dir)
        rec = cls(model, tok, read_meta(model_dir), align_sids(ds, sids), ds, fmt)
        books = Path(sids_dir) / "codebooks.safetensors"
        if books.exists():
            from safetensors.numpy import load_file

            with loading(books):
                b = load_file(str(books))
            rec.books = [b[f"level_{i}"] for i in range(len(b))]
        return rec

    @property
    def sids(self) -> SemanticIds:
        self._flush()
        return self._sids

    @sids.setter
    def sids(self, value: SemanticIds) -> None:
        self._sids, self._pending, self._taken = value, [], None
        self._trie = SidTrie(value.codes, self.meta["level_token_ids"]) if getattr(self, "meta", None) else None

    @property
    def trie(self) -> SidTrie:
        self._flush()
        return self._trie

    def _flush(self) -> None:
        """Added items join the codes and the decoding trie before the next use: inserted into the trie
        (:meth:`SidTrie.insert`, O(added) nodes), not a rebuild of it."""
        if getattr(self, "_pending", None):
            s, new = self._sids, np.concatenate(self._pending)
            self._sids = SemanticIds(list(self.ds.item_ids), np.concatenate([s.codes, new]), s.config, s.report)
            self._pending = []
            self._trie.insert(new, np.arange(len(s.codes), len(s.codes) + len(new)))

    # ------------------------------------------------------------------------------------------ new items
    def codes_for(self, vectors: np.ndarray) -> np.ndarray:
        """Codes for new items from their embeddings (in the space the semantic IDs were built from): the
        nearest centroid level by level, as the catalog's were assigned; at the last k-means level the
        nearest centroid whose bucket still has room — a free number of the disambiguation level, or, without
        one, a code no item holds. A row of -1 when no bucket has room."""
        if self.books is None:
            raise LmrecError("the semantic-ID directory has no codebooks.safetensors: new items cannot get codes")
        raw = assign_codes(vectors, self.books)
        km, extra = len(self.books), self._sids.config.extra_level
        residual = np.asarray(vectors, dtype=np.float32).copy()
        for level in range(km - 1):
            residual -= self.books[level][raw[:, level]]
        last = self.books[-1]
        order = np.argsort((residual ** 2).sum(1, keepdims=True) - 2 * residual @ last.T + (last ** 2).sum(1)[None],
                           axis=1)
        taken = self._taken_buckets()
        out = []
        for j, row in enumerate(raw.tolist()):
            code = [-1] * self._sids.num_levels
            for c in order[j].tolist():
                used = taken.setdefault(tuple(row[:-1]) + (c,), set())
                free = next((n for n in range(max(extra, 1)) if n not in used), None)
                if free is not None:
                    used.add(free)
                    code = row[:-1] + [c] + ([free] if extra else [])
                    break
            out.append(code)
        return np.asarray(out, dtype=np.int64)

    def _taken_buckets(self) -> dict[tuple, set[int]]:
        """Which disambiguation numbers each last-level bucket holds: built once, then kept up to date."""
        if getattr(self, "_taken", None) is None:
            km, extra = len(self.books), self._sids.config.extra_level
            self._taken = {}
            for row in self.sids.codes.tolist():
                self._taken.setdefault(tuple(row[:km]), set()).add(row[km] if extra else 0)
        return self._taken

    def add_items(self, item_ids: list[str], item_text: list, vectors: np.ndarray) -> list[int]:
        """Append items the language model never saw: codes from the saved codebooks (:meth:`codes_for`),
        added to the decoding trie, so beam search can emit them. How often the model does depends on how
        close their codes are to trained ones: it never saw these items in a sequence."""
        start = len(self.ds.item_ids)
        self.append_stored(self.new_records(item_ids, item_text, vectors))
        return list(range(start, len(self.ds.item_ids)))

    def new_records(self, item_ids: list[str], item_text: list, vectors: np.ndarray) -> list[StoredItem]:
        """New items checked (ids not in the catalog) with their codes, ready for the item store and
        :meth:`append_stored`; the catalog is unchanged (the codes' buckets are reserved: append them next)."""
        from lmrec.errors import DataError

        check_new_ids(item_ids, self.ds.item_index)
        codes = self.codes_for(vectors)
        full = [it for it, c in zip(item_ids, codes.tolist()) if c[-1] < 0]
        if full:
            self._taken = None  # codes_for reserved buckets for the others: forget them
            raise DataError(f"no free semantic ID for item {full[0]!r}: every bucket under its first-level codes "
                            "is full; rebuild the semantic IDs with these items", file="items")
        return [StoredItem(str(it), [tuple(kv) for kv in t], {"codes": c})
                for it, t, c in zip(item_ids, item_text, codes.tolist())]

    def append_stored(self, items: list[StoredItem]) -> int:
        """Append stored items (with their codes); ids already in the catalog are skipped (the dataset's own
        entry wins). O(added): inserted into the trie before the next beam search. Returns how many."""
        items = [it for it in items if it.item_id not in self.ds.item_index]
        if not items:
            return 0
        codes = np.asarray([it.payload["codes"] for it in items], dtype=np.int64).reshape(len(items), -1)
        if codes.shape[1] != self._sids.num_levels:
            raise LmrecError(f"stored item {items[0].item_id!r}: {codes.shape[1]} code levels for semantic IDs of "
                             f"{self._sids.num_levels} (an item store of another model?)")
        start = len(self.ds.item_ids)
        self.ds.item_ids += [it.item_id for it in items]
        self.ds.item_text += [list(it.text) for it in items]
        self.ds.item_index.update({it.item_id: start + j for j, it in enumerate(items)})
        self._pending.append(codes)
        if self._taken is not None and self.books is not None:
            km, extra = len(self.books), self._sids.config.extra_level
            for row in codes.tolist():
                self._taken.setdefault(tuple(row[:km]), set()).add(row[km] if extra else 0)
        self.added += len(items)
        return len(items)

    def prompts(self, histories) -> dict[str, torch.Tensor]:
        seq2seq = getattr(self.model.config, "is_encoder_decoder", False)
        if self.fmt.kind == "sequence":  # the newest items' IDs back to back, as the model was trained
            rows = [sequence_generation([sid_token_ids(self.sids.codes[int(i)], self.meta)
                                         for i in list(h)[-self.fmt.max_history:]], self.meta["sid_begin"])
                    for h in histories]
        else:
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

    def rank_fn(self, beams: int, exclude_history: bool = False) -> RankFn:
        """Each target's position among the beams (inf beyond them), and which users' beams carried
        non-finite log-probabilities (a NaN score: see :mod:`lmrec.generative.beam`). ``exclude_history``:
        the user's history items are taken out of the beams' list first (as the other families exclude them
        from their ranking)."""
        def rank(histories, targets):
            items, scores = self.beam_search(histories, beams)
            items = items.numpy()
            hit = items == np.asarray(targets)[:, None]
            ranks = np.where(hit.any(1), hit.argmax(1), np.inf).astype(np.float64)
            if exclude_history:  # history items ranked above the target no longer count
                seen = np.stack([np.isin(row, h) for row, h in zip(items, histories)])
                before = np.cumsum(seen, 1) - seen  # history items strictly before each position
                found = hit.any(1)
                ranks[found] -= before[found, hit.argmax(1)[found]]
            return ranks, torch.isnan(scores).any(1).numpy()

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
                    base: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """model + tokenizer + ``sid_vocab.json`` (from ``meta_dir``) + the prompt format (default: the one
    saved in ``meta_dir``) + the LoRA base model, under a temporary name, then renamed. The weights are
    saved in the model's dtype (a trained model: its fp32 master weights), or in ``dtype``: the model is
    cast for the write and back, so only for weights that dtype holds exactly (a frozen LoRA base loaded
    from that dtype)."""
    fmt = fmt or PromptFormat.load(meta_dir)

    def write(tmp: Path) -> None:
        own = model.dtype
        try:
            model.to(dtype or own).save_pretrained(str(tmp))
        finally:
            if dtype is not None and dtype != own:
                model.to(own)
        tokenizer.save_pretrained(str(tmp))
        shutil.copy2(Path(meta_dir) / META, tmp / META)
        fmt.save(tmp)
        write_marker(tmp, "generative")
        if base is not None:
            shutil.copytree(base, tmp / "base_model")

    return atomic_dir(out, write)


def load_generative(model_dir: str | Path, dtype: torch.dtype | str = "auto"):
    """A trained (or expanded) model directory; LoRA adapters are loaded onto their base model. ``dtype``:
    "auto" keeps the stored dtype (inference), training passes float32 (master weights). An adapter's base
    is stored in its source's dtype but loaded in float32 under "auto": the adapter was trained (and
    validated) on an fp32 base, fp32 holds the stored values exactly, and a merge then keeps every update."""
    model_dir = Path(model_dir)
    check_format(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = model_dir / "base_model"
        if not base_dir.exists():
            raise LmrecError(f"{model_dir} is a LoRA adapter without its base_model/ directory")
        base, tok = load_lm(base_dir, dtype=torch.float32 if dtype == "auto" else dtype)
        with quiet_peft():
            return PeftModel.from_pretrained(base, str(model_dir)), tok
    return load_lm(model_dir, dtype=dtype)
