"""The HTTP service (FastAPI, run by uvicorn): recommendations from a trained model of either family.

    POST /recommend          {"history": [ids], "k": 10, "exclude_history": true} → ranked items
    POST /recommend/batch    {"requests": [...]} → one list per request
    GET  /items/{item_id}    an item's text
    POST /items              {"items": [{"item_id": ..., "text": {"title": ...}}]} → added, recommendable at once
    GET  /metadata           family, catalog size, model version, index, batching
    GET  /health/live        the process answers
    GET  /health/ready       the model and its index are loaded (503 before)
    GET  /docs               OpenAPI documentation

Bad input is a 4xx naming the field and the value (422 invalid, 404 unknown id, 413 body too large, 409
cannot add), never a 500. The model loads in a background thread after the server starts listening, so an
orchestrator can tell a live process from a ready one.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from lmrec.errors import LmrecError
from lmrec.serve.backends import Backend, BadRequest, Hit, Query
from lmrec.serve.batching import DynamicBatcher

ItemId = Annotated[StrictStr | StrictInt, Field(description="An item id (numbers are read as their text)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    history: list[ItemId] = Field(..., description="Item ids the user consumed, oldest first.")
    k: StrictInt = Field(10, description="How many items to return.")
    exclude_history: StrictBool = Field(True, description="Never return an item of the history.")


class BatchRequest(_Strict):
    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=1024)


class Recommendation(BaseModel):
    item_id: str
    score: float
    text: dict[str, str]


class RecommendResponse(BaseModel):
    items: list[Recommendation]


class BatchResponse(BaseModel):
    results: list[list[Recommendation]]


class NewItem(_Strict):
    item_id: ItemId
    text: dict[StrictStr, StrictStr] = Field(..., description="Key/value attributes in order, e.g. title, brand.")


class AddItemsRequest(_Strict):
    items: list[NewItem] = Field(..., min_length=1, max_length=10_000)


class AddItemsResponse(BaseModel):
    added: list[str]
    catalog_size: int
    warning: str | None = None


class Item(BaseModel):
    item_id: str
    text: dict[str, str]


def _query(r: RecommendRequest) -> Query:
    return Query([str(x) for x in r.history], r.k, r.exclude_history)


def _out(hits: list[Hit]) -> list[Recommendation]:
    return [Recommendation(item_id=h.item_id, score=h.score, text=dict(h.text)) for h in hits]


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before the application reads them (pure ASGI:
    counts the chunks as they arrive, so a body without a Content-Length is bounded too). Every body is
    JSON here: one sent with another Content-Type (``curl -d`` says form-urlencoded) is read as JSON."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and 0 < self.limit < int(declared):
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                break
            size += len(msg.get("body", b""))
            if 0 < self.limit < size:
                return await self._reject(send)
            chunks.append(msg)
            more = msg.get("more_body", False)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps({"error": f"request body over {self.limit} bytes", "field": "body"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _invalid(request: Request, exc: RequestValidationError):
    """FastAPI's validation errors as one message naming the first field and value, then all of them."""
    detail = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or "body"
        entry = {"field": field, "message": e.get("msg", "invalid")}
        value = e.get("input")
        if isinstance(value, bytes):  # the raw body of malformed JSON
            value = value.decode("utf-8", "replace")[:200]
        if e.get("type") != "missing" and isinstance(value, str | int | float | bool):
            entry["value"] = value
        detail.append(entry)
    first = detail[0] if detail else {"field": "body", "message": "invalid"}
    msg = f"{first['field']}: {first['message']}" + (f" (got {first['value']!r})" if "value" in first else "")
    return JSONResponse({"error": msg, "detail": detail}, status_code=422)


async def _bad(request: Request, exc: BadRequest):
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)


async def _lmrec_error(request: Request, exc: LmrecError):
    return JSONResponse({"error": str(exc), "field": getattr(exc, "file", None) or "body"}, status_code=422)


class Service:
    """The state behind the routes: the backend (None while loading), the batcher, the loading error."""

    def __init__(self, load: Callable[[], Backend], batcher_opts: dict, log: Callable[[str], None]):
        self.load_fn, self.log = load, log
        self.backend: Backend | None = None
        self.error: str | None = None
        self.batcher = DynamicBatcher(self._run, **batcher_opts)

    def _run(self, queries: list[Query]) -> list[list[Hit]]:
        self.backend.sync()
        return self.backend.recommend(queries)

    def _load(self) -> None:
        try:
            self.backend = self.load_fn()
            self.log(f"ready: {self.backend.family} model, {len(self.backend.item_ids())} items")
        except Exception as e:  # reported by /health/ready; the process stays up to say why
            self.error = f"{type(e).__name__}: {e}"
            self.log(f"loading failed: {self.error}")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        await self.batcher.start()
        threading.Thread(target=self._load, name="lmrec-load", daemon=True).start()
        yield
        await self.batcher.stop()

    def current(self) -> Backend:
        """The loaded backend, with what other server processes added (a stat call when nothing changed)."""
        if self.backend is None:
            raise BadRequest("model", "not loaded yet" if self.error is None else self.error, status=503)
        self.backend.sync()
        return self.backend

    # ------------------------------------------------------------------------------------------ routes
    async def live(self):
        return {"status": "live"}

    async def ready(self):
        if self.backend is None:
            return JSONResponse({"status": "failed" if self.error else "loading", "error": self.error},
                                status_code=503)
        return {"status": "ready"}

    async def metadata(self):
        b, bt = self.current(), self.batcher
        return {**b.metadata(), "lmrec_version": _lmrec_version(), "pid": os.getpid(),
                "batching": {"max_batch": bt.max_batch, "max_wait_ms": bt.max_wait * 1000, "batches": bt.batches,
                             "requests": bt.requests}}

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        q = _query(req)
        self.current().check(q)
        return RecommendResponse(items=_out(await self.batcher.submit(q)))

    async def recommend_batch(self, req: BatchRequest) -> BatchResponse:
        b, qs = self.current(), [_query(r) for r in req.requests]
        for i, q in enumerate(qs):
            b.check(q, where=f"requests[{i}].")
        return BatchResponse(results=[_out(h) for h in await self.batcher.submit_many(qs)])

    async def get_item(self, item_id: str) -> Item:
        b = self.current()
        i = b.index_of(item_id)
        if i is None:
            raise BadRequest("item_id", f"unknown item id {item_id!r}", status=404)
        return Item(item_id=item_id, text=dict(b.item_text(i)))

    async def add_items(self, req: AddItemsRequest) -> AddItemsResponse:
        b, items = self.current(), []
        for p, it in enumerate(req.items):
            text = [(k, v) for k, v in it.text.items()]
            if not any(v.strip() for _, v in text):
                raise BadRequest(f"items[{p}].text", "no text (expected key/value attributes with values)")
            items.append((str(it.item_id), text))
        for p, (it, _) in enumerate(items):
            if b.index_of(it) is not None or it in {x for x, _ in items[:p]}:
                raise BadRequest(f"items[{p}].item_id", f"{it!r} is already in the catalog", status=409)
        ids, warning = await asyncio.to_thread(b.add_items, items)
        if warning:
            self.log(f"warning: {warning}")
        return AddItemsResponse(added=ids, catalog_size=len(b.item_ids()), warning=warning)


def create_app(load: Callable[[], Backend], *, max_batch: int = 32, max_wait_ms: float = 2.0,
               max_body_bytes: int = 1 << 20, log: Callable[[str], None] = print):
    """The application; ``load()`` builds the backend in a background thread once the server is up."""
    svc = Service(load, {"max_batch": max_batch, "max_wait_ms": max_wait_ms}, log)
    app = FastAPI(title="lmrec", version="1", lifespan=svc.lifespan,
                  description="Sequential recommendation from a trained lmrec model (RecFormer or generative).")
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(BadRequest, _bad)
    app.add_exception_handler(LmrecError, _lmrec_error)
    app.add_api_route("/health/live", svc.live, methods=["GET"])
    app.add_api_route("/health/ready", svc.ready, methods=["GET"])
    app.add_api_route("/metadata", svc.metadata, methods=["GET"])
    app.add_api_route("/recommend", svc.recommend, methods=["POST"], response_model=RecommendResponse)
    app.add_api_route("/recommend/batch", svc.recommend_batch, methods=["POST"], response_model=BatchResponse)
    app.add_api_route("/items/{item_id}", svc.get_item, methods=["GET"], response_model=Item)
    app.add_api_route("/items", svc.add_items, methods=["POST"], response_model=AddItemsResponse, status_code=201)
    return BodyLimit(app, max_body_bytes)


def _lmrec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmrec")
    except PackageNotFoundError:
        return "unknown"


def app_from_env():
    """The application from ``$LMREC_SERVE`` (JSON of :func:`serve`'s options): what each uvicorn worker
    process builds when ``--workers`` > 1."""
    opts = json.loads(os.environ["LMREC_SERVE"])
    return build_app(**opts)


def build_app(*, model: str, data: str | None = None, sids: str | None = None, index: str = "auto",
              exact_max: int = 200_000, beams: int | None = None, max_batch: int = 32, max_wait_ms: float = 2.0,
              max_body_bytes: int = 1 << 20, device: str = "cpu", log: Callable[[str], None] = print):
    from lmrec.serve.backends import load_backend

    return create_app(lambda: load_backend(model, data=data, sids=sids, index=index, exact_max=exact_max,
                                           beams=beams, device=device, log=log),
                      max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, log=log)


def serve(*, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info", **opts) -> None:
    """Run the service with uvicorn (``opts``: :func:`build_app`'s keywords, JSON-serialisable)."""
    import uvicorn

    if workers == 1:
        uvicorn.run(build_app(**opts), host=host, port=port, log_level=log_level)
    else:
        os.environ["LMREC_SERVE"] = json.dumps(opts)
        uvicorn.run("lmrec.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
