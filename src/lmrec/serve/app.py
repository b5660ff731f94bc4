"""The HTTP service (FastAPI, run by uvicorn): recommendations from a trained model of either family.

    POST /recommend          {"history": [ids], "k": 10, "exclude_history": true} → ranked items
    POST /recommend/batch    {"requests": [...]} → one list per request
    GET  /items/{item_id}    an item's text
    POST /items              {"items": [{"item_id": ..., "text": {"title": ...}}]} → added, recommendable at once
    GET  /metadata           family, catalog size, model version, index, batching, limits
    GET  /health/live        the process answers
    GET  /health/ready       the model and its index are loaded (503 before, and once stopping)
    GET  /docs               OpenAPI documentation (Swagger UI served from the installed package, no CDN)

Bad input is a 4xx naming the field and the value (422 invalid, 404 unknown id, 413 body too large, 415 not
JSON, 401 no key, 409 cannot add), never a 500; 503 (with ``Retry-After``) when the queue is full or the
service stops, 504 when a request's deadline passes. The model loads in a background thread after the server
starts listening, so an orchestrator can tell a live process from a ready one. Nothing slow runs on the
event loop: forward passes and catching up with other processes' additions run in threads.

Production use (key, limits, shutdown, the item store): docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lmrec.errors import LmrecError
from lmrec.serve.backend import Backend, BadRequest, Hit, Query
from lmrec.serve.batching import DynamicBatcher, Overloaded
from lmrec.serve.http import Gate, bad_request, invalid, lmrec_error
from lmrec.serve.schemas import (
    AddItemsRequest,
    AddItemsResponse,
    BatchRequest,
    BatchResponse,
    Health,
    Item,
    Recommendation,
    RecommendRequest,
    RecommendResponse,
    errors,
)


@dataclass
class Limits:
    """What one request may ask, and how long it may take (``lmrec serve --help`` names each option)."""

    max_k: int = 100  # --max-k (the model's own bound applies too: RecFormer 1000, generative 100)
    max_history: int | None = None  # --max-history (default: the model's own)
    max_batch_requests: int = 256  # --max-batch-requests: requests in one POST /recommend/batch
    max_body_bytes: int = 1 << 20  # --max-body-kb
    deadline_ms: float = 10_000  # --deadline-ms: queue + forward, else 504
    max_queue: int = 1024  # --max-queue: waiting requests, else 503 + Retry-After
    drain_s: float = 0.0  # --drain-seconds: after SIGTERM, keep answering (ready: 503) this long first
    shutdown_timeout_s: float = 30.0  # --shutdown-timeout: in-flight and queued requests get this long


def _query(r: RecommendRequest) -> Query:
    return Query([str(x) for x in r.history], r.k, r.exclude_history)


def _out(hits: list[Hit]) -> list[Recommendation]:
    return [Recommendation(item_id=h.item_id, score=h.score, text=dict(h.text)) for h in hits]


class Service:
    """The state behind the routes: the backend (None while loading), the batcher, the loading error."""

    def __init__(self, load: Callable[[], Backend], batcher_opts: dict, limits: Limits, log: Callable[[str], None],
                 batch_delay_s: float = 0.0, load_first: bool = False):
        self.load_fn, self.log, self.limits = load, log, limits
        self.load_first = load_first
        self.backend: Backend | None = None
        self.error: str | None = None
        self.stopping = False
        self.batch_delay_s = batch_delay_s  # fault injection for the tests (slow forwards), 0 in service
        self.batcher = DynamicBatcher(self._run, max_queue=limits.max_queue, **batcher_opts)
        self._meta: tuple[int, dict] | None = None

    def _run(self, queries: list[Query]) -> list[list[Hit]]:  # the batch thread
        if self.batch_delay_s:
            threading.Event().wait(self.batch_delay_s)
        self.backend.sync()
        return self.backend.recommend(queries)

    def _load(self) -> None:
        try:
            self.backend = self.load_fn()
            self.log(f"ready: {self.backend.family} model, {len(self.backend.item_ids())} items")
        except Exception as e:  # reported by /health/ready; the process stays up to say why
            self.error = f"{type(e).__name__}: {e}"
            self.log(f"loading failed: {self.error}")

    def _on_sigterm(self, previous) -> None:
        """SIGTERM: readiness fails at once; after ``drain_s`` uvicorn's own handler stops accepting and
        waits for in-flight requests (``timeout_graceful_shutdown``), then the lifespan answers the queue."""
        def handler(sig, frame):
            if not self.stopping:
                self.stopping = True
                self.log(f"SIGTERM: not ready; stopping in {self.limits.drain_s:g} s")
            if callable(previous):
                threading.Timer(self.limits.drain_s, previous, (sig, frame)).start()

        signal.signal(signal.SIGTERM, handler)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        await self.batcher.start()
        if threading.current_thread() is threading.main_thread():  # uvicorn's handler is installed by now
            self._on_sigterm(signal.getsignal(signal.SIGTERM))
        if self.load_first:  # one of several processes on a shared port: accept only once loaded
            await asyncio.to_thread(self._load)
        else:
            threading.Thread(target=self._load, name="lmrec-load", daemon=True).start()
        yield
        self.stopping = True
        await self.batcher.stop(self.limits.shutdown_timeout_s)

    async def current(self) -> Backend:
        """The loaded backend, caught up with what other server processes added (in a thread: the catch-up
        waits for a running forward pass, the event loop does not)."""
        if self.backend is None:
            raise BadRequest("model", "not loaded yet" if self.error is None else self.error, status=503)
        if self.backend.needs_sync():
            await asyncio.to_thread(self.backend.sync)
        return self.backend

    async def _submit(self, queries: list[Query]) -> list[list[Hit]]:
        try:
            return await asyncio.wait_for(self.batcher.submit_many(queries), self.limits.deadline_ms / 1000)
        except asyncio.TimeoutError:
            raise BadRequest("deadline", f"no answer within {self.limits.deadline_ms:g} ms (queue and model); "
                                         "try again or raise --deadline-ms", status=504) from None
        except Overloaded as e:
            raise BadRequest("queue", f"{e}; try again shortly", status=503) from None

    def _check(self, b: Backend, q: Query, where: str = "") -> None:
        b.check(q, where, max_k=self.limits.max_k, max_history=self.limits.max_history)

    # ------------------------------------------------------------------------------------------ routes
    async def live(self) -> Health:
        return Health(status="live")

    async def ready(self):
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        if self.backend is None:
            return JSONResponse({"status": "failed" if self.error else "loading", "error": self.error},
                                status_code=503)
        return Health(status="ready")

    async def metadata(self) -> dict:
        b, bt = await self.current(), self.batcher
        size = len(b.item_ids())
        if self._meta is None or self._meta[0] != size:  # the model's part changes with the catalog only
            meta, lim = b.metadata(), self.limits
            # what a request may ask: the model's bound or the service's limit, whichever is lower
            bounds = {"max_k": min(meta["max_k"], lim.max_k),
                      "max_history": min(meta["max_history"], lim.max_history or meta["max_history"])}
            self._meta = (size, {**meta, **bounds, "lmrec_version": _lmrec_version(), "pid": os.getpid(),
                                 "limits": asdict(lim)})
        return {**self._meta[1], "batching": {"max_batch": bt.max_batch, "max_wait_ms": bt.max_wait * 1000,
                                              "batches": bt.batches, "requests": bt.requests,
                                              "queued": bt.queue.qsize(), "refused": bt.refused}}

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        q = _query(req)
        self._check(await self.current(), q)
        return RecommendResponse(items=_out((await self._submit([q]))[0]))

    async def recommend_batch(self, req: BatchRequest) -> BatchResponse:
        if len(req.requests) > self.limits.max_batch_requests:
            raise BadRequest("requests", f"{len(req.requests)} requests; this service takes at most "
                                         f"{self.limits.max_batch_requests} per batch")
        b, qs = await self.current(), [_query(r) for r in req.requests]
        for i, q in enumerate(qs):
            self._check(b, q, where=f"requests[{i}].")
        return BatchResponse(results=[_out(h) for h in await self._submit(qs)])

    async def get_item(self, item_id: str) -> Item:
        b = await self.current()
        i = b.index_of(item_id)
        if i is None:
            raise BadRequest("item_id", f"unknown item id {item_id!r}", status=404)
        return Item(item_id=item_id, text=dict(b.item_text(i)))

    async def add_items(self, req: AddItemsRequest) -> AddItemsResponse:
        b, items, first = await self.current(), [], {}
        for p, it in enumerate(req.items):
            item_id, text = str(it.item_id), list(it.text.items())
            if item_id in first:
                raise BadRequest(f"items[{p}].item_id", f"{item_id!r} is also items[{first[item_id]}].item_id: "
                                                        "each item once per request")
            first[item_id] = p
            if not any(v.strip() for _, v in text):
                raise BadRequest(f"items[{p}].text", "no text (expected key/value attributes with values)")
            if b.index_of(item_id) is not None:
                raise BadRequest(f"items[{p}].item_id", f"{item_id!r} is already in the catalog", status=409)
            items.append((item_id, text))
        ids, warning = await asyncio.to_thread(b.add_items, items)
        if warning:
            self.log(f"warning: {warning}")
        return AddItemsResponse(added=ids, catalog_size=len(b.item_ids()), warning=warning)


def _docs(app: FastAPI) -> None:
    """Swagger UI from the ``swagger-ui-bundle`` package's files, served by this process: /docs works offline."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui")

    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lmrec — API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


def create_app(load: Callable[[], Backend], *, max_batch: int = 32, max_wait_ms: float = 2.0,
               limits: Limits | None = None, api_key: str | None = None, auth: str = "mutate",
               log: Callable[[str], None] = print, batch_delay_s: float = 0.0, load_first: bool = False):
    """The application; ``load()`` builds the backend in a background thread once the server is up, or, with
    ``load_first``, before it accepts a connection. With
    ``api_key``, ``POST /items`` (``auth="mutate"``) or everything but the health probes (``auth="all"``) needs
    ``Authorization: Bearer <api_key>``."""
    limits = limits or Limits()
    svc = Service(load, {"max_batch": max_batch, "max_wait_ms": max_wait_ms}, limits, log, batch_delay_s,
                  load_first)
    app = FastAPI(title="lmrec", version="1", lifespan=svc.lifespan, docs_url=None, redoc_url=None,
                  description="Sequential recommendation from a trained lmrec model (RecFormer or generative).")
    app.state.service = svc
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(LmrecError, lmrec_error)
    gated = (401, 413, 415) if api_key and auth == "all" else (413, 415)
    read = (401,) if api_key and auth == "all" else ()
    route = app.add_api_route
    route("/health/live", svc.live, methods=["GET"], response_model=Health, response_model_exclude_none=True)
    route("/health/ready", svc.ready, methods=["GET"], response_model=Health, responses=errors(503),
          response_model_exclude_none=True)
    route("/metadata", svc.metadata, methods=["GET"], responses=errors(*read, 503))
    route("/recommend", svc.recommend, methods=["POST"], response_model=RecommendResponse,
          responses=errors(*gated, 404, 422, 503, 504))
    route("/recommend/batch", svc.recommend_batch, methods=["POST"], response_model=BatchResponse,
          responses=errors(*gated, 404, 422, 503, 504))
    route("/items/{item_id}", svc.get_item, methods=["GET"], response_model=Item, responses=errors(*read, 404, 503))
    route("/items", svc.add_items, methods=["POST"], response_model=AddItemsResponse, status_code=201,
          responses=errors(*({401} | set(gated) if api_key else gated), 409, 422, 503))
    _docs(app)
    return Gate(app, limits.max_body_bytes, api_key=api_key, auth=auth)


def _lmrec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmrec")
    except PackageNotFoundError:
        return "unknown"


def read_api_key(api_key_file: str | None = None) -> str | None:
    """The key from ``--api-key-file`` (its first line), else ``$LMREC_API_KEY``, else None (no key)."""
    if api_key_file:
        try:
            lines = Path(api_key_file).read_text().strip().splitlines()
        except OSError as e:
            raise LmrecError(f"--api-key-file {api_key_file}: {e.strerror}") from None
        if not lines:
            raise LmrecError(f"--api-key-file {api_key_file}: the file is empty")
        return lines[0].strip()
    key = os.environ.get("LMREC_API_KEY", "").strip()
    return key or None


def app_from_env():
    """The application from ``$LMREC_SERVE`` (JSON of :func:`serve`'s options): what each uvicorn worker
    process builds when ``--workers`` > 1 (the key is read again from the file or the environment).

    Each worker loads its model before it accepts a connection: the processes share one port, so a
    ``/health/ready`` answered by one says nothing of another, and a request the kernel hands to a process
    still loading would get a 503. A process that accepts is ready; until one is, the port queues connections."""
    opts = json.loads(os.environ["LMREC_SERVE"])
    return build_app(**opts, load_first=True)


def build_app(*, model: str, data: str | None = None, sids: str | None = None, index: str = "auto",
              exact_max: int = 200_000, beams: int | None = None, max_batch: int = 32, max_wait_ms: float = 2.0,
              limits: dict | None = None, item_store: str | None = None, api_key: str | None = None,
              api_key_file: str | None = None, auth: str = "mutate", device: str = "cpu",
              log: Callable[[str], None] = print, load_first: bool = False):
    from lmrec.serve.families import load_backend

    key = api_key or read_api_key(api_key_file)
    delay = float(os.environ.get("LMREC_SERVE_TEST_BATCH_DELAY_MS", "0")) / 1000  # tests only: slow forwards
    return create_app(lambda: load_backend(model, data=data, sids=sids, index=index, exact_max=exact_max,
                                           beams=beams, device=device, log=log, item_store=item_store),
                      max_batch=max_batch, max_wait_ms=max_wait_ms, limits=Limits(**(limits or {})), api_key=key,
                      auth=auth, log=log, batch_delay_s=delay, load_first=load_first)


def _exit_zero(sig, frame):
    raise SystemExit(0)


def serve(*, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info", **opts) -> None:
    """Run the service with uvicorn (``opts``: :func:`build_app`'s keywords, JSON-serialisable). SIGTERM:
    readiness fails, requests in flight and queued are answered (for ``--shutdown-timeout``), exit 0."""
    import uvicorn

    timeout = (opts.get("limits") or {}).get("shutdown_timeout_s", Limits.shutdown_timeout_s)
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully: exit 0 then, as before it ran
    signal.signal(signal.SIGTERM, _exit_zero)
    if workers == 1:
        uvicorn.run(build_app(**opts), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=int(timeout + 1))
    else:
        os.environ["LMREC_SERVE"] = json.dumps(opts)
        uvicorn.run("lmrec.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=int(timeout + 1))
