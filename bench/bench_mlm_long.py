"""`lmrec backbone pretrain-mlm` at the Chinese Longformer's setting — 4,096-token chunks, a 512-token window
— on a small Longformer_ZH-layout model, once per attention implementation, HF's kernels (``longformer``)
as the reference measured in the same run.

The backbone is made the way a user makes one from a Chinese BERT: a random-init ``BertForMaskedLM``
(hidden 128, 4 heads, 2 layers, a vocabulary of jieba's most frequent characters) saved with
``save_pretrained``, then ``lmrec backbone convert-to-long --max-positions 4096 --attention-window 512``.
The corpus is generated Chinese text (words of jieba's dictionary), documents of ~12k characters.

Printed per implementation: training tokens/s (real tokens, validation excluded, from ``mlm_report.json``),
the run's peak resident memory (its own process: launched before this one holds anything big, since on Linux a
child's peak starts from its parent's), the peak tensor memory of one training step (forward + backward at
batch 2 × 4,096 tokens; torch's profiler, as in bench_attention.py) and the validation BPC after training
(the same for every implementation: they compute the same function).

    python bench/bench_mlm_long.py [--impls longformer sdpa blocked auto] [--docs 12] [--batch 2] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import peak_mib  # noqa: E402

LENGTH, WINDOW = 4096, 512


def jieba_vocabulary(n_chars: int) -> tuple[list[str], list[str], np.ndarray]:
    """jieba's most frequent characters, and its two- and three-character words with their frequencies."""
    import jieba

    chars: dict[str, int] = {}
    words, freq = [], []
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as f:
        for line in f:
            word, count = line.split()[:2]
            for ch in word:
                chars[ch] = chars.get(ch, 0) + int(count)
            if 2 <= len(word) <= 3:
                words.append(word)
                freq.append(int(count))
    top = sorted(chars, key=lambda c: -chars[c])[:n_chars]
    keep = [i for i, w in enumerate(words) if all(c in set(top) for c in w)]
    p = np.array([freq[i] for i in keep], dtype=float)
    return top, [words[i] for i in keep], p / p.sum()


def make_backbone(root: Path, chars: list[str]) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    from lmrec.recformer.backbones import convert_to_long

    bert = root / "bert"
    bert.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。", *chars]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=512, max_position_embeddings=512)).save_pretrained(bert)
    return convert_to_long(bert, root / "longformer_zh", max_positions=LENGTH, attention_window=WINDOW,
                           log=lambda s: None)


def make_corpus(path: Path, words: list[str], p: np.ndarray, docs: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)

    def doc() -> str:
        out = []
        for _ in range(1500):  # sentences of 2–5 words: ~12k characters, about three 4k-token chunks
            out.append("".join(rng.choice(words, size=rng.integers(2, 6), p=p)) + rng.choice(["，", "。"]))
        return "".join(out)

    path.write_text("\n".join(doc() for _ in range(docs)), encoding="utf-8")
    return path


def run_cli(impl: str, backbone: Path, train: Path, valid: Path, out: Path, batch: int) -> dict:
    cmd = [sys.executable, "-m", "lmrec.cli.main", "backbone", "pretrain-mlm", str(backbone), "--train", str(train),
           "--valid", str(valid), "--output-dir", str(out), f"train.max_length={LENGTH}", f"train.batch_size={batch}",
           "train.epochs=1", f"train.attention_impl={impl}", "train.save_steps=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LMREC_REPORT": "0"})
    if res.returncode != 0:
        raise SystemExit(f"{impl}: pretrain-mlm failed\n{res.stderr[-3000:]}")
    return json.loads((out / "mlm_report.json").read_text())


def step_peak(impl: str, backbone: Path, batch: int) -> float:
    """Peak tensor memory (MiB) of one MLM training step at batch × 4,096 tokens."""
    from lmrec.recformer.backbones import build_recformer
    from lmrec.recformer.modeling_recformer import RecformerForPretraining

    model, _, _ = build_recformer(backbone, model_cls=RecformerForPretraining, max_token_num=LENGTH,
                                  mlm_weight=1.0, attention_impl=impl)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, LENGTH), generator=g)
    labels = torch.where(torch.rand(batch, LENGTH, generator=g) < 0.15, ids, -100)

    def step():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), mlm_labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    return peak_mib(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["longformer", "sdpa", "blocked", "auto"],
                    choices=["longformer", "sdpa", "blocked", "auto"])
    ap.add_argument("--docs", type=int, default=12, help="training documents (~3 chunks of 4,096 tokens each)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    impls = ["longformer", *[i for i in args.impls if i != "longformer"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chars, words, p = jieba_vocabulary(3000)
        backbone = make_backbone(root, chars)
        train = make_corpus(root / "train.txt", words, p, args.docs, 0)
        valid = make_corpus(root / "valid.txt", words, p, 2, 1)
        print(f"pretrain-mlm, Longformer_ZH layout (hidden 128, 4 heads, 2 layers), {LENGTH:,}-token chunks, window "
              f"{WINDOW}, batch {args.batch}, 1 epoch, {torch.get_num_threads()} threads")
        print(f"{'impl':>10} {'tokens/s':>9} {'vs HF':>6} {'peak RSS':>9} {'step tensors':>13} {'vs HF':>6} "
              f"{'valid BPC':>9}")
        reports = {}
        for impl in impls:  # before anything big runs here: a child's peak RSS starts from its parent's
            reports[impl] = run_cli(impl, backbone, train, valid, root / f"run-{impl}", args.batch)
        rows = {}
        for impl in impls:
            r = reports[impl]
            rows[impl] = (r["train_tokens_per_s"], r["peak_memory_mib"], step_peak(impl, backbone, args.batch),
                          r["best"]["bpc"])
            tps, rss, step, bpc = rows[impl]
            hf = rows["longformer"]
            print(f"{impl:>10} {tps:>9,.0f} {tps / hf[0]:>5.2f}x {rss:>6,.0f} MiB {step:>9,.0f} MiB "
                  f"{step / hf[2]:>6.2f} {bpc:>9.4f}", flush=True)
    if args.record:
        from lmrec.provenance import Table, write_record

        hf = rows["longformer"]
        write_record(args.record, Table(
            title=f"backbone pretrain-mlm at {LENGTH:,}-token chunks, window {WINDOW}",
            columns=["impl", "tokens/s", "speed vs HF", "peak RSS MiB", "step tensors MiB", "memory / HF",
                     "valid BPC"],
            rows=[[impl, f"{t:,.0f}", f"{t / hf[0]:.2f}×", f"{r:,.0f}", f"{st:,.0f}", f"{st / hf[2]:.2f}",
                   f"{b:.4f}"] for impl, (t, r, st, b) in rows.items()],
            note=f"Longformer_ZH layout (hidden 128, 4 heads, 2 layers), batch {args.batch}, {args.docs} "
                 f"documents, 1 epoch, {torch.get_num_threads()} threads; reference: HF's kernels "
                 "(impl longformer)"))

if __name__ == "__main__":
    main()
