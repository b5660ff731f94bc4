"""Inference on one GPU, each next to its reference measured in the same run:

- constrained beam search (beam 20, top-10) over 1M items with 3-level codes of 8,192 each, ms per query
  (p50 / p99 over batches of 32 users), for a tiny Qwen3 and a Qwen3-0.6B-shaped one (random init): lmrec's
  prefix tree on the device vs HF ``generate(..., prefix_allowed_tokens_fn=...)`` (a Python callback per
  beam and step, fewer batches: it is slow);
- full ranking of 10M items × 128 dims (fp32 on the device), top-10 per query, 64 queries a batch: lmrec's
  chunked ``top_k`` at several chunk sizes vs one matrix product + ``topk`` over all scores;
- RecFormer finetuning samples/s (a Longformer-base-shaped random model: hidden 768, 12 layers, window 64,
  bf16 autocast): lmrec's attention (``auto``) vs HF's kernels (``longformer``).

    python bench/gpu/bench_infer.py [--parts beam rank finetune]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def percentiles(times: list[float]) -> tuple[float, float]:
    a = np.array(times) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def catalog(n: int, k: int, levels: int, rng) -> np.ndarray:
    codes = np.unique(rng.integers(0, k, size=(int(n * 1.2), levels)), axis=0)
    return codes[rng.permutation(len(codes))[:n]]


def beam_part(out: list) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lmrec.generative.beam import SidTrie, constrained_beam_search

    rng = np.random.default_rng(0)
    base, levels, k, n, users, beams = 151_669, 3, 8192, 1_000_000, 32, 20
    codes = catalog(n, k, levels, rng)
    level_ids = [list(range(base + lv * k, base + (lv + 1) * k)) for lv in range(levels)]
    trie = SidTrie(codes, level_ids)
    prefix: dict[tuple, set] = {}
    for row in codes[:, :2]:  # HF's callback needs every prefix → its allowed next tokens
        t0, t1 = level_ids[0][row[0]], level_ids[1][row[1]]
        prefix.setdefault((), set()).add(t0)
        prefix.setdefault((t0,), set()).add(t1)
    for row in codes:
        key = (level_ids[0][row[0]], level_ids[1][row[1]])
        prefix.setdefault(key, set()).add(level_ids[2][row[2]])
    prefix = {p: sorted(s) for p, s in prefix.items()}
    shapes = {"tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32),
              "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128)}
    for name, shape in shapes.items():
        cfg = Qwen3Config(vocab_size=base + levels * k + 256, tie_word_embeddings=True, pad_token_id=0,
                          eos_token_id=1, **shape)
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
        ours, hf = [], []
        for b in range(8):
            prompts = torch.as_tensor(rng.integers(5, 150_000, size=(users, 64)), device="cuda")
            batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
            torch.cuda.synchronize()
            t = time.perf_counter()
            constrained_beam_search(model, trie, batch, beams)
            torch.cuda.synchronize()
            ours.append((time.perf_counter() - t) / users)
            if b < 3:
                hf.append(_hf_beam(model, batch, prefix, levels, beams) / users)
        (o50, o99), (h50, h99) = percentiles(ours[1:]), percentiles(hf[1:])
        out.append({"part": "beam", "model": name, "items": len(codes), "ours_p50_ms": o50, "ours_p99_ms": o99,
                    "hf_p50_ms": h50, "hf_p99_ms": h99, "speedup": h50 / o50})
        print(f"beam search, {name} model, {len(codes):,} items × 3 × 8,192, beam {beams}: lmrec {o50:.2f} / "
              f"{o99:.2f} ms per query (p50 / p99), HF generate {h50:.2f} / {h99:.2f} ms → {h50 / o50:.1f}x",
              flush=True)
        del model


def _hf_beam(model, batch, prefix, levels, beams) -> float:
    plen = batch["input_ids"].shape[1]

    def allowed(_b, ids):
        return prefix.get(tuple(ids[plen:].tolist()), [1])

    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, num_beams=beams, num_return_sequences=10, max_new_tokens=levels,
                       min_new_tokens=levels, do_sample=False, length_penalty=0.0, prefix_allowed_tokens_fn=allowed,
                       early_stopping=True, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def rank_part(out: list) -> None:
    from lmrec.eval.ranking import top_k

    g = torch.Generator(device="cuda").manual_seed(0)
    items = torch.randn(10_000_000, 128, device="cuda", generator=g)
    ref_times, rows = [], []
    for chunk in (8192, 131_072, 1_048_576):
        times = []
        for _ in range(6):
            q = torch.randn(64, 128, device="cuda", generator=g)
            torch.cuda.synchronize()
            t = time.perf_counter()
            s, i = top_k(q, items, 10, chunk_size=chunk)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / 64)
        rows.append((chunk, percentiles(times[1:])[0], (s, i, q)))
    for _ in range(6):
        q = torch.randn(64, 128, device="cuda", generator=g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        torch.topk(q @ items.T, 10, dim=-1)
        torch.cuda.synchronize()
        ref_times.append((time.perf_counter() - t) / 64)
    ref = percentiles(ref_times[1:])[0]
    _, _, (s, i, q) = rows[-1]
    same = bool((torch.topk(q @ items.T, 10, dim=-1).indices == i).float().mean() > 0.99)
    for chunk, ms, _ in rows:
        out.append({"part": "rank", "chunk": chunk, "ms_per_query": ms, "ref_ms_per_query": ref, "ratio": ref / ms,
                    "same_top10": same})
        print(f"full ranking, 10M items × 128, top-10: chunks of {chunk:>9,}: {ms:.3f} ms per query; one product + "
              f"topk {ref:.3f} ms → {ref / ms:.2f}x (same top-10: {same})", flush=True)
    del items


def finetune_part(out: list) -> None:
    import sys
    import tempfile
    from pathlib import Path

    from lmrec.config import RunConfig
    from lmrec.data.dataset import PreparedDataset
    from lmrec.recformer.backbones import build_default_backbone
    from tests.training.test_distributed import synthetic_dataset
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from bench_finetune import build, train_throughput

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(Path(tmp) / "data", users=2000, items=1500)
        ds = PreparedDataset(data)
        texts = [" ".join(f"{k} {v}" for k, v in t) for t in ds.item_text[:500]]
        backbone = build_default_backbone(texts, Path(tmp) / "bb", hidden_size=768, layers=12, heads=12,
                                          vocab_size=8000, max_positions=1024, attention_window=64)
        cfg = RunConfig.model_validate({"train": {"batch_size": 32, "item_grad": "batch"}})
        res = {}
        for impl in ("longformer", "auto"):
            rec = build(ds, backbone, impl, cfg)
            rec.model.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                res[impl] = train_throughput(rec, ds, cfg, steps=6)
            del rec
            torch.cuda.empty_cache()
        out.append({"part": "finetune", "ours_samples_per_s": res["auto"], "hf_samples_per_s": res["longformer"],
                    "ratio": res["auto"] / res["longformer"]})
        ratio = res["auto"] / res["longformer"]
        print(f"RecFormer finetuning (hidden 768, 12 layers, batch {cfg.train.batch_size}, bf16): lmrec auto "
              f"{res['auto']:.1f} samples/s, HF kernels {res['longformer']:.1f} → {ratio:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["beam", "rank", "finetune"])
    ap.add_argument("--json")
    args = ap.parse_args()
    out: list = []
    for part in args.parts:
        try:
            {"beam": beam_part, "rank": rank_part, "finetune": finetune_part}[part](out)
        except Exception as e:
            print(f"{part}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
