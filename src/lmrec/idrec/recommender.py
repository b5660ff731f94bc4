"""A trained ID baseline (SASRec, GRU4Rec) as a recommender, with the same calls as RecFormer's
(``rank_fn`` for the evaluator, ``top_k`` / ``recommend`` for ``recommend``, ``recommend-all`` and the
service), so that ``lmrec evaluate``, ``recommend`` and ``serve`` take its model directory like any other::

    config.json, model.safetensors     the IdSeqRec model (HF layout, model_type lmrec-idrec)
    items.parquet                      the catalog it was trained on: item_index, item_id, attrs

An ID model knows only the items it was trained with: it cannot add items from their text (the service
answers ``POST /items`` with 409), and a dataset with items outside its catalog is refused with their
count rather than scored with untrained vectors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmrec.data.prepare import read_items, write_items
from lmrec.data.readers import ItemText
from lmrec.errors import DataError, LmrecError
from lmrec.eval.evaluator import RankFn, dot_rank_fn
from lmrec.eval.index import ItemIndex, top_k
from lmrec.eval.ranking import DEFAULT_CHUNK
from lmrec.idrec.models import IdRecConfig, IdSeqRec
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_format, write_marker


def is_id_model(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == IdRecConfig.model_type
    except (OSError, ValueError):
        return False


def save_id_model(model: IdSeqRec, item_ids: list[str], item_text: list[ItemText], out: str | Path) -> Path:
    """The model and its catalog in one directory, written atomically."""
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        write_items(tmp / "items.parquet", item_ids, item_text)
        write_marker(tmp, "idrec")

    return atomic_dir(out, write)


class IdRecommender:
    added = 0  # an ID model never grows its catalog

    def __init__(self, model: IdSeqRec, item_ids: list[str], item_text: list[ItemText], *,
                 index_kind: str = "auto", exact_max: int = 200_000):
        if len(item_ids) != model.config.num_items:
            raise LmrecError(f"{len(item_ids)} catalog items for an ID model of {model.config.num_items} items")
        self.model = model.eval()
        self.item_ids, self.item_text = list(item_ids), list(item_text)
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.order: torch.Tensor | None = None  # model rows of the catalog in use (None: the model's own order)
        self.index_kind, self.exact_max = index_kind, exact_max
        self._index: ItemIndex | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kw) -> IdRecommender:
        path = Path(path)
        if not is_id_model(path) or not (path / "items.parquet").exists():
            raise LmrecError(f"{path} is not a saved ID model (expected config.json of model_type "
                             f"{IdRecConfig.model_type} and items.parquet; `lmrec baseline` writes run/model)")
        check_format(path)
        model = IdSeqRec.from_pretrained(str(path)).to(device)
        return cls(model, *read_items(path / "items.parquet"), **kw)

    @property
    def max_len(self) -> int:
        return self.model.config.max_len

    def ready_for(self, item_ids: list[str], item_text: list[ItemText], batch_size: int = 256) -> IdRecommender:
        """Rank the items of a dataset's catalog (its item indices), which must all be in the model's."""
        if list(item_ids) == self.item_ids:
            return self
        unknown = [it for it in item_ids if it not in self.item_index]
        if unknown:
            raise DataError(f"{len(unknown)} of the dataset's {len(item_ids)} items are not in this ID model's "
                            f"catalog (first: {unknown[0]!r}); an ID model cannot rank items it was not trained "
                            "with: use a text-based model (RecFormer, the hybrid) for new items", file="items")
        rows = [self.item_index[it] for it in item_ids]
        self.order = torch.as_tensor(rows, device=self.model.device)
        self.item_ids, self.item_text = list(item_ids), list(item_text)
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self._index = None
        return self

    # ------------------------------------------------------------------------------------------ scoring
    def _to_model(self, histories: Sequence[Sequence[int]]) -> list[np.ndarray]:
        h = [np.asarray(x, dtype=np.int64) for x in histories]
        if self.order is None:
            return h
        order = self.order.cpu().numpy()
        return [order[x] for x in h]

    @torch.no_grad()
    def encode_histories(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, hidden) user vectors from the last ``max_len`` items of each history (catalog indices)."""
        hist = [h[-self.max_len:] for h in self._to_model(histories)]
        ids = torch.zeros(len(hist), max(1, max(len(h) for h in hist)), dtype=torch.long)
        for i, h in enumerate(hist):
            ids[i, : len(h)] = torch.as_tensor(h + 1)
        lengths = torch.as_tensor([max(1, len(h)) for h in hist])
        dev = self.model.device
        return self.model.user_vectors(ids.to(dev), lengths.to(dev)).float()

    def item_vectors(self) -> torch.Tensor:
        v = self.model.item_vectors().detach().float()
        return v if self.order is None else v[self.order]

    def rank_fn(self, *, exclude_history: bool = False, chunk_size: int = DEFAULT_CHUNK,
                candidates: np.ndarray | None = None) -> RankFn:
        return dot_rank_fn(self.encode_histories, self.item_vectors(), exclude_history=exclude_history,
                           chunk_size=chunk_size, candidates=candidates)

    def retrieval_index(self, log=None) -> ItemIndex:
        if self._index is None:
            self._index = ItemIndex(self.item_vectors().cpu().numpy(), kind=self.index_kind,
                                    exact_max=self.exact_max, log=log)
        return self._index

    def top_k(self, histories: Sequence[Sequence[int]], k: int, *, exclude_history: bool = True,
              exclude: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores = dot products, item indices) of the k best items per history, (B, k) each; rows with fewer
        than k items left end with score -inf and index -1 (as RecFormer's)."""
        return top_k(self.retrieval_index(), self.encode_histories(histories), k, histories,
                     exclude_history=exclude_history, exclude=exclude)

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = True):
        """Item ids (oldest → newest) → [(item_id, text, score)] of the k best items."""
        from lmrec.data.dataset import recommendations

        return recommendations(self, history, k, exclude_history)
