"""The FastAPI app: the API routes, the storefront (when present), error handlers, body limit, metrics.

    app = create_app(Settings(data_dir="../shared/data/amazon-beauty"))   # app.state.service, app.state.metrics
    uvicorn.run(app, host="127.0.0.1", port=8000)                         # what `dragonrec serve` does

    # or from the environment / a settings file, e.g. for several worker processes:
    DRAGONREC_DATA_DIR=../shared/data/amazon-beauty python -m uvicorn dragonrec.serve.app:app_from_env --factory

The service starts with the app (lifespan): the dataset is read and the active version loaded before the
first request is answered.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dragonrec.embed import Embedder
from dragonrec.serve.api import router
from dragonrec.serve.metrics import Metrics, MetricsMiddleware
from dragonrec.serve.ratelimit import RateLimiter
from dragonrec.serve.service import LoopRunner, Service, ServiceError
from dragonrec.serve.settings import Settings

log = logging.getLogger("dragonrec.serve")


def create_app(settings: Settings, service: Service | None = None, loop: LoopRunner | None = None,
               embedder: Embedder | None = None) -> FastAPI:
    """The app over a `Service` (built from `settings` unless one is handed in; a handed-in service is
    started with the app but closed by its owner). `loop` is the feedback loop behind /v1/loop/*."""
    own = service is None
    service = service or Service(settings, loop=loop, embedder=embedder)
    if service.loop is None and settings.loop_method is not None:
        from dragonrec.serve.loop_runner import ServiceLoop

        service.loop = ServiceLoop(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        interval = sys.getswitchinterval()
        if settings.switch_interval_ms is not None:
            sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
        await run_in_threadpool(service.start)
        app.state.metrics.publish_state()
        stop = threading.Event()
        if service.loop is not None and settings.loop_every_s:
            from dragonrec.serve.loop_runner import run_every

            run_every(service, settings.loop_every_s, stop)
        try:
            yield
        finally:
            stop.set()
            if own:
                await run_in_threadpool(service.close)
            sys.setswitchinterval(interval)

    app = FastAPI(title="dragonrec", version="1", lifespan=lifespan,
                  summary="Recommendations, feedback events, catalog and model versions of a dragonrec shop.")
    app.state.service = service
    app.state.settings = settings
    app.state.metrics = Metrics(service)
    service.on_stage = lambda stage, seconds: app.state.metrics.stages.labels(stage).observe(seconds)
    service.on_tick = app.state.metrics.publish_state
    app.state.shop_limiter = RateLimiter(settings.shop_rate_per_minute, settings.shop_burst)
    app.include_router(router)
    storefront = _storefront()
    if storefront is not None:
        app.include_router(storefront.router)
    install_error_handlers(app)
    if settings.storefront_origins:  # a shop served from another origin may call /shop/* from the browser
        app.add_middleware(CORSMiddleware, allow_origins=settings.storefront_origins, allow_credentials=True,
                           allow_methods=["GET", "POST"], allow_headers=["Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.openapi = _openapi_with_limits(app, settings)
    return app


def _openapi_with_limits(app: FastAPI, settings: Settings):
    """app.openapi, plus the limits that are settings rather than types (the longest list, the largest event
    batch): a request the document calls valid is one this server accepts."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("RecommendRequest", "ShopRecommendRequest"):
            n = schemas.get(name, {}).get("properties", {}).get("n", {})
            for branch in [n, *n.get("anyOf", [])]:
                if branch.get("type") == "integer":
                    branch["maximum"] = settings.max_n
        for name in ("EventsIn", "ShopEventsIn"):
            events = schemas.get(name, {}).get("properties", {}).get("events")
            if events is not None:
                events["maxItems"] = settings.max_events_per_batch
        app.openapi_schema = doc
        return doc

    return openapi


def app_from_env() -> FastAPI:
    """`create_app` with settings from DRAGONREC_* variables (and DRAGONREC_SETTINGS_FILE): a uvicorn factory."""
    return create_app(Settings())


def _storefront():
    """The storefront module (pages, dashboard) when it is there; the API runs without it."""
    try:
        from dragonrec.serve import storefront
    except ModuleNotFoundError as e:
        if e.name not in ("dragonrec.serve.storefront", "dragonrec.serve.dashboard"):
            raise
        return None
    return storefront


# -- errors -------------------------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    """Every refusal as {"detail": "..."}: service refusals with their status, validation errors as 422 (400
    for a body that is not JSON) naming each bad field, a store that cannot be reached as a 503 with
    Retry-After, anything unexpected as a 500 that says nothing more (the traceback goes to the log)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if getattr(exc, "retry_after", None) is not None:
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            return JSONResponse({"detail": "the body is not valid JSON", "errors": errors}, status_code=400)
        summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return JSONResponse({"detail": f"invalid request: {summary}{more}", "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        # The store is unreachable (or, SQLite, locked past its busy timeout): the request's transaction rolled
        # back, so nothing of it was stored and a retry is safe. 503 + Retry-After tells clients (and the load
        # balancer) to come back; the log names the cause without the URL (and so without its password).
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        log.error("feedback store unavailable on %s %s: %s", request.method, request.url.path, cause)
        return JSONResponse({"detail": "the feedback store is unavailable; nothing was stored: retry later"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _reply(send, 400, "invalid Content-Length header")
                return
            if too_big:
                await _reply(send, 413, f"request body over {self.max_bytes} bytes")
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


async def _reply(send: Send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
