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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmrec.config import PretrainRunConfig
from lmrec.data.dataset import PreparedDataset
from lmrec.errors import LmrecError
from lmrec.eval.baselines import baselines
from lmrec.eval.evaluator import evaluate
from lmrec.modelfiles import check_recformer
from lmrec.recformer.build import backbone_or_default, build_checked, save_pretraining_model
from lmrec.recformer.collator import PretrainCollator
from lmrec.recformer.evaluation import evaluate_new_items
from lmrec.recformer.masking import WholeWordMasker
from lmrec.recformer.modeling_recformer import RecformerForPretraining, RecformerForSeqRec
from lmrec.recformer.recommender import Recommender
from lmrec.training.loop import Stage, data_loader
from lmrec.training.run import Run


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


def contrastive_batches(pairs: list, batch_size: int, processes: int = 1) -> list[tuple[int, list]]:
    """``(batch index, pairs)`` of an epoch. Under several processes each step gathers one batch per process
    into one contrastive batch, so only complete batches train, and a multiple of the process count of them:
    an incomplete batch breaks the equal-size gather, and Accelerate's ``even_batches`` would fill the last
    step with a batch from the start of the epoch (pairs trained twice). In one process the last batch may be
    incomplete, if it holds the two pairs a contrastive batch needs."""
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    if processes > 1:
        batches = [b for b in batches if len(b) == batch_size]
        batches = batches[: len(batches) // processes * processes]
        if not batches:
            raise LmrecError(f"pretraining on {processes} processes needs at least {processes} complete batches of "
                             f"train.batch_size={batch_size} pairs per epoch; the corpus gives {len(pairs)} pairs: "
                             "lower train.batch_size")
    elif len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # a contrastive batch needs negatives
    return list(enumerate(batches))


def _zero_shot(model: RecformerForPretraining, tokenizer, ds: PreparedDataset) -> Recommender:
    """A recommender over ``ds``'s catalog that shares ``model``'s encoder (no copy)."""
    seqrec = RecformerForSeqRec(model.config)
    seqrec.longformer = model.longformer
    return Recommender(seqrec.to(model.device), tokenizer, ds.item_ids, ds.item_text)


def pretrain(cfg: PretrainRunConfig, log=print) -> PretrainResult:
    dc, m, tr = cfg.data, cfg.model, cfg.train
    if not dc.paths:
        raise LmrecError("no pretraining corpus: give one or more prepared datasets (--data DIR, repeatable)")
    corpus = [PreparedDataset(p) for p in dc.paths]  # inputs are checked before the run directory exists
    valid_ds = PreparedDataset(dc.valid) if dc.valid else corpus[0]
    if m.init:
        check_recformer(m.init, "lmrec pretrain --init")
    # run_config.yaml names the data it ran on, absolute: `lmrec pretrain -c RUN/run_config.yaml` re-runs it
    cfg = cfg.model_copy(update={"data": dc.model_copy(update={
        "paths": [str(Path(p).resolve()) for p in dc.paths], "valid": str(Path(dc.valid).resolve()) if dc.valid
        else None})})
    with Run(cfg, "pretrain", log) as run:
        backbone = backbone_or_default(m, [t for ds in corpus for t in ds.item_text], run.dir, run.acc, tr.seed, log)
        model, tokenizer = build_checked(
            backbone, log, model_cls=RecformerForPretraining, max_token_num=m.max_token_num,
            max_attr_num=m.max_attr_num, max_attr_length=m.max_attr_length,
            max_item_embeddings=dc.max_history_len + 1, temperature=m.temperature, pooler_type=m.pooler_type,
            attention_window=m.attention_window, attention_impl=m.attention_impl, mlm_weight=m.mlm_weight)
        if m.freeze_word_embeddings:
            model.longformer.embeddings.word_embeddings.weight.requires_grad_(False)  # tied: the MLM decoder too
        model.to(run.acc.device)
        r = _train(run, model, tokenizer, corpus, valid_ds)
        metrics = _final_metrics(run, tokenizer, valid_ds, r)
        run.finish(metrics)
    return PretrainResult(run.dir, run.dir / "model", metrics)


def _train(run: Run, model: RecformerForPretraining, tokenizer, corpus: list[PreparedDataset],
           valid_ds: PreparedDataset):
    dc, m, tr, ev = run.cfg.data, run.cfg.model, run.cfg.train, run.cfg.eval
    masker = WholeWordMasker(tokenizer.tokenizer, m.mlm_probability)
    item_tokens = [tokenizer.encode_items(ds.item_text, word_starts=True) for ds in corpus]
    n_pairs = sum(tr.pairs_per_user for ds in corpus for s in ds.train if len(s) >= 2)
    run.log(f"corpus: {len(corpus)} dataset(s), {sum(ds.num_items for ds in corpus)} items, {n_pairs} pairs per "
            f"epoch; validation: {valid_ds.path} ({min(dc.valid_users, len(valid_ds.examples('valid').targets))} "
            "users)")

    world = run.acc.num_processes
    if world > 1:
        kept = len(contrastive_batches(list(range(n_pairs)), tr.batch_size, world)) * tr.batch_size
        run.log(f"{world} processes: {kept} of the {n_pairs} pairs of each epoch's shuffle train (complete batches of "
                f"{tr.batch_size}, a multiple of {world})")

    def make_loader(epoch: int):
        pairs = pretraining_pairs(corpus, np.random.default_rng([tr.seed, epoch]), tr.pairs_per_user)
        return data_loader(contrastive_batches(pairs, tr.batch_size, world), seed=tr.seed + epoch,
                           collate_fn=PretrainCollator(tokenizer, item_tokens, masker, tr.seed, epoch),
                           workers=run.loader_workers)

    valid = valid_ds.examples("valid").head(dc.valid_users)
    zero_shot = _zero_shot(model, tokenizer, valid_ds)  # built once; it shares (and evaluates) model's encoder

    def validate():
        zero_shot.encode_items(tr.item_batch_size, run.acc)
        return evaluate(zero_shot.rank_fn(exclude_history=ev.exclude_history, chunk_size=ev.chunk_size), valid,
                        ks=ev.ks, batch_size=ev.batch_size, accelerator=run.acc, desc="validate (zero-shot)")

    info = {"corpus": [str(p) for p in dc.paths], "valid": str(valid_ds.path)}
    model_dir = run.dir / "model"

    def on_best(metrics, epoch):
        run.on_main(lambda: save_pretraining_model(run.acc.unwrap_model(model), tokenizer, model_dir,
                                                   {**info, "epoch": epoch, "valid": metrics}))

    r = run.fit(model, make_loader, Stage("pretrain", tr.epochs, tr.lr, validate, ev.metric,
                                          eval_every=tr.eval_every, patience=tr.patience, on_best=on_best,
                                          log_every=tr.log_every))
    if not model_dir.exists():  # no validation ran: the final state
        run.on_main(lambda: save_pretraining_model(run.acc.unwrap_model(model), tokenizer, model_dir, info))
    return r


def _final_metrics(run: Run, tokenizer, valid_ds: PreparedDataset, r) -> dict:
    """Zero-shot test metrics of the best model on the validation dataset, next to the baselines."""
    ev, acc = run.cfg.eval, run.acc
    best = RecformerForPretraining.from_pretrained(str(run.dir / "model")).to(acc.device).eval()
    rec = _zero_shot(best, tokenizer, valid_ds)
    rec.encode_items(run.cfg.train.item_batch_size, acc)
    kw = dict(ks=ev.ks, batch_size=ev.batch_size, accelerator=acc)
    test = evaluate(rec.rank_fn(exclude_history=ev.exclude_history), valid_ds.examples("test"),
                    desc="test (zero-shot)", **kw)
    metrics = {"zero_shot": {"test": test, "dataset": str(valid_ds.path)},
               "baselines": baselines(valid_ds, "test", exclude_history=ev.exclude_history, **kw),
               "valid": r.best_metrics, "best_epoch": r.best_epoch, "history": r.history, "test": test}
    new = evaluate_new_items(rec, valid_ds, ev, acc)
    if new is not None:
        metrics["test_new_items"] = new
    return metrics
