"""Soak: a real `lmrec serve` under mixed reads and additions at fixed concurrency for minutes.

``--concurrency`` clients (aiohttp) send requests back to back for ``--minutes``: 80 % POST /recommend
(histories of 1–20 ids, k = 10, including ids added during the run), 10 % GET /items/{id}, 10 % POST /items
(one new item with a fresh id). Prints the requests and errors of each kind (anything but 200/201 is an
error), p50/p99 latency, the server's resident memory after warm-up and at the end (growth in %), and checks
that the catalog grew by exactly the items added. The model is the quickstart-shaped demo of
``bench_serve.py`` (1,682 items) unless ``--model`` names one; the item store is a temporary directory.

    python bench/bench_serve_soak.py [--minutes 2] [--concurrency 16] [--workers 1] [--model DIR] [--record OUT.json]

``--record PATH`` also writes the table with its provenance, for ``docs/results.py add`` (also when the run
found errors: the record is the evidence).

Client and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import demo_model, free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the uvicorn workers), MiB."""
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def start(model: Path, store: Path, workers: int) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmrec.cli.main", "serve", "--model", str(model), "--port",
                             str(port), "--workers", str(workers), "--item-store", str(store), "--log-level",
                             "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready in 120 s")


async def soak(url: str, items: list[str], pid: int, seconds: float, concurrency: int) -> dict:
    import aiohttp

    rng = random.Random(0)
    known, added = list(items), []
    lat: dict[str, list[float]] = {"recommend": [], "get item": [], "add item": []}
    errors: dict[str, int] = dict.fromkeys(lat, 0)
    counter = 0

    async def one(c: aiohttp.ClientSession) -> None:
        nonlocal counter
        roll = rng.random()
        t0 = time.perf_counter()
        if roll < 0.8:
            kind = "recommend"
            req = c.post("/recommend", json={"history": rng.sample(known, rng.randint(1, 20)), "k": 10})
        elif roll < 0.9:
            kind = "get item"
            req = c.get(f"/items/{rng.choice(known)}")
        else:
            kind = "add item"
            counter += 1
            new = f"soak-{counter}"
            req = c.post("/items", json={"items": [{"item_id": new, "text": {"title": f"soak item {counter}",
                                                                             "genres": "Drama"}}]})
        try:
            async with req as r:
                await r.read()
                ok = r.status in (200, 201)
        except aiohttp.ClientError:
            ok = False
        lat[kind].append(time.perf_counter() - t0)
        errors[kind] += not ok
        if kind == "add item" and ok:
            added.append(new)
            known.append(new)

    async def client(c, end):
        while time.perf_counter() < end:
            await one(c)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as c:
        await asyncio.gather(*(client(c, time.perf_counter() + min(20.0, seconds / 6)) for _ in range(concurrency)))
        rss0 = rss_mib(pid)  # after a warm-up of a sixth of the run (at most 20 s)
        for v in lat.values():
            v.clear()
        errors.update(dict.fromkeys(errors, 0))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, t0 + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        rss1 = rss_mib(pid)
        async with c.get("/metadata") as r:
            catalog = (await r.json())["catalog_size"]
    return {"lat": lat, "errors": errors, "wall": wall, "rss": (rss0, rss1), "catalog": catalog,
            "expected_catalog": len(items) + len(added)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--model", type=Path, help="A RecFormer recommender to serve (default: the demo one).")
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_model(Path(tmp))
        items = pq.read_table(model / "items.parquet", columns=["item_id"]).column(0).to_pylist()
        proc, url = start(model, Path(tmp) / "items", args.workers)
        try:
            out = asyncio.run(soak(url, items, proc.pid, args.minutes * 60, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(60)
    rss0, rss1 = out["rss"]
    total = sum(len(v) for v in out["lat"].values())
    print(f"soak: {args.minutes:g} min, {args.concurrency} clients, {args.workers} worker(s), {len(items):,} items "
          f"to start; {total:,} requests ({total / out['wall']:.1f}/s)")
    print(f"{'kind':>10} | {'requests':>8} | {'errors':>6} | {'p50 ms':>7} | {'p99 ms':>7}")
    rows = []
    for kind, v in out["lat"].items():
        ms = np.asarray(v) * 1000 if v else np.zeros(1)
        print(f"{kind:>10} | {len(v):>8,} | {out['errors'][kind]:>6} | {np.percentile(ms, 50):>7.1f} | "
              f"{np.percentile(ms, 99):>7.1f}")
        rows.append([kind, f"{len(v):,}", out["errors"][kind], f"{np.percentile(ms, 50):.1f}",
                     f"{np.percentile(ms, 99):.1f}"])
    errors = sum(out["errors"].values())
    summary = (f"server RSS {rss0:,.0f} MiB after warm-up → {rss1:,.0f} MiB at the end "
               f"({(rss1 / rss0 - 1) * 100:+.1f} %); catalog {out['catalog']:,} (expected {out['expected_catalog']:,})")
    print(f"errors: {errors}; {summary}")
    if args.record:
        from lmrec.provenance import Table, write_record

        write_record(args.record, Table(
            title=f"Soak: {args.minutes:g} min of mixed reads and additions",
            columns=["kind", "requests", "errors", "p50 ms", "p99 ms"],
            rows=rows,
            note=f"{args.concurrency} clients, {args.workers} worker(s), {len(items):,} items to start, "
                 f"{total / out['wall']:.1f} requests/s; {summary}"))
    if errors or out["catalog"] != out["expected_catalog"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
