"""Each family's backend (:class:`~lmrec.serve.backend.Backend`): RecFormer and the ID baselines behind
one index search per batch, the generative model behind constrained beam search; which of them a model
directory gets (``detect_family``, ``load_backend``), and how many server processes may hold it
(``worker_count``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmrec.data.item_store import default_store_path
from lmrec.data.unknown_text import unknown_text_warning
from lmrec.errors import LmrecError
from lmrec.serve.backend import LEGACY_ADDED, Backend, BadRequest, Hit, ItemText, Query

UNREADABLE_HINT = ("The items are added, but their vectors say little: serve a model whose tokenizer covers this "
                   "text (a backbone for its language).")


class _RankingBackend(Backend):
    """A backend over a recommender with ``item_ids``, ``item_text``, ``item_index`` and ``top_k`` (RecFormer,
    the ID models): one index search per batch."""

    def item_ids(self) -> list[str]:
        return self.rec.item_ids

    def item_text(self, index: int) -> ItemText:
        return self.rec.item_text[index]

    def index_of(self, item_id: str) -> int | None:
        return self.rec.item_index.get(item_id)

    def recommend(self, queries: list[Query]) -> list[list[Hit]]:
        with self.lock:
            hist = [[self.rec.item_index[it] for it in q.history] for q in queries]
            excl = [h if q.exclude_history else [] for h, q in zip(hist, queries)]
            scores, items = self.rec.top_k(hist, max(q.k for q in queries), exclude=excl)
            return [[Hit(self.rec.item_ids[i], float(s), self.rec.item_text[i])
                     for s, i in zip(scores[b, : q.k].tolist(), items[b, : q.k].tolist()) if i >= 0]
                    for b, q in enumerate(queries)]


class RecformerBackend(_RankingBackend):
    family = "recformer"
    max_k = 1000

    def __init__(self, model_dir: Path, *, index: str = "auto", exact_max: int = 200_000, device="cpu", log=print,
                 item_store: Path | None = None):
        from lmrec.recformer.recommender import Recommender

        super().__init__(model_dir, item_store)
        self.rec = Recommender.from_pretrained(model_dir, device)
        if not self.rec.item_ids:
            raise LmrecError(f"{model_dir} has no item catalog (a pretraining or `backbone init` output); serve a "
                             "finetuned recommender")
        self.rec.index_kind, self.rec.exact_max = index, exact_max
        if not self.rec.has_item_table:
            log(f"encoding the {len(self.rec.item_ids)} catalog items")
            self.rec.encode_items(show_progress=False)
        self._load_store()
        self.index_report = self.rec.retrieval_index(log=log).report

    @property
    def max_history(self) -> int:
        return self.rec.model.config.max_item_embeddings - 1

    def add_items(self, items):
        ids = self._add_stored(lambda: self.rec.new_records([it for it, _ in items], [t for _, t in items]))
        return ids, unknown_text_warning(self.rec.tokenizer.tokenizer, [" ".join(f"{k} {v}" for k, v in t)
                                                                        for _, t in items],
                                         what="the new items' text", hint=UNREADABLE_HINT)

    def metadata(self) -> dict:
        r, index = self.index_report, self.rec._index  # the index as built: no table work here
        return {**super().metadata(), "index": {"kind": r.kind, "param": r.param, "recall_at_10": r.recall_at_10,
                                               "items": index.size if index is not None else 0}}


class _FixedCatalog(_RankingBackend):
    """A catalog that never grows (an ID model's items): nothing to add, nothing to sync with other processes."""

    def no_new_items(self) -> str:
        raise NotImplementedError

    def add_items(self, items):
        raise BadRequest("items", self.no_new_items(), status=409)

    def needs_sync(self) -> bool:
        return False

    def sync(self) -> None:
        pass


class IdBackend(_FixedCatalog):
    """A trained ID baseline (``lmrec baseline``'s ``model/``): ranks its own catalog; cannot add items."""

    family = "idrec"
    max_k = 1000

    def __init__(self, model_dir: Path, *, index: str = "auto", exact_max: int = 200_000, device="cpu", log=print):
        from lmrec.idrec.recommender import IdRecommender

        super().__init__(model_dir, None)
        self.rec = IdRecommender.from_pretrained(model_dir, device, index_kind=index, exact_max=exact_max)
        self.index_report = self.rec.retrieval_index(log=log).report

    @property
    def max_history(self) -> int:
        return self.rec.max_len

    def no_new_items(self) -> str:
        return (f"{self.model_dir} is an ID model ({self.rec.model.config.arch}): it has a vector only for the items "
                "it was trained with and cannot add items from their text; serve a RecFormer or generative model "
                "to add items")

    def metadata(self) -> dict:
        return {**super().metadata(), "arch": self.rec.model.config.arch}


class FusedBackend(_FixedCatalog):
    """An ID model × the generative model (``fusion.json``, :mod:`lmrec.fusion`): ranks the catalog of the
    dataset it was fused on (every item scored; the beams searched per batch); cannot add items."""

    family = "fusion"
    max_k = 1000

    def __init__(self, model_dir: Path, *, device="cpu", log=print):
        from lmrec.fusion import FusedRecommender, read_spec
        from lmrec.serve.backend import _version

        super().__init__(model_dir, None)
        self.spec = read_spec(model_dir)
        self.rec = FusedRecommender.load(model_dir, device=device, command="lmrec serve")
        # the fused directory holds no weights: its version is that of the two models it names, too
        self.version = "-".join(_version(Path(d))[:4] for d in (model_dir, self.spec["id_model"],
                                                                 self.spec["generative_model"]))

    @property
    def max_history(self) -> int:
        return self.rec.gen.ds.max_history_len

    def no_new_items(self) -> str:
        return (f"{self.model_dir} is a fused model: it ranks the catalog it was fused on and cannot add items; "
                "serve its generative model (or a hybrid ID model) to add items")

    def metadata(self) -> dict:
        return {**super().metadata(), **{k: self.spec[k] for k in ("id_model", "generative_model", "rule",
                                                                  "weight", "beams")},
                "id_model_name": self.spec.get("id_model_name")}  # absent from fusions saved before it was kept


class GenerativeBackend(Backend):
    family = "generative"
    max_k = 100

    def __init__(self, model_dir: Path, data: Path, sids: Path, *, beams: int | None = None, device="cpu",
                 log=print, item_store: Path | None = None):
        from lmrec.generative.recommender import GenerativeRecommender

        super().__init__(model_dir, item_store)
        self.sids_dir, self.beams = Path(sids), beams
        self.rec = GenerativeRecommender.load(model_dir, data, sids, device=device)
        self._embedder = None
        self._load_store()

    def item_ids(self) -> list[str]:
        return self.rec.ds.item_ids

    def item_text(self, index: int) -> ItemText:
        return self.rec.ds.item_text[index]

    def index_of(self, item_id: str) -> int | None:
        return self.rec.ds.item_index.get(item_id)

    @property
    def max_history(self) -> int:
        return self.rec.ds.max_history_len

    def recommend(self, queries: list[Query]) -> list[list[Hit]]:
        """One constrained beam search per beam width: a request's answer never depends on what it was
        batched with. With the history excluded, the beam is widened by the history's length."""
        with self.lock:
            hist = [[self.rec.ds.item_index[it] for it in q.history] for q in queries]
            width = [max(q.k + (len(set(h)) if q.exclude_history else 0), self.beams or 0)
                     for q, h in zip(queries, hist)]
            out: list[list[Hit]] = [[] for _ in queries]
            for w in sorted(set(width)):
                rows = [b for b in range(len(queries)) if width[b] == w]
                items, scores = self.rec.beam_search([hist[b] for b in rows], w)
                for r, b in enumerate(rows):
                    q, skip = queries[b], set(hist[b]) if queries[b].exclude_history else set()
                    for i, s in zip(items[r].tolist(), scores[r].tolist()):
                        if i >= 0 and i not in skip and len(out[b]) < q.k:
                            out[b].append(Hit(self.rec.ds.item_ids[i], float(s), self.rec.ds.item_text[i]))
            return out

    def _embed(self, texts: list[ItemText], warn) -> np.ndarray:
        """New items' vectors in the space the semantic IDs were built from (the source in sid_config.json);
        ``warn`` receives a warning when that encoder's tokenizer cannot read much of the text."""
        source = self.rec.sids.config.encoder
        if source.startswith("recformer:"):
            from lmrec.recformer.recommender import Recommender

            if self._embedder is None:
                self._embedder = Recommender.from_pretrained(source.split(":", 1)[1])
            message = unknown_text_warning(self._embedder.tokenizer.tokenizer,
                                           [" ".join(f"{k} {v}" for k, v in t) for t in texts],
                                           what="the new items' text", hint=UNREADABLE_HINT)
            if message:
                warn(message)
            return self._embedder.encode_texts(texts).cpu().numpy()
        if source and (Path(source) / "config.json").exists():
            from lmrec.generative.sid import embed_texts, item_texts

            return embed_texts(item_texts(texts), source, device="cpu", warn=warn)
        raise BadRequest("items", f"the semantic IDs in {self.sids_dir} were built from vectors without a text "
                                  f"encoder ({source or 'given embeddings'}): new items cannot get codes; rebuild "
                                  "them with `lmrec sid build --encoder` or `--recommender`", status=409)

    def add_items(self, items):
        warnings: list[str] = []
        vectors = self._embed([t for _, t in items], warnings.append)  # outside the locks: its own encoder
        ids = self._add_stored(lambda: self.rec.new_records([it for it, _ in items], [t for _, t in items],
                                                            vectors))
        warnings.append("the language model never saw these items: they get codes from the saved codebooks and "
                        "can be generated, but how often depends on how close their codes are to trained items'")
        return ids, " ".join(warnings)

    def metadata(self) -> dict:
        return {**super().metadata(), "sids": str(self.sids_dir), "semantic_id_levels": self.rec.sids.num_levels,
                "beams": self.beams}


def detect_family(model_dir: str | Path, data: str | Path | None = None, sids: str | Path | None = None) -> str:
    """``recformer``, ``idrec``, ``fusion`` or ``generative`` for a model directory, or a clear error (checked
    before a server starts, so that a wrong path is one message, not a failed readiness probe)."""
    from lmrec.fusion import is_fused_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LmrecError(f"--model {model_dir}: no such directory")
    if is_fused_model(model_dir):
        return "fusion"
    if (model_dir / "sid_vocab.json").exists():
        missing = [n for n, v in (("--data", data), ("--sids", sids)) if v is None]
        if missing:
            raise LmrecError(f"{model_dir} is a generative model: give {' and '.join(missing)} (the prepared dataset "
                             "and the semantic-ID directory it was trained with)")
        if not (Path(data) / "manifest.json").exists():
            raise LmrecError(f"--data {data}: not a prepared dataset (no manifest.json)")
        if not (Path(sids) / "sids.parquet").exists():
            raise LmrecError(f"--sids {sids}: not a semantic-ID directory (no sids.parquet)")
        return "generative"
    if (model_dir / "manifest.json").exists():
        raise LmrecError(f"--model {model_dir} is a prepared dataset, not a model (a generative model takes it as "
                         "--data)")
    if (model_dir / "items.parquet").exists() and (model_dir / "config.json").exists():
        from lmrec.idrec.recommender import is_id_model

        return "idrec" if is_id_model(model_dir) else "recformer"
    if (model_dir / "config.json").exists():
        kind = json.loads((model_dir / "config.json").read_text()).get("model_type", "?")
        raise LmrecError(f"{model_dir} is a {kind} model without an item catalog: serve a finetuned RecFormer "
                         "recommender (…/model with items.parquet) or a trained generative model (with sid_vocab.json)")
    raise LmrecError(f"{model_dir} is not a saved lmrec model (expected items.parquet or sid_vocab.json)")


def load_backend(model_dir: str | Path, *, data: str | Path | None = None, sids: str | Path | None = None,
                 index: str = "auto", exact_max: int = 200_000, beams: int | None = None, device: str = "cpu",
                 log=print, item_store: str | Path | None = None) -> Backend:
    """The backend for a model directory: a RecFormer recommender or a trained ID baseline (``items.parquet``),
    or a generative model
    (``sid_vocab.json``; it needs the prepared dataset and the semantic-ID directory), on ``device``; items
    added at run time live in ``item_store`` (default ``<model_dir>.items``)."""
    family = detect_family(model_dir, data, sids)
    store = None if item_store is None else Path(item_store)
    if (Path(model_dir) / LEGACY_ADDED).exists():
        log(f"{Path(model_dir) / LEGACY_ADDED}: items added by an older lmrec; the item store "
            f"{store or default_store_path(model_dir)} starts with them when empty, and is what is read from now on")
    if family == "generative":
        return GenerativeBackend(Path(model_dir), Path(data), Path(sids), beams=beams, device=device, log=log,
                                 item_store=store)
    if family == "fusion":
        return FusedBackend(Path(model_dir), device=device, log=log)
    if family == "idrec":
        return IdBackend(Path(model_dir), index=index, exact_max=exact_max, device=device, log=log)
    return RecformerBackend(Path(model_dir), index=index, exact_max=exact_max, device=device, log=log,
                            item_store=store)


def worker_count(value: int, device: str = "cpu") -> int:
    """``--workers``: processes, each with its own copy of the model. On an accelerator one process holds the
    model (copies would share the device's memory and compute); throughput comes from ``--max-batch``."""
    if value < 1 or value > (os.cpu_count() or 1) * 4:
        raise LmrecError(f"--workers must be 1..{(os.cpu_count() or 1) * 4}, got {value}")
    if value > 1 and device != "cpu":
        raise LmrecError(f"--workers {value} with --device {device}: each worker would hold its own copy of the model "
                         "on the same device; serve one process per GPU and raise --max-batch instead")
    return value
