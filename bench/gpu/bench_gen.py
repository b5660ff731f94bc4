"""Generative pretraining throughput on one GPU: random-init models with the real shapes of Qwen3-0.6B and
Qwen3-1.7B (vocabulary 151,669 + 3 × 8,192 itemic tokens, padded to 176,384 rows, tied head), 32,768-token
packs of a synthetic OpenOneRec-style corpus of mixed lengths, bf16 autocast over fp32 master weights,
activation checkpointing, the LM-head loss without full logits — trained through lmrec's own loop
(``lmrec.training.loop.fit``: the step ``gen train`` runs).

Per shape, three ways of feeding the same samples:
- ``varlen``: packs of 32,768 tokens, torch's varlen FlashAttention over the samples' boundaries;
- ``sdpa``: the same packs, transformers' sdpa with the block-diagonal mask it derives from the positions
  (what lmrec ran before ``train.attn_implementation``); the reference;
- ``padded``: the samples in length-grouped padded batches of at most 32,768 tokens, sdpa (no packing);
- ``varlen+compile`` (the last shape only, ``--no-compile`` skips it): varlen with ``train.compile`` (each
  decoder layer through ``torch.compile``; compiled during the warm-up steps).

Printed: real (non-padding) tokens/s, MFU = model FLOPs / time / the device's dense bf16 peak (model FLOPs:
6 × parameters in matrix products (decoder + head) × real tokens + causal attention 6 × layers × Σ s² ×
heads × head_dim; activation recomputation not counted), peak memory, and the ratio to sdpa.

    python bench/gpu/bench_gen.py [--shapes 0.6B 1.7B] [--impls varlen sdpa padded] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SHAPES = {  # Qwen3's published configurations
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
}
VOCAB = 176_384  # 151,669 + 3 × 8,192 itemic tokens + 2 markers, padded to a multiple of 256
PACK = 32_768
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def device_peak() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), float("nan"))


def corpus(n_tokens: int, seed: int = 0) -> list[int]:
    """Sample lengths of a mixed corpus: next-item conversations (hundreds of tokens) and general text (a
    long tail up to 8k)."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(6.3, 1.0), 24, 8192))
        out.append(n)
        total += n
    return out


def packed_batches(lengths: list[int], steps: int, seed: int = 0) -> list[dict]:
    """Best-fit packs of PACK tokens through lmrec's packer and collator (segments for varlen)."""
    from lmrec.data.stream import Sample, collate_packs, pack_samples

    rng = np.random.default_rng(seed)
    pending = list(lengths)
    batches = []
    while len(batches) < steps and pending:
        room, chosen = PACK, []
        for n in list(pending):
            if n <= room:
                chosen.append(n)
                pending.remove(n)
                room -= n
            if room < 24:
                break
        samples = [Sample([0, 0, 0], 0, rng.integers(10, 150_000, n).tolist(), rng.integers(10, 150_000, n).tolist())
                   for n in chosen]
        batch = collate_packs([pack_samples(samples)], pad_id=0, length=PACK, segments=True)
        batch.pop("sources"), batch.pop("skipped")
        batch["lengths"] = chosen
        batches.append(batch)
    return batches


def padded_batches(lengths: list[int], steps: int) -> list[dict]:
    """The same kind of samples, length-grouped, padded to the longest of each batch, ≤ PACK tokens a batch."""
    from lmrec.generative.samples import pad_batch

    rng = np.random.default_rng(1)
    order = sorted(lengths, reverse=True)
    batches, i = [], 0
    while len(batches) < steps and i < len(order):
        b = max(1, PACK // order[i])
        chosen = order[i: i + b]
        i += b
        items = [{"input_ids": (ids := rng.integers(10, 150_000, n).tolist()), "labels": ids} for n in chosen]
        batch = pad_batch(items, pad_id=0)
        batch["lengths"] = chosen
        batches.append(batch)
    return batches


def model_flops(cfg, lengths: list[int]) -> float:
    h, L, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    params = L * (h * qd + 2 * h * kvd + qd * h + 3 * h * ff) + VOCAB * h  # matrix products: layers + tied head
    tokens = sum(lengths)
    attention = 6 * L * sum(n * n for n in lengths) * qd  # causal: half of 2·2·s²·d forward, × 3 for training
    return 6 * params * tokens + attention


def run(shape: str, impl: str, steps: int, warmup: int, log) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lmrec.generative.stages import ChunkedLossLM, loss_impl
    from lmrec.training import attention
    from lmrec.training.loop import Optim, Stage, data_loader, fit, make_accelerator

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    acc = make_accelerator("bf16", seed=0)
    cfg = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=PACK, tie_word_embeddings=True, **SHAPES[shape])
    with torch.device("cuda"):
        lm = Qwen3ForCausalLM(cfg)  # fp32 master weights
    attention.apply(lm, attention.VARLEN if impl.startswith("varlen") else "sdpa")
    if impl.endswith("+compile"):  # train.compile: each decoder layer compiled (in the warm-up steps)
        from lmrec.training.fsdp import compile_layers

        compile_layers(lm)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = ChunkedLossLM(lm, 4096, loss_impl("auto", acc.device))
    lengths = corpus(PACK * (steps + warmup + 4))
    batches = (padded_batches if impl == "padded" else packed_batches)(lengths, steps + warmup)
    sizes = [b.pop("lengths") for b in batches]
    marks = {}

    def on_batch(_batch):
        i = len(marks)
        if i in (warmup, warmup + steps - 1):
            torch.cuda.synchronize()
        marks[i] = time.perf_counter()

    stage = Stage(f"{shape}-{impl}", 1, 1e-4, log_every=10_000, on_batch=on_batch)
    fit(acc, model, lambda e: data_loader(batches, seed=0), stage, optim=Optim(warmup_ratio=0.0), log=log)
    seconds = marks[warmup + steps - 1] - marks[warmup]
    timed = sizes[warmup + 1: warmup + steps]
    tokens = sum(sum(s) for s in timed)
    flops = sum(model_flops(cfg, s) for s in timed)
    out = {"shape": shape, "impl": impl, "tokens_per_s": tokens / seconds, "mfu": flops / seconds / device_peak(),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "step_s": seconds / (steps - 1),
           "loss": model.impl}
    del model, lm, acc
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.6B", "1.7B"], choices=list(SHAPES))
    ap.add_argument("--impls", nargs="+", default=["sdpa", "varlen", "padded"])
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (the first's end starts the clock)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, packs of {PACK:,} tokens, bf16 autocast, "
          f"fp32 master weights, activation checkpointing, fused AdamW; dense bf16 peak {device_peak() / 1e12:.0f} "
          "TFLOP/s", flush=True)
    rows = []
    for shape in args.shapes:
        ref = None
        extra = ["varlen+compile"] if shape == args.shapes[-1] and not args.no_compile else []
        for impl in [*args.impls, *extra]:
            try:
                r = run(shape, impl, args.steps, args.warmup, log=lambda m: None)
            except Exception as e:  # one failing configuration must not hide the others' numbers
                print(f"{shape:>5} {impl:>7}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ref = r if impl == "sdpa" else ref
            rows.append(r)
            vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x sdpa" if ref and impl != "sdpa" else ""
            print(f"{shape:>5} {impl:>7}: {r['tokens_per_s']:>9,.0f} tokens/s  MFU {100 * r['mfu']:5.1f} %  "
                  f"step {r['step_s']:.2f} s  peak {r['peak_gib']:6.1f} GiB  loss {r['loss']}  {vs}", flush=True)
        for r in rows:
            if r["shape"] == shape and ref and r["impl"] != "sdpa":
                r["vs_sdpa"] = r["tokens_per_s"] / ref["tokens_per_s"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
