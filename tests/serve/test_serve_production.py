"""The service in production (docs/serving.md), against a real uvicorn on loopback: the API key, content types
and limits, the bounded queue and the deadline, an event loop that never waits for the model, cheap
metadata, and a fuzzed OpenAPI contract (schemathesis)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import httpx
import pytest

from lmrec.serve.app import Limits, build_app, create_app
from lmrec.serve.families import load_backend
from tests.serve.test_serve import Server

KEY = "s3cret-key"


def _item(item_id, title="toy story"):
    return {"items": [{"item_id": item_id, "text": {"title": title}}]}


def test_an_api_key_guards_adding_items_and_bad_new_ids_are_422(recformer_model, tmp_path):
    model = shutil.copytree(recformer_model[0], tmp_path / "model")
    with Server(build_app(model=str(model), api_key=KEY, log=lambda m: None)) as srv:
        srv.wait_ready()
        post = lambda body, **h: httpx.post(srv.url + "/items", json=body, headers=h)  # noqa: E731
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            r = post(_item("a1"), **headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="lmrec"', r.text
            assert r.json()["field"] == "authorization"
        assert not (tmp_path / "model.items" / "items.log").exists()  # nothing was stored
        auth = {"authorization": f"Bearer {KEY}"}
        assert post(_item("a1"), **auth).status_code == 201
        # reads need no key under --auth mutate
        assert httpx.post(srv.url + "/recommend", json={"history": ["a1"]}).status_code == 200
        assert httpx.get(srv.url + "/items/a1").status_code == 200
        for bad, why in (("", "empty"), (" 50", "whitespace"), ("50 ", "whitespace"), ("a\x00b", "control"),
                         ("a\nb", "control")):
            r = post(_item(bad), **auth)
            assert r.status_code == 422 and r.json()["field"] == "items[0].item_id" and why in r.json()["error"], r.text
        r = post({"items": [{"item_id": "d1", "text": {"title": "x"}}, {"item_id": "d2", "text": {"title": "y"}},
                            {"item_id": "d1", "text": {"title": "z"}}]}, **auth)
        assert r.status_code == 422 and "items[2].item_id" in r.json()["error"] and "items[0]" in r.json()["error"]
        assert httpx.get(srv.url + "/items/d1").status_code == 404  # nothing of that request was added
        # Swagger UI from the installed package, not a CDN
        html = httpx.get(srv.url + "/docs").text
        assert "/docs/assets/swagger-ui-bundle.js" in html and "cdn" not in html.lower()
        js = httpx.get(srv.url + "/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
    with Server(build_app(model=str(model), api_key=KEY, auth="all", log=lambda m: None)) as srv:
        srv.wait_ready()
        assert httpx.get(srv.url + "/health/live").status_code == 200  # probes stay open
        assert httpx.get(srv.url + "/health/ready").status_code == 200
        for r in (httpx.post(srv.url + "/recommend", json={"history": ["i1"]}), httpx.get(srv.url + "/metadata"),
                  httpx.get(srv.url + "/items/i1"), httpx.get(srv.url + "/openapi.json")):
            assert r.status_code == 401, r.text
        r = httpx.get(srv.url + "/metadata", headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["catalog_size"] == 31  # the restart read a1 from the store


def test_content_types_limits_a_bounded_queue_and_the_deadline(recformer_model):
    model, _ = recformer_model
    limits = Limits(max_k=5, max_history=3, max_batch_requests=2, max_queue=2, deadline_ms=2000)
    with Server(create_app(lambda: load_backend(model, log=lambda m: None), max_batch=1, limits=limits,
                           log=lambda m: None, batch_delay_s=0.85)) as srv:
        srv.wait_ready()
        body = b'{"history": ["i1"], "k": 2}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            r = httpx.post(srv.url + "/recommend", content=body, headers={"content-type": ctype} if ctype else {})
            assert r.status_code == 415 and r.json()["field"] == "content-type", (ctype, r.text)
        r = httpx.post(srv.url + "/recommend", content=body,
                       headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200 and len(r.json()["items"]) == 2
        for payload, path, field in (({"history": ["i1"], "k": 6}, "/recommend", "k"),
                                     ({"history": ["i1", "i2", "i3", "i4"]}, "/recommend", "history"),
                                     ({"requests": [{"history": ["i1"]}] * 3}, "/recommend/batch", "requests")):
            r = httpx.post(srv.url + path, json=payload)
            assert r.status_code == 422 and r.json()["field"] == field, r.text

        async def burst(n, gap=0.0):  # n concurrent clients against one 0.85 s forward at a time, 2 queue places
            async def one(c, i):
                await asyncio.sleep(gap * i)
                return await c.post("/recommend", json={"history": ["i1"], "k": 2})

            async with httpx.AsyncClient(base_url=srv.url, limits=httpx.Limits(max_connections=n)) as c:
                return await asyncio.gather(*(one(c, i) for i in range(n)))

        t0 = time.time()
        out = asyncio.run(burst(8))
        codes = sorted(r.status_code for r in out)
        assert set(codes) <= {200, 503, 504} and 200 in codes and 503 in codes, codes
        assert all(r.headers["retry-after"] == "1" and r.json()["field"] == "queue"
                   for r in out if r.status_code == 503)
        assert time.time() - t0 < 5  # never unbounded: every client had its answer by the deadline or at once
        time.sleep(2.0)  # let the queue drain
        # the third of three requests 50 ms apart waits behind two 0.85 s forwards: past its 2 s deadline. Margins
        # of 0.35 s (the second ends at 1.7 s, its deadline is at 2.05 s) and 0.45 s (the third would end at
        # 2.55 s, its deadline is at 2.1 s): a 0.1 s delay on the way in flipped the third at 0.4 s / 1 s
        late = asyncio.run(burst(3, gap=0.05))
        assert [r.status_code for r in late] == [200, 200, 504], [(r.status_code, r.text) for r in late]
        assert late[2].json()["field"] == "deadline" and "2000 ms" in late[2].json()["error"]
        time.sleep(0.5)
        meta = httpx.get(srv.url + "/metadata").json()
        assert meta["batching"]["refused"] >= 1 and meta["limits"]["max_queue"] == 2
        assert (meta["max_k"], meta["max_history"]) == (5, 3)  # what a request may ask: the lower of model and limit
        assert httpx.post(srv.url + "/recommend", json={"history": ["i1"], "k": 5}).status_code == 200


def test_the_event_loop_answers_while_a_forward_holds_the_model_and_metadata_is_cheap(recformer_model, tmp_path):
    """Items another worker added are appended in a thread that waits for the running forward pass; the
    probes and other requests do not wait. /metadata and /recommend never renormalise the item table."""
    from lmrec.data.item_store import ItemStore

    model = shutil.copytree(recformer_model[0], tmp_path / "model")
    app = build_app(model=str(model), log=lambda m: None)
    with Server(app) as srv:
        srv.wait_ready()
        backend = app.app.state.service.backend
        records = backend.rec.new_records(["w9"], [[("title", "toy story")]])  # what another worker stores
        other = ItemStore(tmp_path / "model.items")
        with other.writer() as w:
            other.poll()
            w.append(records)
        got: dict = {}
        with backend.lock:  # a long forward pass holds the model
            t = threading.Thread(target=lambda: got.update(r=httpx.get(srv.url + "/items/w9", timeout=30)))
            t.start()
            time.sleep(0.3)
            t0 = time.time()
            assert httpx.get(srv.url + "/health/live").status_code == 200
            assert httpx.get(srv.url + "/health/ready").status_code == 200
            assert time.time() - t0 < 0.5
            assert "r" not in got  # the lookup waits for the catch-up, the loop does not
        t.join(10)
        assert got["r"].status_code == 200 and got["r"].json()["text"] == {"title": "toy story"}

        def table_work(*a, **k):
            raise AssertionError("the item table was renormalised")

        backend.rec._items_normalized = table_work
        table = backend.rec.model.item_embeddings
        for _ in range(3):
            assert httpx.get(srv.url + "/metadata").json()["catalog_size"] == 31
        assert httpx.post(srv.url + "/recommend", json={"history": ["w9"], "k": 3}).status_code == 200
        assert httpx.post(srv.url + "/items", json=_item("w10")).status_code == 201
        assert httpx.post(srv.url + "/recommend", json={"history": ["w10"], "k": 3}).status_code == 200
        # the table grew in place (a buffer with room), not by concatenating the catalog
        assert backend.rec.model.item_embeddings.data_ptr() == table.data_ptr()
        assert backend.rec.retrieval_index().size == 32


def test_schemathesis_finds_no_server_error_and_every_response_matches_the_schema(recformer_model, tmp_path):
    """Generated requests (valid and invalid) against every operation of the OpenAPI schema, on a real uvicorn."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    model = shutil.copytree(recformer_model[0], tmp_path / "model")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    with Server(build_app(model=str(model), log=lambda m: None)) as srv:
        srv.wait_ready()
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        schema.config.generation.update(modes=list(schemathesis.GenerationMode))
        ops = [op.ok() for op in schema.get_all_operations()]
        assert len(ops) == 7
        calls = []
        for op in ops:
            @given(case=op.as_strategy())
            @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                calls.append(case.call_and_validate(base_url=srv.url, checks=checks).status_code)

            run()
        assert len(calls) >= 200 and max(calls) < 500 and {200, 422} <= set(calls), sorted(set(calls))


def _start(model, port: int, *args: str, env: dict | None = None):
    """`lmrec serve` as a user starts it, in its own process group, ready to answer."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lmrec.cli.main", "serve", "--model", str(model), "--port",
                             str(port), "--log-level", "warning", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def test_sigterm_fails_readiness_answers_every_request_in_flight_and_queued_then_exits_0(recformer_model):
    """A real `lmrec serve`: 12 requests in flight and queued (forwards slowed to 0.3 s, 4 per batch) when
    SIGTERM comes; readiness turns 503 during --drain-seconds, every request gets its 200, exit status 0."""
    import signal

    from tests.serve.test_serve import _free_port

    proc, url = _start(recformer_model[0], _free_port(), "--max-batch", "4", "--drain-seconds", "1",
                       "--shutdown-timeout", "20", env={"LMREC_SERVE_TEST_BATCH_DELAY_MS": "300"})
    try:
        async def clients():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                tasks = [asyncio.create_task(c.post("/recommend", json={"history": [f"i{i}"], "k": 3}))
                         for i in range(12)]
                await asyncio.sleep(0.3)  # all sent: one batch in the model, the rest queued
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with httpx.AsyncClient(base_url=url) as fresh:  # a probe on a new connection
                    ready = await fresh.get("/health/ready")
                    during = await fresh.post("/recommend", json={"history": ["i1"], "k": 3})
                return await asyncio.gather(*tasks), ready, during

        answers, ready, during = asyncio.run(clients())
        assert ready.status_code == 503 and ready.json()["status"] == "stopping"
        assert during.status_code == 200  # still answering while the load balancer notices
        assert [r.status_code for r in answers] == [200] * 12
        assert all(len(r.json()["items"]) == 3 for r in answers)
        assert proc.wait(30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_workers_store_200_concurrent_adds_once_and_kill_9_leaves_no_torn_store(recformer_model, tmp_path):
    """`lmrec serve --workers 2`: 200 concurrent adds (16 at a time, over both processes) → after a restart each
    item is there exactly once; then the server is killed with SIGKILL during more adds → after a restart the
    store holds every acknowledged item, each once, and only whole requests (2 items each)."""
    import os
    import random
    import signal

    from lmrec.data.item_store import ItemStore
    from tests.serve.test_serve import _free_port

    model = shutil.copytree(recformer_model[0], tmp_path / "model")
    proc, url = _start(model, _free_port(), "--workers", "2")
    acked: list[str] = []
    kill_after = -1

    async def adds(ids, concurrency=16):
        sem = asyncio.Semaphore(concurrency)

        async def one(c, i):
            async with sem:
                body = {"items": [{"item_id": f"{i}-a", "text": {"title": f"new {i}"}},
                                  {"item_id": f"{i}-b", "text": {"title": f"other {i}"}}]}
                try:
                    r = await c.post("/items", json=body)
                except httpx.TransportError:
                    return None
                if r.status_code == 201:
                    acked.extend(r.json()["added"])
                    if i.startswith("k") and len(acked) == kill_after:  # others are mid-request now
                        os.killpg(proc.pid, signal.SIGKILL)
                return r.status_code

        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(one(c, i) for i in ids))

    try:
        assert asyncio.run(adds([f"c{i}" for i in range(100)])) == [201] * 100  # 200 items
        kill_after = 200 + 2 * random.Random(0).randint(5, 40)  # SIGKILL once that many items are acknowledged
        asyncio.run(adds([f"k{i}" for i in range(1000)], concurrency=4))
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    stored = [it.item_id for it in ItemStore(tmp_path / "model.items").all()]
    assert len(stored) == len(set(stored))  # each once
    assert set(acked) <= set(stored) and {f"c{i}-{s}" for i in range(100) for s in "ab"} <= set(stored)
    killed = [i for i in stored if i.startswith("k")]
    assert 0 < len(killed) < 2000 and len(killed) % 2 == 0  # whole requests, the kill came mid-stream
    assert {i[:-2] for i in killed} == {i[:-2] for i in killed if f"{i[:-2]}-a" in killed and f"{i[:-2]}-b" in killed}
    backend = load_backend(model, log=lambda m: None)  # a restart
    assert len(backend.item_ids()) == 30 + len(stored) and len(set(backend.item_ids())) == len(backend.item_ids())


def test_items_an_older_lmrec_kept_in_the_model_directory_start_the_item_store_once(recformer_model, tmp_path):
    """`added_items.parquet` (what lmrec wrote inside the model directory before the item store): copied into
    an empty store on the first start, with its vectors; read from the store after that, never twice."""
    import pyarrow as pa

    from lmrec.data.item_store import ItemStore
    from lmrec.data.prepare import write_items
    from lmrec.recformer.recommender import Recommender

    model = shutil.copytree(recformer_model[0], tmp_path / "model")
    text = [[("title", "toy story")], [("title", "a new film"), ("genres", "drama")]]
    vectors = Recommender.from_pretrained(model).encode_texts(text, normalize=False).numpy()
    write_items(model / "added_items.parquet", ["old-1", "old-2"], text,
                extra={"vector": pa.array(list(vectors), pa.list_(pa.float32()))})
    logged: list[str] = []
    for _ in range(2):  # two starts
        backend = load_backend(model, log=logged.append)
        assert backend.item_ids()[-2:] == ["old-1", "old-2"] and len(backend.item_ids()) == 32
        assert backend.item_text(backend.index_of("old-2")) == text[1]
        np_table = backend.rec.model.item_embeddings[-2:].numpy()
        assert abs(np_table - vectors).max() == 0  # the stored vectors, not re-encoded
    assert [it.item_id for it in ItemStore(tmp_path / "model.items").all()] == ["old-1", "old-2"]
    assert any("older lmrec" in m for m in logged)
