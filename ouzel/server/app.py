"""The FastAPI application: auth, error shapes, health, metrics, model list; the API routers live
in openai.py, responses.py and anthropic.py."""
from __future__ import annotations

import hmac
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import ServeEngine
from .errors import ApiError, anthropic_error, openai_error

log = logging.getLogger(__name__)


def create_app(engine: ServeEngine) -> FastAPI:
    cfg = engine.cfg

    # a dependency, not an HTTP middleware: BaseHTTPMiddleware wraps `receive`, and then handlers
    # can no longer see a client hang up (request.is_disconnected)
    async def guard(request: Request) -> None:
        engine.http_requests += 1
        if cfg.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY or x-api-key: KEY)",
                               kind="authentication_error")
        size = int(request.headers.get("content-length") or 0)
        if size > cfg.max_body_bytes:
            raise ApiError(413, f"request body is {size} bytes; the limit is {cfg.max_body_bytes}")

    app = FastAPI(title="ouzel", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(guard)])
    app.state.engine = engine
    if cfg.cors:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return error_response(request, e)

    @app.exception_handler(404)
    async def on_404(request: Request, e):
        return error_response(request, ApiError(404, f"no route {request.method} {request.url.path}",
                                                kind="not_found_error"))

    @app.get("/health")
    async def health():
        s = engine.scheduler.stats()
        return {"status": "ok", "model": engine.model_id, "running": s["running"], "waiting": s["waiting"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "created": int(engine.started), "owned_by": "ouzel",
                                            "context_length": engine.llm.ctx}]}

    from . import anthropic, openai, responses
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.state.responses = responses.ResponseStore()
    app.include_router(anthropic.router)
    return app


def error_response(request: Request, e: ApiError) -> JSONResponse:
    body = anthropic_error(e) if request.url.path.startswith("/v1/messages") else openai_error(e)
    return JSONResponse(body, status_code=e.status)


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def check_model(engine: ServeEngine, body: dict) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if name not in (engine.model_id, engine.cfg.model):
        raise ApiError(404, f"model {name!r} does not exist; this server serves {engine.model_id!r}",
                       kind="not_found_error", param="model")


def sse(events, *, run=None, done: bool = False, named: bool = False) -> StreamingResponse:
    """An SSE response from an async iterator of dicts (None = keep-alive comment). `run` is the
    engine stream underneath: closed explicitly when the client goes away, which cancels it."""
    async def body():
        try:
            async for ev in events:
                if ev is None:
                    yield ": keep-alive\n\n"
                elif named:
                    yield f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"
                else:
                    yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
        except ApiError as e:
            err = openai_error(e) if not named else anthropic_error(e)
            yield (f"event: error\n" if named else "") + f"data: {json.dumps(err)}\n\n"
        finally:
            await events.aclose()
            if run is not None:
                await run.aclose()
        if done:
            yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
