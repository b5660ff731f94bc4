"""``lmrec baseline sasrec|gru4rec``: an ID-based sequential model trained on every position of every
training sequence, validated and tested by the shared evaluator on the same split as both language-model
families, next to popularity and the random expectation.

Training data: each user's training sequence ``s`` gives inputs ``s[:-1]`` and next-item targets ``s[1:]``.
A sequence longer than ``max_len`` is cut into windows of ``max_len`` positions, ``max_len / 2`` apart,
each target trained once per epoch and with at least ``max_len / 2`` items of context after the first
window (RecBole trains one sample per prefix, each with its last ``max_len`` items: the same targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmrec.config import IdRunConfig, with_data_path
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines, new_items_protocol
from lmrec.eval.evaluator import RankFn, dot_rank_fn, evaluate
from lmrec.eval.ranking import DEFAULT_CHUNK
from lmrec.idrec import NAMES
from lmrec.idrec.models import IdRecConfig, IdSeqRec
from lmrec.idrec.recommender import save_id_model
from lmrec.training.loop import Stage, data_loader
from lmrec.training.run import Run


@dataclass
class BaselineResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


def training_windows(sequences: list[np.ndarray], max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs as item index + 1, labels with -100 where a target was trained by an earlier window)."""
    stride = max(1, max_len // 2)
    out = []
    for s in sequences:
        x, y = s[:-1] + 1, s[1:]
        m = len(x)
        if m == 0:
            continue
        ends = [min(m, max_len)]
        while ends[-1] < m:
            ends.append(min(m, ends[-1] + stride))
        done = 0
        for e in ends:
            lo = max(0, e - max_len)
            labels = y[lo:e].copy()
            labels[: done - lo] = -100
            out.append((x[lo:e], labels))
            done = e
    return out


def _batch(windows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    width = max(len(x) for x, _ in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    labels = torch.full((len(windows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(windows):
        ids[i, : len(x)] = torch.as_tensor(x)
        labels[i, : len(y)] = torch.as_tensor(y)
    return {"input_ids": ids, "labels": labels}


def rank_fn(model: IdSeqRec, *, exclude_history: bool = False, chunk_size: int = DEFAULT_CHUNK,
            candidates: np.ndarray | None = None) -> RankFn:
    """Full ranking of every item (or of ``candidates``) for each history (its last ``max_len`` items), by
    the model in eval mode (the item table too: the hybrid's training-time ID dropout must not reach it)."""
    m = model.config.max_len
    model.eval()

    @torch.no_grad()
    def queries(histories: list[np.ndarray]) -> torch.Tensor:
        model.eval()
        hist = [h[-m:] for h in histories]
        ids = torch.zeros(len(hist), max(1, max(len(h) for h in hist)), dtype=torch.long)
        for i, h in enumerate(hist):
            ids[i, : len(h)] = torch.as_tensor(h + 1)
        lengths = torch.as_tensor([max(1, len(h)) for h in hist])
        dev = model.device
        return model.user_vectors(ids.to(dev), lengths.to(dev)).float()

    return dot_rank_fn(queries, model.item_vectors().detach().float(), exclude_history=exclude_history,
                       chunk_size=chunk_size, candidates=candidates)


def _init_state(source: str, config: IdRecConfig, item_ids: list[str]) -> dict[str, torch.Tensor]:
    """``model.init_from``: every weight the saved model shares with a ``config`` model (same names, same
    shapes), on the same catalog — checked before the run directory exists. What the model has beyond it (the
    hybrid's text projection) starts as built; the hybrid's text buffers always come from this run's text."""
    from safetensors.torch import load_file

    from lmrec.data.prepare import read_items
    from lmrec.idrec.recommender import is_id_model
    from lmrec.modelfiles import check_recommender

    src = Path(source)
    if not is_id_model(src) or not (src / "model.safetensors").is_file() or not (src / "items.parquet").is_file():
        raise LmrecError(f"model.init_from {source}: not a trained ID model (expected config.json of model_type "
                         f"{IdRecConfig.model_type}, model.safetensors, items.parquet: `lmrec baseline`'s run/model)")
    check_recommender(src, "lmrec baseline", option="model.init_from")
    if read_items(src / "items.parquet")[0] != list(item_ids):
        raise LmrecError(f"model.init_from {source}: its catalog is not this dataset's (train it on the same data)")
    with torch.device("meta"):
        own = IdSeqRec(config).state_dict()
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
             if k in own and k not in ("text_vectors", "known")}
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
             if v.shape != own[k].shape]
    if wrong:
        raise LmrecError(f"model.init_from {source}: sizes differ from this model's: {', '.join(wrong[:3])} (give "
                         "the same model.hidden_size, layers, heads, inner_size and max_len)")
    if not state:
        raise LmrecError(f"model.init_from {source}: no weight in common with a {config.arch} model")
    return state


def train_baseline(cfg: IdRunConfig, data: str | Path, log=print, text_vectors: np.ndarray | None = None
                   ) -> BaselineResult:
    """Train ``cfg.model.arch`` on ``data`` with early stopping on validation; test the best state. The hybrid
    takes ``text_vectors``: one row per item of ``data`` (made above the families, e.g. by
    ``lmrec.pipeline.text_vectors``)."""
    ds = PreparedDataset(data)
    if (cfg.model.arch == "hybrid") != (text_vectors is not None):
        raise LmrecError("the hybrid takes the items' text vectors (and only the hybrid does): see "
                         "lmrec.pipeline.text_vectors")
    if text_vectors is not None and len(text_vectors) != ds.num_items:
        raise LmrecError(f"{len(text_vectors)} text vectors for the {ds.num_items} items of {data}")
    cfg = with_data_path(cfg, data)  # run_config.yaml names the data it ran on
    mc, tr, ev = cfg.model.resolved(), cfg.train, cfg.eval
    windows = training_windows(ds.train, mc.max_len)
    log(f"{NAMES[mc.arch]}: {len(windows)} training windows, {sum(int((y >= 0).sum()) for _, y in windows)} "
        f"targets per epoch")
    text_dim = 0 if text_vectors is None else text_vectors.shape[1]
    model_config = IdRecConfig(num_items=ds.num_items, text_dim=text_dim, **mc.model_dump())
    init = None if mc.init_from is None else _init_state(mc.init_from, model_config, ds.item_ids)
    with Run(cfg, f"baseline_{mc.arch}", log, inputs=(data,)) as run:
        torch.manual_seed(tr.seed)
        model = IdSeqRec(model_config)
        if text_vectors is not None:
            known = torch.zeros(ds.num_items, dtype=torch.bool)
            known[torch.as_tensor(np.concatenate([*ds.train, np.zeros(0, np.int64)]))] = True
            model.set_text(torch.as_tensor(text_vectors, dtype=torch.float32), known)
            log(f"hybrid: {int(known.sum())} items with an ID vector, {ds.num_items - int(known.sum())} by their "
                f"text alone; text vectors of width {text_dim}")
        if init is not None:
            model.load_state_dict(init, strict=False)
            new = sorted(k for k in model.state_dict() if k not in init and k not in ("text_vectors", "known"))
            log(f"initialised from {mc.init_from}: {len(init)} tensors" + (f"; new: {', '.join(new)}" if new else ""))
        model = model.to(run.acc.device)
        kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=run.acc)
        best = run.dir / "model"

        def make_loader(epoch: int):
            order = np.random.default_rng(tr.seed * 1000 + epoch).permutation(len(windows))
            batches = [[windows[i] for i in order[s : s + tr.batch_size]] for s in range(0, len(order), tr.batch_size)]
            return data_loader(batches, collate_fn=_batch, seed=tr.seed + epoch)

        plan = Stage(mc.arch, tr.epochs, tr.lr, metric=ev.metric, patience=tr.patience, log_every=tr.log_every,
                     validate=lambda: evaluate(rank_fn(model, exclude_history=ev.exclude_history),
                                               ds.examples("valid"), desc="validate", **kw),
                     on_best=run.keep_best(lambda out: save_id_model(model, ds.item_ids, ds.item_text, out)))
        r = run.fit(model, make_loader, plan)
        trained = IdSeqRec.from_pretrained(best).to(run.acc.device)
        test, ranks = evaluate(rank_fn(trained, exclude_history=ev.exclude_history), examples := ds.examples("test"),
                               desc="test", return_ranks=True, **kw)
        metrics = {"model": NAMES[mc.arch], "valid": r.best_metrics, "best_epoch": r.best_epoch,
                   "epochs_run": r.epochs_run, "history": r.history, "test": test,
                   "baselines": baselines(ds, "test", exclude_history=ev.exclude_history, **kw)}
        # a cold-start split: the new items ranked among themselves (the hybrid by their text; an ID model's
        # vectors for them never trained, so it shows what a model without text can do there: about random)
        new = new_items_protocol(ds, lambda c: rank_fn(trained, exclude_history=ev.exclude_history, candidates=c),
                                 exclude_history=ev.exclude_history, **kw)
        if new is not None:
            metrics["test_new_items"] = new
        run.finish(metrics, test_ranks=(examples, ranks))
    return BaselineResult(run.dir, best, metrics)
