"""RecFormer pretraining (`lmrec pretrain`): item-item contrastive + whole-word MLM on several domains.

Per user sequence of every corpus dataset and epoch, ``pairs_per_user`` pairs: a target drawn from the
second half of the user's training sequence, the history = the items before it. Loss (in
``RecformerForPretraining.forward``): InfoNCE of histories against the batch's targets (gathered across
ranks) + ``mlm_weight`` × (MLM on the history + MLM on the target), whole-word masked (see ``masking``).
Validation: zero-shot full ranking on a validation dataset's valid split (its items encoded on the fly).
The best model is saved as a RecFormer checkpoint (``model/``) without a catalog: ``lmrec finetune
--init`` starts from it and ``lmrec evaluate --model`` ranks any dataset's items with it (zero-shot).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmrec.config import PretrainRunConfig, save_config
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines
from lmrec.eval.evaluator import evaluate
from lmrec.io import atomic_dir
from lmrec.recformer.backbones import build_recformer
from lmrec.recformer.finetune import backbone_or_default, evaluate_new_items
from lmrec.recformer.masking import WholeWordMasker
from lmrec.recformer.modeling_recformer import RecformerForPretraining, RecformerForSeqRec
from lmrec.recformer.recommender import Recommender
from lmrec.training.loop import accelerator_for, data_loader, fit, fit_options


@dataclass
class PretrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


def pretraining_pairs(datasets: list[PreparedDataset], rng: np.random.Generator, pairs_per_user: int = 1
                      ) -> list[tuple[int, list[int], int]]:
    """(dataset index, history item indices, target item index), shuffled: targets from the second half
    of each training sequence, histories = everything before the target."""
    pairs = []
    for d, ds in enumerate(datasets):
        for seq in ds.train:
            n = len(seq)
            if n < 2:
                continue
            lo = max(1, n // 2)
            for t in rng.integers(lo, n, size=pairs_per_user):
                pairs.append((d, list(seq[:t]), int(seq[t])))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def make_pretrain_collate(tokenizer, item_tokens: list[list], masker: WholeWordMasker, seed: int, epoch: int):
    """A batch ``(batch index, pairs)`` → model inputs with MLM labels. The masking RNG is seeded by
    (seed, epoch, batch index): the same batch is masked the same way in a resumed run."""

    def collate(batch):
        b, pairs = batch
        rng = np.random.default_rng([seed, epoch, b])
        hist = tokenizer.pad([tokenizer.build_sequence([item_tokens[d][i] for i in h]) for d, h, _ in pairs])
        tgt = tokenizer.pad([tokenizer.build_sequence([item_tokens[d][t]]) for d, _, t in pairs])
        for x in (hist, tgt):
            x["input_ids"], x["mlm_labels"] = masker(x["input_ids"], x["attention_mask"], x.pop("word_starts"), rng)
        return {**hist, "item_inputs": tgt}

    return collate


def _zero_shot(model: RecformerForPretraining, tokenizer, ds: PreparedDataset) -> Recommender:
    """A recommender over ``ds``'s catalog that shares ``model``'s encoder (no copy)."""
    seqrec = RecformerForSeqRec(model.config)
    seqrec.longformer = model.longformer
    return Recommender(seqrec.to(model.device), tokenizer, ds.item_ids, ds.item_text)


def save_pretraining_model(model: RecformerForPretraining, tokenizer, out: Path, extra: dict | None = None) -> Path:
    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "pretrain_info.json").write_text(json.dumps(extra, indent=2) + "\n")

    return atomic_dir(out, write)


def pretrain(cfg: PretrainRunConfig, log=print) -> PretrainResult:
    t0 = time.time()
    dc, m, tr, ev = cfg.data, cfg.model, cfg.train, cfg.eval
    if not dc.paths:
        raise LmrecError("no pretraining corpus: give one or more prepared datasets (--data DIR, repeatable)")
    run_dir = Path(cfg.output_dir)
    acc = accelerator_for(run_dir, tr)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "run_config.yaml")
    acc.wait_for_everyone()
    acc.init_trackers("pretrain")
    corpus = [PreparedDataset(p) for p in dc.paths]
    valid_ds = PreparedDataset(dc.valid) if dc.valid else corpus[0]
    texts = [t for ds in corpus for t in ds.item_text]
    backbone = backbone_or_default(m, texts, run_dir, acc, tr.seed, log)
    model, tokenizer, report = build_recformer(
        backbone, model_cls=RecformerForPretraining, max_token_num=m.max_token_num, max_attr_num=m.max_attr_num,
        max_attr_length=m.max_attr_length, max_item_embeddings=dc.max_history_len + 1, temperature=m.temperature,
        pooler_type=m.pooler_type, attention_window=m.attention_window, mlm_weight=m.mlm_weight)
    problems = report.problems()
    if problems:
        raise LmrecError(f"{backbone} does not initialise RecFormer completely ({', '.join(problems[:5])}); "
                         f"see `lmrec backbone init {backbone} OUT`")
    log(f"initialised from {backbone}: " + ", ".join(f"{v} {k}" for k, v in report.counts().items() if v))
    if m.freeze_word_embeddings:
        model.longformer.embeddings.word_embeddings.weight.requires_grad_(False)  # tied: the MLM decoder too
    model.to(acc.device)
    masker = WholeWordMasker(tokenizer.tokenizer, m.mlm_probability)
    item_tokens = [tokenizer.encode_items(ds.item_text, word_starts=True) for ds in corpus]
    n_pairs = sum(tr.pairs_per_user for ds in corpus for s in ds.train if len(s) >= 2)
    log(f"corpus: {len(corpus)} dataset(s), {sum(ds.num_items for ds in corpus)} items, {n_pairs} pairs per epoch; "
        f"validation: {valid_ds.path} ({min(dc.valid_users, len(valid_ds.examples('valid').targets))} users)")

    def make_loader(epoch: int):
        pairs = pretraining_pairs(corpus, np.random.default_rng([tr.seed, epoch]), tr.pairs_per_user)
        batches = [(b, pairs[i : i + tr.batch_size]) for b, i in enumerate(range(0, len(pairs), tr.batch_size))]
        if len(batches) > 1 and len(batches[-1][1]) < 2:
            batches.pop()  # a contrastive batch needs negatives
        return data_loader(batches, seed=tr.seed + epoch,
                           collate_fn=make_pretrain_collate(tokenizer, item_tokens, masker, tr.seed, epoch))

    valid = valid_ds.examples("valid").head(dc.valid_users)

    zero_shot = _zero_shot(model, tokenizer, valid_ds)  # built once; it shares (and evaluates) model's encoder

    def validate():
        zero_shot.encode_items(tr.item_batch_size, acc)
        return evaluate(zero_shot.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size), valid,
                        ks=ev.ks, batch_size=ev.batch_size, accelerator=acc, desc="validate (zero-shot)")

    model_dir = run_dir / "model"
    info = {"corpus": [str(p) for p in dc.paths], "valid": str(valid_ds.path)}

    def on_best(metrics, epoch):
        if acc.is_main_process:
            save_pretraining_model(acc.unwrap_model(model), tokenizer, model_dir,
                                   {**info, "epoch": epoch, "valid": metrics})
        acc.wait_for_everyone()

    steps = math.ceil(math.ceil(n_pairs / tr.batch_size) / tr.grad_accum)
    r = fit(acc, model, make_loader, epochs=tr.epochs, lr=tr.lr, steps_per_epoch=steps, validate=validate,
            eval_every=tr.eval_every, metric=ev.metric, patience=tr.patience, on_best=on_best, tag="pretrain",
            **fit_options(run_dir, tr), log=log)
    if not model_dir.exists() and acc.is_main_process:  # no validation ran: the final state
        save_pretraining_model(acc.unwrap_model(model), tokenizer, model_dir, info)
    acc.wait_for_everyone()
    best = RecformerForPretraining.from_pretrained(str(model_dir)).to(acc.device).eval()
    rec = _zero_shot(best, tokenizer, valid_ds)
    rec.encode_items(tr.item_batch_size, acc)
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=acc)
    test = evaluate(rec.rank_fn(exclude_history=ev.exclude_history), valid_ds.examples("test"),
                    desc="test (zero-shot)", **kw)
    metrics = {"zero_shot": {"test": test, "dataset": str(valid_ds.path)},
               "baselines": baselines(valid_ds, "test", exclude_history=ev.exclude_history, **kw),
               "valid": r.best_metrics, "best_epoch": r.best_epoch, "history": r.history,
               "wall_time_s": round(time.time() - t0, 1)}
    metrics["test"] = metrics["zero_shot"]["test"]
    new = evaluate_new_items(rec, valid_ds, ev, acc)
    if new is not None:
        metrics["test_new_items"] = new
    if acc.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    acc.end_training()
    return PretrainResult(run_dir, model_dir, metrics)
