"""Pipelines across the two families (above both, so neither imports the other): the RecFormer →
semantic-ID hand-off, and the quickstart's generative run.

A trained RecFormer's item table is a good source of semantic IDs (items that the same users consume get
close vectors; the text alone says little about who watches a movie): ``item_vectors`` takes it from a
saved recommender, encoding the table first when the recommender was saved without one or for another
catalog.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The quickstart's generative run (and `lmrec compare`'s): 3 epochs on a CPU budget (more keep improving),
# validated once at the end (every run so far improved each epoch), the LM head only on the answer's tokens
# (the chunked loss: the same loss, a quarter less time per step), and a terse prompt (the item IDs alone:
# 2.2x fewer tokens than the worded default for the embedded model trained from scratch; ml-100k seed 42:
# test NDCG@10 0.0429 vs 0.0424 with the words, 480 s vs ~700 s on 2 busy cores).
GEN_QUICKSTART = ["train.epochs=3", "train.eval_every=3", "train.loss_chunk_tokens=4096", "train.log_every=50",
                  "data.prompt='{history}'"]


def item_vectors(recommender: str | Path, data: str | Path) -> np.ndarray:
    """Unit-norm item vectors of a saved RecFormer recommender, one row per item of ``data`` in its order."""
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.recommender import Recommender

    ds = PreparedDataset(data)
    rec = Recommender.from_pretrained(recommender).ready_for(ds.item_ids, ds.item_text)  # its saved table
    emb = rec.model.item_embeddings.float().cpu().numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-8)


def semantic_ids(data, out, *, recommender=None, encoder=None, levels: int = 3, codes: int | None = None,
                 seed: int = 0, log=print):
    """``lmrec sid build``: from a recommender's item table, or from the item text through ``encoder``."""
    from lmrec.generative.api import build_semantic_ids

    vectors = item_vectors(recommender, data) if recommender is not None else None
    return build_semantic_ids(data, out, encoder=encoder, embeddings=vectors,
                              source=f"recformer:{recommender}" if recommender is not None else None,
                              levels=levels, codes=codes, seed=seed, log=log)


def generative_pipeline(data, out_dir, *, model=None, recommender=None, encoder=None, stages=("2",),
                        init: str = "codebook", overrides: list[str] | None = None, log=print) -> dict:
    """Semantic IDs → vocabulary expansion → the given training stages (each from the previous one's best
    model) → the last stage's metrics. What `lmrec quickstart` runs for its generative row."""
    from lmrec.generative.api import expand_model, train_stages

    out_dir = Path(out_dir)
    sids = out_dir / "sids"
    semantic_ids(data, sids, recommender=recommender, encoder=encoder, log=log)
    expand_model(model, sids, out_dir / "expanded", data=data, init=init, log=log)
    return train_stages(data, sids, out_dir / "expanded", out_dir, stages=stages, overrides=overrides, log=log)
