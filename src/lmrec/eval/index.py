"""Top-k retrieval by inner product through a faiss index: exact below a catalog size, approximate above.

Serving ranks a whole catalog for every request; at millions of items an exact scan costs a full pass over
the table per query batch, so above ``exact_max`` items an approximate index answers instead — IVF (inverted
lists over k-means cells; builds in seconds) or HNSW (a proximity graph; slower to build, fewer distance
computations per query). Its search breadth (``nprobe`` / ``efSearch``) is raised at build time until the
recall@10 against exact ranking, measured on held-out queries, reaches ``target_recall``; the measured
recall is kept on the index and reported.

Items are only appended (new items without retraining), so a faiss id is the item's catalog index.
Evaluation never goes through here: the standard protocol needs exact ranks (:mod:`lmrec.eval.ranking`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lmrec.errors import LmrecError

KINDS = ("auto", "exact", "ivf", "hnsw")


@dataclass
class IndexReport:
    kind: str  # exact | ivf | hnsw
    items: int
    dim: int
    param: str = ""  # "nprobe=32", "efSearch=64"
    recall_at_10: float | None = None  # against exact ranking, on sample queries; None for exact
    build_s: float = 0.0

    def line(self) -> str:
        if self.kind == "exact":
            return f"exact inner-product index over {self.items:,} items × {self.dim}"
        return (f"{self.kind} index over {self.items:,} items × {self.dim} ({self.param}): recall@10 "
                f"{self.recall_at_10:.4f} against exact ranking; built in {self.build_s:.1f} s")


def _queries_like(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sample queries for the recall check: catalog vectors with noise, renormalised when the catalog is
    unit-norm. Users' vectors live in the items' space (they are scored by the same dot product); an item
    and its neighbourhood is the closest stand-in available at build time."""
    rng = np.random.default_rng(seed)
    q = vectors[rng.integers(0, len(vectors), n)].copy()
    q += rng.standard_normal(q.shape).astype(np.float32) * q.std(0, keepdims=True)
    norms = np.linalg.norm(vectors[: min(len(vectors), 1000)], axis=1)
    if np.allclose(norms, 1.0, atol=1e-3):
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k ids that the approximate top-k found, averaged over queries."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


class ItemIndex:
    """Inner-product top-k over item vectors, with history exclusion and appends."""

    def __init__(self, vectors: np.ndarray, *, kind: str = "auto", exact_max: int = 200_000,
                 target_recall: float = 0.95, check_queries: int = 500, seed: int = 0,
                 log: Callable[[str], None] | None = None):
        import time

        import faiss

        if kind not in KINDS:
            raise LmrecError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        if kind == "auto":
            kind = "exact" if n <= exact_max else "ivf"
        t0 = time.perf_counter()
        if kind == "exact" or n < 1000:
            kind = "exact"
            self.index = faiss.IndexFlatIP(d)
            self.index.add(vectors)
        elif kind == "ivf":
            # √N cells (1,000 at 1M items), k-means on 64 points per cell: seconds to build on 2 cores
            nlist = int(min(max(16, np.sqrt(n)), n // 39))  # faiss wants ≥ 39 training points per cell
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = vectors if n <= 64 * nlist else vectors[rng.choice(n, 64 * nlist, replace=False)]
            self.index.train(train)
            self.index.add(vectors)
        else:
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 80
            self.index.add(vectors)
        self.report = IndexReport(kind=kind, items=n, dim=d)
        if kind != "exact":
            self._tune(vectors, target_recall, check_queries, seed)
        self.report.build_s = round(time.perf_counter() - t0, 2)
        if log is not None:
            log(self.report.line())

    def _tune(self, vectors: np.ndarray, target: float, n_queries: int, seed: int) -> None:
        """Raise the search breadth until recall@10 against an exact scan reaches ``target``."""
        import faiss

        q = _queries_like(vectors, n_queries, seed)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        _, truth = exact.search(q, 10)
        del exact
        if self.report.kind == "ivf":
            limit, value = self.index.nlist, 8
        else:
            limit, value = 4096, 16
        while True:
            self._set_breadth(value)
            _, found = self.index.search(q, 10)
            recall = recall_at(found, truth)
            if recall >= target or value >= limit:
                break
            value = min(limit, value * 2)
        self.report.recall_at_10 = round(recall, 4)

    def _set_breadth(self, value: int) -> None:
        if self.report.kind == "ivf":
            self.index.nprobe = value
            self.report.param = f"nlist={self.index.nlist}, nprobe={value}"
        else:
            self.index.hnsw.efSearch = value
            self.report.param = f"M=32, efSearch={value}"

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Append items; their ids continue the catalog order."""
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.report.items = self.size

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item indices) of the k best items per query, (B, k) each, best first. Excluded items and
        items with a non-finite score (a NaN vector) never appear; rows that run out of items are padded with
        score -inf and index -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        extra = max((len(set(h)) for h in exclude), default=0) if exclude is not None else 0
        kk = min(self.size, k + extra)
        scores, ids = self.index.search(queries, kk)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        for b in range(len(queries)):
            keep = (ids[b] >= 0) & np.isfinite(scores[b])
            if exclude is not None:
                keep &= ~np.isin(ids[b], np.asarray(exclude[b], dtype=np.int64))
            s, i = scores[b][keep][:k], ids[b][keep][:k]
            out_s[b, : len(s)], out_i[b, : len(i)] = s, i
        return out_s, out_i


def top_k(index: ItemIndex, queries, k: int, histories, *, exclude_history: bool = True, exclude=None):
    """The k best items per query row from ``index`` as tensors ``(scores, item indices)``, (B, k) each;
    ``exclude`` (items per row) overrides ``exclude_history`` (each row's own history). Rows with fewer than k
    items left end with score -inf and index -1. Shared by every recommender that retrieves through an index."""
    import torch

    if k < 1:
        raise LmrecError(f"k must be at least 1, got {k}")
    scores, items = index.search(queries.cpu().numpy(), min(k, index.size),
                                 exclude=exclude if exclude is not None else histories if exclude_history else None)
    return torch.from_numpy(scores), torch.from_numpy(items)
