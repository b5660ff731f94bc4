"""``gen train --data-config``: a generative stage on streamed, packed chat parquet (OpenOneRec's recipe).

The data config names the sources (our ``gen samples`` output, a user's OpenOneRec files, general text),
their weights, the pack length and the stream's workers; ``data.ChatStream`` reads them; the loop runs the
stream as one epoch of token-normalised steps and checkpoints the stream's state with the model. What is
logged every ``train.log_every`` steps: the loss on itemic tokens and on text tokens, the loss of every
source, real (non-padding) tokens per second, and the share of padding.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmrec.data.data_config import DataMixConfig
from lmrec.data.stream import ChatStream, collate_packs
from lmrec.data.stream_plan import check_readers, scan
from lmrec.errors import ConfigError, LmrecError
from lmrec.generative.prompts import encode_chat
from lmrec.training.distributed import from_main_process
from lmrec.training.loop import peak_memory_mib

SNAPSHOT_EVERY = 16


def check_itemic_range(mix: DataMixConfig, meta: dict) -> list[int]:
    """[first, last] itemic token id, from the model's ``sid_vocab.json``; a typed ``itemic_id_range`` in
    the data config must agree with it."""
    ids = sum(meta["level_token_ids"], [])
    derived = [min(ids), max(ids)]
    if mix.itemic_id_range is not None and list(mix.itemic_id_range) != derived:
        raise ConfigError(f"itemic_id_range {mix.itemic_id_range} in the data config does not match the model's "
                          f"sid_vocab.json ({derived}); leave it out, it is derived from the model")
    return derived


def stream_loader_factory(mix: DataMixConfig, tok, run, batch_size: int, log=print, segments: bool = False):
    """``make_loader`` for the loop (one StatefulDataLoader over this rank's stream), the source names, and
    the stream's plan (every file's footer and a sampled tokenization, read once on rank 0 and sent to the
    other ranks; for the schedule's estimate)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    names = [s.name or Path(s.path.rstrip("/*")).stem or f"source{i}" for i, s in enumerate(mix.sources)]
    if len(set(names)) != len(names):
        raise ConfigError(f"data config sources need distinct names (got {names}); add \"name\" to each")
    encode = functools.partial(encode_chat, tok, think=mix.add_think_pattern)
    plan = from_main_process(run.acc, lambda: scan(mix, encode))
    weights = [s.weight for s in mix.sources]
    check_readers(plan, mix, weights, run.acc.num_processes, log)
    stream = ChatStream(plan.files, names, mix, encode, rank=run.acc.process_index, world=run.acc.num_processes,
                        weights=weights, row_groups=plan.row_groups)
    collate = functools.partial(collate_packs, pad_id=tok.pad_token_id, length=mix.max_length, segments=segments)
    log(f"streaming {sum(len(f) for f in plan.files)} parquet files of {len(names)} source(s) "
        f"({', '.join(names)}), packs of {mix.max_length} tokens, {mix.num_workers} worker(s) per rank")

    def make_loader(epoch: int):
        # a worker's state is taken every SNAPSHOT_EVERY packs; a resume replays the few packs since (exact)
        return StatefulDataLoader(stream, batch_size=batch_size, num_workers=mix.num_workers, collate_fn=collate,
                                  snapshot_every_n_steps=SNAPSHOT_EVERY)

    return make_loader, names, plan


def token_metrics(names: list[str], itemic: list[int], acc, steps_between: int, params: int = 0,
                  peak_tflops: float | None = None, shift: int = 1):
    """A ``step_metrics`` callback on the last micro-batch of every ``steps_between`` steps, summed over the
    ranks: losses on itemic tokens / text tokens / per source, the padding share, and real tokens per second
    (that micro-batch's real tokens × micro-batches since the last call / the time since), peak memory of
    this process, and — given the accelerator's peak TFLOP/s — the model FLOPs utilisation estimate
    6 · parameters · tokens/s / peak (the usual 6N rule: forward + backward, attention not counted).

    A packed batch says each token's source (``sources``, -1 for padding); a padded batch from a prepared
    dataset has none (``names`` empty: its real tokens are its attention mask). ``shift``: 1 for a causal
    LM (position t predicts label t + 1), 0 for an encoder-decoder's decoder labels."""
    itemic_ids = torch.as_tensor(sorted(set(itemic)))
    last = {"time": time.time()}

    @torch.no_grad()
    def metrics(batch: dict, out) -> dict[str, float]:
        if "sources" not in batch:
            batch = {**batch, "sources": torch.where(batch["attention_mask"].bool(), 0, -1)}
        labels, sources = batch["labels"][:, shift:], batch["sources"][:, shift:].to(batch["labels"].device)
        nll = getattr(out, "token_nll", None)  # the chunked loss has no logits, but every token's loss
        if nll is None:
            logits = out.logits[:, : out.logits.shape[1] - shift]
            nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                                  ignore_index=-100).view_as(labels)
        seen = labels != -100
        is_item = torch.isin(labels, itemic_ids.to(labels.device)) & seen
        parts = [nll[is_item].sum(), is_item.sum(), nll[seen & ~is_item].sum(), (seen & ~is_item).sum(),
                 (batch["sources"] >= 0).sum(), torch.tensor(batch["sources"].numel())]
        for s in range(len(names)):
            m = seen & (sources == s)
            parts += [nll[m].sum(), m.sum()]
        v = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=labels.device) for x in parts])
        v = acc.reduce(v, reduction="sum") if acc.num_processes > 1 else v
        v = v.tolist()
        now = time.time()
        out_ = {"loss_itemic": v[0] / max(v[1], 1), "loss_text": v[2] / max(v[3], 1),
                "padding_share": 1 - v[4] / max(v[5], 1),
                "real_tokens_per_s": v[4] * steps_between / max(now - last["time"], 1e-9)}
        last["time"] = now
        for s, name in enumerate(names):
            out_[f"loss_source/{name}"] = v[6 + 2 * s] / max(v[7 + 2 * s], 1)
        out_["peak_memory_mib"] = peak_memory_mib(labels.device)
        if peak_tflops:
            out_["mfu"] = 6 * params * out_["real_tokens_per_s"] / (peak_tflops * 1e12 * acc.num_processes)
        return out_

    return metrics


def require_decoder_only(model) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise LmrecError("packed streaming trains decoder-only models (Qwen3-style); an encoder-decoder model "
                         "trains from a prepared dataset (--data, --sids)")


class StreamTally:
    """Per source: samples trained on, over-length samples and bad rows skipped — counted on every
    micro-batch (``on_batch``) of this rank, saved with every checkpoint by every rank (``extra_state``,
    ``rank_local``: each rank resumes its own counts; ``report`` sums them)."""

    rank_local = True

    def __init__(self, names: list[str]):
        self.names = names
        self.counts: dict[str, dict[str, int]] = {"samples": {}, "too_long": {}, "bad_rows": {}}

    def on_batch(self, batch: dict) -> None:
        starts = (batch["position_ids"] == 0) & (batch["sources"].to(batch["position_ids"].device) >= 0)
        per = torch.bincount(batch["sources"].to(starts.device)[starts], minlength=len(self.names)).tolist()
        for name, n in zip(self.names, per):
            self._add("samples", name, n)
        for key, n in batch.get("skipped", {}).items():
            kind, _, name = key.partition("/")
            self._add(kind, name, n)

    def _add(self, kind: str, name: str, n: int) -> None:
        if n:
            self.counts[kind][name] = self.counts[kind].get(name, 0) + int(n)

    def state_dict(self) -> dict:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"]

    def report(self, run, log=print) -> dict:
        """Summed over the ranks; printed by rank 0 and returned for metrics.json."""
        from accelerate.utils import gather_object

        parts = gather_object([self.counts]) if run.acc.num_processes > 1 else [self.counts]
        total: dict[str, dict[str, int]] = {k: {} for k in self.counts}
        for c in parts:
            for kind, per_source in c.items():
                for src, n in per_source.items():
                    total[kind][src] = total[kind].get(src, 0) + n
        if run.is_main:
            for src in self.names:
                log(f"source {src}: {total['samples'].get(src, 0)} samples trained on, "
                    f"{total['too_long'].get(src, 0)} over-length (over_length: dropped or truncated), "
                    f"{total['bad_rows'].get(src, 0)} bad rows skipped")
        return total
