"""The Python API, mirroring the CLI, for both families on one data layout.

```python
>>> import lmrec
>>> data = lmrec.prepare("ml-100k", "data/ml-100k")
>>> run = lmrec.finetune(data, output_dir="runs/ml-100k", overrides=["train.stage1_epochs=4"])   # RecFormer
>>> lmrec.evaluate(run.model_dir, data)["ndcg@10"]
>>> lmrec.recommend(run.model_dir, ["50", "181", "258"], k=5)
>>> lmrec.build_semantic_ids(data, "sids", recommender=run.model_dir)                             # generative
>>> lmrec.expand_vocab("sids", "models/qwen-sid", data=data)          # model=None: the embedded tiny Qwen3
>>> g = lmrec.train_generative(data, "sids", "models/qwen-sid", output_dir="runs/g2", stage="2")
>>> lmrec.evaluate_generative(g.model_dir, data, "sids")["test"]["ndcg@10"]
>>> lmrec.recommend_generative(g.model_dir, data, "sids", ["50", "181", "258"], k=5)
```
"""

from __future__ import annotations

import json
from pathlib import Path

from lmrec.errors import LmrecError
from lmrec.io import atomic_file


def load_raw(source: str | Path, *, fmt: str = "auto", items: str | Path | None = None, user_col: str = "user_id",
             item_col: str = "item_id", time_col: str = "timestamp", text: list[str] | None = None, log=print):
    """Read a source into RawData. ``source`` is ``"ml-100k"``, a RecBole ``.inter`` file, an Amazon
    reviews JSON-lines file (``fmt="amazon"``, ``items`` = the meta file), or any table (``fmt="table"``)."""
    from lmrec.data import sources

    if str(source) == "ml-100k":
        return sources.load_ml100k(log)
    path = Path(source)
    if fmt == "auto":
        fmt = "recbole" if path.suffix == ".inter" else "table"
    if fmt == "recbole":
        item_path = Path(items) if items else path.with_suffix(".item")
        return sources.load_recbole(path, item_path, text, user_col=user_col, item_col=item_col, time_col=time_col)
    if fmt == "amazon":
        if items is None:
            raise LmrecError("the amazon format needs the meta file (--items meta_X.json)")
        return sources.load_amazon(path, items)
    if fmt == "table":
        if not text:
            raise LmrecError("name the item text columns (--text title,brand or key=column entries)")
        return sources.load_generic(path, user_col=user_col, item_col=item_col, time_col=time_col, text=text,
                                    items_path=items)
    raise LmrecError(f"unknown format {fmt!r} (expected auto, recbole, amazon or table)")


def prepare(source: str | Path, out_dir: str | Path, *, overwrite: bool = False, log=print, **options) -> Path:
    """Prepare a dataset directory. Reader options (fmt, items, user_col, item_col, time_col, text) and
    :class:`~lmrec.data.prepare.PrepareOptions` fields (k_core, max_history_len, split, cold_ratio, seed)."""
    from lmrec.data.prepare import PrepareOptions
    from lmrec.data.prepare import prepare as _prepare

    reader_keys = {"fmt", "items", "user_col", "item_col", "time_col", "text"}
    raw = load_raw(source, log=log, **{k: v for k, v in options.items() if k in reader_keys})
    opts = PrepareOptions(**{k: v for k, v in options.items() if k not in reader_keys})
    return _prepare(raw, out_dir, opts, overwrite=overwrite)


def finetune(data: str | Path, *, output_dir: str | Path | None = None, config: str | Path | None = None,
             overrides: list[str] | None = None, log=print):
    """Two-stage RecFormer finetuning; returns a result with ``run_dir``, ``model_dir`` and ``metrics``."""
    from lmrec.config import load_config
    from lmrec.recformer.finetune import finetune as _finetune

    ov = list(overrides or [])
    if output_dir is not None:
        ov.append(f"output_dir={output_dir}")
    return _finetune(load_config(config, ov), data, log=log)


def evaluate(model_dir: str | Path, data: str | Path, *, split: str = "test", exclude_history: bool = False,
             ks=(10, 20, 50), batch_size: int = 64, candidates: str = "all", with_baselines: bool = False,
             device: str = "auto") -> dict:
    """Metrics of a saved recommender on a prepared dataset (items it never saw are encoded on the fly), on
    ``device`` (``auto``: the accelerator when one is present; ``cpu``, ``cuda``, ``cuda:N``).

    ``candidates="new"`` ranks each target among the items never seen before test time only (no training
    interaction, no validation target): the new-item protocol of zero-shot evaluation, for cold-start test
    splits. ``with_baselines`` returns ``{"test": metrics, "baselines": {...}}``: the expected metrics of a random
    ranking, and popularity (interactions in the training part) on a full ranking — among new items only it
    would rank every target last."""
    import numpy as np

    from lmrec.data.dataset import PreparedDataset
    from lmrec.eval.baselines import popularity_rank_fn, random_expectation
    from lmrec.eval.evaluator import evaluate as _evaluate

    if candidates not in ("all", "new"):
        raise LmrecError(f"candidates must be 'all' or 'new', got {candidates!r}")
    ds = PreparedDataset(data)
    examples = ds.examples(split)
    pool = None
    if candidates == "new":
        pool = ds.new_items()
        seen = ~np.isin(examples.targets, pool)
        if seen.any():
            raise LmrecError(f"{data}: --candidates new ranks only the {len(pool)} items never seen before test "
                             f"time, but {seen.sum()} of the {len(examples)} {split} targets were seen (first: "
                             f"item {ds.item_ids[examples.targets[seen][0]]!r}); use it on a cold-start split "
                             f"(`lmrec data prepare ... --split cold`)")
    rec = load_recommender(model_dir, device).ready_for(ds.item_ids, ds.item_text)
    metrics = _evaluate(rec.rank_fn(exclude_history=exclude_history, candidates=pool), examples, ks=ks,
                        batch_size=batch_size, desc=split)
    if not with_baselines:
        return metrics
    baselines = {}
    if pool is None:
        baselines["popularity"] = _evaluate(popularity_rank_fn(ds, exclude_history=exclude_history), examples, ks=ks,
                                            batch_size=batch_size, desc="popularity")
    baselines["random"] = random_expectation(examples, ds.num_items, ks=ks, exclude_history=exclude_history,
                                             candidates=pool)
    return {"test": metrics, "baselines": baselines}


def recommend_all(model_dir: str | Path, data: str | Path, out: str | Path, *, k: int = 10,
                  exclude_history: bool = True, batch_size: int = 256, device: str = "auto") -> Path:
    """Top-k items for every user of a prepared dataset, from the user's whole sequence (all splits, the
    newest ``max_history_len`` items), written atomically to a parquet file with one row per
    recommendation: ``user_id``, ``rank`` (1 = best), ``item_id``, ``score`` (cosine / temperature)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from lmrec.data.dataset import PreparedDataset
    from lmrec.progress import progress

    out = Path(out)
    if out.suffix != ".parquet":
        raise LmrecError(f"--out {out}: expected a .parquet file name")
    if k < 1:
        raise LmrecError(f"k must be at least 1, got {k}")
    ds = PreparedDataset(data)
    rec = load_recommender(model_dir, device, "lmrec recommend-all").ready_for(ds.item_ids, ds.item_text)
    seqs = pq.read_table(ds.path / "sequences.parquet", columns=["user_id", "items"]).to_pydict()
    m = ds.max_history_len
    users, ranks, item_ids, scores = [], [], [], []
    for s in progress(range(0, len(seqs["user_id"]), batch_size), "recommend"):
        hist = [np.asarray(h[-m:], dtype=np.int64) for h in seqs["items"][s : s + batch_size]]
        keep = [i for i, h in enumerate(hist) if len(h)]
        if not keep:
            continue
        hist = [hist[i] for i in keep]
        sc, ix = rec.top_k(hist, k, exclude_history=exclude_history)
        for row, i in enumerate(keep):
            n = int(torch.isfinite(sc[row]).sum())  # with the history excluded, fewer than k may remain
            users += [seqs["user_id"][s + i]] * n
            ranks += list(range(1, n + 1))
            item_ids += [rec.item_ids[j] for j in ix[row, :n].tolist()]
            scores += sc[row, :n].tolist()
    table = pa.table({"user_id": users, "rank": pa.array(ranks, pa.int32()), "item_id": item_ids,
                      "score": pa.array(scores, pa.float32())})
    return atomic_file(out, lambda tmp: pq.write_table(table, tmp))


def recommend(model_dir: str | Path, history: list[str], k: int = 10, *, exclude_history: bool = True,
              device: str = "auto"):
    """[(item_id, [(key, value), ...], score), ...] for a history of item ids (oldest → newest)."""
    return load_recommender(model_dir, device, "lmrec recommend").recommend(history, k,
                                                                            exclude_history=exclude_history)


def load_recommender(model_dir: str | Path, device: str = "auto", command: str = "lmrec evaluate"):
    """The saved recommender in ``model_dir`` on ``device``: a RecFormer model (``model_type`` recformer), a
    trained ID baseline (``lmrec baseline``'s ``model/``, model_type lmrec-idrec) or a fused one (an ID model
    × the generative model: ``fusion.json``, on the dataset it was fused on); all of them rank and recommend
    through the same calls."""
    from lmrec.fusion import FusedRecommender, is_fused_model
    from lmrec.idrec.recommender import IdRecommender
    from lmrec.modelfiles import check_recommender, loading
    from lmrec.recformer.recommender import Recommender

    if is_fused_model(model_dir):
        return FusedRecommender.load(model_dir, device=_device(device), command=command)

    fam = check_recommender(model_dir, command=command)  # every file checked before any is loaded
    with loading(model_dir):
        if fam == "idrec":
            return IdRecommender.from_pretrained(model_dir, _device(device))
        return Recommender.from_pretrained(model_dir, _device(device))


def model_label(model_dir: str | Path) -> str:
    """What a saved recommender is, for a table's row: RecFormer, SASRec / GRU4Rec / the hybrid, or a fusion."""
    from lmrec.fusion import is_fused_model
    from lmrec.idrec import NAMES, SHORT_NAMES
    from lmrec.idrec.recommender import is_id_model

    def id_name(d, names=NAMES) -> str:
        try:
            return names.get(json.loads((Path(d) / "config.json").read_text()).get("arch"), "ID model")
        except (OSError, ValueError):
            return "ID model"

    if is_fused_model(model_dir):
        from lmrec.fusion import read_spec

        return f"fusion ({id_name(read_spec(model_dir)['id_model'], SHORT_NAMES)} × generative)"
    if is_id_model(model_dir):
        return id_name(model_dir)
    return "RecFormer"


def _device(spec: str):
    from lmrec.training.distributed import inference_device

    return inference_device(spec)


# --------------------------------------------------------------------------------------------- generative
def build_semantic_ids(data: str | Path, out: str | Path, *, recommender: str | Path | None = None,
                       encoder: str | Path | None = None, levels: int = 3, codes: int | None = None, seed: int = 0,
                       log=print):
    """Semantic IDs of a dataset's items, from a saved RecFormer's item table or from the item text."""
    from lmrec.pipeline import semantic_ids

    return semantic_ids(data, out, recommender=recommender, encoder=encoder, levels=levels, codes=codes,
                        seed=seed, log=log)


def expand_vocab(sids: str | Path, out: str | Path, *, model: str | Path | None = None,
                 data: str | Path | None = None, init: str = "codebook", log=print) -> dict:
    """New tokens for every code of ``sids`` in a local language model (None: the embedded tiny Qwen3,
    whose tokenizer is trained on ``data``'s item text)."""
    from lmrec.generative.api import expand_model

    return expand_model(model, sids, out, data=data, init=init, log=log)


def train_generative(data: str | Path, sids: str | Path, model: str | Path, *, output_dir: str | Path,
                     stage: str = "2", config: str | Path | None = None, overrides: list[str] | None = None,
                     log=print):
    """One generative stage ("1", "2" or "sft"; see ``lmrec.generative.stages``); returns a result with
    ``run_dir``, ``model_dir`` and ``metrics``."""
    from lmrec.config import GenRunConfig, load_config
    from lmrec.generative.train import train_generative as _train

    cfg = load_config(config, [f"output_dir={output_dir}", f"train.stage={stage}", *(overrides or [])],
                      schema=GenRunConfig)
    return _train(cfg, model_dir=model, data=data, sids_dir=sids, log=log)


def evaluate_generative(model_dir: str | Path, data: str | Path, sids: str | Path, *, split: str = "test",
                        beams: int = 50, ks=(10, 20, 50), batch_size: int = 32, device: str = "auto",
                        exclude_history: bool = False) -> dict:
    """Constrained-beam-search metrics: ``{"test": ..., "baselines": {...}}``."""
    from lmrec.generative.api import evaluate_generative as _evaluate

    return _evaluate(model_dir, data, sids, split=split, beams=beams, ks=ks, batch_size=batch_size, device=device,
                     exclude_history=exclude_history)


def recommend_generative(model_dir: str | Path, data: str | Path, sids: str | Path, history: list[str],
                         k: int = 10, *, beams: int | None = None, device: str = "auto"):
    """[(item_id, [(key, value), ...], score), ...]: the top-k distinct real items by constrained beam search."""
    from lmrec.generative.recommender import GenerativeRecommender

    return GenerativeRecommender.load(model_dir, data, sids, device=_device(device)).recommend(history, k, beams)
