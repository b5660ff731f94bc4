"""Streaming chat parquet: throughput (samples/s per worker) and peak RSS of lmrec's ChatStream at two corpus
sizes, and the same read through HF ``datasets`` streaming (``split_dataset_by_node``) when it is installed.

The corpora are synthetic OpenOneRec-format shards of 2,000 rows: 500 files (1M rows) and 5,000 files
(10M rows; the same file hard-linked, so the 10× corpus costs no disk). Each run reads a fixed number of
samples through a StatefulDataLoader with 2 workers (tokenization, shuffle buffer and packing in the workers)
in a fresh process, and reports the peak RSS of the process and of its workers. The memory target: peak RSS
at 10× ≤ 1.1× the peak at 1× (nothing grows with the corpus).

    python bench/bench_stream.py [--samples 100000] [--workers 2] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_FILE = 2000


def make_corpus(root: Path, files: int, template: Path) -> Path:
    out = root / f"corpus-{files}"
    out.mkdir()
    for i in range(files):
        os.link(template, out / f"part-{i:05d}-of-{files:05d}.parquet")
    return out


def make_template(root: Path) -> Path:
    from lmrec.data.chat_format import ChatRow, write_shards

    def turns(i: int) -> list[dict]:
        history = " ".join(["item"] * (3 + i % 40))
        return [{"role": "user", "content": f"Recent items, oldest first: {history}. Next item?"},
                {"role": "assistant", "content": f"<|sid_begin|><s_a_{i % 256}><s_b_{i % 97}><|sid_end|>"}]

    rows = [ChatRow(f"r{i}", "rec", turns(i)) for i in range(ROWS_PER_FILE)]
    (path,) = write_shards(rows, root / "template", rows_per_file=ROWS_PER_FILE)
    return path


def child(corpus: str, samples: int, workers: int, engine: str, tok_dir: str) -> None:
    """Run in a fresh process: read ``samples`` samples, print JSON (samples/s, peak RSS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    n = 0
    if engine == "lmrec":
        import functools

        from torchdata.stateful_dataloader import StatefulDataLoader

        from lmrec.data.data_config import DataMixConfig, source_files
        from lmrec.data.stream import ChatStream
        from lmrec.generative.prompts import encode_chat

        cfg = DataMixConfig(sources=[corpus], max_length=4096, num_workers=workers, local_shuffle_buffer_size=10000)
        stream = ChatStream([source_files(cfg.sources[0])], ["rec"], cfg, functools.partial(encode_chat, tok))
        for pack in StatefulDataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                       snapshot_every_n_steps=16):
            n += sum(1 for p in pack["position_ids"] if p == 0)
            if n >= samples:
                break
    else:  # HF datasets streaming, the same rows and the same tokenization (no packing)
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        from lmrec.data.chat_format import parse_row
        from lmrec.generative.prompts import encode_chat

        files = sorted(str(p) for p in Path(corpus).glob("*.parquet"))
        ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
        ds = split_dataset_by_node(ds, rank=0, world_size=1).shuffle(seed=0, buffer_size=10000)
        ds = ds.map(lambda r: encode_chat(tok, parse_row(r, "hf", 0)), remove_columns=["uuid", "source", "metadata",
                                                                                        "messages", "segments"])
        import torch

        for _ in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers):
            n += 1
            if n >= samples:
                break
    dt = time.perf_counter() - t0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"samples": n, "seconds": dt, "per_worker": n / dt / max(workers, 1),
                      "rss_main_mib": self_kb / 1024, "rss_worker_mib": kids_kb / 1024}))


def measure(corpus: Path, samples: int, workers: int, engine: str, tok_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(corpus), str(samples), str(workers), engine, str(tok_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    from lmrec.generative.default_model import build_default_lm

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = make_template(root)
        tok_dir = build_default_lm(["Recent items, oldest first item Next item"] * 50, root / "lm", vocab_size=300)
        rows = []
        for files in (500, 5000):
            corpus = make_corpus(root, files, template)
            r = measure(corpus, args.samples, args.workers, "lmrec", tok_dir)
            rows.append((files, r))
            print(f"lmrec ChatStream, {files} files ({files * ROWS_PER_FILE:,} rows): {r['per_worker']:,.0f} samples/s "
                  f"per worker, peak RSS main {r['rss_main_mib']:.0f} MiB, worker {r['rss_worker_mib']:.0f} MiB")
        (_, a), (_, b) = rows
        ratio = (b["rss_main_mib"] + b["rss_worker_mib"]) / (a["rss_main_mib"] + a["rss_worker_mib"])
        print(f"peak RSS 10x corpus / 1x corpus: {ratio:.3f} (target <= 1.1)")
        table = [[f"lmrec ChatStream, {f} files", f"{f * ROWS_PER_FILE:,}", f"{r['per_worker']:,.0f}",
                  f"{r['rss_main_mib']:.0f}", f"{r['rss_worker_mib']:.0f}", "—"] for f, r in rows]
        table[1][-1] = f"peak RSS vs 1×: {ratio:.3f}"
        try:
            import datasets  # noqa: F401
        except ImportError:
            print("HF datasets is not installed: no reference measurement (pip install datasets)")
        else:
            h = measure(root / "corpus-500", args.samples, args.workers, "hf", tok_dir)
            print(f"HF datasets streaming, 500 files: {h['per_worker']:,.0f} samples/s per worker, peak RSS main "
                  f"{h['rss_main_mib']:.0f} MiB, worker {h['rss_worker_mib']:.0f} MiB")
            print(f"throughput lmrec / HF datasets: {a['per_worker'] / h['per_worker']:.2f}x")
            table[0][-1] = f"throughput vs HF: {a['per_worker'] / h['per_worker']:.2f}×"
            table.append(["HF datasets streaming, 500 files (no packing)", f"{500 * ROWS_PER_FILE:,}",
                          f"{h['per_worker']:,.0f}", f"{h['rss_main_mib']:.0f}", f"{h['rss_worker_mib']:.0f}", "—"])
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title="Streaming chat parquet",
            columns=["reader", "rows", "samples/s per worker", "peak RSS main MiB", "peak RSS worker MiB",
                     "ratio"],
            rows=table,
            note=f"{args.samples:,} samples per run, {args.workers} workers, tokenization + shuffle + "
                 "packing in the workers, each run in a fresh process"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main()
