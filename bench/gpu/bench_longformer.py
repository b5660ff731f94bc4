"""Longformer MLM training on one GPU in the Longformer_ZH shape (hidden 768, 12 layers, 12 heads, a 21,128-token
vocabulary, 4,096 tokens, window 512, the first token global): the model ``lmrec backbone pretrain-mlm``
trains (built from a checkpoint made by ``lmrec backbone convert-to-long`` from a random-init BERT), bf16
autocast, AdamW — once per attention implementation, HF's kernels (``longformer``) as the reference measured
in the same run.

``flex`` has no attention dropout: it runs with attention dropout 0 (``attention_probs_dropout_prob=0``); the
others with the checkpoint's 0.1, and HF once more at 0 as flex's own reference.

    python bench/gpu/bench_longformer.py [--impls longformer blocked sdpa flex auto] [--batch 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

LENGTH, WINDOW = 4096, 512


def make_backbone(root: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    from lmrec.recformer.backbones import convert_to_long

    bert = root / "bert"
    bert.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"tok{i}" for i in range(21128 - 5)]]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, max_position_embeddings=512)).save_pretrained(bert)
    return convert_to_long(bert, root / "longformer_zh", max_positions=LENGTH, attention_window=WINDOW,
                           log=lambda s: None)


def run(backbone: Path, impl: str, batch: int, steps: int, dropout: float) -> dict:
    from lmrec.recformer.backbones import build_recformer
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    torch.cuda.empty_cache()
    model, _, _ = build_recformer(backbone, model_cls=RecformerForPretraining, max_token_num=LENGTH, mlm_weight=1.0,
                                  attention_impl=impl, attention_probs_dropout_prob=dropout)
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, LENGTH), generator=g).cuda()
    labels = torch.where(torch.rand(batch, LENGTH, generator=g).cuda() < 0.15, ids, -100)
    mask = torch.ones_like(ids)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps (flex compiles in the first)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, mlm_labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"impl": impl, "dropout": dropout, "tokens_per_s": steps * batch * LENGTH / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["longformer", "blocked", "sdpa", "flex", "auto"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: Longformer_ZH shape MLM, {LENGTH} tokens, "
          f"window {WINDOW}, batch {args.batch}, bf16 autocast", flush=True)
    rows, ref = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone = make_backbone(Path(tmp))
        plan = [("longformer", 0.1), *[(i, 0.0 if i == "flex" else 0.1) for i in args.impls if i != "longformer"]]
        if "flex" in args.impls:
            plan.append(("longformer", 0.0))
        for impl, p in plan:
            try:
                r = run(backbone, impl, args.batch, args.steps, p)
            except Exception as e:
                print(f"{impl:>10} (attention dropout {p}): FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            if impl == "longformer":
                ref[p] = r
            base = ref.get(p)
            r["vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            r["mem_vs_hf"] = r["peak_gib"] / base["peak_gib"] if base else float("nan")
            rows.append(r)
            print(f"{impl:>10} (attention dropout {p}): {r['tokens_per_s']:>9,.0f} tokens/s  {r['vs_hf']:.2f}x HF  "
                  f"peak {r['peak_gib']:5.1f} GiB ({r['mem_vs_hf']:.2f}x HF)  loss {r['loss']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
