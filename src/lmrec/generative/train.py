"""``lmrec gen train``: one generative stage (``stages``) on the shared run skeleton and loop.

Every stage trains on the chat samples (next item, optionally item↔text alignment), validates with
constrained beam search (``eval.metric`` on the valid split), keeps the best state, and ends with a test
evaluation next to popularity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmrec.config import GenRunConfig
from lmrec.data.data_config import load_data_config
from lmrec.data.dataset import PreparedDataset
from lmrec.data.stream_plan import estimated_steps
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines
from lmrec.eval.evaluator import evaluate
from lmrec.generative.export import SOURCE
from lmrec.generative.prompts import PromptFormat, encode_sequence, encode_training, sid_token_ids
from lmrec.generative.recommender import GenerativeRecommender, load_generative, save_generative
from lmrec.generative.samples import align_sids, build_samples, pad_batch
from lmrec.generative.sid import SemanticIds
from lmrec.generative.stages import STAGES, ChunkedLossLM, loss_impl
from lmrec.generative.stream_loader import check_itemic_range, require_decoder_only, stream_loader_factory
from lmrec.generative.train_metrics import StreamTally, token_metrics
from lmrec.generative.vocab import read_meta, stored_dtype
from lmrec.modelfiles import check_generative
from lmrec.training.attention import segmented, with_segments
from lmrec.training.fsdp import build_on_meta, full_state_dict, materialize_and_load, shard, unsharded
from lmrec.training.loop import Stage, StreamStage, data_loader
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


def _check_inputs(model_dir: Path, ds: PreparedDataset | None, sids_dir, stage: str
                  ) -> tuple[dict, SemanticIds | None]:
    check_generative(model_dir, "lmrec gen train")
    meta = read_meta(model_dir)
    if stage == "1" and (model_dir / "adapter_config.json").exists():
        raise LmrecError("stage 1 needs a full model, not a LoRA adapter")
    if ds is None:
        return meta, None
    sids = align_sids(ds, SemanticIds.load(sids_dir))
    if [len(x) for x in meta["level_token_ids"]] != sids.config.level_sizes:
        raise LmrecError(f"{model_dir} was expanded for levels {[len(x) for x in meta['level_token_ids']]} "
                         f"but {sids_dir} has {sids.config.level_sizes}")
    return meta, sids


def train_generative(cfg: GenRunConfig, *, model_dir: str | Path, data: str | Path | None = None,
                     sids_dir: str | Path | None = None, data_config: str | Path | None = None,
                     log=print) -> GenResult:
    """Train stage ``cfg.train.stage`` from ``model_dir`` (an expanded model or a previous stage's) on the
    chat samples of a prepared dataset (``data`` + ``sids_dir``), or on the packed stream a data config
    describes (``data_config``; with ``data`` + ``sids_dir`` too, validation and test by beam search)."""
    stage, tr, ev = cfg.train.stage, cfg.train, cfg.eval
    model_dir = Path(model_dir)
    mix = load_data_config(data_config) if data_config is not None else None
    if (data is None) != (sids_dir is None) or (mix is None and data is None):
        raise LmrecError("give --data and --sids (a prepared dataset and its semantic IDs), --data-config, or both")
    ds = PreparedDataset(data) if data is not None else None  # inputs are checked before the run directory exists
    meta, sids = _check_inputs(model_dir, ds, sids_dir, stage)
    if mix is not None:
        check_itemic_range(mix, meta)
    fmt = PromptFormat.from_config(cfg.data)
    with Run(cfg, f"gen_stage{stage}", log, inputs=(model_dir, data, sids_dir, data_config)) as run:
        run.on_main(lambda: (run.dir / SOURCE).write_text(json.dumps({"model": str(model_dir.resolve())}) + "\n"))
        built = _build_model(cfg, model_dir, meta, run, mix is not None, log)
        model, lm, tok = built.model, built.lm, built.tok
        rec = GenerativeRecommender(lm, tok, meta, sids, ds, fmt) if ds is not None and not tr.fsdp else None
        if ds is not None and tr.fsdp:
            log("train.fsdp: no beam-search validation during training (it would run sharded generation); the "
                "model at the end is saved and tested")

        def save(out: Path):  # every rank calls it: a sharded model is gathered first
            state = full_state_dict(model, "lm." if model is not lm else "") if tr.fsdp else None
            run.on_main(lambda: save_generative(unsharded(lm.config, state) if tr.fsdp else lm, tok, model_dir, out,
                                                fmt=fmt, base=run.dir / "base_model" if tr.lora else None))

        if mix is None:
            seq2seq = model.config.is_encoder_decoder
            make_loader = _loader_factory(cfg, ds, sids, tok, seq2seq, log, segmented(built.attn), run.loader_workers,
                                          meta=meta)
            plan = Stage(f"stage{stage}", tr.epochs, tr.lr, log_every=tr.log_every,
                         step_metrics=token_metrics([], sum(meta["level_token_ids"], []), run.acc,
                                                    tr.log_every * tr.grad_accum, _parameters(lm), tr.peak_tflops,
                                                    shift=0 if seq2seq else 1))
        else:
            make_loader, plan, tally = _stream_plan(cfg, mix, tok, meta, model, run, log, segmented(built.attn))
        if rec is not None:
            plan.validate = lambda: evaluate(rec.rank_fn(ev.beams, ev.exclude_history), ds.examples("valid"), ks=ev.ks,
                                             batch_size=ev.batch_size, accelerator=run.acc, desc="validate")
            plan.metric, plan.patience, plan.eval_every = cfg.eval.metric, tr.patience, tr.eval_every
            plan.on_best = lambda metrics, epoch: save(run.dir / "model")
        plan.after_step = built.after_step
        r = run.fit(model, make_loader, plan)
        if mix is not None:
            _check_stream_end(r.global_step, plan, cfg, log)
        best = run.dir / "model"
        if rec is None:  # nothing validated: the model at the end of the stream / of the epochs
            save(best)
        metrics = {"valid": r.best_metrics, "history": r.history, "best_epoch": r.best_epoch, "stage": stage,
                   "steps": r.global_step, "attn_implementation": built.attn}
        if mix is not None:
            metrics["stream"] = tally.report(run, log)
        tested, test_ranks = _test_metrics(cfg, run, best, meta, sids, ds, fmt) if ds is not None else ({}, None)
        metrics.update(tested)
        run.finish(metrics, test_ranks=test_ranks)
    return GenResult(run.dir, best, metrics)


@dataclass
class _Built:
    model: torch.nn.Module  # what the loop trains (the chunked-loss wrapper, sharded, ...)
    lm: torch.nn.Module  # the transformers (or peft) model inside it
    tok: object
    after_step: object  # the stage's hook, bound to the parameters where they train
    attn: str = "sdpa"  # the attention implementation (lmrec.training.attention)


def _build_model(cfg: GenRunConfig, model_dir: Path, meta: dict, run: Run, packed: bool, log) -> _Built:
    """Load the model (with ``train.fsdp``: built on the meta device, sharded, then filled from rank 0's
    read), choose its attention, set up the stage, wrap it for the chunked loss, and place it."""
    tr, stage, device = cfg.train, cfg.train.stage, run.acc.device
    if tr.fsdp:
        if (model_dir / "adapter_config.json").exists():
            raise LmrecError(f"train.fsdp needs a full model; {model_dir} is a LoRA adapter (merge it with "
                             "`lmrec gen export`)")
        from transformers import AutoTokenizer

        lm, tok = build_on_meta(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    else:
        lm, tok = load_generative(model_dir, dtype=torch.float32)  # the master weights, whatever is stored
    stored = stored_dtype(model_dir / "base_model" if (model_dir / "adapter_config.json").exists() else model_dir)
    if tr.lora and stage != "1":  # the frozen base the adapter applies to, in the dtype it came in (exact)
        run.on_main(lambda: save_generative(lm, tok, model_dir, run.dir / "base_model", dtype=stored))
    attn = _attention(cfg, lm, run, packed, log)
    setup = STAGES[stage](lm, meta, tr if tr.lora else None)
    lm = setup.model
    if tr.compile:
        from lmrec.training.fsdp import compile_layers

        log(f"train.compile: {compile_layers(lm)} decoder layers compiled")
    model = lm
    if tr.loss_chunk_tokens:
        impl = loss_impl(tr.loss_impl, device)
        model = ChunkedLossLM(lm, tr.loss_chunk_tokens, impl)
        log(f"LM-head loss without the full logits: {impl} (train.loss_impl={tr.loss_impl})")
    if tr.fsdp:
        dtype = torch.bfloat16 if run.acc.mixed_precision == "bf16" else None
        shard(model, lm, device, param_dtype=dtype, reduce_fp32=tr.fsdp_reduce_fp32,
              activation_checkpointing=tr.activation_checkpointing, shard_size=tr.fsdp_shard_size)
        materialize_and_load(model, model_dir, device, prefix="lm." if model is not lm else "")
        log(f"train.fsdp: sharded over {run.acc.num_processes} processes per decoder layer, compute in "
            f"{dtype or torch.float32}, fp32 master weights, gradients reduced in "
            f"{'fp32' if tr.fsdp_reduce_fp32 or dtype is None else dtype}")
    else:
        if tr.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(device)
        compute = {"bf16": "bf16 (autocast)", "fp16": "fp16 (autocast)"}.get(run.acc.mixed_precision, "float32")
        log(f"float32 master weights, compute in {compute}")
    log(f"{model_dir} stores {str(stored).removeprefix('torch.')}; this run's model and checkpoints are saved in "
        "float32, its master weights (`lmrec gen export --dtype bf16` writes a bf16 copy)")
    log(f"stage {stage}: {setup.trainable:,} trainable parameters of {_parameters(lm):,}")
    return _Built(model, lm, tok, setup.after_step(), attn)


def _attention(cfg: GenRunConfig, lm, run: Run, packed: bool, log) -> str:
    """The attention implementation of this run (``train.attn_implementation``), checked to keep packed
    samples apart, set on the model and logged."""
    from lmrec.training import attention

    name = attention.resolve(cfg.train.attn_implementation, run.acc.device, packed=packed,
                             mixed_precision=run.acc.mixed_precision)
    attention.check_isolates(name, packed)
    attention.apply(lm, name)
    log(f"attention: {name} (train.attn_implementation={cfg.train.attn_implementation}"
        f"{', packed samples kept apart by their segment boundaries' if name in attention.SEGMENTED else ''})")
    return name


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a sharded parameter counts whole


def _stream_plan(cfg: GenRunConfig, mix, tok, meta: dict, model, run: Run, log, segments: bool = False):
    """The loader factory and the loop's :class:`StreamStage`: a schedule of ``num_training_steps`` (or the
    estimate from the sampled token lengths), ``max_steps``, and the token metrics."""
    tr = cfg.train
    require_decoder_only(model)
    make_loader, names, reads = stream_loader_factory(mix, tok, run, tr.batch_size, log, segments=segments)
    steps, most = estimated_steps(reads, mix, [s.weight for s in mix.sources], run.acc.num_processes,
                                  tr.batch_size, tr.grad_accum)
    if most > 1.1 * steps:
        log(f"the ranks' shares of the data differ: the run ends when the smallest ends (about {steps} steps), "
            f"the rank with the most data has about {most} (files of unequal sizes)")
    if tr.num_training_steps is None:
        log(f"learning-rate schedule over {steps} steps (estimated from {sum(reads.sampled)} sampled rows' token "
            "lengths and every file's row count; set train.num_training_steps to fix it)")
    steps = tr.num_training_steps or max(1, steps)  # 0: the run ends at once, and _check_stream_end says why
    itemic = sum(meta["level_token_ids"], [])
    tally = StreamTally(names)
    plan = StreamStage(f"stage{cfg.train.stage}", tr.lr, num_training_steps=steps, max_steps=tr.max_steps,
                       step_metrics=token_metrics(names, itemic, run.acc, tr.log_every * tr.grad_accum,
                                                  _parameters(model), tr.peak_tflops),
                       log_every=tr.log_every, on_batch=tally.on_batch, extra_state=tally)
    return make_loader, plan, tally


def _check_stream_end(steps: int, plan: StreamStage, cfg: GenRunConfig, log) -> None:
    """A stream that ended before its first optimizer step would save the model it started from."""
    if steps == 0:
        raise LmrecError("the stream ended before the first optimizer step (a rank had fewer than "
                         f"train.batch_size × train.grad_accum = {cfg.train.batch_size * cfg.train.grad_accum} packs): "
                         "nothing was trained; lower train.batch_size or train.grad_accum, or add data")
    if steps > plan.num_training_steps and cfg.train.lr_schedule != "constant":
        log(f"the stream ran {steps - plan.num_training_steps} steps past the learning-rate schedule's "
            f"{plan.num_training_steps} (at its final learning rate); set train.num_training_steps to {steps}")


def _test_metrics(cfg: GenRunConfig, run: Run, best: Path, meta, sids, ds, fmt) -> tuple[dict, tuple]:
    """The test metrics next to popularity, and (the test examples, their ranks) for ``Run.finish``."""
    ev = cfg.eval
    model, tok = load_generative(best)
    rec = GenerativeRecommender(model.to(run.acc.device), tok, meta, sids, ds, fmt)
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=run.acc)
    examples = ds.examples("test")
    test, ranks = evaluate(rec.rank_fn(ev.beams, ev.exclude_history), examples, desc="test", return_ranks=True,
                           **kw)
    return {"test": test, "baselines": baselines(ds, "test", exclude_history=ev.exclude_history, **kw),
            "beams": ev.beams, "sid_report": sids.report, "exclude_history": ev.exclude_history}, (examples, ranks)


def _loader_factory(cfg: GenRunConfig, ds: PreparedDataset, sids: SemanticIds, tok, seq2seq: bool, log,
                    segments: bool = False, workers: int = 0, meta: dict | None = None):
    """The training samples tokenized once; ``make_loader(epoch)`` serves them in length-grouped batches."""
    tr, dc = cfg.train, cfg.data
    if dc.format == "sequence" and seq2seq:
        raise LmrecError("data.format=sequence is for decoder-only models (one causal sequence of item IDs); an "
                         "encoder-decoder model trains with data.format=chat")
    rows = build_samples(ds, sids, dc, split="train")
    item_tokens = ([sid_token_ids(c, meta) for c in sids.codes.tolist()] if dc.format == "sequence" else [])
    encoded = [encode_sequence([item_tokens[i] for i in r["items"]], r["first_target"]) if r["task"] == "sequence"
               else encode_training(tok, r["messages"], seq2seq=seq2seq, max_length=dc.max_length) for r in rows]
    targets = sum(len(r["items"]) - r["first_target"] if r["task"] == "sequence" else r["task"] == "next_item"
                  for r in rows)
    log(f"{len(encoded)} training samples ({targets} next-item targets)")
    lengths = np.array([len(e["input_ids"]) for e in encoded])
    pad = tok.pad_token_id

    def make_loader(epoch: int):
        batches = length_grouped_batches(lengths, tr.batch_size, np.random.default_rng(tr.seed * 1000 + epoch))
        collate = (lambda b: with_segments(pad_batch(b, pad))) if segments else (lambda b: pad_batch(b, pad))
        return data_loader([[encoded[i] for i in b] for b in batches], collate_fn=collate, seed=tr.seed + epoch,
                           workers=workers)

    return make_loader
