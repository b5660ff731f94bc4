"""What the service serves: one trained model of any family behind one interface, the requests it answers,
and the item store its server processes share. Each family's backend, and which one a model directory gets,
are in :mod:`lmrec.serve.families`.

A backend answers a batch of requests in one forward pass (RecFormer: one history encoding, one index
search; generative: one constrained beam search per beam width), adds items without retraining, and
describes itself. Requests are validated against it before they are queued (:meth:`Backend.check`), so a
bad id never reaches a batch that other requests share.

Items added at run time are kept in an item store beside the model (:mod:`lmrec.data.item_store`; by default
``<model_dir>.items/``), never in the model directory: offline evaluation of the model is unchanged by them.
Several server processes (``--workers``) each hold a copy of the catalog; an addition is checked and appended
under the store's file lock after catching up with the others' (so every id is stored once), and each process
appends what the others added before its next batch (:meth:`Backend.sync`, in the batch thread: the event
loop never waits for it). Each step costs O(added), not O(catalog).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmrec.data.item_store import ItemStore, StoredItem, default_store_path
from lmrec.data.readers import ItemText
from lmrec.errors import DataError, LmrecError

LEGACY_ADDED = "added_items.parquet"  # where lmrec kept added items before the item store


class BadRequest(LmrecError):
    """A request the model cannot answer: ``field`` names where (``history[2]``, ``k``, ``items[0].item_id``)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class Query:
    history: list[str]
    k: int = 10
    exclude_history: bool = True


@dataclass
class Hit:
    item_id: str
    score: float
    text: ItemText


def _version(model_dir: Path) -> str:
    """A short fingerprint of the weights on disk: config, file names, sizes and modification times."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _legacy_records(path: Path) -> list[StoredItem]:
    """The items of an ``added_items.parquet`` (id, attrs, and a ``vector`` or ``codes`` column) as records."""
    import pyarrow.parquet as pq

    from lmrec.data.item_store import encode_vector
    from lmrec.data.prepare import read_items

    ids, text = read_items(path)
    key = "vector" if "vector" in pq.read_schema(path).names else "codes"
    values = pq.read_table(path, columns=[key]).column(0).to_pylist()
    if key == "vector":
        values = [encode_vector(np.asarray(v, dtype=np.float32)) for v in values]
    return [StoredItem(i, t, {key: v}) for i, t, v in zip(ids, text, values)]


class Backend:
    family: str
    max_k: int
    rec: object

    def __init__(self, model_dir: Path, item_store: Path | None = None):
        self.model_dir = Path(model_dir)
        self.lock = threading.RLock()  # one forward pass or one catalog change at a time
        self.version = _version(self.model_dir)
        self.store = ItemStore(item_store or default_store_path(self.model_dir))

    def _load_store(self) -> None:
        """Append the store's items (the families call it once their catalog is loaded). An empty store
        starts with the items an older lmrec kept in ``<model_dir>/added_items.parquet`` (copied once; the
        model directory is left as it is)."""
        legacy = self.model_dir / LEGACY_ADDED
        with self.lock:
            if legacy.exists() and self.store.size() == 0:
                with self.store.writer() as w:
                    found = self.store.poll()  # another worker may have copied them meanwhile
                    if not found:
                        found = _legacy_records(legacy)
                        w.append(found)
                self.rec.append_stored(found)
            self.rec.append_stored(self.store.poll())

    # ------------------------------------------------------------------------------------------ catalog
    def item_ids(self) -> list[str]:
        raise NotImplementedError

    def item_text(self, index: int) -> ItemText:
        raise NotImplementedError

    def index_of(self, item_id: str) -> int | None:
        raise NotImplementedError

    @property
    def max_history(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ requests
    def check(self, q: Query, where: str = "", max_k: int | None = None, max_history: int | None = None
              ) -> list[int]:
        """Item indices of a query's history, or a :class:`BadRequest` naming the field and value (``max_k``,
        ``max_history``: the service's own limits, below the model's)."""
        max_k, max_history = min(self.max_k, max_k or self.max_k), min(self.max_history,
                                                                       max_history or self.max_history)
        if not q.history:
            raise BadRequest(f"{where}history", "empty (expected at least one item id)")
        if len(q.history) > max_history:
            raise BadRequest(f"{where}history", f"{len(q.history)} items; this service takes at most "
                                                f"{max_history} (send the newest)")
        if not 1 <= q.k <= max_k:
            raise BadRequest(f"{where}k", f"{q.k} is out of range (expected 1..{max_k})")
        out = []
        for p, it in enumerate(q.history):
            i = self.index_of(it)
            if i is None:
                raise BadRequest(f"{where}history[{p}]", f"unknown item id {it!r}", status=404)
            out.append(i)
        return out

    def recommend(self, queries: list[Query]) -> list[list[Hit]]:
        """Answers for checked queries, computed together (one batch)."""
        raise NotImplementedError

    def add_items(self, items: list[tuple[str, ItemText]]) -> tuple[list[str], str | None]:
        """Append items and store them beside the model; returns (ids, warning or None)."""
        raise NotImplementedError

    def metadata(self) -> dict:
        return {"family": self.family, "model_dir": str(self.model_dir), "model_version": self.version,
                "catalog_size": len(self.item_ids()), "added_items": self.added, "max_history": self.max_history,
                "max_k": self.max_k, "item_store": str(self.store.root)}

    @property
    def added(self) -> int:
        return self.rec.added

    # ------------------------------------------------------------------------------------------ processes
    def needs_sync(self) -> bool:
        """Whether another process added items this one has not appended yet (one stat call)."""
        return self.store.changed()

    def sync(self) -> None:
        """Append what other server processes added since (O(added); nothing but a stat call when nothing
        changed). Called from the batch thread and worker threads, never on the event loop."""
        if self.store.changed():
            with self.lock:
                self.rec.append_stored(self.store.poll())

    def _add_stored(self, make) -> list[str]:
        """Under the store's file lock: catch up with every process's additions, build the records
        (``make()``: checks ids against the now complete catalog), append them durably, then to the catalog."""
        with self.store.writer() as w, self.lock:
            self.rec.append_stored(self.store.poll())
            try:
                records: list[StoredItem] = make()
            except DataError as e:  # another process added the id after the service's own check
                raise BadRequest("items", e.reason, status=409) from None  # the reason: the field is named once
            w.append(records)
            self.rec.append_stored(records)
        return [r.item_id for r in records]
