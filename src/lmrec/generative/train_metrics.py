"""What a generative stage measures and reports: every ``train.log_every`` steps the loss on itemic tokens
and on text tokens, the loss of every source, real (non-padding) tokens per second, the share of padding,
peak memory and the MFU estimate (any stage, packed or padded batches); and, for a streamed stage, how many
samples of each source it trained on and skipped, saved with its checkpoints and reported at the end.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lmrec.training.loop import peak_memory_mib


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
