"""Continued MLM pretraining of a backbone on raw text (`lmrec backbone pretrain-mlm`), the recipe that
made the Chinese Longformer (whole-word masking; BPC 14.78 → 3.10 in its report).

The corpus is one document per line, English or Chinese; documents are cut into chunks of
``max_length`` tokens (``[CLS]``/``<s>`` … ``[SEP]``/``</s>``). Validation masks the validation file once,
with a fixed seed, and reports

* perplexity = exp(mean negative log-likelihood of the masked tokens), and
* bits per character (BPC) = total negative log-likelihood of the masked tokens in bits / the number of
  characters those tokens cover in the text (a Chinese character-level tokenizer: one token = one
  character, so BPC is the loss in bits per masked token).

The model is RecFormer's encoder + tied MLM head built from the backbone (any layout ``lmrec backbone
init`` reads); the result is saved as a RecFormer checkpoint that ``--backbone`` / ``--init`` accept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmrec.config import MlmRunConfig
from lmrec.errors import DataError, LmrecError
from lmrec.recformer.build import build_checked, save_pretraining_model
from lmrec.recformer.masking import WholeWordMasker, word_starts
from lmrec.recformer.modeling_recformer import RecformerForPretraining
from lmrec.training.loop import Stage, data_loader, peak_memory_mib
from lmrec.training.run import Run


@dataclass
class Chunk:
    ids: list[int]
    starts: list[bool]
    chars: list[int]  # characters of the text each token covers (0 for special tokens)


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file (expected a text file, one document per line)", file=str(path))
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError("no text (expected one document per line)", file=str(path))
    return lines


def chunk_corpus(tokenizer, lines: list[str], max_length: int) -> list[Chunk]:
    """Tokenize documents (with word-start flags and character counts) and cut them into chunks of at
    most ``max_length`` tokens including the two special tokens."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None:
        raise LmrecError(f"tokenizer {type(tokenizer).__name__} has no cls/bos or sep/eos token")
    room = max_length - 2
    if room < 1:
        raise LmrecError(f"train.max_length must be at least 3, got {max_length}")
    out = []
    for i in range(0, len(lines), 1000):
        batch = lines[i : i + 1000]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
        flags = word_starts(enc.encodings, batch)
        for e, f in zip(enc.encodings, flags):
            chars = [b - a for a, b in e.offsets]
            for j in range(0, len(e.ids), room):
                starts = f[j : j + room]
                starts[0] = True  # a chunk starts a word
                out.append(Chunk([start, *e.ids[j : j + room], end], [True, *starts, True],
                                 [0, *chars[j : j + room], 0]))
    return out


def mlm_batch(chunks: list[Chunk], masker: WholeWordMasker, pad_id: int, rng: np.random.Generator) -> dict:
    L = max(len(c.ids) for c in chunks)
    ids = np.full((len(chunks), L), pad_id, dtype=np.int64)
    att = np.zeros_like(ids)
    starts = np.ones((len(chunks), L), dtype=bool)
    chars = np.zeros_like(ids)
    for b, c in enumerate(chunks):
        n = len(c.ids)
        ids[b, :n], att[b, :n], starts[b, :n], chars[b, :n] = c.ids, 1, c.starts, c.chars
    masked, labels = masker(ids, att, starts, rng)
    return {"input_ids": masked, "attention_mask": torch.as_tensor(att), "mlm_labels": labels,
            "chars": torch.as_tensor(chars)}


@torch.no_grad()
def mlm_metrics(model: RecformerForPretraining, batches: list[dict]) -> dict[str, float]:
    """Negative log-likelihood of every masked token (natural log), summed; perplexity and BPC from it."""
    model.eval()
    device = next(model.parameters()).device
    nll, tokens, chars = 0.0, 0, 0
    for batch in batches:
        labels = batch["mlm_labels"].to(device)
        h = model.longformer(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        sel = labels >= 0
        logp = F.log_softmax(model.lm_head(h[sel]).float(), dim=-1)
        nll += float(-logp.gather(1, labels[sel][:, None]).sum())
        tokens += int(sel.sum())
        chars += int(batch["chars"].to(device)[sel].sum())
    return {"loss": nll / max(tokens, 1), "perplexity": math.exp(nll / max(tokens, 1)),
            "bpc": nll / math.log(2) / max(chars, 1), "masked_tokens": tokens, "masked_chars": chars}


def pretrain_mlm(backbone: str | Path, train_file: str | Path, valid_file: str | Path, cfg: MlmRunConfig,
                 log=print) -> dict:
    tr = cfg.train
    train_lines, valid_lines = read_lines(train_file), read_lines(valid_file)  # checked before the run opens
    with Run(cfg, "pretrain_mlm", log, inputs=(backbone, train_file, valid_file)) as run:
        overrides = {"max_token_num": tr.max_length, "mlm_weight": 1.0, "attention_impl": tr.attention_impl}
        if tr.attention_window is not None:
            overrides["attention_window"] = tr.attention_window
        model, rtok = build_checked(Path(backbone), log, model_cls=RecformerForPretraining, **overrides)
        tok = rtok.tokenizer
        masker = WholeWordMasker(tok, tr.mlm_probability)
        train = chunk_corpus(tok, train_lines, tr.max_length)
        valid = chunk_corpus(tok, valid_lines, tr.max_length)
        log(f"{len(train)} training chunks, {len(valid)} validation chunks of ≤ {tr.max_length} tokens")
        vrng = np.random.default_rng([tr.seed, 10**6])  # validation masks: drawn once, the same every time
        valid_batches = [mlm_batch(valid[i : i + tr.batch_size], masker, tok.pad_token_id, vrng)
                         for i in range(0, len(valid), tr.batch_size)]
        model.to(run.acc.device)
        before = mlm_metrics(model, valid_batches)
        log(f"validation before training: BPC {before['bpc']:.3f}, perplexity {before['perplexity']:.1f}")

        def make_loader(epoch: int):
            order = np.random.default_rng([tr.seed, epoch]).permutation(len(train))
            batches = [(b, [train[j] for j in order[i : i + tr.batch_size]])
                       for b, i in enumerate(range(0, len(order), tr.batch_size))]
            return data_loader(batches, seed=tr.seed + epoch, workers=run.loader_workers,
                               collate_fn=MlmCollator(masker, tok.pad_token_id, tr.seed, epoch))

        out_dir = run.dir / "model"
        info = {"backbone": str(backbone), "before": before}
        speed = _Throughput(lambda: mlm_metrics(run.acc.unwrap_model(model), valid_batches))
        r = run.fit(model, make_loader, Stage(
            "mlm", tr.epochs, tr.lr, speed.validate, "bpc", greater_is_better=False, patience=tr.patience,
            log_every=tr.log_every,
            on_best=lambda metrics, epoch: run.on_main(lambda: save_pretraining_model(
                run.acc.unwrap_model(model), rtok, out_dir, {**info, "epoch": epoch, "valid": metrics})),
            on_batch=speed.on_batch))
        result = {"before": before, "best": r.best_metrics, "best_epoch": r.best_epoch, "history": r.history,
                  "model_dir": str(out_dir), **speed.summary(run.acc.device)}
        log(f"training: {result['train_tokens']:,} tokens at {result['train_tokens_per_s']:,.0f} tokens/s (this "
            f"process; validation excluded), peak memory {result['peak_memory_mib']:,.0f} MiB, attention "
            f"{model.config.attention_impl}")
        run.finish(result, "mlm_report.json")
    return result


class _Throughput:
    """Real (non-padding) tokens trained on per second of training — the time of the whole fit less the
    validation passes — and the peak memory, for ``mlm_report.json``."""

    def __init__(self, validate):
        self._validate, self.tokens, self.valid_s = validate, 0, 0.0
        self.t0 = time.perf_counter()

    def validate(self) -> dict:
        t = time.perf_counter()
        out = self._validate()
        self.valid_s += time.perf_counter() - t
        return out

    def on_batch(self, batch: dict) -> None:
        self.tokens = self.tokens + batch["attention_mask"].sum()  # a tensor: no device sync per micro-batch

    def summary(self, device) -> dict:
        train_s = max(time.perf_counter() - self.t0 - self.valid_s, 1e-9)
        tokens = int(self.tokens)
        return {"train_tokens": tokens, "train_tokens_per_s": tokens / train_s,
                "peak_memory_mib": peak_memory_mib(device)}


class MlmCollator:
    """``(batch index, chunks)`` → a masked batch; the RNG is seeded by (seed, epoch, batch index), so a
    resumed run masks the same batch the same way."""

    def __init__(self, masker: WholeWordMasker, pad_id: int, seed: int, epoch: int):
        self.masker, self.pad_id, self.seed, self.epoch = masker, pad_id, seed, epoch

    def __call__(self, batch) -> dict:
        b, chunks = batch
        out = mlm_batch(chunks, self.masker, self.pad_id, np.random.default_rng([self.seed, self.epoch, b]))
        del out["chars"]  # for validation only
        return out
