"""Packing: the share of real (non-padding) tokens in packed vs padded batches, and training tokens/s of the
embedded tiny Qwen3 on both.

Two corpora: the ml-100k next-item chat samples (``gen samples``' prompts over random semantic IDs: short,
similar lengths) and a long-tailed mix of those with general text (lengths drawn from a log-normal up to
the pack length, 30 % of the samples). *Padded* is today's prepared-dataset path (length-grouped batches of
``--batch`` samples, each padded to its longest); *packed* is the stream's best-fit packing into
``--max-length`` tokens (each batch ``--packs`` packs). Target: ≥ 97 % real tokens packed.

    python bench/bench_packing.py [--max-length 2048] [--steps 20] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def samples_of(tmp: Path, general_share: float, rng) -> tuple[list[dict], object]:
    """Tokenized samples: ml-100k next-item prompts (+ general text when ``general_share`` > 0)."""
    from lmrec.api import prepare
    from lmrec.config import GenDataConfig
    from lmrec.data.chat_format import ChatRow
    from lmrec.data.dataset import PreparedDataset
    from lmrec.generative import sid as sid_mod
    from lmrec.generative.default_model import build_default_lm
    from lmrec.generative.prompts import encode_chat
    from lmrec.generative.samples import build_samples
    from lmrec.generative.vocab import load_lm

    data = tmp / "ml-100k"
    if not (data / "manifest.json").exists():
        prepare("ml-100k", data, log=lambda m: None)
    ds = PreparedDataset(data)
    sids, _ = sid_mod.build_sids(ds.item_ids, rng.normal(size=(ds.num_items, 16)).astype(np.float32), levels=3)
    rows = build_samples(ds, sids, GenDataConfig(targets_per_user=10), "train")
    lm = tmp / "lm"
    if not (lm / "config.json").exists():
        build_default_lm([" ".join(v for _, v in t) for t in ds.item_text], lm, vocab_size=2000)
    _, tok = load_lm(lm)
    out = [encode_chat(tok, ChatRow(str(i), "rec", r["messages"])) for i, r in enumerate(rows)]
    words = " ".join(v for t in ds.item_text for _, v in t).split()
    for _ in range(int(len(out) * general_share / (1 - general_share)) if general_share else 0):
        n = int(min(1900, rng.lognormal(4.5, 1.0)))
        text = " ".join(rng.choice(words, size=n))
        out.append(encode_chat(tok, ChatRow("t", "wiki", None, [text])))
    order = rng.permutation(len(out))
    return [out[i] for i in order], tok


def padded_batches(samples: list[dict], batch: int, rng) -> list[list[dict]]:
    from lmrec.generative.train import length_grouped_batches

    lengths = np.array([len(s["input_ids"]) for s in samples])
    return [[samples[i] for i in b] for b in length_grouped_batches(lengths, batch, rng)]


def packed_batches(samples: list[dict], max_length: int, packs: int) -> list[list[dict]]:
    from lmrec.data.data_config import DataMixConfig
    from lmrec.data.stream import ChatStream, Sample

    stream = ChatStream([[]], ["x"], DataMixConfig(sources=["x"], max_length=max_length, pack_buffer_size=64), None)
    pending = [Sample([0, 0, i], 0, s["input_ids"][:max_length], s["labels"][:max_length])
               for i, s in enumerate(samples)]
    out, buffer = [], []
    for s in pending:
        buffer.append(s)
        if len(buffer) >= 64:
            out.append(stream._take_pack(buffer))
    while buffer:
        out.append(stream._take_pack(buffer))
    return [out[i: i + packs] for i in range(0, len(out), packs)]


def real_share_padded(batches) -> float:
    real = sum(len(s["input_ids"]) for b in batches for s in b)
    return real / sum(len(b) * max(len(s["input_ids"]) for s in b) for b in batches)


def real_share_packed(batches, max_length: int) -> float:
    real = sum(len(p["input_ids"]) for b in batches for p in b)
    return real / sum(len(b) * max_length for b in batches)


def tokens_per_s(model, batches, make, steps: int) -> float:
    """Real (non-padding) tokens trained per second; ``make(batch)`` → (model inputs, real tokens)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    real, t0 = 0, None
    for i, b in enumerate(batches[: steps + 2]):
        if i == 2:
            t0, real = time.perf_counter(), 0
        x, n = make(b)
        model(**x).loss.backward()
        opt.step()
        opt.zero_grad()
        real += n
    return real / (time.perf_counter() - t0)


def padded_inputs(batch, pad: int):
    from lmrec.generative.samples import pad_batch

    x = pad_batch(batch, pad)
    return x, int(x["attention_mask"].sum())


def packed_inputs(batch, pad: int, length: int):
    from lmrec.data.stream import collate_packs

    x = collate_packs(batch, pad, length)
    return {k: v for k, v in x.items() if k not in ("sources", "skipped")}, int((x["sources"] >= 0).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32, help="samples per padded batch")
    ap.add_argument("--packs", type=int, default=1, help="packs per packed batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cache", default=None, help="directory kept between runs (ml-100k, tokenizer)")
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    rows = []
    from lmrec.generative.vocab import load_lm

    tmp = Path(args.cache or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    for name, share in (("ml-100k next-item samples", 0.0), ("long-tailed mix, 30 % general text", 0.3)):
        rng = np.random.default_rng(0)
        samples, tok = samples_of(tmp, share, rng)
        lengths = np.array([len(s["input_ids"]) for s in samples])
        padded = padded_batches(samples, args.batch, rng)
        packed = packed_batches(samples, args.max_length, args.packs)
        a, b = real_share_padded(padded), real_share_packed(packed[:-1], args.max_length)
        print(f"{name}: {len(samples)} samples, length median {np.median(lengths):.0f} / p99 "
              f"{np.percentile(lengths, 99):.0f} / max {lengths.max()}")
        print(f"  real tokens: padded batches {a:.1%}, packed {b:.1%} (target >= 97%)")
        model, _ = load_lm(tmp / "lm")
        torch.manual_seed(0)
        pad = tok.pad_token_id
        tp = tokens_per_s(model, padded, lambda x, pad=pad: padded_inputs(x, pad), args.steps)
        tq = tokens_per_s(model, packed, lambda x, pad=pad: packed_inputs(x, pad, args.max_length), args.steps)
        print(f"  training real tokens/s (tiny Qwen3): padded {tp:,.0f}, packed {tq:,.0f}, ratio {tq / tp:.2f}x")
        rows.append([name, len(samples), f"{np.median(lengths):.0f} / {np.percentile(lengths, 99):.0f} / "
                     f"{lengths.max()}", f"{a:.1%}", f"{b:.1%}", f"{tp:,.0f}", f"{tq:,.0f}", f"{tq / tp:.2f}×"])
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title="Packing vs padded batches",
            columns=["corpus", "samples", "length median / p99 / max", "real tokens padded",
                     "real tokens packed", "real tokens/s padded", "real tokens/s packed", "packed / padded"],
            rows=rows,
            note=f"packs of {args.max_length:,} tokens ({args.packs} per batch), padded batches "
                 f"of {args.batch} samples; the embedded tiny Qwen3, {args.steps} steps, "
                 f"{torch.get_num_threads()} threads"))


if __name__ == "__main__":
    main()
