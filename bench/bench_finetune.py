"""Finetuning throughput (samples/s) and evaluation throughput (users/s, ranked over all items) for the
quickstart configuration on MovieLens-100k, with lmrec's SDPA attention and, as the reference measured in
the same run, HF's own Longformer attention (same weights, same batches).

    python bench/bench_finetune.py [--steps 20] [--users 256] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmrec.api import prepare
from lmrec.config import RunConfig
from lmrec.data.dataset import PreparedDataset
from lmrec.eval.evaluator import evaluate
from lmrec.recformer.backbones import build_default_backbone, build_recformer
from lmrec.recformer.collator import FinetuneCollator
from lmrec.recformer.recommender import Recommender


def build(ds: PreparedDataset, backbone: Path, impl: str, cfg: RunConfig) -> Recommender:
    m = cfg.model
    model, tok, _ = build_recformer(backbone, max_token_num=m.max_token_num, max_attr_num=m.max_attr_num,
                                    max_attr_length=m.max_attr_length, max_item_embeddings=ds.max_history_len + 1,
                                    pooler_type=m.pooler_type, attention_window=m.attention_window,
                                    attention_impl=impl)
    return Recommender(model, tok, ds.item_ids, ds.item_text)


def train_throughput(rec: Recommender, ds: PreparedDataset, cfg: RunConfig, steps: int) -> float:
    rng = np.random.default_rng(0)
    ex = ds.train_examples(rng)
    opt = torch.optim.AdamW(rec.model.parameters(), lr=1e-4)
    rec.model.train()
    bs = cfg.train.batch_size
    # what finetuning feeds the model
    collate = FinetuneCollator(rec.tokenizer, rec.item_tokens, len(rec.item_ids), ds.train_items(),
                               cfg.train.item_grad, cfg.train.item_batch_size)
    batches = []
    for _ in range(steps + 2):
        idx = rng.choice(len(ex), bs, replace=False)
        batches.append(collate([(ex.histories[i], ex.targets[i]) for i in idx]))
    for i, b in enumerate(batches):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        loss = rec.model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * bs / (time.perf_counter() - t0)


def eval_throughput(rec: Recommender, ds: PreparedDataset, users: int) -> float:
    ex = ds.examples("test")
    ex.histories, ex.targets, ex.users = ex.histories[:users], ex.targets[:users], ex.users[:users]
    t0 = time.perf_counter()
    rec.encode_items(show_progress=False)
    evaluate(rec.rank_fn(), ex, batch_size=64)
    return users / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    cfg = RunConfig()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare("ml-100k", Path(tmp) / "ml", log=lambda m: None)
        ds = PreparedDataset(data)
        texts = [" ".join(f"{k} {v}" for k, v in t) for t in ds.item_text]
        m = cfg.model
        backbone = build_default_backbone(texts, Path(tmp) / "bb", hidden_size=m.default_hidden_size,
                                          layers=m.default_layers, heads=m.default_heads,
                                          vocab_size=m.default_vocab_size, max_positions=m.max_token_num)
        results = {}
        for impl in ("longformer", "sdpa"):
            torch.manual_seed(0)
            rec = build(ds, backbone, impl, cfg)
            results[impl] = (train_throughput(rec, ds, cfg, args.steps), eval_throughput(rec, ds, args.users))
    (ref_t, ref_e), (our_t, our_e) = results["longformer"], results["sdpa"]
    config = (f"quickstart defaults (batch {cfg.train.batch_size}, max_token_num {cfg.model.max_token_num}, "
              f"hidden {cfg.model.default_hidden_size}, {cfg.model.default_layers} layers, item_grad "
              f"{cfg.train.item_grad}), {torch.get_num_threads()} threads")
    print(f"config: {config}")
    rows = []
    for what, ref, ours in (("finetune  samples/s", ref_t, our_t), ("evaluate  users/s  ", ref_e, our_e)):
        print(f"{what}  HF Longformer attention {ref:8.1f}   lmrec sdpa {ours:8.1f}   ratio {ours / ref:5.2f}x")
        rows.append([" ".join(what.split()), f"{ref:.1f}", f"{ours:.1f}", f"{ours / ref:.2f}×"])
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title="RecFormer finetuning and evaluation throughput, MovieLens-100k",
            columns=["measure", "HF Longformer attention", "lmrec sdpa", "lmrec / HF"],
            rows=rows,
            note=f"{config}; {args.steps} finetuning steps, {args.users} users evaluated over all items"))


if __name__ == "__main__":
    main()
