"""A RecFormer recommender as one ``save_pretrained`` directory::

    config.json, model.safetensors     the RecformerForSeqRec encoder (HF layout)
    tokenizer files                    the backbone's tokenizer (any AutoTokenizer)
    item_table.safetensors             the frozen item table, one row per item of the catalog
    items.parquet                      the catalog: item_index, item_id, attrs (key/value text)

Inference only: it encodes items and histories in batches, ranks all items for the evaluator (exact, in
chunks), and recommends through a faiss index (exact below ``exact_max`` items, approximate above; see
:mod:`lmrec.eval.index`). New items are encoded from their text and appended without retraining: what a
text-based recommender is for. The items it ranks, and how they grow, are its
:class:`~lmrec.recformer.catalog.Catalog` (:mod:`lmrec.recformer.catalog`): items added after training live
in memory; the service keeps them in an item store beside the model (:mod:`lmrec.data.item_store`, payload:
the encoded vector) and appends them with :meth:`Recommender.append_stored`. Loading a directory reads its
own catalog only, so offline evaluation ranks the dataset's items. Training batches are built by
``lmrec.recformer.collator``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmrec.data.item_store import StoredItem
from lmrec.data.prepare import read_items, write_items
from lmrec.errors import LmrecError
from lmrec.eval.evaluator import RankFn, dot_rank_fn
from lmrec.eval.index import ItemIndex, top_k
from lmrec.eval.ranking import DEFAULT_CHUNK
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_format, write_marker
from lmrec.progress import progress
from lmrec.recformer.catalog import Catalog, ItemText, TableBuffer, store_records, stored_vectors
from lmrec.recformer.collator import history_inputs
from lmrec.recformer.configuration_recformer import RecformerConfig
from lmrec.recformer.modeling_recformer import RecformerForSeqRec
from lmrec.recformer.tokenization_recformer import ItemTokens, RecformerTokenizer


class Recommender:
    def __init__(self, model: RecformerForSeqRec, tokenizer: RecformerTokenizer, item_ids: list[str],
                 item_text: list[ItemText], *, index_kind: str = "auto", exact_max: int = 200_000):
        self.model = model
        self.tokenizer = tokenizer
        self.index_kind, self.exact_max = index_kind, exact_max
        self.added = 0  # items appended by add_items (the last ``added`` of the catalog)
        self._table = TableBuffer()
        self.set_catalog(item_ids, item_text)

    # ------------------------------------------------------------------------------------------ catalog
    def set_catalog(self, item_ids: list[str], item_text: list[ItemText]) -> None:
        """Use another catalog (zero-shot on new items); the item table must be re-encoded."""
        self.catalog = Catalog(self.tokenizer, item_ids, item_text)
        self.model.set_item_embeddings(torch.zeros(0, self.model.config.hidden_size))
        self._index: ItemIndex | None = None

    # the catalog's lists under the names every family's recommender has: the evaluator, the service and the
    # collators read them from any of them
    @property
    def item_ids(self) -> list[str]:
        return self.catalog.item_ids

    @property
    def item_text(self) -> list[ItemText]:
        return self.catalog.item_text

    @property
    def item_index(self) -> dict[str, int]:
        return self.catalog.item_index

    @property
    def item_tokens(self) -> list[ItemTokens]:
        return self.catalog.item_tokens

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
        n = len(self.item_ids)
        world = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        per_rank = -(-n // world)
        idx = np.arange(rank * per_rank, (rank + 1) * per_rank).clip(max=n - 1)  # pad the last shard
        show = show_progress and (accelerator is None or accelerator.is_local_main_process)
        out = self._encode_tokens([self.item_tokens[i] for i in idx], batch_size, show)
        if world > 1:
            out = accelerator.gather(out.contiguous())[:n]
        self.model.set_item_embeddings(out)
        self._index = None
        return out

    @torch.no_grad()
    def _encode_tokens(self, tokens: list[ItemTokens], batch_size: int, show: bool = False) -> torch.Tensor:
        """Items' vectors, each item encoded as a one-item history, in batches of similar length (less
        padding), in eval mode. (N, H)"""
        model = self.model
        was_training = model.training
        model.eval()
        order = np.argsort([len(t[0]) for t in tokens], kind="stable")
        out = torch.empty(len(tokens), model.config.hidden_size, device=model.device)
        for s in progress(range(0, len(tokens), batch_size), "encode items", show):
            sel = order[s : s + batch_size]
            inputs = history_inputs(self.tokenizer, tokens, [[int(i)] for i in sel])
            out[torch.as_tensor(sel, device=out.device)] = model.encode(
                **{k: v.to(model.device) for k, v in inputs.items()}).float()
        model.train(was_training)
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

    def rank_fn(self, *, exclude_history: bool = False, chunk_size: int = DEFAULT_CHUNK,
                candidates: np.ndarray | None = None) -> RankFn:
        """Full ranking over all catalog items, or over ``candidates`` (item indices), by cosine similarity,
        for :func:`lmrec.eval.evaluate`."""
        return dot_rank_fn(self.encode_histories, self._items_normalized(), exclude_history=exclude_history,
                           chunk_size=chunk_size, candidates=candidates)

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = True):
        """Item ids (oldest → newest) → [(item_id, text, score)] of the k best items."""
        from lmrec.data.dataset import recommendations

        return recommendations(self, history, k, exclude_history)

    def top_k(self, histories: Sequence[Sequence[int]], k: int, *, exclude_history: bool = True,
              exclude: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores = cosine / temperature, item indices) of the k best items for each history: (B, k) each,
        from the retrieval index. ``exclude`` (items per row) overrides ``exclude_history``. When fewer than
        k items remain, a row ends with score -inf and index -1."""
        scores, items = top_k(self.retrieval_index(), self.encode_histories(histories), k, histories,
                              exclude_history=exclude_history, exclude=exclude)
        return scores / self.model.config.temperature, items

    def retrieval_index(self, log=None) -> ItemIndex:
        """The faiss index over the (unit-norm) item table, built on first use (``index_kind``: auto = exact
        up to ``exact_max`` items, IVF above, its recall@10 against exact ranking measured at build)."""
        if self._index is None or self._index.size != len(self.item_ids) or not self.has_item_table:
            table = self._items_normalized()  # O(catalog): only when the index is (re)built, never per query
            self._index = ItemIndex(table.cpu().numpy(), kind=self.index_kind, exact_max=self.exact_max, log=log)
        return self._index

    # ------------------------------------------------------------------------------------------ new items
    def add_items(self, item_ids: Sequence[str], item_text: Sequence[ItemText], batch_size: int = 256) -> list[int]:
        """Encode items the model never saw from their key/value text and append them to the catalog, the
        item table and the index: recommendable at once, no retraining. Returns their catalog indices."""
        start = len(self.item_ids)
        self.append_stored(self.new_records(item_ids, item_text, batch_size))
        return list(range(start, len(self.item_ids)))

    def new_records(self, item_ids: Sequence[str], item_text: Sequence[ItemText], batch_size: int = 256
                    ) -> list[StoredItem]:
        """New items checked (ids not in the catalog, text present) and encoded, ready for the item store and
        :meth:`append_stored`; the catalog is unchanged."""
        item_ids, item_text = self.catalog.checked_new(item_ids, item_text)
        vectors = self.encode_texts(item_text, batch_size, normalize=False).float().cpu().numpy()
        return store_records(item_ids, item_text, vectors)

    def append_stored(self, items: Sequence[StoredItem]) -> int:
        """Append stored items (with their vectors) to the catalog, the item table and the index, without
        encoding; ids already in the catalog are skipped (the catalog's entry wins). Returns how many."""
        items = self.catalog.unseen(items)
        if not items:
            return 0
        vectors = stored_vectors(items, self.model.config.hidden_size)
        if not self.has_item_table:
            self.encode_items(show_progress=False)
        self.catalog.extend([it.item_id for it in items], [list(it.text) for it in items])
        self.model.set_item_embeddings(self._table.grown(self.model.item_embeddings, vectors))
        if self._index is not None:
            self._index.add(F.normalize(vectors.float(), dim=-1).cpu().numpy())
        self.added += len(items)
        return len(items)

    def encode_texts(self, item_text: Sequence[ItemText], batch_size: int = 256, normalize: bool = True
                     ) -> torch.Tensor:
        """Item vectors of key/value texts, as the item table encodes them, without touching the catalog. (N, H)"""
        out = self._encode_tokens(self.tokenizer.encode_items([list(t) for t in item_text]), batch_size)
        return F.normalize(out, dim=-1) if normalize else out

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
            write_marker(tmp, "recformer")

        path = atomic_dir(path, write)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Recommender:
        path = Path(path)
        check_format(path)  # a directory of a newer lmrec is refused, not misread
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

