"""Serving: throughput and latency of `lmrec serve` with and without dynamic batching, the retrieval index at
a million items, and the chunk size of full ranking.

1. HTTP on loopback. A RecFormer recommender (default: the quickstart's shape — the embedded 2-layer × 128
   Longformer, random init, 32-token histories — over MovieLens-100k's 1,682 items; ``--model DIR`` serves
   a trained one) runs as a real `lmrec serve` process; this process is the client (aiohttp, asyncio) with
   1, 8 and 64 concurrent clients sending POST /recommend (histories of 1–20 ids, k = 10), a bounded number
   of requests per level (at most ``--seconds`` each). Once with ``--max-batch 32`` and once with
   ``--max-batch 1`` (one forward pass per request): requests/s, p50/p99 latency, and the ratio.
2. One million synthetic item vectors (128-d, unit norm, drawn around 2,000 centres like the clustered
   embeddings of a real catalog): build time, recall@10 against exact ranking on fresh queries, query
   latency and resident memory of the exact and the IVF index (what `--index auto` picks above 200k items).
3. Full ranking at 1M items (the evaluator's path): item chunks of 65,536 (the earlier default) against
   8,192 (the default now), identical ranks, time ratio.

    python bench/bench_serve.py [--model DIR] [--seconds 20] [--items 1000000] [--record OUT.json]

``--record PATH`` also writes the tables with their provenance, for ``docs/results.py add``.

Client and server share this machine's cores, so absolute numbers are a floor for a server with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmrec.provenance import Table, write_record


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def demo_model(out: Path) -> Path:
    from lmrec.data.sources import load_ml100k
    from lmrec.recformer.backbones import build_default_backbone, build_recformer
    from lmrec.recformer.recommender import Recommender

    raw = load_ml100k(lambda m: None)
    ids = sorted(raw.item_text)
    text = [raw.item_text[i] for i in ids]
    backbone = build_default_backbone([" ".join(f"{k} {v}" for k, v in t) for t in text], out / "backbone",
                                      hidden_size=128, layers=2, heads=2, vocab_size=8000)
    model, tok, _ = build_recformer(backbone, max_token_num=32, max_item_embeddings=51)
    rec = Recommender(model, tok, ids, text)
    rec.encode_items(show_progress=False)
    return rec.save_pretrained(out / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmrec.cli.main", "serve", "--model", str(model), "--port",
                             str(port), "--max-batch", str(max_batch), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=5):
                return proc, url
        except OSError:  # refused while starting, 503 while loading
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready in 120 s")


async def load(url: str, items: list[str], clients: int, total: int, seconds: float, seed: int) -> dict:
    """``clients`` connections sending requests back to back until ``total`` or ``seconds``. The client is
    aiohttp: httpx's connection pool was the bottleneck at 64 connections here (125 req/s on /health/live,
    where aiohttp made 5,300)."""
    import aiohttp

    rng = np.random.default_rng(seed)
    bodies = [{"history": [str(x) for x in rng.choice(items, int(rng.integers(1, 21)), replace=False)], "k": 10}
              for _ in range(total)]
    latencies: list[float] = []
    errors = 0
    nxt = 0
    t_end = time.perf_counter() + seconds

    async def client(c: aiohttp.ClientSession):
        nonlocal nxt, errors
        while nxt < total and time.perf_counter() < t_end:
            body = bodies[nxt]
            nxt += 1
            t0 = time.perf_counter()
            async with c.post("/recommend", json=body) as r:
                await r.read()
                errors += r.status != 200
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as c:
        async with c.post("/recommend", json=bodies[0]) as r:  # warm-up
            await r.read()
        async with c.get("/metadata") as r:
            before = (await r.json())["batching"]
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
        async with c.get("/metadata") as r:
            after = (await r.json())["batching"]
    lat = np.asarray(latencies) * 1000
    batches = max(1, after["batches"] - before["batches"])
    return {"n": len(lat), "errors": errors, "rps": len(lat) / wall, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "batch": (after["requests"] - before["requests"]) / batches}


def bench_http(model: Path, seconds: float) -> Table:
    import pyarrow.parquet as pq

    items = pq.read_table(model / "items.parquet", columns=["item_id"]).column(0).to_pylist()
    results = {}
    for max_batch in (32, 1):
        proc, url = start_server(model, max_batch)
        try:
            for clients in (1, 8, 64):
                total = {1: 1000, 8: 800, 64: 2000}[clients]  # 1 client: more requests, a steadier ratio
                results[max_batch, clients] = asyncio.run(load(url, items, clients, total, seconds, clients))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\n1. POST /recommend on loopback ({len(items):,} items, k = 10), client and server on this machine")
    print(f"{'clients':>7} | {'batching':>9} | {'requests':>8} | {'errors':>6} | {'req/s':>7} | {'p50 ms':>7} | "
          f"{'p99 ms':>7} | {'mean batch':>10}")
    rows = []
    for clients in (1, 8, 64):
        for max_batch in (32, 1):
            r = results[max_batch, clients]
            name = "32, 2 ms" if max_batch == 32 else "off"
            print(f"{clients:>7} | {name:>9} | {r['n']:>8} | {r['errors']:>6} | {r['rps']:>7.1f} | {r['p50']:>7.1f} | "
                  f"{r['p99']:>7.1f} | {r['batch']:>10.1f}")
            rows.append([clients, name, r["n"], r["errors"], f"{r['rps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                         f"{r['batch']:.1f}", "—"])
        ratio = results[32, clients]["rps"] / results[1, clients]["rps"]
        print(f"{'':>7}   throughput with batching / without: {ratio:.2f}x")
        rows[-2][-1] = f"{ratio:.2f}×"
    return Table(title=f"POST /recommend on loopback, {len(items):,} items, k = 10",
                 columns=["clients", "batching", "requests", "errors", "req/s", "p50 ms", "p99 ms", "mean batch",
                          "req/s with batching / without"],
                 rows=rows, note=f"client and server on this machine; at most {seconds:g} s per load level")


def clustered(n: int, d: int, centres: int, seed: int, draw_seed: int | None = None, spread: float = 1.0
              ) -> np.ndarray:
    """Unit vectors around `centres` random centres; `spread` 1.0: a vector is as far from its centre as the
    centre from the origin (cosine to its centre ≈ 0.7), so clusters overlap as real embeddings do."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s : s + m] = c[rng.integers(0, centres, m)] + spread * rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_search(search, q: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(top-10 ids of all queries, ms per query when all go at once, ms for one query alone)."""
    t0 = time.perf_counter()
    _, ids = search(q, 10)
    batch = (time.perf_counter() - t0) / len(q) * 1000
    t0 = time.perf_counter()
    for i in range(20):
        search(q[i : i + 1], 10)
    return ids, batch, (time.perf_counter() - t0) / 20 * 1000


def bench_index(n: int) -> Table:
    import faiss

    from lmrec.eval.index import ItemIndex, recall_at

    d = 128
    base = rss_mib()
    x = clustered(n, d, 2000, 0)
    # queries: fresh draws from the items' distribution (a user vector lies among the items it is near), not
    # catalog items themselves
    q = clustered(1000, d, 2000, 0, draw_seed=1)
    print(f"\n2. Retrieval index, {n:,} synthetic items × {d} (vectors: {x.nbytes / 2**20:,.0f} MiB; process "
          f"{rss_mib() - base:,.0f} MiB over its start)")
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    truth, exact_batch, exact_one = timed_search(exact.search, q)
    del exact
    print(f"{'index':>26} | {'build s':>7} | {'recall@10':>9} | {'ms/query (1000 at once)':>23} | "
          f"{'ms (1 query)':>12} | {'RSS MiB':>8}")
    print(f"{'exact (IndexFlatIP)':>26} | {0:>7.1f} | {1.0:>9.4f} | {exact_batch:>23.3f} | {exact_one:>12.1f} | "
          f"{rss_mib() - base:>8,.0f}")
    rows = [["exact (IndexFlatIP)", "0.0", "1.0000", f"{exact_batch:.3f}", f"{exact_one:.1f}",
             f"{rss_mib() - base:,.0f}"]]
    before = rss_mib()
    for kind in ("ivf", "hnsw") if n <= 200_000 else ("ivf",):
        idx = ItemIndex(x, kind=kind, log=None)
        found, batch, one = timed_search(idx.search, q)
        rep = idx.report
        name = f"{kind} ({rep.param})"
        print(f"{name:>26} | {rep.build_s:>7.1f} | {recall_at(found, truth):>9.4f} | {batch:>23.3f} | {one:>12.1f} | "
              f"{rss_mib() - base:>8,.0f}")
        rows.append([name, f"{rep.build_s:.1f}", f"{recall_at(found, truth):.4f}", f"{batch:.3f}", f"{one:.1f}",
                     f"{rss_mib() - base:,.0f}"])
        print(f"{'':>26}   recall@10 at build (its own sample queries): {rep.recall_at_10:.4f}; index adds "
              f"{rss_mib() - before:,.0f} MiB; exact/{kind} single-query time: {exact_one / one:.1f}x")
        del idx
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:,.0f} MiB")
    return Table(title=f"Retrieval index, {n:,} synthetic items × {d}",
                 columns=["index", "build s", "recall@10 vs exact", "ms/query (1000 at once)", "ms (1 query)",
                          "RSS MiB over start"],
                 rows=rows, note=f"1,000 queries drawn from the items' distribution; peak RSS {peak:,.0f} MiB")


def bench_chunks(n: int) -> Table:
    import torch

    from lmrec.eval.ranking import DEFAULT_CHUNK, target_ranks, top_k

    torch.manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(n, 128), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)
    t = torch.randint(0, n, (64,))
    print(f"\n3. Full ranking (evaluation) at {n:,} items × 128, 64 users: best of 3")
    out, rows = {}, []
    for chunk in (65536, DEFAULT_CHUNK):
        for name, fn in (("target ranks", lambda c: target_ranks(q, items, t, chunk_size=c)),
                         ("top-10", lambda c: top_k(q, items, 10, chunk_size=c)[1])):
            best, res = float("inf"), None
            for _ in range(3):
                t0 = time.perf_counter()
                res = fn(chunk)
                best = min(best, time.perf_counter() - t0)
            out[name, chunk] = (best, res)
            gflops = 2 * n * 128 * 64 / best / 1e9
            print(f"  {name:>12}, chunks of {chunk:>6,}: {best * 1000:7.0f} ms ({gflops:5.1f} GFLOP/s)")
    for name in ("target ranks", "top-10"):
        (a, ra), (b, rb) = out[name, 65536], out[name, DEFAULT_CHUNK]
        same = bool(torch.equal(ra, rb))
        print(f"  {name}: identical results {same}; 65,536 / {DEFAULT_CHUNK:,} time: {a / b:.2f}x")
        rows.append([name, f"{a * 1000:.0f}", f"{b * 1000:.0f}", f"{a / b:.2f}×", same])
    return Table(title=f"Full ranking (evaluation), {n:,} items × 128, 64 users",
                 columns=["computes", "chunks of 65,536 ms", f"chunks of {DEFAULT_CHUNK:,} ms (default)",
                          "65,536 / default time", "identical results"],
                 rows=rows, note="best of 3")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="A trained RecFormer recommender to serve (default: a demo one).")
    ap.add_argument("--seconds", type=float, default=20, help="At most this long per load level.")
    ap.add_argument("--items", type=int, default=1_000_000, help="Synthetic catalog size for parts 2 and 3.")
    ap.add_argument("--skip", nargs="*", default=[], choices=["http", "index", "chunks"])
    ap.add_argument("--record", help="also write the tables and their provenance here (docs/results.py add)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        if "http" not in args.skip:
            tables.append(bench_http(args.model or demo_model(Path(tmp)), args.seconds))
    if "index" not in args.skip:
        tables.append(bench_index(args.items))
    if "chunks" not in args.skip:
        tables.append(bench_chunks(args.items))
    if args.record:
        write_record(args.record, *tables)


if __name__ == "__main__":
    main()
