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
    counts the chunks as they arrive, so a body without a Content-Length is bounded too)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
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


def create_app(load: Callable[[], Backend], *, max_batch: int = 32, max_wait_ms: float = 2.0,
               max_body_bytes: int = 1 << 20, log: Callable[[str], None] = print) -> FastAPI:
    """The application; ``load()`` builds the backend in a background thread once the server is up."""
    state: dict = {"backend": None, "error": None}

    def run(queries: list[Query]) -> list[list[Hit]]:
        backend = state["backend"]
        backend.sync()
        return backend.recommend(queries)

    batcher = DynamicBatcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms)

    def load_model() -> None:
        try:
            state["backend"] = load()
            log(f"ready: {state['backend'].family} model, {len(state['backend'].item_ids())} items")
        except Exception as e:  # reported by /health/ready; the process stays up to say why
            state["error"] = f"{type(e).__name__}: {e}"
            log(f"loading failed: {state['error']}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        threading.Thread(target=load_model, name="lmrec-load", daemon=True).start()
        yield
        await batcher.stop()

    app = FastAPI(title="lmrec", version="1", lifespan=lifespan,
                  description="Sequential recommendation from a trained lmrec model (RecFormer or generative).")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
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

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)

    @app.exception_handler(LmrecError)
    async def lmrec_error(request: Request, exc: LmrecError):
        return JSONResponse({"error": str(exc), "field": getattr(exc, "file", None) or "body"}, status_code=422)

    def backend() -> Backend:
        """The loaded backend, with what other server processes added (a stat call when nothing changed)."""
        if state["backend"] is None:
            raise BadRequest("model", "not loaded yet" if state["error"] is None else state["error"], status=503)
        state["backend"].sync()
        return state["backend"]

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if state["backend"] is None:
            return JSONResponse({"status": "failed" if state["error"] else "loading", "error": state["error"]},
                                status_code=503)
        return {"status": "ready"}

    @app.get("/metadata")
    async def metadata():
        b = backend()
        return {**b.metadata(), "lmrec_version": _lmrec_version(), "pid": os.getpid(),
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                             "batches": batcher.batches, "requests": batcher.requests}}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(req: RecommendRequest):
        b, q = backend(), _query(req)
        b.check(q)
        return RecommendResponse(items=_out(await batcher.submit(q)))

    @app.post("/recommend/batch", response_model=BatchResponse)
    async def recommend_batch(req: BatchRequest):
        b = backend()
        qs = [_query(r) for r in req.requests]
        for i, q in enumerate(qs):
            b.check(q, where=f"requests[{i}].")
        return BatchResponse(results=[_out(h) for h in await batcher.submit_many(qs)])

    @app.get("/items/{item_id}", response_model=Item)
    async def get_item(item_id: str):
        b = backend()
        i = b.index_of(item_id)
        if i is None:
            raise BadRequest("item_id", f"unknown item id {item_id!r}", status=404)
        return Item(item_id=item_id, text=dict(b.item_text(i)))

    @app.post("/items", response_model=AddItemsResponse, status_code=201)
    async def add_items(req: AddItemsRequest):
        b = backend()
        items = []
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
            log(f"warning: {warning}")
        return AddItemsResponse(added=ids, catalog_size=len(b.item_ids()), warning=warning)

    return BodyLimit(app, max_body_bytes) if max_body_bytes else app


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
              max_body_bytes: int = 1 << 20, log: Callable[[str], None] = print):
    from lmrec.serve.backends import load_backend

    return create_app(lambda: load_backend(model, data=data, sids=sids, index=index, exact_max=exact_max,
                                           beams=beams, log=log),
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
