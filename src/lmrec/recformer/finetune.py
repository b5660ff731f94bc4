"""RecFormer's two-stage finetuning (Li et al., KDD 2023, §3.4) on the shared training loop.

* Stage 1: before every epoch all items are re-encoded into the (frozen) item table; the encoder trains
  against it with a full softmax; validation every ``eval_every`` epochs; early stopping on NDCG@10; the
  best state (weights + the table it was validated with) is kept.
* Stage 2: the best stage-1 state is reloaded, the item table stays exactly as it is, and the encoder
  trains on with its own patience.

``train.samples_per_user`` samples per user per epoch (RecFormer: 1): a random prefix → the next item.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lmrec.config import RunConfig, save_config
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines, random_expectation
from lmrec.eval.evaluator import evaluate
from lmrec.io import atomic_dir
from lmrec.recformer.backbones import build_default_backbone, build_recformer, resolve_backbone
from lmrec.recformer.recommender import Recommender
from lmrec.training.loop import accelerator_for, data_loader, fit, fit_options


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    metrics: dict
    recommender: Recommender  # the final model, in memory (on every rank)


def build_recommender(cfg: RunConfig, ds: PreparedDataset, run_dir: Path, accelerator, log=print) -> Recommender:
    """From ``model.init`` (a saved recommender, or a RecFormer checkpoint without a catalog such as the
    output of ``lmrec backbone init`` / ``lmrec checkpoint convert``), a backbone directory, or the embedded
    default."""
    m = cfg.model
    if m.init and (Path(m.init) / "items.parquet").exists():
        rec = Recommender.from_pretrained(m.init)
        if rec.item_ids != ds.item_ids:
            rec.set_catalog(ds.item_ids, ds.item_text)
        return rec
    backbone = backbone_or_default(m, ds.item_text, run_dir, accelerator, cfg.train.seed, log)
    model, tokenizer, report = build_recformer(
        backbone, max_token_num=m.max_token_num, max_attr_num=m.max_attr_num, max_attr_length=m.max_attr_length,
        max_item_embeddings=ds.max_history_len + 1, temperature=m.temperature, pooler_type=m.pooler_type,
        user_projection=m.user_projection,
        attention_window=m.attention_window,
    )
    problems = report.problems()
    if problems:
        raise LmrecError(f"{backbone} does not initialise RecFormer completely ({', '.join(problems[:5])}"
                         f"{' ...' if len(problems) > 5 else ''}); see `lmrec backbone init {backbone} OUT`")
    log(f"initialised from {backbone}: " + ", ".join(f"{v} {k}" for k, v in report.counts().items() if v))
    return Recommender(model, tokenizer, ds.item_ids, ds.item_text)


def backbone_or_default(m, item_text, run_dir: Path, accelerator, seed: int, log=print) -> Path:
    """``model.init``, else ``model.backbone`` (or $LMREC_BACKBONE / $MODEL_NAME_OR_PATH), else the embedded
    default built once in ``run_dir/backbone`` (its tokenizer trained on ``item_text``; a resumed run
    reuses it)."""
    backbone = Path(m.init) if m.init else resolve_backbone(m.backbone)
    if backbone is None:
        backbone = run_dir / "backbone"
        if accelerator.is_main_process and not (backbone / "config.json").exists():
            log(f"building the embedded default backbone in {backbone} (tokenizer trained on the item text)")
            texts = [" ".join(f"{k} {v}" for k, v in t) for t in item_text]
            build_default_backbone(texts, backbone, hidden_size=m.default_hidden_size, layers=m.default_layers,
                                   heads=m.default_heads, vocab_size=m.default_vocab_size,
                                   max_positions=m.max_token_num, attention_window=_first(m.attention_window),
                                   seed=seed)
        accelerator.wait_for_everyone()
    return backbone


def make_collate(rec: Recommender, item_grad: str, candidates: np.ndarray, item_batch_size: int = 256):
    """(history, target) pairs → a model batch: ``labels`` as positions in ``candidates`` (the items known
    at training time), plus what ``item_grad`` needs: ``target_inputs`` (the targets tokenized alone) for
    "batch", the candidates' text for "all", the ``candidates`` rows of the frozen table otherwise."""
    position = np.full(len(rec.item_ids), -1)
    position[candidates] = np.arange(len(candidates))
    catalog = rec.catalog_inputs(candidates, item_batch_size) if item_grad == "all" else None
    cand = torch.as_tensor(candidates)

    def collate(pairs):
        out = rec.batch([h for h, _ in pairs], device="cpu")
        out["labels"] = torch.as_tensor(position[[int(t) for _, t in pairs]])
        if item_grad == "all":
            out["item_inputs"], out["item_order"] = catalog
        else:
            out["candidates"] = cand
            if item_grad == "batch":
                out["target_inputs"] = rec.batch([[int(t)] for _, t in pairs], device="cpu")
        return out

    return collate


def _first(w):
    return w if isinstance(w, int) else w[0]


def _reload(rec: Recommender, model_dir: Path) -> None:
    """Load a saved state (weights + item table) into ``rec`` in place (all ranks)."""
    rec.model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    rec.model.set_item_embeddings(load_file(str(model_dir / "item_table.safetensors"))["item_embeddings"])


def finetune(cfg: RunConfig, dataset_path: str | Path, log=print) -> FinetuneResult:
    t0 = time.time()
    run_dir = Path(cfg.output_dir)
    acc = accelerator_for(run_dir, cfg.train)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "run_config.yaml")
    acc.wait_for_everyone()
    acc.init_trackers("finetune")
    ds = PreparedDataset(dataset_path)
    rec = build_recommender(cfg, ds, run_dir, acc, log)
    rec.model.to(acc.device)
    tr, ev = cfg.train, cfg.eval
    valid = ds.examples("valid")

    known = ds.train_items()  # the softmax never sees items unknown at training time (cold-start items)
    collators = {g: make_collate(rec, g, known, tr.item_batch_size) for g in {tr.item_grad, "batch", "none"}}

    def make_loader(epoch: int, item_grad: str = tr.item_grad):
        ex = ds.train_examples(np.random.default_rng(tr.seed * 1000 + epoch), tr.samples_per_user)
        pairs = list(zip(ex.histories, ex.targets.tolist()))
        return data_loader(pairs, batch_size=tr.batch_size, collate_fn=collators[item_grad], seed=tr.seed + epoch)

    n_train = sum(min(tr.samples_per_user, len(t) - 1) for t in ds.train if len(t) >= 2)
    steps = math.ceil(math.ceil(n_train / tr.batch_size) / tr.grad_accum)
    table_fresh = {"value": False}

    def encode_table():
        rec.encode_items(tr.item_batch_size, acc)
        table_fresh["value"] = True

    def before_epoch_stage1(epoch: int):
        if not table_fresh["value"]:
            encode_table()
        table_fresh["value"] = False  # training makes it stale

    def validate(reencode: bool):
        def run():
            if reencode:
                encode_table()
            return evaluate(rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size), valid,
                            ks=ev.ks, batch_size=ev.batch_size, accelerator=acc, desc="validate")
        return run

    def keep(name: str):
        def on_best(metrics, epoch):
            if acc.is_main_process:
                rec.save_pretrained(run_dir / name)
            acc.wait_for_everyone()
        return on_best

    class TableState:  # stage 1's item table is encoded before an epoch: a mid-epoch resume restores it
        def state_dict(self):
            return {"table": rec.model.item_embeddings.cpu(), "fresh": table_fresh["value"]}

        def load_state_dict(self, state):
            rec.model.set_item_embeddings(state["table"])
            table_fresh["value"] = state["fresh"]

    # one Checkpointing (and one resume plan) for both stages
    common = dict(steps_per_epoch=steps, eval_every=tr.eval_every, metric=ev.metric, **fit_options(run_dir, tr),
                  log=log)
    log(f"stage 1: up to {tr.stage1_epochs} epochs, item table re-encoded before each")
    r1 = fit(acc, rec.model, make_loader, epochs=tr.stage1_epochs, lr=tr.lr, before_epoch=before_epoch_stage1,
             validate=validate(True), patience=tr.patience, on_best=keep("stage1_best"), tag="stage1",
             extra_state=TableState(), **common)
    best_dir = run_dir / "stage1_best"
    history = {"stage1": r1.history}
    stage2_won = False
    if tr.stage2_epochs > 0 and best_dir.exists():
        _reload(rec, best_dir)
        log(f"stage 2: up to {tr.stage2_epochs} epochs from the best stage-1 state (epoch {r1.best_epoch}), "
            "item table frozen")
        # the table stays frozen: the catalog is never re-encoded in stage 2 (an in-batch term may stay)
        stage2_grad = "none" if tr.item_grad == "none" else "batch"
        r2 = fit(acc, rec.model, functools.partial(make_loader, item_grad=stage2_grad), epochs=tr.stage2_epochs,
                 lr=tr.stage2_lr or tr.lr / 2, validate=validate(False), patience=tr.stage2_patience,
                 on_best=keep("model"), tag="stage2", global_step=r1.global_step, **common)
        history["stage2"] = r2.history
        stage2_won = r2.best_metrics.get(ev.metric, -1.0) >= r1.best_metrics.get(ev.metric, -1.0)
    if not stage2_won and acc.is_main_process:  # the best stage-1 state is the model
        if best_dir.exists():
            atomic_dir(run_dir / "model", lambda tmp: shutil.copytree(best_dir, tmp, dirs_exist_ok=True))
        else:  # no epoch was run: the initial model
            rec.encode_items(tr.item_batch_size)
            rec.save_pretrained(run_dir / "model")
    acc.wait_for_everyone()
    _reload(rec, run_dir / "model")
    metrics = evaluate_all(rec, ds, cfg, acc)
    metrics["history"] = history
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    metrics["dataset"] = {"path": str(dataset_path), **ds.manifest["counts"], "split": ds.manifest["options"]["split"]}
    if acc.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    acc.end_training()
    return FinetuneResult(run_dir, run_dir / "model", metrics, rec)


def evaluate_all(rec: Recommender, ds: PreparedDataset, cfg: RunConfig, acc=None) -> dict:
    """Test and valid metrics of the recommender and of popularity, on the same split."""
    ev = cfg.eval
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=acc)
    out: dict = {}
    if not rec.has_item_table:
        rec.encode_items(cfg.train.item_batch_size, acc)
    for split in ("test", "valid"):
        out[split] = evaluate(rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size),
                              ds.examples(split), desc=split, **kw)
    for split, key in (("test", "baselines"), ("valid", "baselines_valid")):
        out[key] = baselines(ds, split, exclude_history=ev.exclude_history, **kw)
    new = evaluate_new_items(rec, ds, cfg.eval, acc)
    if new is not None:
        out["test_new_items"] = new
    return out


def evaluate_new_items(rec: Recommender, ds: PreparedDataset, ev, acc=None) -> dict | None:
    """On a cold-start split, the new-item protocol next to full ranking: each test target ranked among
    the items never seen before test time, with the random expectation for that candidate set.
    ``{"test": ..., "baselines": {"random": ...}}``; None on other splits."""
    if ds.manifest["options"].get("split") != "cold":
        return None
    examples, new = ds.examples("test"), ds.new_items()
    if not len(examples) or not np.isin(examples.targets, new).all():
        return None
    fn = rec.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size, candidates=new)
    test = evaluate(fn, examples, ks=ev.ks, batch_size=ev.batch_size, accelerator=acc, desc="test (new items)")
    rnd = random_expectation(examples, ds.num_items, ks=ev.ks, exclude_history=ev.exclude_history, candidates=new)
    return {"test": test, "baselines": {"random": rnd}, "candidates": int(len(new))}
