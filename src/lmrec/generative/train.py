"""``lmrec gen train``: one generative stage (``stages``) on the shared run skeleton and loop.

Every stage trains on the chat samples (next item, optionally item↔text alignment), validates with
constrained beam search (``eval.metric`` on the valid split), keeps the best state, and ends with a test
evaluation next to popularity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmrec.config import GenRunConfig
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines
from lmrec.eval.evaluator import evaluate
from lmrec.generative.prompts import PromptFormat, encode_training
from lmrec.generative.recommender import GenerativeRecommender, load_generative, save_generative
from lmrec.generative.samples import align_sids, build_samples, pad_batch
from lmrec.generative.sid import SemanticIds
from lmrec.generative.stages import STAGES
from lmrec.generative.vocab import read_meta
from lmrec.training.loop import Stage, data_loader
from lmrec.training.run import Run


@dataclass
class GenResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 50
                           ) -> list[np.ndarray]:
    """Shuffled batches of similar-length samples (little padding): shuffle, sort within groups of
    ``group`` batches by length, cut into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * group
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s : s + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _check_inputs(model_dir: Path, ds: PreparedDataset, sids_dir, stage: str) -> tuple[dict, SemanticIds]:
    meta = read_meta(model_dir)
    sids = align_sids(ds, SemanticIds.load(sids_dir))
    if [len(x) for x in meta["level_token_ids"]] != sids.config.level_sizes:
        raise LmrecError(f"{model_dir} was expanded for levels {[len(x) for x in meta['level_token_ids']]} "
                         f"but {sids_dir} has {sids.config.level_sizes}")
    if stage == "1" and (model_dir / "adapter_config.json").exists():
        raise LmrecError("stage 1 needs a full model, not a LoRA adapter")
    return meta, sids


def train_generative(cfg: GenRunConfig, *, model_dir: str | Path, data: str | Path, sids_dir: str | Path,
                     log=print) -> GenResult:
    """Train stage ``cfg.train.stage`` from ``model_dir`` (an expanded model or a previous stage's)."""
    stage, tr, ev = cfg.train.stage, cfg.train, cfg.eval
    model_dir = Path(model_dir)
    ds = PreparedDataset(data)  # inputs are checked before the run directory exists
    meta, sids = _check_inputs(model_dir, ds, sids_dir, stage)
    fmt = PromptFormat.from_config(cfg.data)
    with Run(cfg, f"gen_stage{stage}", log) as run:
        model, tok = load_generative(model_dir)
        if tr.lora and stage != "1":  # the frozen base the adapter applies to
            run.on_main(lambda: save_generative(model, tok, model_dir, run.dir / "base_model"))
        setup = STAGES[stage](model, meta, tr if tr.lora else None)
        model = setup.model.to(run.acc.device)
        total = sum(p.numel() for p in model.parameters())
        log(f"stage {stage}: {setup.trainable:,} trainable parameters of {total:,}")
        rec = GenerativeRecommender(model, tok, meta, sids, ds, fmt)

        def save(out: Path):
            save_generative(run.acc.unwrap_model(model), tok, model_dir, out, fmt=fmt,
                            base=run.dir / "base_model" if tr.lora else None)

        def validate():
            return evaluate(rec.rank_fn(ev.beams), ds.examples("valid"), ks=ev.ks, batch_size=ev.batch_size,
                            accelerator=run.acc, desc="validate")

        make_loader = _loader_factory(cfg, ds, sids, tok, model.config.is_encoder_decoder, log)
        r = run.fit(model, make_loader, Stage(f"stage{stage}", tr.epochs, tr.lr, validate, ev.metric,
                                              patience=tr.patience, on_best=run.keep_best(save),
                                              after_step=setup.after_step))
        best = run.dir / "model"
        model, tok = load_generative(best)
        rec = GenerativeRecommender(model.to(run.acc.device), tok, meta, sids, ds, fmt)
        kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=run.acc)
        metrics = run.finish({
            "test": evaluate(rec.rank_fn(ev.beams), ds.examples("test"), desc="test", **kw),
            "valid": r.best_metrics, "baselines": baselines(ds, "test", **kw), "history": r.history,
            "best_epoch": r.best_epoch, "stage": stage, "beams": ev.beams, "sid_report": sids.report})
    return GenResult(run.dir, best, metrics)


def _loader_factory(cfg: GenRunConfig, ds: PreparedDataset, sids: SemanticIds, tok, seq2seq: bool, log):
    """The training samples tokenized once; ``make_loader(epoch)`` serves them in length-grouped batches."""
    tr, dc = cfg.train, cfg.data
    rows = build_samples(ds, sids, dc, split="train")
    encoded = [encode_training(tok, r["messages"], seq2seq=seq2seq, max_length=dc.max_length) for r in rows]
    log(f"{len(encoded)} training samples ({sum(r['task'] == 'next_item' for r in rows)} next-item)")
    lengths = np.array([len(e["input_ids"]) for e in encoded])
    pad = tok.pad_token_id

    def make_loader(epoch: int):
        batches = length_grouped_batches(lengths, tr.batch_size, np.random.default_rng(tr.seed * 1000 + epoch))
        return data_loader([[encoded[i] for i in b] for b in batches], collate_fn=lambda b: pad_batch(b, pad),
                           seed=tr.seed + epoch)

    return make_loader
