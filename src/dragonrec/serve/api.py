"""The HTTP routes: /v1/* for servers and admins (write and admin routes take an API key), /shop/* for the
storefront's own pages (no key: only from the shop's origin, the visitor from its cookie), /health, /metrics.

Every route is a thin call into `Service`; a refused request answers `{"detail": "what is wrong"}` with a
4xx status (see `install_error_handlers`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from dragonrec.serve.ratelimit import RateLimited
from dragonrec.serve.schemas import (
    ActivateResult,
    EventIn,
    EventsIn,
    Health,
    Id,
    IngestResult,
    Input,
    ItemIn,
    ItemPatch,
    ItemPublic,
    ItemsPublic,
    LoopStatus,
    ModelsPublic,
    RecommendRequest,
    RecommendResponse,
    ShopRecommendRequest,
    UserHistory,
)
from dragonrec.serve.service import NotFound, Service, ServiceError

VISITOR_COOKIE = "dragonrec_visitor"
CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


class AuthError(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class TooManyRequests(ServiceError):
    status = 429

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


# -- what a refusal looks like in the OpenAPI document ------------------------------------------------------
class FieldError(BaseModel):
    loc: str  # "body.events.1.action"
    msg: str
    type: str


class Problem(BaseModel):
    """Every refusal (4xx): what is wrong in one sentence; a validation error also lists each bad field."""

    detail: str
    errors: list[FieldError] | None = None


_WHY = {
    400: "The body is not valid JSON (or a header is malformed)",
    401: "No API key",
    403: "A wrong API key (on /shop/*: another origin, or no visitor cookie)",
    404: "Unknown id",
    409: "Conflicts with the current state",
    413: "The body (or the event batch) is too large",
    422: "Invalid input: each bad field named",
    429: "Over the visitor's rate: retry after Retry-After seconds",
}


def refusals(*codes: int) -> dict[int | str, dict]:
    """The documented refusals of a route, all with the `Problem` body, so that clients (and schemathesis)
    know every status a route answers."""
    return {code: {"model": Problem, "description": _WHY[code]} for code in codes}


KEYED = (401, 403)
BODY = (400, 413, 422)


# -- dependencies ------------------------------------------------------------------------------------------
# The dependencies are `async def`: FastAPI runs a plain `def` dependency on its thread pool, and each such hop
# is a thread hand-off that waits for the GIL under load. None of these blocks, so they run on the event loop;
# the hot routes make one explicit hop for the work that does block (`run_in_threadpool`).
def service_of(request: Request) -> Service:
    return request.app.state.service


async def _service(request: Request) -> Service:
    return service_of(request)


def api_key_of(request: Request) -> str | None:
    """The key a request carries: `X-API-Key: KEY` or `Authorization: Bearer KEY`."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request) -> None:
    """401 without a key, 403 with a wrong one; no key configured on the server refuses every request."""
    check_api_key(request)


def check_api_key(request: Request) -> None:
    """`require_api_key`'s check."""
    service = service_of(request)
    if not service.settings.api_keys:
        raise AuthError("this server has no API key configured (set DRAGONREC_API_KEY): keyed routes are off")
    key = api_key_of(request)
    if key is None:
        raise AuthError("an API key is required: send X-API-Key: KEY or Authorization: Bearer KEY")
    if not service.check_api_key(key):
        raise Forbidden("the API key is not valid")


async def recommend_key(request: Request) -> None:
    if service_of(request).settings.recommend_requires_key:
        check_api_key(request)


def request_origin(request: Request) -> str | None:
    """scheme://host[:port] of the page that sent the request: its Origin header, else its Referer."""
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if not referer:
            return None
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
    return origin.rstrip("/") if origin and origin != "null" else None


async def require_shop_origin(request: Request) -> None:
    """The storefront's routes take requests from the shop's own pages only: an Origin (or Referer) that is
    the server's own origin or one of `settings.storefront_origins`."""
    allowed = set(service_of(request).settings.storefront_origins)
    allowed.add(f"{request.url.scheme}://{request.headers.get('host', '')}")
    origin = request_origin(request)
    if origin is None:
        if request.headers.get("sec-fetch-site") == "same-origin":
            return
        raise Forbidden("this route takes requests from the shop's pages only (no Origin or Referer header)")
    if origin not in allowed:
        raise Forbidden(f"this route takes requests from the shop's pages only, not from {origin[:100]}")


def cookie_secure(request: Request) -> bool:
    """Whether the service's cookies get the Secure flag: the request came over https (behind a TLS load
    balancer: uvicorn --proxy-headers) or a configured shop origin is https."""
    if request.url.scheme == "https":
        return True
    return any(o.startswith("https://") for o in service_of(request).settings.storefront_origins)


def visitor_of(request: Request) -> str:
    visitor = request.cookies.get(VISITOR_COOKIE)
    if not visitor or len(visitor) > 200:
        raise Forbidden(f"no {VISITOR_COOKIE} cookie: open a shop page first")
    return visitor


async def limit_visitor(request: Request) -> None:
    """The storefront's open routes are rate-limited per visitor (per client address without a cookie)."""
    limiter = getattr(request.app.state, "shop_limiter", None)
    if limiter is None:
        return
    visitor = request.cookies.get(VISITOR_COOKIE)
    key, kind = (f"v:{visitor}", "visitor") if visitor else \
        (f"ip:{request.client.host if request.client else '?'}", "address")
    try:
        limiter.check(key, kind)
    except RateLimited as e:
        raise TooManyRequests(str(e), e.retry_after) from None


Keyed = [Depends(require_api_key)]
ServiceDep = Annotated[Service, Depends(_service)]

router = APIRouter()


# -- recommend, events --------------------------------------------------------------------------------------
@router.post("/v1/recommend", response_model=RecommendResponse, tags=["recommend"],
             dependencies=[Depends(recommend_key)], responses=refusals(*KEYED, *BODY))
async def recommend(body: RecommendRequest, service: ServiceDep, request: Request) -> RecommendResponse:
    """A list for one user; the impression (what was shown, by which version) is stored before the answer.
    Send `request_id` back with every event that answers the list."""
    resp = await run_in_threadpool(service.recommend, body)
    request.app.state.metrics.recommendations.labels(resp.model_version, str(resp.cold).lower()).inc()
    return resp


@router.post("/v1/events", response_model=IngestResult, tags=["events"], dependencies=Keyed,
             responses=refusals(*KEYED, *BODY))
async def post_events(body: EventsIn, service: ServiceDep, request: Request) -> IngestResult:
    """Store a batch of events (all or nothing); an `event_id` already stored is counted as a duplicate."""
    return await run_in_threadpool(_ingest, service, request, body.events, "/v1/events")


def _ingest(service: Service, request: Request, events: list[EventIn], route: str) -> IngestResult:
    """Store the events and count them (blocks: a route calls it on the thread pool)."""
    result = service.ingest(events)
    metrics = request.app.state.metrics
    metrics.events.labels("all", route).inc(result.accepted)
    metrics.duplicates.inc(result.duplicates)
    return result


# -- items --------------------------------------------------------------------------------------------------
@router.get("/v1/items", response_model=ItemsPublic, tags=["items"], responses=refusals(422))
def list_items(service: ServiceDep, q: Annotated[str, Query(max_length=200)] = "",
               limit: Annotated[int, Query(ge=1, le=200)] = 24,
               offset: Annotated[int, Query(ge=0)] = 0) -> ItemsPublic:
    """Search products (every word in title, brand, category or description); no query: the popular ones."""
    items, total = service.search_page(q, limit, offset)
    return ItemsPublic(items=[ItemPublic(**i) for i in items], total=total, limit=limit, offset=offset)


@router.get("/v1/items/{item_id:path}", response_model=ItemPublic, tags=["items"], responses=refusals(404, 422))
def get_item(item_id: str, service: ServiceDep) -> ItemPublic:
    item = service.item(item_id)
    if item is None:
        raise NotFound(f"unknown item {item_id!r}")
    return ItemPublic(**item)


@router.post("/v1/items", response_model=ItemPublic, status_code=status.HTTP_201_CREATED, tags=["items"],
             dependencies=Keyed, responses=refusals(*KEYED, 409, *BODY))
def post_item(body: ItemIn, service: ServiceDep) -> ItemPublic:
    """Add a product: searchable, recommendable and accepted in events as soon as this returns."""
    return ItemPublic(**service.add_item(body))


@router.patch("/v1/items/{item_id:path}", response_model=ItemPublic, tags=["items"], dependencies=Keyed,
              responses=refusals(*KEYED, 404, *BODY))
def patch_item(item_id: str, body: ItemPatch, service: ServiceDep) -> ItemPublic:
    """Change some fields of a product (null clears an optional field)."""
    return ItemPublic(**service.update_item(item_id, body))


@router.delete("/v1/items/{item_id:path}", status_code=status.HTTP_204_NO_CONTENT, tags=["items"],
               dependencies=Keyed, responses=refusals(*KEYED, 404, 422))
def delete_item(item_id: str, service: ServiceDep) -> Response:
    """Hide a product from lists and search; past and late events naming it stay valid."""
    service.delete_item(item_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- users --------------------------------------------------------------------------------------------------
@router.get("/v1/users/{user_id}/history", response_model=UserHistory, tags=["users"], dependencies=Keyed,
            responses=refusals(*KEYED, 422))
def user_history(user_id: str, service: ServiceDep,
                 limit: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> UserHistory:
    """A user's events, oldest first (an unknown user has none)."""
    return UserHistory(user_id=user_id, events=service.history(user_id, limit))


# -- models, loop ---------------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelsPublic, tags=["models"], dependencies=Keyed,
            responses=refusals(*KEYED))
def list_models(service: ServiceDep) -> ModelsPublic:
    return ModelsPublic(**service.models())


@router.post("/v1/models/rollback", response_model=ActivateResult, tags=["models"], dependencies=Keyed,
             responses=refusals(*KEYED, 404, 409, 422))
def rollback(service: ServiceDep, wait: bool = False) -> ActivateResult:
    """Re-activate the previous version; it loads in the background (`wait=true`: answer once it serves)."""
    return ActivateResult(**service.rollback(wait=wait))


@router.post("/v1/models/{version}/activate", response_model=ActivateResult, tags=["models"], dependencies=Keyed,
             responses=refusals(*KEYED, 404, 409, 422))
def activate(version: str, service: ServiceDep, wait: bool = False) -> ActivateResult:
    """Make a version active; it loads in the background (`wait=true`: answer once it serves)."""
    return ActivateResult(**service.activate(version, wait=wait))


@router.post("/v1/loop/run", response_model=LoopStatus, status_code=status.HTTP_202_ACCEPTED, tags=["loop"],
             dependencies=Keyed, responses=refusals(*KEYED, 409))
def loop_run(service: ServiceDep) -> LoopStatus:
    """Start one round of the feedback loop in the background (409 when none is configured or one runs)."""
    return LoopStatus(**service.run_loop())


@router.get("/v1/loop/status", response_model=LoopStatus, tags=["loop"], dependencies=Keyed,
            responses=refusals(*KEYED))
def loop_status(service: ServiceDep) -> LoopStatus:
    return LoopStatus(**service.loop_status())


# -- health, metrics ----------------------------------------------------------------------------------------
@router.get("/health", response_model=Health, tags=["ops"])
def health(service: ServiceDep) -> Health:
    """ok, or degraded when the active version failed to load (the previous one still serves). Open to all:
    a failed load says which version and when; why is in GET /v1/models (keyed) and the server log."""
    status = service.status()
    if status["load_error"] is not None:
        status["load_error"] = {k: status["load_error"][k] for k in ("version", "at")}
    return Health(**status)


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- the storefront's own routes ----------------------------------------------------------------------------
class ShopEventIn(EventIn):
    """An event from a shop page: the visitor is the cookie's (a user_id, if sent, must be it)."""

    user_id: Id | None = None


class ShopEventsIn(Input):
    events: list[ShopEventIn] = Field(min_length=1)


@router.post("/shop/events", response_model=IngestResult, tags=["storefront"],
             dependencies=[Depends(require_shop_origin), Depends(limit_visitor)], responses=refusals(403, *BODY, 429))
async def shop_events(body: ShopEventsIn, service: ServiceDep, request: Request) -> IngestResult:
    """Events from the storefront's pages (no key: the shop's origin only; the visitor from its cookie)."""
    visitor = visitor_of(request)
    events = []
    for i, e in enumerate(body.events):
        if e.user_id is not None and e.user_id != visitor:
            raise Forbidden(f"events[{i}].user_id: a page may only report its own visitor's events")
        events.append(EventIn(**{**e.model_dump(), "user_id": visitor}))
    return await run_in_threadpool(_ingest, service, request, events, "/shop/events")


@router.post("/shop/recommend", response_model=RecommendResponse, tags=["storefront"],
             dependencies=[Depends(require_shop_origin), Depends(limit_visitor)], responses=refusals(403, *BODY, 429))
async def shop_recommend(body: ShopRecommendRequest, service: ServiceDep, request: Request) -> RecommendResponse:
    """A list for the visitor of the `dragonrec_visitor` cookie (the shop's origin only)."""
    visitor = visitor_of(request)
    if body.user_id is not None and body.user_id != visitor:
        raise Forbidden("user_id: a page may only ask for its own visitor's list")
    resp = await run_in_threadpool(
        service.recommend, RecommendRequest(**{**body.model_dump(exclude={"user_id"}), "user_id": visitor}))
    request.app.state.metrics.recommendations.labels(resp.model_version, str(resp.cold).lower()).inc()
    return resp
