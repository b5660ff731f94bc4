"""HTTP plumbing of the service: the gate in front of the application (API key, content type, body size,
checked before anything is parsed) and the handlers that turn errors into one JSON message naming the
field (:class:`~lmrec.serve.schemas.ErrorBody`), never a 500 for a client's mistake."""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lmrec.errors import LmrecError
from lmrec.serve.backend import BadRequest

RETRY_AFTER_S = 1  # what a 503 tells a client to wait: a queue drains in well under a second at capacity


def _error(status: int, message: str, field: str, headers: list | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"error": message, "field": field}).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]}, body)


class Gate:
    """What is refused before the application reads a request (pure ASGI, so nothing is parsed first):

    - 401 without ``Authorization: Bearer <key>`` when a key is set: for ``POST /items`` (``auth="mutate"``) or
      every path but the health probes (``auth="all"``); compared in constant time; ``WWW-Authenticate`` says how.
    - 415 for a POST whose ``Content-Type`` is not ``application/json``: a web page can send ``text/plain`` or a
      form across sites without a preflight, never JSON.
    - 413 for a body over ``limit`` bytes, counted as the chunks arrive (a body without Content-Length too).
    """

    def __init__(self, app, limit: int, api_key: str | None = None, auth: str = "mutate"):
        self.app, self.limit, self.auth = app, limit, auth
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    def _needs_key(self, method: str, path: str) -> bool:
        if self.key is None or path.startswith("/health/"):
            return False
        return self.auth == "all" or (method == "POST" and path.rstrip("/") == "/items")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self._needs_key(scope["method"], scope["path"]) and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.key):
            return await self._reject(send, *_error(401, "missing or wrong API key (send Authorization: Bearer "
                                                         "<key>)", "authorization",
                                                    [(b"www-authenticate", b'Bearer realm="lmrec"')]))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                shown = media.decode("latin-1") or "none"
                return await self._reject(send, *_error(415, f"Content-Type {shown}: send application/json",
                                                        "content-type"))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and 0 < self.limit < int(declared):
            return await self._reject(send, *_error(413, f"request body over {self.limit} bytes", "body"))
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                break
            size += len(msg.get("body", b""))
            if 0 < self.limit < size:
                return await self._reject(send, *_error(413, f"request body over {self.limit} bytes", "body"))
            chunks.append(msg)
            more = msg.get("more_body", False)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send, start: dict, body: bytes):
        await send(start)
        await send({"type": "http.response.body", "body": body})


async def invalid(request: Request, exc: RequestValidationError):
    """FastAPI's validation errors (422) as one message naming the first field and value, then all of them."""
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
    return JSONResponse({"error": msg, "field": first["field"], "detail": detail}, status_code=422)


async def bad_request(request: Request, exc: BadRequest):
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status, headers=headers)


async def lmrec_error(request: Request, exc: LmrecError):
    return JSONResponse({"error": str(exc), "field": getattr(exc, "file", None) or "body"}, status_code=422)
