"""The admin dashboard (`/admin`): click-through and purchase rate by model version and over time, the
feedback loop's rounds, the active model version and its lineage, and recent events, all read from the
service's own store and registry. Charts are inline SVG drawn here: nothing is fetched at run time.

    /admin/login        enter an API key once (kept as an HMAC of it in an HttpOnly cookie on /admin)
    /admin              the dashboard
    /admin/api/stats    the same numbers as JSON (the cookie, `X-API-Key: KEY` or `Authorization: Bearer KEY`)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from sqlalchemy import case, func, select

from dragonrec.registry import Registry, RegistryError, VersionInfo
from dragonrec.serve.api import api_key_of, cookie_secure, require_shop_origin
from dragonrec.store.models import events as events_t
from dragonrec.store.models import impressions as impressions_t

log = logging.getLogger(__name__)

ADMIN_COOKIE = "dragonrec_admin"
WINDOW_DAYS = 30.0  # default window of impressions the rates are computed over
MAX_IMPRESSIONS = 50_000  # the latest ones of the window, at most
RECENT_EVENTS = 50
BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds per point over time, smallest that fits
MAX_POINTS = 48
COLORS = {"ctr": "#b4235a", "purchase_rate": "#1e7a46", "reward": "#b4235a", "ndcg": "#2456a6",
          "diversity": "#9a5b00"}

router = APIRouter(prefix="/admin", include_in_schema=False)
env = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"), autoescape=True,
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


# --- who may look ---------------------------------------------------------------------------------------

def _keys(request: Request) -> list[str]:
    return [k.get_secret_value() for k in request.app.state.service.settings.api_keys]


def _token(key: str) -> str:
    """What the admin cookie holds: a keyed hash, so the key itself never sits in a cookie jar."""
    return hmac.new(key.encode(), b"dragonrec admin session", hashlib.sha256).hexdigest()


def is_admin(request: Request) -> bool:
    """A right API key in the request's headers, or the admin cookie a right key set."""
    given = api_key_of(request)
    if given is not None:
        return request.app.state.service.check_api_key(given)
    keys = _keys(request)
    cookie = request.cookies.get(ADMIN_COOKIE)
    return cookie is not None and any(hmac.compare_digest(cookie, _token(k)) for k in keys)


def _login_page(request: Request, status: int, error: str = "") -> HTMLResponse:
    html = env.get_template("admin/login.html").render(
        error=error, configured=bool(_keys(request)), static_url=_static_url)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _static_url(name: str) -> str:
    from dragonrec.serve.storefront import static_url  # storefront includes this router: import it late

    return static_url(name)


def _product_url(item_id: str) -> str:
    from dragonrec.serve.storefront import product_url

    return product_url(item_id)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _login_page(request, 200)


@router.post("/login", dependencies=[Depends(require_shop_origin)])
async def login(request: Request) -> Response:
    """The login form (urlencoded `key`): a right key sets the admin cookie."""
    body = await request.body()
    if len(body) > 4096:
        raise HTTPException(413, "the login form is larger than 4 KiB")
    key = parse_qs(body.decode("utf-8", errors="replace")).get("key", [""])[0].strip()
    keys = _keys(request)
    match = next((k for k in keys if hmac.compare_digest(key.encode(), k.encode())), None)
    if match is None:
        return _login_page(request, 401, "That is not an API key of this service." if keys else "")
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(ADMIN_COOKIE, _token(match), max_age=12 * 3600, path="/admin", httponly=True,
                        samesite="strict", secure=cookie_secure(request))
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(ADMIN_COOKIE, path="/admin")
    return response


# --- the numbers ----------------------------------------------------------------------------------------

def impression_outcomes(store, since: float, until: float | None = None,
                        limit: int = MAX_IMPRESSIONS) -> pd.DataFrame:
    """One row per impression shown in [since, until) (the latest `limit`): request_id, model_version,
    created_at, and whether any event answering it was a click / a purchase."""
    im, ev = impressions_t.c, events_t.c
    answered = (select(ev.request_id,
                       func.max(case((ev.action == "click", 1), else_=0)).label("clicked"),
                       func.max(case((ev.action == "purchase", 1), else_=0)).label("purchased"))
                .where(ev.request_id.is_not(None)).group_by(ev.request_id).subquery())
    q = (select(im.request_id, im.model_version, im.created_at,
                func.coalesce(answered.c.clicked, 0), func.coalesce(answered.c.purchased, 0))
         .select_from(impressions_t.outerjoin(answered, answered.c.request_id == im.request_id))
         .where(im.created_at >= since))
    if until is not None:
        q = q.where(im.created_at < until)
    q = q.order_by(im.created_at.desc()).limit(limit)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    df = pd.DataFrame(rows, columns=["request_id", "model_version", "created_at", "clicked", "purchased"])
    df["model_version"] = df["model_version"].fillna("none")
    df[["clicked", "purchased"]] = df[["clicked", "purchased"]].astype(bool)
    return df.iloc[::-1].reset_index(drop=True)


def _rates(df: pd.DataFrame) -> dict:
    n = len(df)
    clicked, purchased = int(df["clicked"].sum()), int(df["purchased"].sum())
    return {"impressions": n, "clicked": clicked, "purchased": purchased,
            "ctr": clicked / n if n else 0.0, "purchase_rate": purchased / n if n else 0.0}


def by_version(df: pd.DataFrame) -> list[dict]:
    """Rates per model version, in the order versions were first shown."""
    order = list(dict.fromkeys(df["model_version"]))
    return [{"model_version": v, **_rates(df[df["model_version"] == v])} for v in order]


def over_time(df: pd.DataFrame, now: float) -> dict:
    """Rates per time bucket (the smallest bucket that keeps the series within MAX_POINTS points)."""
    if not len(df):
        return {"bucket_s": BUCKETS[0], "points": []}
    start = float(df["created_at"].min())
    span = max(now - start, 1.0)
    bucket = next((b for b in BUCKETS if span / b <= MAX_POINTS), BUCKETS[-1])
    keys = (df["created_at"] // bucket).astype("int64")
    points = []
    for k, part in df.groupby(keys, sort=True):
        versions = part["model_version"].value_counts()
        points.append({"t": float(k * bucket), **_rates(part), "model_version": str(versions.index[0])})
    return {"bucket_s": bucket, "points": points}


def recent_events(store, n: int = RECENT_EVENTS) -> list[dict]:
    """The latest events by arrival."""
    ev = events_t.c
    q = (select(ev.ingested_at, ev.user_id, ev.item_id, ev.action, ev.request_id, ev.value)
         .order_by(ev.ingest_seq.desc()).limit(n))
    with store.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return [dict(r) for r in rows]


def _registry(service) -> Registry | None:
    reg = getattr(service, "registry", None)
    if reg is None:
        root = Path(service.settings.resolved_registry_dir)
        reg = Registry(root) if root.is_dir() else None
    return reg


def _metric(metrics: dict, *needles: str) -> float | None:
    """The first numeric metric whose name contains one of `needles` (in that order of preference)."""
    for needle in needles:
        for name, value in metrics.items():
            if needle in name.lower() and isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return None


def lineage(service) -> dict:
    """The active version and its parent chain (newest first), from the registry."""
    reg = _registry(service)
    versions: dict[str, VersionInfo] = {}
    active = None
    if reg is not None:
        try:
            versions = {v.version: v for v in reg.list()}
            active = reg.active_version()
        except RegistryError:
            pass
    chain, at = [], active
    while at is not None and at in versions and len(chain) < 100:
        info = versions[at]
        chain.append({"version": info.version, "method": info.method, "parent": info.parent,
                      "created": info.created, "metrics": _flat_metrics(info.metrics), "note": info.note})
        at = info.parent
    serving = getattr(service, "model_version", None)
    return {"active": active, "serving": serving, "chain": chain, "n_versions": len(versions)}


def _flat_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def loop_rounds(service) -> list[dict]:
    """The feedback loop's rounds: from the service's loop status where it keeps one, else the registry's
    fine-tuned versions (each loop round registers a child of the version it started from) with the reward,
    held-out NDCG and diversity the gate recorded."""
    status = getattr(service, "loop_status", None)
    if callable(status):
        try:
            found = status()
        except Exception:  # a loop that cannot report must not take the dashboard down
            log.exception("loop_status failed")
            found = None
        if hasattr(found, "model_dump"):
            found = found.model_dump()
        rounds = (found.get("rounds") or (found.get("detail") or {}).get("rounds")) if isinstance(found, dict) else None
        if rounds:
            return [_round(r if isinstance(r, dict) else r.model_dump(), i) for i, r in enumerate(rounds)]
    reg = _registry(service)
    if reg is None:
        return []
    try:
        versions = reg.list()
    except RegistryError:
        return []
    out = []
    for v in versions:
        m = v.metrics or {}
        if v.parent is None or not any(("reward" in k or "ndcg" in k or "diversity" in k) for k in m):
            continue
        out.append(_round({"version": v.version, "parent": v.parent, "method": v.method, "created": v.created,
                           **m}, len(out)))
    return out


def _round(r: dict, i: int) -> dict:
    return {"round": r.get("round", i + 1), "version": r.get("version"), "parent": r.get("parent"),
            "method": r.get("method"), "promoted": r.get("promoted"), "created": r.get("created"),
            "reward": _metric(r, "reward"), "ndcg": _metric(r, "heldout_ndcg", "held_out_ndcg", "ndcg"),
            "diversity": _metric(r, "diversity")}


def stats(service, days: float = WINDOW_DAYS, now: float | None = None) -> dict:
    """Everything the dashboard shows, as plain data (also /admin/api/stats)."""
    now = time.time() if now is None else now
    df = impression_outcomes(service.store, since=now - days * 86400)
    counts = service.store.counts()
    return {"generated": now, "window_days": days, "totals": _rates(df), "by_version": by_version(df),
            "over_time": over_time(df, now), "rounds": loop_rounds(service), "lineage": lineage(service),
            "recent_events": recent_events(service.store),
            "store": {"events": counts.events, "impressions": counts.impressions,
                      "events_by_action": counts.events_by_action}}


# --- charts (inline SVG) --------------------------------------------------------------------------------

W, H = 540, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 30, 56


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= v)


def _fmt(v: float, pct: bool) -> str:
    return f"{v * 100:.1f}%" if pct else f"{v:.3g}"


def _frame(title: str, ymax: float, pct: bool, legend: Sequence[tuple[str, str]]) -> list[str]:
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
              f'aria-label="{escape(title)}"><title>{escape(title)}</title>'),
             f'<text x="{LEFT}" y="16" font-size="13" font-weight="600">{escape(title)}</text>']
    for i in range(5):
        y = TOP + (H - TOP - BOTTOM) * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ec"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#5d6677">'
                     f'{_fmt(ymax * (4 - i) / 4, pct)}</text>')
    x = LEFT
    for name, label in legend:  # under the x axis labels
        parts.append(f'<rect x="{x}" y="{H - 14}" width="10" height="10" fill="{COLORS.get(name, "#555")}"/>'
                     f'<text x="{x + 14}" y="{H - 5}" font-size="11">{escape(label)}</text>')
        x += 14 + 7 * len(label) + 16
    return parts


def bar_chart(title: str, labels: Sequence[str], series: dict[str, Sequence[float]], names: dict[str, str],
              pct: bool = True, chart_id: str = "") -> Markup:
    """Grouped bars: one group per label, one bar per series."""
    if not labels:
        return _empty(title, chart_id)
    ymax = _nice_max(max((v for vals in series.values() for v in vals), default=0.0))
    parts = _frame(title, ymax, pct, [(k, names[k]) for k in series])
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    group = plot_w / len(labels)
    bar = min(40.0, group * 0.8 / len(series))
    for g, label in enumerate(labels):
        x0 = LEFT + g * group + (group - bar * len(series)) / 2
        for s, (name, vals) in enumerate(series.items()):
            v = float(vals[g])
            h = plot_h * v / ymax
            parts.append(f'<rect class="bar" data-series="{name}" data-label="{escape(label)}" data-value="{v:.6f}" '
                         f'x="{x0 + s * bar:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                         f'fill="{COLORS.get(name, "#555")}"><title>{escape(label)}: {escape(names[name])} '
                         f'{_fmt(v, pct)}</title></rect>')
        parts.append(f'<text x="{LEFT + (g + 0.5) * group:.1f}" y="{H - BOTTOM + 16}" font-size="11" '
                     f'text-anchor="middle">{escape(label)}</text>')
    return Markup(_wrap(parts, chart_id))


def line_chart(title: str, xs: Sequence[float], series: dict[str, Sequence[float | None]], names: dict[str, str],
               xlabels: Sequence[str], pct: bool = True, chart_id: str = "") -> Markup:
    """Lines over x (times or round numbers); None leaves a gap."""
    if not xs:
        return _empty(title, chart_id)
    values = [v for vals in series.values() for v in vals if v is not None]
    ymax = _nice_max(max(values, default=0.0))
    parts = _frame(title, ymax, pct, [(k, names[k]) for k in series])
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    lo, hi = min(xs), max(xs)

    def px(x: float) -> float:
        return LEFT + (plot_w * (x - lo) / (hi - lo) if hi > lo else plot_w / 2)

    def py(v: float) -> float:
        return TOP + plot_h - plot_h * v / ymax

    for name, vals in series.items():
        run: list[str] = []
        for x, v in zip(xs, vals):
            if v is None:
                if len(run) > 1:
                    parts.append(_polyline(run, name))
                run = []
                continue
            run.append(f"{px(x):.1f},{py(v):.1f}")
            parts.append(f'<circle class="point" data-series="{name}" data-value="{v:.6f}" cx="{px(x):.1f}" '
                         f'cy="{py(v):.1f}" r="3" fill="{COLORS.get(name, "#555")}"><title>{escape(names[name])} '
                         f'{_fmt(v, pct)}</title></circle>')
        if len(run) > 1:
            parts.append(_polyline(run, name))
    step = max(1, math.ceil(len(xs) / 6))
    for i in range(0, len(xs), step):
        x = px(xs[i])
        anchor = "start" if x - LEFT < 40 else "end" if W - RIGHT - x < 40 else "middle"  # stay inside
        parts.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" font-size="11" text-anchor="{anchor}">'
                     f'{escape(xlabels[i])}</text>')
    return Markup(_wrap(parts, chart_id))


def _polyline(points: list[str], name: str) -> str:
    return (f'<polyline data-series="{name}" fill="none" stroke="{COLORS.get(name, "#555")}" stroke-width="2" '
            f'points="{" ".join(points)}"/>')


def _wrap(parts: list[str], chart_id: str) -> str:
    return f'<div class="chart" id="{escape(chart_id)}">' + "".join(parts) + "</svg></div>"


def _empty(title: str, chart_id: str) -> Markup:
    parts = _frame(title, 1.0, True, [])
    parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#5d6677">no data yet</text>')
    return Markup(_wrap(parts, chart_id))


def _time_label(t: float, bucket: int) -> str:
    return time.strftime("%m-%d %H:%M" if bucket < 86400 else "%Y-%m-%d", time.gmtime(t))


def charts(s: dict) -> dict[str, Markup]:
    names = {"ctr": "click-through", "purchase_rate": "purchase rate"}
    versions = s["by_version"]
    points = s["over_time"]["points"]
    rounds = s["rounds"]
    out = {
        "by_version": bar_chart("Click-through and purchase rate by model version",
                                [v["model_version"] for v in versions],
                                {"ctr": [v["ctr"] for v in versions],
                                 "purchase_rate": [v["purchase_rate"] for v in versions]}, names,
                                chart_id="chart-by-version"),
        "over_time": line_chart("Click-through and purchase rate over time (UTC)", [p["t"] for p in points],
                                {"ctr": [p["ctr"] for p in points],
                                 "purchase_rate": [p["purchase_rate"] for p in points]}, names,
                                [_time_label(p["t"], s["over_time"]["bucket_s"]) for p in points],
                                chart_id="chart-over-time"),
    }
    if rounds:
        xs = [float(r["round"]) for r in rounds]
        labels = [f"{r['round']}" for r in rounds]
        out["reward"] = line_chart("Loop rounds: reward", xs, {"reward": [r["reward"] for r in rounds]},
                                   {"reward": "reward"}, labels, pct=False, chart_id="chart-reward")
        out["quality"] = line_chart("Loop rounds: held-out NDCG and diversity", xs,
                                    {"ndcg": [r["ndcg"] for r in rounds],
                                     "diversity": [r["diversity"] for r in rounds]},
                                    {"ndcg": "held-out NDCG", "diversity": "diversity"}, labels, pct=False,
                                    chart_id="chart-quality")
    return out


# --- pages ----------------------------------------------------------------------------------------------

def _days(days: float | None) -> float:
    if days is None:
        return WINDOW_DAYS
    if not (0 < days <= 3650):
        raise HTTPException(422, f"days must be in (0, 3650], not {days}")
    return float(days)


def page_html(service, s: dict) -> str:
    """The dashboard page for the numbers `s` (from `stats`)."""
    titles = {}
    for e in s["recent_events"]:
        item = service.item(e["item_id"])
        titles[e["item_id"]] = (item or {}).get("title") or e["item_id"]
    return env.get_template("admin/dashboard.html").render(
        s=s, charts=charts(s), titles=titles, static_url=_static_url, product_url=_product_url,
        when=lambda t: "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)),
        pct=lambda v: f"{v * 100:.1f}%", num=lambda v: "—" if v is None else f"{v:.4g}")


@router.get("", response_class=HTMLResponse)
def dashboard(request: Request, days: float | None = None) -> HTMLResponse:
    if not is_admin(request):
        return _login_page(request, 401)
    service = request.app.state.service
    html = page_html(service, stats(service, _days(days)))
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/api/stats")
def api_stats(request: Request, days: float | None = None) -> dict[str, Any]:
    if not is_admin(request):
        raise HTTPException(401, "admin only: send an API key (X-API-Key or Authorization: Bearer)")
    return stats(request.app.state.service, _days(days))
