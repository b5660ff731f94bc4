"""Constrained beam search: lmrec's CSR prefix tree vs HF ``generate(..., prefix_allowed_tokens_fn=...)``.

Same tiny Qwen3-style model (random init), catalogs of 1k and 10k items with 3-level codes, beam 20,
top-10, 8 and 32 users per call (32 is the evaluator's default batch). Checks that both return the same
top-10 items and prints the speed ratio.

    python bench/bench_beam.py [--users 8 32] [--repeats 3] [--record beam.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lmrec.generative.beam import SidTrie, constrained_beam_search
from lmrec.provenance import Table, write_record


def catalog(n: int, k: int, levels: int, rng) -> np.ndarray:
    grid = rng.integers(0, k, size=(n * 3, levels))
    codes = np.unique(grid, axis=0)
    return codes[rng.permutation(len(codes))[:n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    rows = []
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base_vocab, levels = 2000, 3
    for n, k in ((1000, 16), (10000, 32)):
        codes = catalog(n, k, levels, rng)
        level_ids = [list(range(base_vocab + lv * k, base_vocab + (lv + 1) * k)) for lv in range(levels)]
        cfg = Qwen3Config(vocab_size=base_vocab + levels * k, hidden_size=128, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
        model = Qwen3ForCausalLM(cfg).eval()
        trie = SidTrie(codes, level_ids)
        prefix: dict[tuple, list[int]] = {}
        for row in codes:
            toks = [level_ids[lv][c] for lv, c in enumerate(row)]
            for d in range(levels):
                prefix.setdefault(tuple(toks[:d]), set()).add(toks[d])
        prefix = {p: sorted(s) for p, s in prefix.items()}
        item_of = {tuple(level_ids[lv][c] for lv, c in enumerate(row)): i for i, row in enumerate(codes)}
        for users in args.users:
            prompts = torch.as_tensor(rng.integers(5, base_vocab, size=(users, 40)))
            rows.append(run(model, trie, {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}, prefix,
                            item_of, levels, f"{len(codes):>6} items, {levels} levels x {k} codes", cfg.eos_token_id,
                            args))
    if args.record:
        write_record(args.record, Table(
            title="Constrained beam search (tiny Qwen3, random init)",
            columns=["catalog", "users per call", "same top-10 as HF", "lmrec ms", "HF generate ms",
                     "HF / lmrec"],
            rows=rows,
            note=f"beam {args.beams}, top-10, mean of {args.repeats} calls; HF: generate with "
                 "prefix_allowed_tokens_fn"))


def run(model, trie, batch, prefix, item_of, levels, label, eos, args) -> list:
    users, plen = batch["input_ids"].shape

    def allowed(batch_id, ids):
        return prefix.get(tuple(ids[plen:].tolist()), [eos])

    def ours():
        return constrained_beam_search(model, trie, batch, args.beams)

    def hf():
        out = model.generate(**batch, num_beams=args.beams, num_return_sequences=10, max_new_tokens=levels,
                             min_new_tokens=levels, do_sample=False, length_penalty=0.0,
                             prefix_allowed_tokens_fn=allowed, early_stopping=True, pad_token_id=0)
        seqs = out[:, plen:].view(users, 10, levels)
        return [[item_of.get(tuple(s.tolist()), -1) for s in u] for u in seqs]

    with torch.no_grad():
        a, h = ours(), hf()  # warm-up and check
        same = sum(a[0][u, :10].tolist() == h[u] for u in range(users))
        t = time.perf_counter()
        for _ in range(args.repeats):
            ours()
        t_ours = (time.perf_counter() - t) / args.repeats
        t = time.perf_counter()
        for _ in range(args.repeats):
            hf()
        t_hf = (time.perf_counter() - t) / args.repeats
    print(f"{label}, beam {args.beams}, top-10, {users} users: "
          f"same top-10 for {same}/{users} users; lmrec {t_ours * 1000:.1f} ms, HF generate + "
          f"prefix_allowed_tokens_fn {t_hf * 1000:.1f} ms -> {t_hf / t_ours:.1f}x")
    return [label.strip(), users, f"{same}/{users}", f"{t_ours * 1000:.1f}", f"{t_hf * 1000:.1f}",
            f"{t_hf / t_ours:.1f}×"]


if __name__ == "__main__":
    main()
