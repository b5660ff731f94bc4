"""The HTTP service on loopback, as a client sees it: answers equal the CLI's under 200 concurrent requests,
every bad request is its 4xx, readiness follows loading, items added at run time are recommended and
survive a restart, the generative service returns only real items."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from lmrec.serve.app import build_app, create_app
from lmrec.serve.families import load_backend
from tests.conftest import ITEM_TEXTS, run_cli

JSON = {"content-type": "application/json"}
WORDS = sorted({w.lower() for t in ITEM_TEXTS for _, v in t for w in v.split()})


def synthetic_dataset(path, users: int = 40, items: int = 30, seed: int = 0):
    """The walk dataset of the distributed tests, with item titles made of distinct word triples from the
    tiny backbone's vocabulary (so that the tiny model tells the items apart)."""
    from tests.training.test_distributed import synthetic_dataset as walks

    rng = np.random.default_rng(seed)
    titles: set[str] = set()
    while len(titles) < items:
        titles.add(" ".join(rng.choice(WORDS, 3, replace=False)))
    text = {f"i{k}": [("title", title), ("genres", WORDS[k % len(WORDS)])] for k, title in enumerate(sorted(titles))}
    return walks(path, users, items, seed, text=text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1 (the real server: sockets, HTTP parsing, the lifespan)."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health/ready").status_code != 200:
            assert time.time() < deadline, httpx.get(self.url + "/health/ready").text
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _histories(n: int, items: int = 30, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"i{j}" for j in rng.choice(items, int(rng.integers(1, 8)), replace=False)] for _ in range(n)]


def test_200_concurrent_requests_equal_the_cli_and_are_batched(recformer_model, tmp_path):
    from lmrec.api import recommend

    model, _ = recformer_model
    hists = _histories(20)
    expected = [recommend(model, h, k=5) for h in hists]  # what `lmrec recommend` prints
    cli = run_cli("recommend", "--model", model, "--history", ",".join(hists[0]), "-k", "5")
    assert cli.returncode == 0 and all(it in cli.stdout for it, _, _ in expected[0])

    async def load(url):  # aiohttp: httpx's pool is slow with many connections (bench/bench_serve.py)
        import aiohttp

        async def one(c, i):
            async with c.post("/recommend", json={"history": hists[i % 20], "k": 5}) as r:
                return r.status, await r.json()

        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=64)) as c:
            out = await asyncio.gather(*(one(c, i) for i in range(200)))
            async with c.get("/metadata") as r:
                return out, await r.json()

    with Server(build_app(model=str(model), max_batch=32, max_wait_ms=5, log=lambda m: None)) as srv:
        srv.wait_ready()
        responses, meta = asyncio.run(load(srv.url))
    assert [status for status, _ in responses] == [200] * 200
    gaps = [min(a[2] - b[2] for a, b in zip(e, e[1:])) for e in expected]
    assert min(gaps) > 1e-3, gaps  # no near-ties: the order is the model's, not rounding's
    for i, (_, body) in enumerate(responses):
        got = body["items"]
        want = expected[i % 20]
        assert [g["item_id"] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g["score"] for g in got], [w[2] for w in want], rtol=1e-4, atol=1e-4)
        assert got[0]["text"] == dict(want[0][1])
        assert not set(hists[i % 20]) & {g["item_id"] for g in got}  # exclude_history defaults to true
    assert meta["family"] == "recformer" and meta["catalog_size"] == 30 and meta["index"]["kind"] == "exact"
    b = meta["batching"]
    assert b["requests"] == 200 and b["batches"] < 200  # concurrent requests shared forward passes


def test_bad_requests_get_their_4xx_naming_the_field(recformer_model):
    model, _ = recformer_model
    with Server(build_app(model=str(model), limits={"max_body_bytes": 4096}, log=lambda m: None)) as srv:
        srv.wait_ready()
        post = lambda body, path="/recommend", **kw: httpx.post(srv.url + path, json=body, **kw)  # noqa: E731
        cases = [
            (post({"history": ["i1", "nope"]}), 404, "history[1]"),
            (post({"history": []}), 422, "history"),
            (post({"history": ["i1"], "k": 0}), 422, "k"),
            (post({"history": ["i1"], "k": 5000}), 422, "k"),
            (post({"history": ["i1"], "k": "ten"}), 422, "k"),
            (post({"history": "i1"}), 422, "history"),
            (post({"history": [["i1"]]}), 422, "history[0]"),
            (post({"history": ["i1"], "exclude_history": "yes"}), 422, "exclude_history"),
            (post({"history": ["i1"], "kk": 3}), 422, "kk"),
            (post({}), 422, "history"),
            (post({"history": [f"i{j % 30}" for j in range(11)]}), 422, "history"),  # the model takes 10
            (httpx.post(srv.url + "/recommend", content=b"{not json", headers=JSON), 422, ""),
            (httpx.post(srv.url + "/recommend", content=b"", headers=JSON), 422, ""),
            (post({"history": ["i1"] * 2000}), 413, "body"),
            (post({"requests": [{"history": ["i1"]}, {"history": ["x"]}]}, "/recommend/batch"), 404,
             "requests[1].history[0]"),
            (post({"requests": []}, "/recommend/batch"), 422, "requests"),
            (httpx.get(srv.url + "/items/nope"), 404, "item_id"),
            (post({"items": [{"item_id": "i3", "text": {"title": "dup"}}]}, "/items"), 409, "items[0].item_id"),
            (post({"items": [{"item_id": "z", "text": {"title": " "}}]}, "/items"), 422, "items[0].text"),
            (post({"items": [{"item_id": "z"}]}, "/items"), 422, "items[0].text"),
        ]
        for i, (r, status, field) in enumerate(cases):
            assert r.status_code == status, (i, r.status_code, r.text)
            body = r.json()
            assert field in body["error"], (i, body)
        assert "'nope'" in cases[0][0].json()["error"] and "'ten'" in cases[4][0].json()["error"]
        # numbers are item ids too (MovieLens users send them), a good request still works after all that
        r = post({"history": ["i1", "i2"], "k": 3, "exclude_history": False})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert httpx.get(srv.url + "/docs").status_code == 200
        assert "/recommend/batch" in httpx.get(srv.url + "/openapi.json").json()["paths"]


def test_readiness_before_and_after_loading(recformer_model):
    model, _ = recformer_model
    gate = threading.Event()

    def load():
        gate.wait(30)
        return load_backend(model, log=lambda m: None)

    with Server(create_app(load)) as srv:
        assert httpx.get(srv.url + "/health/live").status_code == 200
        r = httpx.get(srv.url + "/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.post(srv.url + "/recommend", json={"history": ["i1"]}).status_code == 503
        gate.set()
        srv.wait_ready()
        assert httpx.get(srv.url + "/health/ready").json() == {"status": "ready"}
        assert httpx.post(srv.url + "/recommend", json={"history": ["i1"]}).status_code == 200

    def broken():
        raise FileNotFoundError("weights gone")

    with Server(create_app(broken, log=lambda m: None)) as srv:
        time.sleep(0.3)
        r = httpx.get(srv.url + "/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "weights gone" in r.json()["error"]


def test_a_worker_process_accepts_connections_only_once_loaded(recformer_model):
    """`--workers` > 1 (``load_first``): processes share a port, so a process that accepts must be ready —
    the first answer is 200 however long the load takes; a failed load is still reported, not a dead port."""
    model, _ = recformer_model

    def slow():
        time.sleep(1.0)
        return load_backend(model, log=lambda m: None)

    with Server(create_app(slow, load_first=True, log=lambda m: None)) as srv:
        assert httpx.get(srv.url + "/health/ready").json() == {"status": "ready"}
        assert httpx.post(srv.url + "/recommend", json={"history": ["i1"]}).status_code == 200

    def broken():
        raise FileNotFoundError("weights gone")

    with Server(create_app(broken, load_first=True, log=lambda m: None)) as srv:
        r = httpx.get(srv.url + "/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "weights gone" in r.json()["error"]


def test_an_added_item_is_recommended_at_once_and_survives_a_restart(recformer_model, tmp_path):
    import shutil

    from lmrec.api import recommend

    src, data = recformer_model
    model = shutil.copytree(src, tmp_path / "model")
    from lmrec.data.dataset import PreparedDataset

    ITEM7 = PreparedDataset(data).item_text[PreparedDataset(data).item_index["i7"]]
    # the new item's text repeats an existing item's: it lands next to it, so a history of that item ranks it first
    twin = {"title": ITEM7[0][1], "genres": ITEM7[1][1]}
    with Server(build_app(model=str(model), log=lambda m: None)) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "new-1", "text": twin},
                                                          {"item_id": 990, "text": {"title": "something else"}}]})
        assert r.status_code == 201, r.text
        assert r.json()["added"] == ["new-1", "990"] and r.json()["catalog_size"] == 32
        top = httpx.post(srv.url + "/recommend", json={"history": ["i7"], "k": 1}).json()["items"]
        assert top[0]["item_id"] == "new-1"
        assert httpx.get(srv.url + "/items/new-1").json()["text"] == twin
        # a history may hold the new item
        assert httpx.post(srv.url + "/recommend", json={"history": ["new-1", "990"], "k": 3}).status_code == 200
    # the items live in the store beside the model; the model directory is as it was
    assert (tmp_path / "model.items" / "items.log").exists()
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in src.iterdir())
    with Server(build_app(model=str(model), log=lambda m: None)) as srv:  # a restart
        srv.wait_ready()
        assert httpx.get(srv.url + "/metadata").json()["catalog_size"] == 32
        top = httpx.post(srv.url + "/recommend", json={"history": ["i7"], "k": 1}).json()["items"]
        assert top[0]["item_id"] == "new-1"
    # offline commands read the model's own catalog: the served additions are the service's
    assert {it for it, _, _ in recommend(model, ["i7"], k=30, exclude_history=False)} == {f"i{j}" for j in range(30)}


def _add(url: str, item_id: str, title: str) -> int:
    return httpx.post(url + "/items", json={"items": [{"item_id": item_id, "text": {"title": title}}]}).status_code


def test_a_second_server_process_sees_items_the_first_added(recformer_model, tmp_path):
    import shutil

    src, _ = recformer_model
    model = shutil.copytree(src, tmp_path / "model")
    with Server(build_app(model=str(model), log=lambda m: None)) as a, \
            Server(build_app(model=str(model), log=lambda m: None)) as b:
        a.wait_ready()
        b.wait_ready()
        assert _add(a.url, "x1", "toy") == 201
        assert httpx.get(b.url + "/items/x1").status_code == 200
        assert _add(b.url, "x2", "story") == 201
        assert httpx.get(a.url + "/metadata").json()["catalog_size"] == 32
        assert _add(a.url, "x1", "again") == 409


def test_the_serve_command_with_two_worker_processes(recformer_model, tmp_path):
    """`lmrec serve --workers 2` as a user starts it: both processes answer, and an item added through one
    is known to the other."""
    import os
    import shutil
    import subprocess
    import sys

    src, _ = recformer_model
    model = shutil.copytree(src, tmp_path / "model")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmrec.cli.main", "serve", "--model", str(model), "--port",
                             str(port), "--workers", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert _add(url, "w1", "toy story") == 201
        pids, deadline = {}, time.time() + 60
        while len(pids) < 2 and time.time() < deadline:  # the kernel spreads connections over the processes
            r = httpx.get(url + "/metadata")  # (the second may still be loading: then it takes none)
            # no 503: a process accepts connections only once its model is loaded (one ready means all that answer)
            assert r.status_code == 200, r.text
            pids[r.json()["pid"]] = r.json()["catalog_size"]
            time.sleep(0.01)
        assert len(pids) == 2 and set(pids.values()) == {31}, pids
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def generative_model(tmp_path_factory):
    """An expanded tiny Qwen3 with semantic IDs from MiniLM (untrained: the service's contract, not its quality)."""
    from lmrec.generative.api import build_semantic_ids, expand_model

    root = tmp_path_factory.mktemp("gen_serve")
    data = synthetic_dataset(root / "data", users=40, items=30)
    build_semantic_ids(data, root / "sids", levels=2, codes=4, log=lambda m: None)
    expand_model(None, root / "sids", root / "model", data=data, init="codebook", log=lambda m: None)
    return root / "model", data, root / "sids"


def test_generative_service_returns_only_real_items_and_new_items_join_the_trie(generative_model, tmp_path):
    import shutil

    from lmrec.generative.recommender import GenerativeRecommender

    src, data, sids = generative_model
    model = shutil.copytree(src, tmp_path / "model")
    hist = ["i1", "i4", "i9"]
    expected = GenerativeRecommender.load(model, data, sids).recommend(hist, 5)  # `lmrec gen recommend`
    with Server(build_app(model=str(model), data=str(data), sids=str(sids), log=lambda m: None)) as srv:
        srv.wait_ready()
        meta = httpx.get(srv.url + "/metadata").json()
        assert meta["family"] == "generative" and meta["catalog_size"] == 30
        r = httpx.post(srv.url + "/recommend", json={"history": hist, "k": 5, "exclude_history": False}).json()
        assert [x["item_id"] for x in r["items"]] == [e[0] for e in expected]
        np.testing.assert_allclose([x["score"] for x in r["items"]], [e[2] for e in expected], rtol=1e-4)
        r = httpx.post(srv.url + "/recommend/batch", json={"requests": [{"history": h, "k": 10} for h in
                                                                         _histories(6)]}).json()
        catalog = {f"i{j}" for j in range(30)}
        for h, rows in zip(_histories(6), r["results"]):
            ids = [x["item_id"] for x in rows]
            assert len(ids) == 10 == len(set(ids)) and set(ids) <= catalog and not set(ids) & set(h)
        r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "g-new", "text": {"title": "toy story",
                                                                                         "genres": "comedy"}}]})
        assert r.status_code == 201 and "never saw" in r.json()["warning"]
        # a beam as wide as the catalog enumerates the whole trie: the new item is a reachable sequence
        r = httpx.post(srv.url + "/recommend", json={"history": hist, "k": 31, "exclude_history": False}).json()
        assert {x["item_id"] for x in r["items"]} == catalog | {"g-new"}
    # a restart: the codes come back from the item store beside the model
    with Server(build_app(model=str(model), data=str(data), sids=str(sids), log=lambda m: None)) as srv:
        srv.wait_ready()
        assert httpx.get(srv.url + "/metadata").json()["catalog_size"] == 31
        r = httpx.post(srv.url + "/recommend", json={"history": hist, "k": 31, "exclude_history": False}).json()
        assert {x["item_id"] for x in r["items"]} == catalog | {"g-new"}
    # offline (`lmrec gen evaluate`, `gen recommend`) the catalog is the dataset's: the model dir is unchanged
    again = GenerativeRecommender.load(model, data, sids)
    assert len(again.ds.item_ids) == 30 and set(again.ds.item_ids) == catalog
    assert again.trie.leaf_item.numel() == 30
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in src.iterdir())


def test_an_id_baseline_is_served_like_any_model_and_refuses_new_items(tmp_path):
    """`lmrec baseline`'s model/ serves: answers equal `lmrec recommend`'s; POST /items is 409 (no text encoder)."""
    import lmrec
    from lmrec.config import IdRunConfig, load_config
    from lmrec.idrec.train import train_baseline

    data = synthetic_dataset(tmp_path / "data", users=40, items=30)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.epochs=2", "model.hidden_size=16"],
                      schema=IdRunConfig)
    model = train_baseline(cfg, data, log=lambda m: None).model_dir
    hist = ["i1", "i4", "i9"]
    expected = lmrec.recommend(model, hist, k=5, device="cpu")
    with Server(build_app(model=str(model), log=lambda m: None)) as srv:
        srv.wait_ready()
        meta = httpx.get(srv.url + "/metadata").json()
        assert meta["family"] == "idrec" and meta["arch"] == "sasrec" and meta["catalog_size"] == 30
        r = httpx.post(srv.url + "/recommend", json={"history": hist, "k": 5}).json()
        assert [x["item_id"] for x in r["items"]] == [e[0] for e in expected]
        np.testing.assert_allclose([x["score"] for x in r["items"]], [e[2] for e in expected], rtol=1e-5)
        r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "new", "text": {"title": "a new thing"}}]})
        assert r.status_code == 409 and "ID model" in r.json()["error"]
        assert httpx.get(srv.url + "/metadata").json()["catalog_size"] == 30


def test_serve_command_checks_its_inputs(recformer_model, generative_model, tmp_path):
    from typer.testing import CliRunner

    from lmrec.cli.main import app
    from lmrec.errors import LmrecError

    model, data = recformer_model
    gen, gdata, sids = generative_model
    for args, msg in [((tmp_path / "missing",), "no such directory"),
                      ((data,), "is a prepared dataset, not a model"),
                      ((tmp_path,), "not a saved lmrec model"),
                      ((gen,), "give --data and --sids"),
                      ((model, "--index", "flat"), "--index must be one of"),
                      ((model, "--port", "70000"), "--port must be"),
                      ((model, "--workers", "0"), "--workers must be"),
                      ((model, "--host", "0.0.0.0"), "--host 0.0.0.0 without an API key"),
                      ((model, "--api-key-file", tmp_path / "nokey"), "--api-key-file")]:
        # in-process (the console script turns the same LmrecError into one line and exit 2, as below)
        r = CliRunner().invoke(app, ["serve", "--model", *map(str, args)])
        assert isinstance(r.exception, LmrecError) and msg in str(r.exception), (args, r.exception, r.output)
    res = run_cli("serve", "--model", tmp_path / "missing", timeout=60)
    assert res.returncode == 2 and "no such directory" in res.stderr and "Traceback" not in res.stderr
    from lmrec.serve.families import worker_count

    # on an accelerator one process serves (each worker would hold its own copy on the same device)
    with pytest.raises(LmrecError, match="--workers 2 with --device cuda: each worker would hold its own copy"):
        worker_count(2, "cuda")
    assert worker_count(1, "cuda") == 1 and worker_count(2, "cpu") == 2


def test_added_items_in_a_script_the_tokenizer_lacks_get_a_warning_with_the_share(recformer_model,
                                                                                generative_model, tmp_path):
    """POST /items: Chinese text through the English WordPiece tokenizer of the RecFormer model (and through
    the MiniLM the generative model's semantic IDs were built with) is mostly [UNK]: the items are added,
    and the response (and the log) says how much of the text the model could not read."""
    import shutil

    from transformers import AutoTokenizer

    from lmrec.generative.sid import default_encoder, item_texts

    chinese = {"title": "华为无线蓝牙耳机 第一代", "genres": "数码 耳机"}
    cases = [(recformer_model[0], {}, recformer_model[0], " ".join(f"{k} {v}" for k, v in chinese.items()))]
    if default_encoder() is not None:  # the generative model's semantic IDs came from MiniLM: its tokenizer reads
        gen, data, sids = generative_model
        cases.append((gen, {"data": str(data), "sids": str(sids)}, default_encoder(),
                      item_texts([list(chinese.items())])[0]))
    for n, (src, opts, tok_dir, text) in enumerate(cases):
        model = shutil.copytree(src, tmp_path / f"model{n}")
        tok = AutoTokenizer.from_pretrained(tok_dir)
        pieces = tok.tokenize(text)
        share = sum(p == tok.unk_token for p in pieces) / len(pieces)
        logged: list[str] = []
        with Server(build_app(model=str(model), log=logged.append, **opts)) as srv:
            srv.wait_ready()
            r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "zh-1", "text": chinese}]})
            assert r.status_code == 201 and r.json()["added"] == ["zh-1"], r.text
            warning = r.json()["warning"] or ""
            assert f"{share:.0%} of the tokens of " in warning and "unknown to its tokenizer" in warning, warning
            assert any("unknown to its tokenizer" in m for m in logged)
            r = httpx.post(srv.url + "/items", json={"items": [{"item_id": "en-1", "text": {"title": "toy story",
                                                                                            "genres": "comedy"}}]})
            assert r.status_code == 201 and "unknown" not in (r.json()["warning"] or "")


def test_an_id_another_process_added_meanwhile_is_one_409_naming_it_once(recformer_model, tmp_path):
    """The service checks new ids against its catalog, then the backend again under the store's lock (another
    worker may have added the id in between): that second refusal is a 409 on `items`, its message naming
    the id and its place in the request, the field not repeated in it."""
    import shutil

    from lmrec.serve.backend import BadRequest

    src, _ = recformer_model
    backend = load_backend(shutil.copytree(src, tmp_path / "model"), log=lambda m: None)
    existing = backend.item_ids()[0]
    with pytest.raises(BadRequest) as e:
        backend.add_items([("brand-new", [("title", "x")]), (existing, [("title", "y")])])
    assert (e.value.status, e.value.field) == (409, "items")
    assert e.value.message == f"item id {existing!r} (item 2 of the request) is already in the catalog"
    assert "brand-new" not in backend.item_ids()  # all or nothing


def test_the_service_says_who_may_add_items(capsys):
    """Without a key, loopback or an explicit --allow-open-mutation: the log says POST /items is open to whoever
    reaches the host; with one, what needs it. A public address without either is refused (above)."""
    from lmrec.cli.serve import _open_mutation
    from lmrec.errors import LmrecError

    _open_mutation("127.0.0.1", None, False, "mutate")
    _open_mutation("0.0.0.0", None, True, "mutate")
    _open_mutation("0.0.0.0", "k", False, "all")
    err = capsys.readouterr().err.splitlines()
    assert err == ["no API key: POST /items (adding items) is open to anyone who can reach 127.0.0.1",
                   "no API key: POST /items (adding items) is open to anyone who can reach 0.0.0.0",
                   "API key set: every endpoint but /health/* needs it"]
    with pytest.raises(LmrecError, match="without an API key would let anyone"):
        _open_mutation("10.0.0.5", None, False, "mutate")
