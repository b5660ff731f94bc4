"""Longformer attention at 512–4,096 tokens: forward + backward time and peak memory of every
implementation behind ``attention_impl`` (lmrec.recformer.attention), with HF's own band kernels
(``longformer``) as the reference measured in the same run.

One Longformer layer (hidden 256, 4 heads, intermediate 1,024), batch 1, one global token (the first),
same weights for every implementation; the input requires grad, so backward computes the weight and the
input gradients. Time: median of ``--repeats`` runs after one warm-up. Peak memory: the high-water mark of
bytes held by tensors allocated during forward + backward (torch's profiler records every CPU allocation;
the CPU analogue of ``torch.cuda.max_memory_allocated``), the inputs and weights excluded.

Targets: at 4,096 tokens the blocked kernel ≥ 2.5× faster than HF's with a 64 window and ≥ 1.5×
with a 512 window; its memory grows ≤ 4.5× from 1,024 to 4,096 tokens; at ≤ 1,024 tokens ``auto`` is no
slower than dense SDPA. Every row also checks the outputs against HF's (max |diff|).

    python bench/bench_attention.py [--lengths 512 1024 2048 4096] [--windows 64 512] [--repeats 5] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lmrec.recformer.attention import LongformerLayers, Pattern, hf_self_attention, self_attention
from lmrec.recformer.configuration_recformer import RecformerConfig

IMPLS = ("longformer", "sdpa", "blocked", "auto")


def layer_for(window: int, hidden: int, heads: int, impl: str, seed: int = 0) -> LongformerLayers:
    cfg = RecformerConfig(vocab_size=10, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                          intermediate_size=4 * hidden, attention_window=window, attention_impl=impl,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    layers = LongformerLayers(cfg)
    for p in layers.parameters():  # BERT-like scale, so that softmaxes are not flat
        torch.nn.init.normal_(p, std=0.05)
    return layers.train()


def forward(layers: LongformerLayers, x: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``layer``: the whole Longformer layer; ``attention``: its self-attention only (hidden states →
    context), the part the implementations differ in."""
    if level == "layer":
        return layers(x, mask)
    sa = layers.layer[0].attention.self
    impl = layers.config.attention_impl
    if impl == "longformer":
        return hf_self_attention(sa, x, mask)
    if impl == "auto":
        impl = layers.choose(x.shape[1], layers.config.attention_window[0])
    return self_attention(sa, x, Pattern(mask), impl, training=True)


def step(layers: LongformerLayers, x: torch.Tensor, mask: torch.Tensor, level: str = "layer") -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    out = forward(layers, x, mask, level)
    out.square().mean().backward()
    return out.detach()


def peak_mib(fn) -> float:
    """The most bytes held at once by tensors allocated while ``fn`` runs: torch's profiler attributes each
    CPU allocation to the op that made it and records each free; summed in time order."""
    import os

    from torch.profiler import ProfilerActivity, profile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1), os.dup2(quiet, 2)  # the profiler's backend prints start/stop lines
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for f in (*saved, quiet):
            os.close(f)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def measure(impl: str, length: int, window: int, hidden: int, heads: int, repeats: int, level: str,
            ref=None) -> dict:
    layers = layer_for(window, hidden, heads, impl)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, length, hidden, generator=g)
    mask = torch.zeros(1, length)
    mask[0, 0] = 1  # one global token

    def run():
        layers.zero_grad(set_to_none=True)
        return step(layers, x, mask, level)

    out = run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    mem = peak_mib(run)
    diff = float((out - ref).abs().max()) if ref is not None else 0.0
    # the minimum: the machine's other load only ever adds time
    return {"ms": 1000 * min(times), "mib": mem, "out": out, "diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS[1:]), choices=IMPLS[1:],
                    help="measured next to HF's (longformer), always measured")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {args.hidden}, {args.heads} heads, "
          "1 layer, batch 1, 1 global token, forward + backward (weight and input gradients); time = the fastest "
          f"of {args.repeats} runs")
    print(f"{'window':>6} {'tokens':>6} {'impl':>10} | {'attention':>9} {'MiB':>7} {'vs HF':>6} {'mem/HF':>6} | "
          f"{'layer':>8} {'MiB':>7} {'vs HF':>6} | {'max|diff|':>9}")
    res: dict[tuple[str, int, int, str], dict] = {}
    for window in args.windows:
        for n in args.lengths:
            for impl in ["longformer", *args.impls]:
                for level in ("attention", "layer"):
                    ref = res.get((level, window, n, "longformer"), {}).get("out")
                    res[level, window, n, impl] = measure(impl, n, window, args.hidden, args.heads, args.repeats,
                                                          level, ref)
                a, lay = res["attention", window, n, impl], res["layer", window, n, impl]
                ha, hl = res["attention", window, n, "longformer"], res["layer", window, n, "longformer"]
                print(f"{window:>6} {n:>6} {impl:>10} | {a['ms']:>7.1f}ms {a['mib']:>7.1f} {ha['ms'] / a['ms']:>5.2f}x "
                      f"{a['mib'] / ha['mib']:>6.2f} | {lay['ms']:>6.1f}ms {lay['mib']:>7.1f} "
                      f"{hl['ms'] / lay['ms']:>5.2f}x | {max(a['diff'], lay['diff']):>9.1e}", flush=True)
                rows.append([window, f"{n:,}", impl, f"{a['ms']:.1f}", f"{a['mib']:.1f}", f"{ha['ms'] / a['ms']:.2f}×",
                             f"{a['mib'] / ha['mib']:.2f}", f"{lay['ms']:.1f}", f"{lay['mib']:.1f}",
                             f"{hl['ms'] / lay['ms']:.2f}×", f"{max(a['diff'], lay['diff']):.1e}"])
    summary(res, args)
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title="Longformer attention, forward + backward, every attention_impl",
            columns=["window", "tokens", "impl", "attention ms", "attention MiB", "speed vs HF",
                     "memory / HF", "layer ms", "layer MiB", "layer speed vs HF", "max |diff| vs HF"],
            rows=rows,
            note=f"hidden {args.hidden}, {args.heads} heads, 1 layer, batch 1, 1 global token, "
                 f"{torch.get_num_threads()} threads; time: the fastest of {args.repeats} runs; "
                 "reference: HF's band kernels (impl longformer)"))


def summary(res: dict, args) -> None:
    print()
    hi = max(args.lengths)
    for window in args.windows:
        for impl in ("blocked", "sdpa", "longformer"):
            for level in ("attention", "layer"):
                if ("attention", window, 1024, impl) in res and ("attention", window, 4096, impl) in res:
                    growth = res[level, window, 4096, impl]["mib"] / res[level, window, 1024, impl]["mib"]
                    print(f"window {window}: {impl} {level} memory 1,024 → 4,096 tokens ×{growth:.2f}"
                          + (" (target ≤ 4.5)" if impl == "blocked" else ""))
        if ("attention", window, hi, "blocked") in res:
            target = 2.5 if window <= 64 else 1.5
            for level in ("attention", "layer"):
                speed = res[level, window, hi, "longformer"]["ms"] / res[level, window, hi, "blocked"]["ms"]
                print(f"window {window}: blocked {level} at {hi:,} tokens {speed:.2f}x HF's speed (target ≥ {target})")
        for n in args.lengths:
            if n <= 1024 and ("layer", window, n, "auto") in res and ("layer", window, n, "sdpa") in res:
                ratio = [res[lv, window, n, "sdpa"]["ms"] / res[lv, window, n, "auto"]["ms"]
                         for lv in ("attention", "layer")]
                print(f"window {window}: auto at {n:,} tokens {ratio[0]:.2f}x (attention) / {ratio[1]:.2f}x (layer) "
                      "dense SDPA's speed (target ≥ 1)")


if __name__ == "__main__":
    main()
