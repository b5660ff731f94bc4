"""Generative training stages on the shared Accelerate loop, and the rank function for the evaluator.

* stage ``1``: everything frozen except the embedding rows of the new itemic tokens. The optimizer sees
  the whole embedding matrix (and the LM head when untied), so the old rows are restored after every
  step: a gradient mask alone would still let decoupled weight decay shrink them.
* stage ``2``: all parameters.
* ``sft``: all parameters, or peft LoRA (``train.lora``) with the new token rows trainable.

Every stage trains on the chat samples (next item, item↔text alignment) with the loss on assistant
tokens only, validates with constrained beam search (NDCG@10 on the valid split), keeps the best state,
and ends with a test evaluation next to popularity.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmrec.config import GenRunConfig, save_config
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines
from lmrec.eval.evaluator import RankFn, evaluate
from lmrec.generative.beam import SidTrie, constrained_beam_search
from lmrec.generative.samples import (
    align_sids,
    build_samples,
    next_item_messages,
    pad_batch,
    tokenize_chat,
    tokenize_seq2seq,
)
from lmrec.generative.sid import SemanticIds
from lmrec.generative.vocab import META, load_lm, read_meta
from lmrec.io import atomic_dir
from lmrec.training.loop import accelerator_for, data_loader, fit, fit_options

STAGES = ("1", "2", "sft")


@dataclass
class GenResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


class GenerativeRecommender:
    """A language model with itemic tokens + the item codes: prompts, beam search, ranks."""

    def __init__(self, model, tokenizer, meta: dict, sids: SemanticIds, ds: PreparedDataset, max_history: int = 20,
                 with_titles: bool = False):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.sids, self.ds = sids, ds
        self.trie = SidTrie(sids.codes, meta["level_token_ids"])
        self.max_history, self.with_titles = max_history, with_titles

    def prompts(self, histories) -> dict[str, torch.Tensor]:
        rows = []
        seq2seq = getattr(self.model.config, "is_encoder_decoder", False)
        for h in histories:
            msgs = next_item_messages(self.ds, self.sids, list(h)[-self.max_history:], None, self.with_titles)
            if seq2seq:
                rows.append({"input_ids": self.tokenizer(msgs[0]["content"])["input_ids"]})
            else:
                ids = self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)
                rows.append({"input_ids": ids + [self.meta["sid_begin"]]})
        batch = pad_batch(rows, self.tokenizer.pad_token_id, left=not seq2seq)
        if seq2seq:
            start = self.model.config.decoder_start_token_id
            batch["decoder_input_ids"] = torch.tensor([[start, self.meta["sid_begin"]]] * len(rows))
        return batch

    def beam_search(self, histories, beams: int):
        was = self.model.training
        self.model.eval()
        items, scores = constrained_beam_search(self.model, self.trie, self.prompts(histories), beams)
        self.model.train(was)
        return items, scores

    def rank_fn(self, beams: int) -> RankFn:
        def rank(histories, targets):
            items, _ = self.beam_search(histories, beams)
            hit = items.numpy() == np.asarray(targets)[:, None]
            return np.where(hit.any(1), hit.argmax(1), np.inf).astype(np.float64)

        return rank

    def recommend(self, history_ids: list[str], k: int = 10, beams: int | None = None):
        idx = self.ds.resolve_history(history_ids, source="--history")
        items, scores = self.beam_search([idx], max(k, beams or k))
        out = []
        for i, s in zip(items[0].tolist(), scores[0].tolist()):
            if i >= 0 and len(out) < k:
                out.append((self.ds.item_ids[i], self.ds.item_text[i], s))
        return out


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


def _stage_params(model, stage: str, meta: dict):
    """Freeze for stage 1 and return the restore hook (None for other stages)."""
    if stage != "1":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    mats = [emb]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr():
        mats.append(out.weight)
    new = torch.zeros(emb.shape[0], dtype=torch.bool)
    new[torch.as_tensor(sum(meta["level_token_ids"], []) + [meta["sid_begin"], meta["sid_end"]])] = True
    saved = []
    for w in mats:
        w.requires_grad_(True)
        old = (~new).to(w.device)
        saved.append((w, old, w.detach()[old].clone()))

    def restore():
        with torch.no_grad():
            for w, old, rows in saved:
                w[old] = rows

    return restore


def _apply_lora(model, tr, meta: dict):
    from peft import LoraConfig, get_peft_model

    new_ids = sum(meta["level_token_ids"], []) + [meta["sid_begin"], meta["sid_end"]]
    target = tr.lora_target_modules
    cfg = LoraConfig(r=tr.lora_r, lora_alpha=tr.lora_alpha, lora_dropout=tr.lora_dropout,
                     target_modules=target, trainable_token_indices=new_ids,
                     task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    return get_peft_model(model, cfg)


PROMPT_CONFIG = "prompt_config.json"


def _save(model, tokenizer, meta_dir: Path, out: Path, base: Path | None = None, prompt: dict | None = None) -> None:
    """model + tokenizer + sid_vocab.json + the prompt format (+ the LoRA base model) under a temporary
    name, then renamed."""
    prompt = prompt or (json.loads((meta_dir / PROMPT_CONFIG).read_text()) if (meta_dir / PROMPT_CONFIG).exists()
                        else None)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy2(meta_dir / META, tmp / META)
        if prompt:
            (tmp / PROMPT_CONFIG).write_text(json.dumps(prompt) + "\n")
        if base is not None:
            shutil.copytree(base, tmp / "base_model")

    atomic_dir(out, write)


def load_generative(model_dir: str | Path):
    """A trained (or expanded) model directory; LoRA adapters are loaded onto their base model."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = model_dir / "base_model"
        if not base_dir.exists():
            raise LmrecError(f"{model_dir} is a LoRA adapter without its base_model/ directory")
        base, tok = load_lm(base_dir)
        return PeftModel.from_pretrained(base, str(model_dir)), tok
    return load_lm(model_dir)


def train_generative(cfg: GenRunConfig, *, model_dir: str | Path, data: str | Path, sids_dir: str | Path,
                     stage: str, log=print) -> GenResult:
    if stage not in STAGES:
        raise LmrecError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    t0 = time.time()
    model_dir, run_dir = Path(model_dir), Path(cfg.output_dir)
    tr, ev, dc = cfg.train, cfg.eval, cfg.data
    acc = accelerator_for(run_dir, tr)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "run_config.yaml")
    acc.init_trackers(f"gen_stage{stage}")
    meta = read_meta(model_dir)
    ds = PreparedDataset(data)
    sids = align_sids(ds, SemanticIds.load(sids_dir))
    if [len(x) for x in meta["level_token_ids"]] != sids.config.level_sizes:
        raise LmrecError(f"{model_dir} was expanded for levels {[len(x) for x in meta['level_token_ids']]} "
                         f"but {sids_dir} has {sids.config.level_sizes}")
    model, tok = load_generative(model_dir)
    if stage == "1" and (model_dir / "adapter_config.json").exists():
        raise LmrecError("stage 1 needs a full model, not a LoRA adapter")
    restore = _stage_params(model, stage, meta)
    if tr.lora:
        if stage == "1":
            raise LmrecError("train.lora applies to stage 2 / sft (stage 1 trains only the new token rows)")
        base_copy = run_dir / "base_model"
        if acc.is_main_process:
            _save(model, tok, model_dir, base_copy)
        model = _apply_lora(model, tr, meta)
    model.to(acc.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"stage {stage}: {trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")
    rows = build_samples(ds, sids, split="train", max_history=dc.max_history, targets_per_user=dc.targets_per_user,
                         with_titles=dc.with_titles, alignment=dc.alignment)
    tokenize = tokenize_seq2seq if model.config.is_encoder_decoder else tokenize_chat
    encoded = [tokenize(tok, r["messages"], dc.max_length) for r in rows]
    log(f"{len(encoded)} training samples ({sum(r['task'] == 'next_item' for r in rows)} next-item)")
    pad = tok.pad_token_id

    lengths = np.array([len(e["input_ids"]) for e in encoded])

    def make_loader(epoch: int):
        batches = length_grouped_batches(lengths, tr.batch_size, np.random.default_rng(tr.seed * 1000 + epoch))
        return data_loader([[encoded[i] for i in b] for b in batches], collate_fn=lambda b: pad_batch(b, pad),
                           seed=tr.seed + epoch)

    rec = GenerativeRecommender(model, tok, meta, sids, ds, dc.max_history, dc.with_titles)
    valid = ds.examples("valid")

    def validate():
        return evaluate(rec.rank_fn(ev.beams), valid, ks=ev.ks, batch_size=ev.batch_size, accelerator=acc,
                        desc="validate")

    best_dir = run_dir / "model"

    def on_best(metrics, epoch):
        if acc.is_main_process:
            _save(acc.unwrap_model(model), tok, model_dir, best_dir, base=run_dir / "base_model" if tr.lora else None,
                  prompt={"max_history": dc.max_history, "with_titles": dc.with_titles})
        acc.wait_for_everyone()

    steps = math.ceil(math.ceil(len(encoded) / tr.batch_size) / tr.grad_accum)
    r = fit(acc, model, make_loader, epochs=tr.epochs, lr=tr.lr, steps_per_epoch=steps, validate=validate,
            metric=ev.metric, patience=tr.patience, on_best=on_best, tag=f"stage{stage}", after_step=restore,
            **fit_options(run_dir, tr), log=log)
    acc.wait_for_everyone()
    model, tok = load_generative(best_dir)
    model.to(acc.device)
    rec = GenerativeRecommender(model, tok, meta, sids, ds, dc.max_history, dc.with_titles)
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=acc)
    metrics = {"test": evaluate(rec.rank_fn(ev.beams), ds.examples("test"), desc="test", **kw),
               "valid": r.best_metrics,
               "baselines": baselines(ds, "test", **kw),
               "history": r.history, "best_epoch": r.best_epoch, "stage": stage, "beams": ev.beams,
               "sid_report": sids.report, "wall_time_s": round(time.time() - t0, 1)}
    if acc.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    acc.end_training()
    return GenResult(run_dir, best_dir, metrics)
