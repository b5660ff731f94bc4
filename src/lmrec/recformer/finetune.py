"""RecFormer's two-stage finetuning (Li et al., KDD 2023, §3.4) on the shared run skeleton and loop.

* Stage 1: before every epoch all items are re-encoded into the (frozen) item table; the encoder trains
  against it with a full softmax; validation every ``eval_every`` epochs; early stopping on NDCG@10; the
  best state (weights + the table it was validated with) is kept.
* Stage 2: the best stage-1 state is reloaded, the item table stays exactly as it is, and the encoder
  trains on with its own patience.

``train.samples_per_user`` samples per user per epoch (RecFormer: 1): a random prefix → the next item.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from lmrec.config import RunConfig, with_data_path
from lmrec.data.dataset import PreparedDataset
from lmrec.eval.evaluator import evaluate
from lmrec.io import atomic_dir
from lmrec.modelfiles import check_recformer
from lmrec.recformer.build import build_recommender
from lmrec.recformer.collator import FinetuneCollator
from lmrec.recformer.evaluation import evaluate_all
from lmrec.recformer.recommender import Recommender
from lmrec.training.loop import Stage, data_loader
from lmrec.training.run import Run


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    metrics: dict
    recommender: Recommender  # the final model, in memory (on every rank)


def _reload(rec: Recommender, model_dir: Path) -> None:
    """Load a saved state (weights + item table) into ``rec`` in place (all ranks)."""
    rec.model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    rec.model.set_item_embeddings(load_file(str(model_dir / "item_table.safetensors"))["item_embeddings"])


class ItemTable:
    """Stage 1's item table: encoded before an epoch unless validation just encoded it, and part of every
    checkpoint (a mid-epoch resume restores the table that epoch trained against)."""

    def __init__(self, rec: Recommender, run: Run, batch_size: int):
        self.rec, self.run, self.batch_size, self.fresh = rec, run, batch_size, False

    def encode(self) -> None:
        self.rec.encode_items(self.batch_size, self.run.acc)
        self.fresh = True

    def before_epoch(self, epoch: int) -> None:
        if not self.fresh:
            self.encode()
        self.fresh = False  # training makes it stale

    def state_dict(self) -> dict:
        return {"table": self.rec.model.item_embeddings.cpu(), "fresh": self.fresh}

    def load_state_dict(self, state: dict) -> None:
        self.rec.model.set_item_embeddings(state["table"])
        self.fresh = state["fresh"]


def finetune(cfg: RunConfig, dataset_path: str | Path, log=print) -> FinetuneResult:
    ds = PreparedDataset(dataset_path)  # inputs are checked before the run directory exists
    if cfg.model.init:
        check_recformer(cfg.model.init, "lmrec finetune --init")
    cfg = with_data_path(cfg, dataset_path)  # run_config.yaml names the data it ran on
    with Run(cfg, "finetune", log, inputs=(dataset_path,)) as run:
        rec = build_recommender(cfg, ds, run.dir, run.acc, log)
        rec.model.to(run.acc.device)
        history = _train_two_stages(run, rec, ds)
        _reload(rec, run.dir / "model")
        metrics, test_ranks = evaluate_all(rec, ds, cfg.eval, run.acc, cfg.train.item_batch_size)
        metrics["history"] = history
        metrics["dataset"] = {"path": str(dataset_path), **ds.manifest["counts"],
                              "split": ds.manifest["options"]["split"]}
        run.finish(metrics, test_ranks=test_ranks)
    return FinetuneResult(run.dir, run.dir / "model", metrics, rec)


def _train_two_stages(run: Run, rec: Recommender, ds: PreparedDataset) -> dict:
    """Stage 1, then stage 2 from the best stage-1 state; ``run.dir / "model"`` ends up holding the best."""
    tr, ev = run.cfg.train, run.cfg.eval
    valid = ds.examples("valid")
    known = ds.train_items()  # the softmax never sees items unknown at training time (cold-start items)
    collators = {g: FinetuneCollator(rec.tokenizer, rec.item_tokens, len(rec.item_ids), known, g, tr.item_batch_size)
                 for g in {tr.item_grad, "batch", "none"}}

    def loader_for(item_grad: str):
        def make_loader(epoch: int):
            ex = ds.train_examples(np.random.default_rng(tr.seed * 1000 + epoch), tr.samples_per_user)
            pairs = list(zip(ex.histories, ex.targets.tolist()))
            return data_loader(pairs, batch_size=tr.batch_size, collate_fn=collators[item_grad], seed=tr.seed + epoch,
                               workers=run.loader_workers)
        return make_loader

    table = ItemTable(rec, run, tr.item_batch_size)

    def validate(reencode: bool):
        def run_validation():
            if reencode:
                table.encode()
            return evaluate(rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size), valid,
                            ks=ev.ks, batch_size=ev.batch_size, accelerator=run.acc, desc="validate")
        return run_validation

    run.log(f"stage 1: up to {tr.stage1_epochs} epochs, item table re-encoded before each")
    r1 = run.fit(rec.model, loader_for(tr.item_grad), Stage(
        "stage1", tr.stage1_epochs, tr.lr, validate(True), ev.metric, eval_every=tr.eval_every,
        patience=tr.patience, on_best=run.keep_best(rec.save_pretrained, "stage1_best"),
        before_epoch=table.before_epoch, extra_state=table, log_every=tr.log_every))
    best_dir = run.dir / "stage1_best"
    history = {"stage1": r1.history}
    stage2_won = False
    if tr.stage2_epochs > 0 and best_dir.exists():
        _reload(rec, best_dir)
        run.log(f"stage 2: up to {tr.stage2_epochs} epochs from the best stage-1 state (epoch {r1.best_epoch}), "
                "item table frozen")
        # the table stays frozen: the catalog is never re-encoded in stage 2 (an in-batch term may stay)
        r2 = run.fit(rec.model, loader_for("none" if tr.item_grad == "none" else "batch"), Stage(
            "stage2", tr.stage2_epochs, tr.stage2_lr or tr.lr / 2, validate(False), ev.metric,
            eval_every=tr.eval_every, patience=tr.stage2_patience, on_best=run.keep_best(rec.save_pretrained),
            log_every=tr.log_every),
            global_step=r1.global_step, fallback="the best stage-1 state")
        history["stage2"] = r2.history
        stage2_won = r2.best_metrics.get(ev.metric, -1.0) >= r1.best_metrics.get(ev.metric, -1.0)
    if not stage2_won:
        run.on_main(lambda: _best_of_stage1(rec, best_dir, run.dir / "model", tr.item_batch_size))
    return history


def _best_of_stage1(rec: Recommender, best_dir: Path, out: Path, item_batch_size: int) -> None:
    if best_dir.exists():
        atomic_dir(out, lambda tmp: shutil.copytree(best_dir, tmp, dirs_exist_ok=True))
    else:  # no epoch was run: the initial model
        rec.encode_items(item_batch_size)
        rec.save_pretrained(out)
