"""The FastAPI application: operations endpoints, security, error shapes; the APIs are routers."""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from ember import __version__
from ember.engine.async_engine import AsyncEngine, EngineDead, QueueFull
from ember.server import ollama_api, openai_api

access_log = logging.getLogger("ember.access")
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def error_body(path: str, status: int, message: str, kind: str = "invalid_request_error",
               param: str | None = None) -> dict:
    """OpenAI's error shape under /v1 (and elsewhere), Ollama's under /api."""
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(request: Request, status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, kind, param), status_code=status,
                        headers=headers)


class Guard:
    """Pure ASGI middleware: API key, body-size limit, request ids and access logs.

    Pure ASGI rather than an @app.middleware function, so streaming responses and disconnect
    notices pass straight through to the handlers.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # Ollama's own examples post JSON with `curl -d`, i.e. as form data: the body is JSON
            # whatever the header says, as Ollama's server reads it
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        rid = (headers.get(b"x-request-id") or uuid.uuid4().hex[:16].encode())[:64]
        status = {"code": 500}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        async def reject(code: int, message: str, kind: str = "invalid_request_error"):
            await JSONResponse(error_body(path, code, message, kind), status_code=code)(scope, receive, send_logged)

        try:
            if self.api_key and path != "/health":
                auth = headers.get(b"authorization", b"").decode("latin-1")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return await reject(401, "missing or invalid API key", "authentication_error")
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_body
                except ValueError:
                    return await reject(400, "invalid Content-Length header")
                if too_big:
                    return await reject(413, f"request body larger than {self.max_body} bytes")
            elif scope["method"] in ("POST", "PUT", "PATCH"):
                # no length given (chunked): read it here, within the limit, then replay it
                body, more = b"", True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await reject(413, f"request body larger than {self.max_body} bytes")
                replayed = False

                async def receive_buffered():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, receive_buffered, send_logged)
            return await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "request_id": rid.decode("latin-1"), "method": scope["method"], "path": path,
                "status": status["code"], "ms": round((time.perf_counter() - t0) * 1000, 1),
                "client": client[0] if client else None}))


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def create_app(engine: AsyncEngine, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               store=None, shutdown_timeout: float = 30.0) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await engine.shutdown(shutdown_timeout)

    app = FastAPI(title="ember", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = engine.model_name
    app.state.store = store
    app.state.metrics = engine.metrics
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        return error_response(request, 400, msg, param=loc or None)

    @app.exception_handler(QueueFull)
    async def on_full(request: Request, exc: QueueFull):
        return error_response(request, 503, f"server busy: {exc}", "server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(EngineDead)
    async def on_dead(request: Request, exc: EngineDead):
        return error_response(request, 503, str(exc), "engine_dead")

    @app.exception_handler(ValueError)
    async def on_value(request: Request, exc: ValueError):
        return error_response(request, 400, str(exc))

    @app.get("/")
    async def root():
        # Ollama's clients and tools probe this before anything else
        return PlainTextResponse("Ollama is running (ember)")

    @app.get("/health")
    async def health():
        if not engine.is_healthy():
            return JSONResponse({"status": "dead", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if engine.metrics is None:
            return PlainTextResponse("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        tok = engine.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        ids = tok.encode_chat(req.messages) if req.messages is not None else tok.encode(
            req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}): got {bad[:5]}")
        return {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    return app
