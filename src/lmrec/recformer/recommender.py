"""A RecFormer recommender as one ``save_pretrained`` directory::

    config.json, model.safetensors     the RecformerForSeqRec encoder (HF layout)
    tokenizer files                    the backbone's tokenizer (any AutoTokenizer)
    item_table.safetensors             the frozen item table, one row per item of the catalog
    items.parquet                      the catalog: item_index, item_id, attrs (key/value text)

Inference only: it encodes items and histories in batches, ranks all items for the evaluator, and
recommends. Training batches are built by ``lmrec.recformer.collator``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmrec.data.prepare import read_items, write_items
from lmrec.errors import LmrecError
from lmrec.eval.evaluator import RankFn, dot_rank_fn
from lmrec.eval.ranking import top_k
from lmrec.io import atomic_dir
from lmrec.progress import progress
from lmrec.recformer.collator import history_inputs
from lmrec.recformer.configuration_recformer import RecformerConfig
from lmrec.recformer.modeling_recformer import RecformerForSeqRec
from lmrec.recformer.tokenization_recformer import ItemTokens, RecformerTokenizer

ItemText = list[tuple[str, str]]


class Recommender:
    def __init__(self, model: RecformerForSeqRec, tokenizer: RecformerTokenizer, item_ids: list[str],
                 item_text: list[ItemText]):
        self.model = model
        self.tokenizer = tokenizer
        self.set_catalog(item_ids, item_text)

    # ------------------------------------------------------------------------------------------ catalog
    def set_catalog(self, item_ids: list[str], item_text: list[ItemText]) -> None:
        """Use another catalog (zero-shot on new items); the item table must be re-encoded."""
        self.item_ids = list(item_ids)
        self.item_text = list(item_text)
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.item_tokens: list[ItemTokens] = self.tokenizer.encode_items(self.item_text)
        self.model.set_item_embeddings(torch.zeros(0, self.model.config.hidden_size))

    def ready_for(self, item_ids: list[str], item_text: list[ItemText], batch_size: int = 256) -> Recommender:
        """Ready to rank ``item_ids``: switch to that catalog when it differs, encode the item table when it
        is missing (items the model never saw are encoded on the fly)."""
        if self.item_ids != list(item_ids):
            self.set_catalog(item_ids, item_text)
        if not self.has_item_table:
            self.encode_items(batch_size)
        return self

    @property
    def has_item_table(self) -> bool:
        return self.model.item_embeddings.shape[0] == len(self.item_ids)

    # ------------------------------------------------------------------------------------------ encoding
    def batch(self, histories: Sequence[Sequence[int]], device: torch.device | str | None = None
              ) -> dict[str, torch.Tensor]:
        """Item-index histories (oldest → newest) → padded model inputs on ``device`` (default: the model's)."""
        device = self.model.device if device is None else device
        return {k: v.to(device) for k, v in history_inputs(self.tokenizer, self.item_tokens, histories).items()}

    @torch.no_grad()
    def encode_items(self, batch_size: int = 256, accelerator=None, show_progress: bool = True) -> torch.Tensor:
        """Encode every catalog item (as a one-item history) into the item table; shards across ranks."""
        model = self.model
        was_training = model.training
        model.eval()
        n = len(self.item_ids)
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        per_rank = -(-n // world)
        idx = np.arange(rank * per_rank, (rank + 1) * per_rank).clip(max=n - 1)  # pad the last shard
        order = np.argsort([len(self.item_tokens[i][0]) for i in idx], kind="stable")  # less padding
        out = torch.empty(len(idx), model.config.hidden_size, device=model.device)
        show = show_progress and (accelerator is None or accelerator.is_local_main_process)
        for s in progress(range(0, len(idx), batch_size), "encode items", show):
            sel = order[s : s + batch_size]
            out[torch.as_tensor(sel, device=out.device)] = model.encode(
                **self.batch([[int(i)] for i in idx[sel]])).float()
        if world > 1:
            out = accelerator.gather(out.contiguous())[:n]
        model.train(was_training)
        model.set_item_embeddings(out)
        return out

    @torch.no_grad()
    def encode_histories(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        user = self.model.encode_user(**self.batch(histories)).float()
        self.model.train(was_training)
        return F.normalize(user, dim=-1)  # (B, H)

    def _items_normalized(self) -> torch.Tensor:
        if not self.has_item_table:
            raise LmrecError("the item table does not match the catalog; call encode_items() first")
        return F.normalize(self.model.item_embeddings.float(), dim=-1)

    def rank_fn(self, *, exclude_history: bool = False, chunk_size: int = 65536,
                candidates: np.ndarray | None = None) -> RankFn:
        """Full ranking over all catalog items, or over ``candidates`` (item indices), by cosine similarity,
        for :func:`lmrec.eval.evaluate`."""
        return dot_rank_fn(self.encode_histories, self._items_normalized(), exclude_history=exclude_history,
                           chunk_size=chunk_size, candidates=candidates)

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = True):
        """Item ids (oldest → newest) → [(item_id, text, score)] of the k best items."""
        from lmrec.errors import DataError

        unknown = [(p, it) for p, it in enumerate(history, start=1) if it not in self.item_index]
        if unknown:
            p, it = unknown[0]
            raise DataError(f"unknown item id {it!r} at position {p} of the history (not in this model's "
                            f"catalog of {len(self.item_ids)} items)", file="history")
        if not history:
            raise DataError("empty history (expected at least one item id)", file="history")
        idx = [self.item_index[it] for it in history]
        scores, items = self.top_k([idx], k, exclude_history=exclude_history)
        return [(self.item_ids[i], self.item_text[i], float(s)) for s, i in zip(scores[0].tolist(), items[0].tolist())
                if s > float("-inf")]  # with the history excluded, fewer than k items may remain

    def top_k(self, histories: Sequence[Sequence[int]], k: int, *, exclude_history: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores = cosine / temperature, item indices) of the k best items for each history: (B, k) each.
        Excluded history items can only fill a row when fewer than k items remain; their score is -inf."""
        if k < 1:
            raise LmrecError(f"k must be at least 1, got {k}")
        scores, items = top_k(self.encode_histories(histories), self._items_normalized(), k,
                              exclude=histories if exclude_history else None)
        return scores / self.model.config.temperature, items

    # ------------------------------------------------------------------------------------------ files
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the directory atomically (temporary name, then rename)."""
        def write(tmp: Path) -> None:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(tmp)
            if self.has_item_table:
                save_file({"item_embeddings": self.model.item_embeddings.detach().float().cpu().contiguous()},
                          str(tmp / "item_table.safetensors"))
            write_items(tmp / "items.parquet", self.item_ids, self.item_text)

        path = atomic_dir(path, write)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Recommender:
        path = Path(path)
        if (path / "config.json").exists() and not (path / "items.parquet").exists():
            cfg = json.loads((path / "config.json").read_text())
            if cfg.get("model_type") == "recformer":  # pretraining / `backbone init` output: no catalog yet
                from lmrec.recformer.backbones import build_recformer

                model, tokenizer, report = build_recformer(path)
                if report.problems():
                    raise LmrecError(f"{path}: {', '.join(report.problems()[:3])}")
                return cls(model.to(device), tokenizer, [], [])
        if not (path / "config.json").exists() or not (path / "items.parquet").exists():
            raise LmrecError(f"{path} is not a saved lmrec recommender (expected config.json and items.parquet)")
        config = RecformerConfig.from_pretrained(str(path))
        model = RecformerForSeqRec.from_pretrained(str(path), config=config).to(device)
        tokenizer = RecformerTokenizer.from_pretrained(path, config)
        rec = cls(model, tokenizer, *read_items(path / "items.parquet"))
        if (path / "item_table.safetensors").exists():
            model.set_item_embeddings(load_file(str(path / "item_table.safetensors"))["item_embeddings"])
        return rec
