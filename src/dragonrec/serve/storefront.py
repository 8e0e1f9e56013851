"""The storefront: server-rendered shop pages over the Service (home, search, product, cart, preferences) and
the review route. The pages' JavaScript (static/shop.js) reports every action to `POST /shop/events`.

    app.include_router(storefront.router)      # serve/app.py; the dashboard's /admin pages come with it

A visitor is the `dragonrec_visitor` cookie (set on the first page, HttpOnly, SameSite=Lax); it is the
user_id of their impressions and events. Recommended cards carry their impression's request_id, and a product
opened from one keeps it (`?rid=`), so that views, carts, purchases and reviews answer the list that led there.
The cart is not kept anywhere but in the store: it is what the visitor's add/remove/purchase events leave.
"""

from __future__ import annotations

import base64
import binascii
import colorsys
import functools
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from dragonrec.serve import dashboard
from dragonrec.serve.api import VISITOR_COOKIE, cookie_secure, limit_visitor, require_shop_origin
from dragonrec.serve.api import _ingest as ingest
from dragonrec.serve.schemas import EventIn, RecommendRequest
from dragonrec.store.models import reviews as reviews_t

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

PREFS_COOKIE = "dragonrec_prefs"
VISITOR_RE = re.compile(r"v-[0-9a-f]{32}")
COOKIE_YEAR = 365 * 24 * 3600
PAGE_SIZE = 24  # products per grid page
REC_N = 8  # items per recommended list
REVIEW_MAX = 2000  # characters of review text
PREFS_TEXT_MAX = 200
MAX_CATEGORIES = 10  # departments offered on the preferences form

router = APIRouter(include_in_schema=False)
router.include_router(dashboard.router)

env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True)


# --- template helpers -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _static_version(name: str) -> str:
    """A content hash for cache busting (the files change only with the package)."""
    path = STATIC / name
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10] if path.is_file() else "0"


def static_url(name: str) -> str:
    return f"/shop/static/{name}?v={_static_version(name)}"


def product_url(item_id: str, request_id: str | None = None) -> str:
    url = "/product/" + quote(str(item_id), safe="")
    return url + ("?rid=" + quote(request_id, safe="") if request_id else "")


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def money(price: Any) -> str:
    v = _number(price)
    return "—" if v is None else f"${v:,.2f}"


def stars(n: float) -> str:
    k = max(0, min(5, round(float(n))))
    return "★" * k + "☆" * (5 - k)


def leaf(item: dict) -> str:
    """The last step of an item's category path ("Concealers" of "Beauty > Makeup > Concealers")."""
    return str(item.get("category") or "").split(">")[-1].strip()


def initial(item: dict) -> str:
    text = (item.get("brand") or item.get("title") or item.get("item_id") or "?").strip()
    return (text[:1] or "?").upper()


def thumb_color(item: dict) -> str:
    """A stable colour per department, standing in for the product photos the catalog does not have."""
    key = str(item.get("category") or item.get("item_id") or "").split(">")[:2]
    h = int(hashlib.md5(">".join(key).encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hls_to_rgb(h, 0.42, 0.45)
    return f"rgb({int(r * 255)}, {int(g * 255)}, {int(b * 255)})"


env.globals.update(static_url=static_url, product_url=product_url, money=money, stars=stars, leaf=leaf,
                   initial=initial, thumb_color=thumb_color, review_max=REVIEW_MAX)


def render(name: str, **ctx: Any) -> HTMLResponse:
    return HTMLResponse(env.get_template(name).render(**ctx))


# --- visitors, preferences, the cart ------------------------------------------------------------------

def service_of(request: Request):
    return request.app.state.service


def visitor_of(request: Request) -> tuple[str, bool]:
    """(visitor id, whether it is new). A missing or malformed cookie makes a new visitor."""
    v = request.cookies.get(VISITOR_COOKIE)
    if v and VISITOR_RE.fullmatch(v):
        return v, False
    return f"v-{uuid.uuid4().hex}", True


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, max_age=COOKIE_YEAR, path="/", httponly=True, samesite="lax",
                        secure=cookie_secure(request))


@dataclass
class Prefs:
    """What a visitor told the preferences form: departments (category paths) and a few words."""

    categories: list[str] = field(default_factory=list)
    text: str = ""
    stated: bool = False  # the visitor answered the form (or skipped it): do not ask again

    def is_empty(self) -> bool:
        return not self.categories and not self.text

    def context(self) -> dict | None:
        """As RecommendRequest's context.preferences."""
        return None if self.is_empty() else {"text": self.text or None, "categories": self.categories}

    def summary(self) -> str:
        parts = [c.split(">")[-1].strip() for c in self.categories]
        if self.text:
            parts.append(f"“{self.text}”")
        return ", ".join(parts)

    def encode(self) -> str:
        raw = json.dumps({"c": self.categories, "t": self.text}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def prefs_of(request: Request) -> Prefs:
    raw = request.cookies.get(PREFS_COOKIE)
    if not raw or len(raw) > 4096:
        return Prefs()
    try:
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        cats = [str(c)[:200] for c in data.get("c", [])][:MAX_CATEGORIES]
        text = str(data.get("t") or "")[:PREFS_TEXT_MAX]
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return Prefs()
    return Prefs(cats, text, stated=True)


@dataclass(frozen=True)
class Department:
    path: str  # "Beauty > Skin Care": what the recommender reads
    name: str  # "Skin Care": what the visitor reads
    n: int


def departments(request: Request) -> list[Department]:
    """The catalog's main departments, largest first: the first level of the category paths, or the second
    where every item shares the first ("Beauty > ...")."""
    catalog = service_of(request).catalog
    key = (id(catalog), len(catalog))
    cached = getattr(request.app.state, "shop_departments", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    paths = [[s.strip() for s in p.split(">")] for p in catalog.categories if p]
    firsts = {p[0] for p in paths}
    depth = 2 if len(firsts) == 1 and sum(len(p) > 1 for p in paths) > len(paths) // 2 else 1
    counts = Counter(" > ".join(p[:depth]) for p in paths if len(p) >= depth)
    found = [Department(path, path.split(" > ")[-1], n) for path, n in counts.most_common(MAX_CATEGORIES)]
    request.app.state.shop_departments = (key, found)
    return found


def visitor_events(request: Request, visitor: str):
    """The visitor's stored events, oldest first (the store is the record of what they did)."""
    return service_of(request).store.events_of_user(visitor, limit=2000)


def cart_of(events) -> dict[str, str | None]:
    """item_id -> the request_id its add-to-cart answered: what adds, removes and purchases leave in the cart."""
    cart: dict[str, str | None] = {}
    for action, item_id, request_id in zip(events["action"], events["item_id"], events["request_id"]):
        if action == "add_to_cart":
            cart.pop(item_id, None)
            cart[item_id] = request_id if isinstance(request_id, str) else None
        elif action in ("remove_from_cart", "purchase"):
            cart.pop(item_id, None)
    return cart


def recent_views(events, exclude: str | None = None) -> list[str]:
    """Item ids the visitor viewed, latest first, each once."""
    seen: dict[str, None] = {}
    for action, item_id in zip(events["action"][::-1], events["item_id"][::-1]):
        if action == "view" and item_id != exclude:
            seen.setdefault(item_id, None)
    return list(seen)


# --- recommendations ------------------------------------------------------------------------------------

@dataclass
class Shown:
    """A recommended list as the page shows it: the impression's request_id and its cards."""

    request_id: str
    model_version: str | None
    cards: list[dict]


def item_view(request: Request, item_id: str) -> dict | None:
    item = service_of(request).item(item_id)
    return None if item is None else dict(item)


def recommend(request: Request, visitor: str, surface: str, n: int = REC_N, exclude: list[str] | None = None,
              **context: Any) -> Shown | None:
    """Ask the service for a list (it stores the impression); None when it has nothing or fails, so that a
    page never breaks because a recommender did."""
    ctx = {k: v for k, v in context.items() if v not in (None, [], "")}
    filters = {"exclude": exclude} if exclude else None
    try:
        resp = service_of(request).recommend(RecommendRequest(user_id=visitor, n=n, context=ctx, filters=filters,
                                                              surface=surface))
    except Exception:
        log.exception("recommend failed (surface %s)", surface)
        return None
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.recommendations.labels(resp.model_version, str(resp.cold).lower()).inc()
    cards = []
    for rec in resp.items:
        item = item_view(request, rec.item_id)
        if item is not None:
            cards.append({"item": item, "reason": rec.reason, "source": rec.source, "score": rec.score})
    return Shown(resp.request_id, resp.model_version, cards) if cards else None


def page(request: Request, name: str, visitor: str, new_visitor: bool, **ctx: Any) -> HTMLResponse:
    ctx.setdefault("query", "")
    if "cart_count" not in ctx:
        ctx["cart_count"] = 0 if new_visitor else len(cart_of(visitor_events(request, visitor)))
    response = render(name, page=name.removesuffix(".html"), **ctx)
    if new_visitor:
        _set_cookie(request, response, VISITOR_COOKIE, visitor)
    response.headers["Cache-Control"] = "no-store"  # every page is this visitor's, with fresh impressions
    return response


# --- pages ----------------------------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    service = service_of(request)
    visitor, new = visitor_of(request)
    prefs = prefs_of(request)
    events = None if new else visitor_events(request, visitor)
    cart = {} if events is None else cart_of(events)
    cold = events is None or len(events) == 0
    recommended = recommend(request, visitor, "home", preferences=prefs.context(), cart=list(cart))
    shown = {c["item"]["item_id"] for c in recommended.cards} if recommended else set()
    popular = [dict(i) for i in service.popular(PAGE_SIZE + len(shown)) if i["item_id"] not in shown]
    return page(request, "home.html", visitor, new, cart_count=len(cart),
                ask_preferences=cold and not prefs.stated, prefs=prefs, prefs_summary=prefs.summary(),
                categories=departments(request), recommended=recommended, popular=popular[:PAGE_SIZE])


@router.get("/search", response_class=HTMLResponse)
def search(request: Request, q: str = "", offset: int = 0) -> Response:
    q = q.strip()[:200]
    if not q:
        return RedirectResponse("/", status_code=303)
    offset = max(0, min(offset, 10_000))
    visitor, new = visitor_of(request)
    found = [dict(i) for i in service_of(request).search(q, limit=PAGE_SIZE + 1, offset=offset)]
    return page(request, "search.html", visitor, new, query=q, results=found[:PAGE_SIZE],
                more=len(found) > PAGE_SIZE, offset=offset, limit=PAGE_SIZE)


def _answers(request: Request, request_id: str | None, visitor: str, item_id: str) -> str | None:
    """request_id when it names a list shown to this visitor with this item in it, else None: a product
    page only ties its events to an impression that led to it."""
    if not request_id or len(request_id) > 200:
        return None
    imp = service_of(request).store.impression(request_id)
    return request_id if imp is not None and imp.user_id == visitor and item_id in imp.item_ids else None


@router.get("/product/{item_id:path}", response_class=HTMLResponse)
def product(request: Request, item_id: str, rid: str | None = None) -> HTMLResponse:
    visitor, new = visitor_of(request)
    item = item_view(request, item_id)
    if item is None:
        response = page(request, "message.html", visitor, new, heading="Product not found",
                        message=f"There is no product {item_id!r} in this shop.")
        response.status_code = 404
        return response
    events = None if new else visitor_events(request, visitor)
    cart = {} if events is None else cart_of(events)
    goes_with = recommend(request, visitor, "goes_with", item_id=item_id)
    because = None
    viewed = [] if events is None else recent_views(events, exclude=item_id)
    if viewed and (anchor := item_view(request, viewed[0])) is not None:
        # the page's own product is not a suggestion on its own page
        shown = recommend(request, visitor, "because_viewed", item_id=viewed[0], exclude=[item_id])
        if shown is not None:
            because = {"item": anchor, "rec": shown}
    return page(request, "product.html", visitor, new, item=item, cart_count=len(cart),
                request_id=None if new else _answers(request, rid, visitor, item_id),
                in_cart=item_id in cart, goes_with=goes_with, because=because,
                reviews=reviews_of(request, item_id), rating=rating_of(request, item_id))


@router.get("/cart", response_class=HTMLResponse)
def cart_page(request: Request) -> HTMLResponse:
    visitor, new = visitor_of(request)
    cart = {} if new else cart_of(visitor_events(request, visitor))
    lines = []
    for item_id, request_id in reversed(cart.items()):
        item = item_view(request, item_id)
        if item is not None:
            lines.append({"item": item, "request_id": request_id})
    total = sum(_number(line["item"].get("price")) or 0.0 for line in lines)
    with_cart = recommend(request, visitor, "cart", cart=list(cart)) if cart else None
    return page(request, "cart.html", visitor, new, cart_count=len(cart), lines=lines, total=total,
                with_cart=with_cart)


@router.get("/preferences", response_class=HTMLResponse)
def preferences_page(request: Request) -> HTMLResponse:
    visitor, new = visitor_of(request)
    return page(request, "preferences.html", visitor, new, prefs=prefs_of(request),
                categories=departments(request))


@router.post("/preferences", dependencies=[Depends(require_shop_origin)])
async def save_preferences(request: Request) -> Response:
    """The preferences form (urlencoded): departments and a few words, kept in a cookie."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "send the preferences form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > 8192:
        raise HTTPException(413, "the preferences form is larger than 8 KiB")
    form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=50)
    known = {d.path for d in departments(request)}
    prefs = Prefs(stated=True)
    if form.get("do", ["save"])[0] != "skip":
        prefs.categories = [c for c in dict.fromkeys(form.get("category", [])) if c in known]
        prefs.text = " ".join(form.get("text", [""])[0].split())[:PREFS_TEXT_MAX]
    response = RedirectResponse("/", status_code=303)
    _set_cookie(request, response, PREFS_COOKIE, prefs.encode())
    return response


@router.get("/shop/static/{name}")
def static(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


# --- reviews --------------------------------------------------------------------------------------------

# Review text lives in the store's `shop_reviews` table (store/models.py, created by the store's migrations),
# keyed by the review event's id.
def _reviews_engine(request: Request):
    return service_of(request).store.engine


def reviews_of(request: Request, item_id: str, limit: int = 50) -> list[dict]:
    q = (select(reviews_t).where(reviews_t.c.item_id == item_id)
         .order_by(reviews_t.c.created_at.desc()).limit(limit))
    with _reviews_engine(request).connect() as conn:
        rows = conn.execute(q).mappings().all()
    return [{**r, "when": time.strftime("%Y-%m-%d", time.gmtime(r["created_at"]))} for r in rows]


def rating_of(request: Request, item_id: str) -> dict | None:
    q = select(func.avg(reviews_t.c.stars), func.count()).where(reviews_t.c.item_id == item_id)
    with _reviews_engine(request).connect() as conn:
        mean, n = conn.execute(q).one()
    return {"mean": float(mean), "n": int(n)} if n else None


class ReviewIn(BaseModel):
    """A review from the product page: stars (the review event's value) and text, under one event id."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    item_id: str = Field(min_length=1, max_length=200)
    request_id: str | None = Field(default=None, max_length=200)
    stars: int = Field(ge=1, le=5)
    text: str = Field(default="", max_length=REVIEW_MAX)


@router.post("/shop/reviews", dependencies=[Depends(require_shop_origin), Depends(limit_visitor)])
def post_review(body: ReviewIn, request: Request) -> dict:
    """Store a review: its event (action review, value = stars) through the service, then its text.
    Idempotent by event_id: a retried post stores neither twice."""
    visitor, new = visitor_of(request)
    if new:
        raise HTTPException(403, "no visitor cookie: open a shop page first")
    if service_of(request).item(body.item_id) is None:
        raise HTTPException(404, f"unknown item {body.item_id!r}")
    request_id = None
    if body.request_id is not None:
        request_id = _answers(request, body.request_id, visitor, body.item_id)
        if request_id is None:
            raise HTTPException(422, f"request_id {body.request_id!r} is not a list shown to you with this item")
    text = "\n".join(line.rstrip() for line in body.text.strip().splitlines())
    result = ingest(service_of(request), request, [EventIn(
        event_id=body.event_id, user_id=visitor, item_id=body.item_id, action="review", request_id=request_id,
        value=body.stars)], "/shop/reviews")
    engine = _reviews_engine(request)
    row = {"event_id": body.event_id, "item_id": body.item_id, "user_id": visitor, "stars": body.stars,
           "text": text, "created_at": time.time()}
    try:
        with engine.begin() as conn:
            owner = conn.execute(select(reviews_t.c.user_id).where(reviews_t.c.event_id == body.event_id)).scalar()
            if owner is None:
                conn.execute(insert(reviews_t).values(**row))
    except IntegrityError:  # the same event id, inserted by a concurrent retry of this post
        owner = visitor
    if owner not in (None, visitor):
        raise HTTPException(409, f"event_id {body.event_id!r} is another visitor's review")
    return {**{k: row[k] for k in ("event_id", "item_id", "stars", "text")},
            "accepted": result.accepted, "duplicates": result.duplicates}
