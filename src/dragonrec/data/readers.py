"""Readers for catalogs and event logs (parquet, CSV, JSONL) and for the seed feedback log.

Every problem is reported with the file, the row (or line) and what is wrong. With `on_error="skip"` bad
rows are dropped and counted in a `ReadReport` instead of failing the whole read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from dragonrec.data.catalog import Catalog
from dragonrec.schema import ACTION_ALIASES, ACTIONS, Action, Impression, parse_action

OnError = Literal["raise", "skip"]

# Canonical column -> the names it goes by in public datasets, tried in order.
DEFAULT_EVENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id", "userId", "user", "visitorid", "reviewerID"),
    "item_id": ("item_id", "itemId", "item", "product_id", "asin", "itemid"),
    "action": ("action", "event_type", "event", "behavior_type"),
    "timestamp": ("timestamp", "ts", "time", "event_time", "unixReviewTime"),
    "order": ("order", "seq_idx"),
    "value": ("value", "rating", "dwell_ms"),
    "request_id": ("request_id",),
    "session_id": ("session_id", "user_session", "session"),
}
DEFAULT_ITEM_COLUMNS: dict[str, tuple[str, ...]] = {
    "item_id": ("item_id", "itemId", "product_id", "asin"),
    "title": ("title", "name"),
    "brand": ("brand",),
    "category": ("category", "category_path", "category_code"),
    "price": ("price",),
    "description": ("description",),
}
REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


class DataError(ValueError):
    """A problem in an input file, located by file and row (or line)."""

    def __init__(self, path: Path | str, problem: str, row: int | None = None, line: int | None = None):
        self.path, self.problem, self.row, self.line = str(path), problem, row, line
        where = f"line {line}" if line is not None else f"row {row}" if row is not None else None
        super().__init__(f"{self.path}{': ' + where if where else ''}: {problem}")


@dataclass
class ReadReport:
    """What a read skipped, by problem, with the first few locations of each."""

    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, err: DataError) -> None:
        self.skipped[err.problem.split(":")[0]] += 1
        self.examples.setdefault(err.problem.split(":")[0], [])
        if len(self.examples[err.problem.split(":")[0]]) < 5:
            self.examples[err.problem.split(":")[0]].append(str(err))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadReport) -> None:
        self.rows_read += other.rows_read
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: 5 - len(self.examples.get(k, []))])


@dataclass
class Dataset:
    """A catalog and its events; events hold canonical columns plus `item_idx`, the catalog index."""

    name: str
    catalog: Catalog
    events: pd.DataFrame
    impressions: list[Impression] = field(default_factory=list)
    report: ReadReport = field(default_factory=ReadReport)

    @property
    def items(self) -> pd.DataFrame:
        return self.catalog.items

    def counts(self) -> dict[str, int]:
        return {
            "users": int(self.events["user_id"].nunique()),
            "items": len(self.catalog),
            "items_with_events": int(self.events["item_idx"].nunique()),
            "events": len(self.events),
            "rows_skipped": self.report.n_skipped,
        }


def _lines(path: Path):
    """(line number, text) for each line of a UTF-8 file (a byte-order mark is dropped); a line that is not
    UTF-8 comes as a DataError naming it instead of its text, so one bad line does not hide the others."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(path, f"not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at column "
                                              f"{e.start + 1}", line=lineno)


def _read_jsonl(path: Path, on_error: OnError, report: ReadReport) -> pd.DataFrame:
    records, lines = [], []
    for lineno, raw in _lines(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not raw.strip():
                continue
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 (reported as malformed JSON below)
        except DataError as err:
            if on_error == "raise":
                raise
            report.add(err)
            continue
        except ValueError as e:
            err = DataError(path, f"malformed JSON: {e}", line=lineno)
            if on_error == "raise":
                raise err from None
            report.add(err)
            continue
        records.append(obj)
        lines.append(lineno)
    if not records and not report.n_skipped:
        raise DataError(path, "empty file: no JSON lines")
    df = pd.DataFrame.from_records(records)
    df.attrs["locations"] = ("line", np.asarray(lines))
    return df


_CSV_ROW = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _read_csv(path: Path, on_error: OnError, report: ReadReport) -> pd.DataFrame:
    """A CSV of strings. A row with more fields than the header is located (raise) or dropped and counted (skip)."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(path, "empty file: no header row") from None
    except pd.errors.ParserError as e:
        m = _CSV_ROW.search(str(e))
        if m is None:
            raise DataError(path, f"malformed CSV: {str(e).strip()}") from None
        problem = f"malformed row: {m.group(3)} fields where the header has {m.group(1)}"
        if on_error == "raise":
            raise DataError(path, problem, line=int(m.group(2))) from None
        bad: list[int] = []
        df = pd.read_csv(path, dtype=str, keep_default_na=True, engine="python",
                         on_bad_lines=lambda fields: bad.append(len(fields)))  # returning None drops the row
        for n in bad:  # the python parser does not say where: counted, not located
            report.add(DataError(path, f"malformed row: {n} fields where the header has {len(df.columns)}"))
        df.attrs["locations"] = ("row", np.arange(len(df)))
        return df
    df.attrs["locations"] = ("line", np.arange(len(df)) + 2)  # line 1 is the header
    return df


def read_table(path: Path | str, on_error: OnError = "raise", report: ReadReport | None = None) -> pd.DataFrame:
    """Read a parquet, CSV or JSONL file into a DataFrame; `attrs["locations"]` maps rows to file rows/lines."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
            df.attrs["locations"] = ("row", np.arange(len(df)))
        elif suffix == ".csv":
            df = _read_csv(path, on_error, report)
        elif suffix in (".jsonl", ".json"):
            df = _read_jsonl(path, on_error, report)
        else:
            raise DataError(path, f"unsupported file type {suffix!r} (use parquet, csv or jsonl)")
    except DataError:
        raise
    except Exception as e:  # pyarrow/pandas parse failures: a broken (truncated, corrupt) file
        raise DataError(path, f"cannot read file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    return df


def _resolve_columns(df: pd.DataFrame, defaults: dict[str, tuple[str, ...]], mapping: dict[str, str] | None,
                     path: Path) -> dict[str, str]:
    """canonical name -> column in df. An explicit mapping wins; it must name existing columns."""
    resolved: dict[str, str] = {}
    for canonical, source in (mapping or {}).items():
        if source not in df.columns:
            raise DataError(path, f"missing column: mapping says {canonical!r} is {source!r}, which the file lacks "
                                  f"(columns: {', '.join(map(str, df.columns))})")
        resolved[canonical] = source
    for canonical, names in defaults.items():
        if canonical in resolved:
            continue
        for name in names:
            if name in df.columns:
                resolved[canonical] = name
                break
    return resolved


def _fail_rows(df: pd.DataFrame, bad: np.ndarray, problem_of, path: Path, on_error: OnError,
               report: ReadReport) -> pd.DataFrame:
    """Raise on the first bad row, or drop the bad rows and count them."""
    if not bad.any():
        return df
    kind, locs = df.attrs.get("locations", ("row", np.arange(len(df))))
    positions = np.flatnonzero(bad)
    if on_error == "raise":
        p = positions[0]
        raise DataError(path, problem_of(p), **{kind: int(locs[p])})
    for p in positions:
        report.add(DataError(path, problem_of(p), **{kind: int(locs[p])}))
    keep = ~bad
    out = df[keep].reset_index(drop=True)
    out.attrs["locations"] = (kind, locs[keep])
    return out


def _parse_timestamps(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since the epoch as float64, and a mask of values that are not timestamps."""
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = col.astype("datetime64[ns, UTC]" if getattr(col.dt, "tz", None) else "datetime64[ns]")
        secs = ts.astype("int64").to_numpy() / 1e9
        bad = col.isna().to_numpy()
        return np.where(bad, np.nan, secs), bad
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.all() and col.notna().any():  # ISO date strings are timestamps too
        dt = pd.to_datetime(col, errors="coerce", utc=True, format="ISO8601")
        if dt.notna().any():
            secs = dt.astype("int64").to_numpy() / 1e9
            bad = dt.isna().to_numpy()
            return np.where(bad, np.nan, secs), bad
    return num.to_numpy(dtype=np.float64, na_value=np.nan), bad


def load_items(path: Path | str, mapping: dict[str, str] | None = None, on_error: OnError = "raise",
               report: ReadReport | None = None) -> Catalog:
    """Read a catalog. Needs an item id column; title, brand, category, price, description are optional."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    df = read_table(path, on_error, report)
    cols = _resolve_columns(df, DEFAULT_ITEM_COLUMNS, mapping, path)
    if "item_id" not in cols:
        raise DataError(path, f"missing column: item_id (columns: {', '.join(map(str, df.columns))})")
    ids = df[cols["item_id"]]
    df = _fail_rows(df, ids.isna().to_numpy(), lambda p: "missing item_id", path, on_error, report)
    ids = df[cols["item_id"]].astype(str)
    dup = ids.duplicated().to_numpy()
    df = _fail_rows(df, dup, lambda p: f"duplicate item_id {ids.iloc[p]!r}", path, on_error, report)
    report.rows_read += len(df)
    out = pd.DataFrame({"item_id": df[cols["item_id"]].astype(str).to_numpy(dtype=object)})
    for canonical in ("title", "brand", "category", "description"):
        out[canonical] = (df[cols[canonical]].astype(object).where(df[cols[canonical]].notna(), None).to_numpy()
                          if canonical in cols else None)
    if "price" in cols:
        out["price"] = pd.to_numeric(df[cols["price"]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        out["price"] = np.nan
    used = set(cols.values())
    for extra in df.columns:
        if extra not in used and extra not in out.columns:
            out[extra] = df[extra].to_numpy()
    return Catalog(out)


def load_events(path: Path | str, catalog: Catalog | None = None, mapping: dict[str, str] | None = None,
                on_error: OnError = "raise", report: ReadReport | None = None,
                default_action: Action = Action.VIEW) -> pd.DataFrame:
    """Read an event log into canonical columns, sorted by user, time, then explicit order.

    With a catalog, events for items it lacks are errors; `item_idx` holds each event's catalog index.
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    df = read_table(path, on_error, report)
    cols = _resolve_columns(df, DEFAULT_EVENT_COLUMNS, mapping, path)
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in cols]
    if missing:
        raise DataError(path, f"missing column: {', '.join(missing)} (columns: {', '.join(map(str, df.columns))};"
                              " map your own names with a column mapping)")
    for c in ("user_id", "item_id"):
        col = df[cols[c]]
        df = _fail_rows(df, col.isna().to_numpy(), lambda p, c=c: f"missing {c}", path, on_error, report)
    ts, bad = _parse_timestamps(df[cols["timestamp"]])
    raw_ts = df[cols["timestamp"]]
    df = _fail_rows(df, bad, lambda p: f"non-numeric timestamp: {raw_ts.iloc[p]!r}", path, on_error, report)
    ts = ts[~bad]
    if "action" in cols:
        raw = df[cols["action"]].astype(str).str.strip().str.lower().str.replace(" ", "_").str.replace("-", "_")
        names = {k: v.value for k, v in ACTION_ALIASES.items()}
        mapped = pd.Series([names.get(a) for a in raw.tolist()], dtype=object)
        bad = mapped.isna().to_numpy()
        df = _fail_rows(df, bad, lambda p: f"unknown action: {raw.iloc[p]!r} (known: {', '.join(a.value for a in ACTIONS)})",
                        path, on_error, report)
        ts = ts[~bad]
        actions = mapped[~bad].to_numpy(dtype=object)
    else:
        actions = np.full(len(df), default_action.value, dtype=object)
    out = pd.DataFrame({
        "user_id": df[cols["user_id"]].astype(str).to_numpy(dtype=object),
        "item_id": df[cols["item_id"]].astype(str).to_numpy(dtype=object),
        "action": actions,
        "timestamp": ts,
    })
    out.attrs["locations"] = df.attrs.get("locations")
    if catalog is not None:
        known = out["item_id"].map(lambda i: i in catalog).to_numpy(dtype=bool)
        ids = out["item_id"]
        out = _fail_rows(out, ~known, lambda p: f"unknown item: {ids.iloc[p]!r} is not in the catalog",
                         path, on_error, report)
        df = df[known].reset_index(drop=True)
        out["item_idx"] = catalog.indices(out["item_id"])
    for c in ("order", "value"):
        out[c] = pd.to_numeric(df[cols[c]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan) if c in cols else np.nan
    for c in ("request_id", "session_id"):
        out[c] = df[cols[c]].astype(object).where(df[cols[c]].notna(), None).to_numpy() if c in cols else None
    report.rows_read += len(out)
    out = out.sort_values(["user_id", "timestamp", "order"], kind="stable", na_position="last").reset_index(drop=True)
    out.attrs.pop("locations", None)
    return out


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in TABLE_SUFFIXES:
            p = directory / f"{stem}{suffix}"
            if p.exists():
                return p
    return None


def load_dataset(path: Path | str, item_mapping: dict[str, str] | None = None,
                 event_mapping: dict[str, str] | None = None, on_error: OnError = "raise") -> Dataset:
    """Read a dataset directory: `items.*` and `interactions.*` (or `events.*`), and `feedback.jsonl` if present.

    A single seed-style feedback log file (`*.jsonl` with `user_browsing_history` lines) also works.
    """
    path = Path(path)
    report = ReadReport()
    if path.is_file():
        events, impressions, catalog = load_feedback_log(path, on_error=on_error, report=report)
        return Dataset(path.stem, catalog, events, impressions, report)
    if not path.is_dir():
        raise DataError(path, "no such dataset directory")
    items_path = _find(path, ("items", "catalog", "products"))
    events_path = _find(path, ("interactions", "events"))
    feedback_path = path / "feedback.jsonl"
    if events_path is None and not feedback_path.exists():
        raise DataError(path, "no event log: expected interactions.{parquet,csv,jsonl}, events.* or feedback.jsonl")
    catalog = load_items(items_path, item_mapping, on_error, report) if items_path else None
    frames, impressions = [], []
    if events_path is not None:
        if catalog is None:  # no catalog file: the catalog is every item the log mentions
            raw = load_events(events_path, None, event_mapping, on_error, report)
            catalog = Catalog.from_ids(pd.unique(raw["item_id"]))
            raw["item_idx"] = catalog.indices(raw["item_id"])
            frames.append(raw)
        else:
            frames.append(load_events(events_path, catalog, event_mapping, on_error, report))
    if feedback_path.exists():
        ev, impressions, catalog = load_feedback_log(feedback_path, catalog, on_error, report)
        frames.append(ev)
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    events = events.sort_values(["user_id", "timestamp", "order"], kind="stable", na_position="last")
    return Dataset(path.name, catalog, events.reset_index(drop=True), impressions, report)


_VERB_PATTERNS: tuple[tuple[str, Action], ...] = (
    ("added to cart", Action.ADD_TO_CART), ("removed from cart", Action.REMOVE_FROM_CART),
    ("scrolled past", Action.SCROLL_PAST), ("clicked", Action.CLICK), ("purchased", Action.PURCHASE),
    ("bought", Action.PURCHASE), ("viewed", Action.VIEW), ("hovered", Action.HOVER), ("reviewed", Action.REVIEW),
    ("added", Action.ADD_TO_CART), ("removed", Action.REMOVE_FROM_CART), ("ignored", Action.SCROLL_PAST),
)


def parse_user_action(text: str) -> tuple[Action, str | None]:
    """'clicked prod_45' -> (CLICK, 'prod_45'); 'added prod_5 to cart' -> (ADD_TO_CART, 'prod_5');
    'ignored' -> (SCROLL_PAST, None), meaning every recommendation was passed over."""
    t = " ".join(str(text).strip().split())
    low = t.lower()
    for phrase, action in _VERB_PATTERNS:
        if low.startswith(phrase):
            rest = t[len(phrase):].strip()
            for suffix in (" to cart", " from cart", " to the cart", " from the cart"):
                if rest.lower().endswith(suffix):
                    rest = rest[: -len(suffix)].strip()
            return action, (rest or None)
    try:  # "click prod_45", "purchase prod_45"
        verb, _, rest = t.partition(" ")
        return parse_action(verb), (rest.strip() or None)
    except ValueError:
        raise ValueError(f"cannot parse user_action {text!r}: expected '<verb> <item id>', e.g. 'clicked prod_45'") from None


def load_feedback_log(path: Path | str, catalog: Catalog | None = None, on_error: OnError = "raise",
                      report: ReadReport | None = None) -> tuple[pd.DataFrame, list[Impression], Catalog]:
    """Read the original design's feedback log: one JSON object a line,
    `{"user_browsing_history": [...], "llm_recommendations": [...], "user_action": "clicked prod_45"}`.

    Each line becomes an Impression (the recommendations, in order) plus events: the browsing history as
    views, then the user's action on the impression. Optional keys: user_id, request_id, timestamp.
    Lines without user_id get a user of their own. Without a catalog, the catalog is the ids the log names.
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    rows, impressions, mentioned = [], [], {}
    if path.exists() and path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    for lineno, raw in _lines(path):
        if isinstance(raw, str) and not raw.strip():
            continue
        try:
            if isinstance(raw, DataError):
                raise raw
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise DataError(path, "malformed line: not a JSON object", line=lineno)
            for key in ("user_browsing_history", "llm_recommendations", "user_action"):
                if key not in obj:
                    raise DataError(path, f"missing key: {key}", line=lineno)
            history, recs = obj["user_browsing_history"], obj["llm_recommendations"]
            if not isinstance(history, list) or not isinstance(recs, list):
                raise DataError(path, "malformed line: history and recommendations must be lists", line=lineno)
            try:
                action, target = parse_user_action(obj["user_action"])
            except ValueError as e:
                raise DataError(path, f"unknown action: {e}", line=lineno) from None
            ids = [str(i) for i in history] + [str(i) for i in recs] + ([target] if target else [])
            if catalog is not None:
                unknown = [i for i in ids if i not in catalog]
                if unknown:
                    raise DataError(path, f"unknown item: {unknown[0]!r} is not in the catalog", line=lineno)
            ts = obj.get("timestamp", float(lineno))
            try:
                ts = float(ts)
            except (TypeError, ValueError):
                raise DataError(path, f"non-numeric timestamp: {ts!r}", line=lineno) from None
        except json.JSONDecodeError as e:
            err = DataError(path, f"malformed JSON: {e.msg}", line=lineno)
            if on_error == "raise":
                raise err from None
            report.add(err)
            continue
        except DataError as err:
            if on_error == "raise":
                raise
            report.add(err)
            continue
        mentioned.update(dict.fromkeys(ids))
        user = str(obj.get("user_id", f"feedback-line-{lineno}"))
        request_id = str(obj.get("request_id", f"{path.stem}-{lineno}"))
        impressions.append(Impression(request_id=request_id, user_id=user, item_ids=[str(r) for r in recs],
                                      timestamp=ts))
        # History happened before the impression: spread it over the second before it, in order.
        n = len(history)
        for k, item in enumerate(history):
            rows.append((user, str(item), Action.VIEW.value, ts - (n - k) / (n + 1), None, float(k)))
        targets = [target] if target else [str(r) for r in recs]  # "ignored": every shown item passed over
        for k, item in enumerate(targets):
            rows.append((user, item, action.value, ts, request_id, float(n + k)))
    report.rows_read += len(impressions)
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp", "request_id", "order"])
    if catalog is None:
        catalog = Catalog.from_ids(list(mentioned))
    events["item_idx"] = catalog.indices(events["item_id"]) if len(events) else np.zeros(0, dtype=np.int64)
    events["value"] = np.nan
    events["session_id"] = None
    events = events.sort_values(["user_id", "timestamp", "order"], kind="stable").reset_index(drop=True)
    return events, impressions, catalog
