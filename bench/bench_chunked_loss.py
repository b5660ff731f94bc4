"""Chunked LM-head loss vs the full logits: peak memory and time of forward + backward at Qwen3's real
vocabulary with the itemic tokens (176,384 rows), at the hidden sizes of Qwen3-0.6B to 8B (1,024–4,096:
where the head gradient the chunked loss holds, 4·V·h bytes, is as large as a chunk's logits or larger)
and a small one, for several token counts.

Each measurement runs in a fresh process (peak RSS is the process's high-water mark; the inputs' own
memory is subtracted) on the CPU, or on a GPU when one is present (``torch.cuda.max_memory_allocated``).
Full logits at 32k tokens need 32,768 × 176,384 × 4 B = 21.5 GiB for the fp32 logits alone, plus the
softmax's copy: where that cannot run here, the size is printed from that formula instead.
Targets: chunked peak ≤ 1/4 of the full-logits peak at 8k tokens, time ≤ 1.3×.

    python bench/bench_chunked_loss.py [--hidden 1024 4096] [--chunk 4096] [--tokens 2048 8192] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB = 176_384


def child(impl: str, tokens: int, hidden: int, chunk: int) -> None:
    import torch

    from lmrec.training.losses import chunked_lm_loss, plain_lm_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).to(dev).requires_grad_()
    w = (torch.randn(VOCAB, hidden, generator=g) * 0.02).to(dev).requires_grad_()
    y = torch.randint(0, VOCAB, (1, tokens), generator=g).to(dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    loss = chunked_lm_loss(h, w, y, chunk_tokens=chunk)[0] if impl == "chunked" else plain_lm_loss(h, w, y)
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": peak - base, "loss": loss.item(),
                      "device": dev}))


def measure(impl: str, tokens: int, hidden: int, chunk: int) -> dict | None:
    res = subprocess.run([sys.executable, __file__, "--child", impl, str(tokens), str(hidden), str(chunk)],
                         capture_output=True, text=True)
    if res.returncode != 0:  # killed for memory, or out of GPU memory
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--max-full-gib", type=float, default=16.0,
                    help="skip the full-logits run where its logits alone would exceed this (it would not fit)")
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    rows = [row(n, hidden, args) for hidden in args.hidden for n in args.tokens]
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title=f"Chunked LM-head loss at vocabulary {VOCAB:,}",
            columns=["tokens", "hidden", "chunked MiB", "chunked s", "full logits MiB", "full logits s",
                     "memory chunked / full", "time chunked / full", "device"],
            rows=rows,
            note=f"forward + backward, chunks of {args.chunk:,}; each in a fresh process; full logits "
                 f"not run where they need more than {args.max_full_gib:g} GiB"))


def row(n: int, hidden: int, args) -> list:
    """Measure one size, print its line, return its table row."""
    logits_gib = n * VOCAB * 4 / 2**30
    c = measure("chunked", n, hidden, args.chunk)
    tried = 2 * logits_gib <= args.max_full_gib
    full = measure("full", n, hidden, args.chunk) if tried else None
    ours = [f"{c['peak_mib']:,.0f}", f"{c['seconds']:.2f}"] if c else ["failed", "—"]
    line = f"{n:,} tokens, vocab {VOCAB:,}, hidden {hidden}: chunked ({args.chunk}) "
    line += f"{ours[0]} MiB, {ours[1]} s" if c else "failed"
    if tried and full is None:  # killed for memory, or out of GPU memory
        ref = ["failed (out of memory?)", "—", "—", "—"]
        line += "; full logits failed (out of memory?)"
    elif full is None:
        ref = [f"not run (≥ {2 * logits_gib:.1f} GiB)", "—", "—", "—"]
        line += (f"; full logits not run here: fp32 logits alone {logits_gib:.1f} GiB (+ the softmax copy "
                 f"in backward: >= {2 * logits_gib:.1f} GiB)")
    else:
        ratios = [f"{c['peak_mib'] / full['peak_mib']:.3f}", f"{c['seconds'] / full['seconds']:.2f}×"] if c else [
            "—", "—"]
        ref = [f"{full['peak_mib']:,.0f}", f"{full['seconds']:.2f}", *ratios]
        line += (f"; full logits {ref[0]} MiB, {ref[1]} s; memory ratio {ratios[0]} (target <= 0.25), time ratio "
                 f"{ratios[1]} (target <= 1.3)")
        if c:
            line += f"; |loss diff| {abs(c['loss'] - full['loss']):.2e}"
    device = c["device"] if c else "?"
    print(line + f" [{device}]")
    return [f"{n:,}", hidden, *ours, *ref, device]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
