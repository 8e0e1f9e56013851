"""Request and response bodies of the HTTP API, named by their role (`RecommendRequest`, `ItemPublic`, ...).

Inputs forbid unknown fields (a misspelt field is a 422, not a silently ignored one), take strings where
ids go (a number is a wrong type) and finite numbers only.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StringConstraints, field_validator

from dragonrec.candidates.query import Preferences
from dragonrec.schema import ACTIONS, Action, parse_action

Id = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/\s]+$")]
ShortText = Annotated[str, StringConstraints(max_length=2000)]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- recommend ----------------------------------------------------------------------------------------------
class PreferencesIn(Input):
    """What a visitor told us: free text and/or category paths."""

    text: ShortText | None = None
    categories: list[ShortText] = Field(default_factory=list, max_length=50)


class ContextIn(Input):
    """What the page knows: the product on it, the cart, stated preferences."""

    item_id: ItemId | None = None
    """The product on the page: read as the latest view, never recommended."""
    cart: list[ItemId] = Field(default_factory=list, max_length=200)
    """Products in the cart: read as add-to-cart events, never recommended."""
    preferences: ShortText | list[ShortText] | PreferencesIn | None = None
    """Free text ("vegan, no fragrance"), a list of categories, or both as {text, categories}."""

    def preferences_obj(self) -> Preferences | None:
        p = self.preferences
        if p is None:
            return None
        if isinstance(p, str):
            return Preferences(text=p)
        if isinstance(p, list):
            return Preferences(categories=p)
        return Preferences(text=p.text, categories=p.categories)


class FiltersIn(Input):
    """Business filters: only these categories or brands, a price range, never these items."""

    categories: list[ShortText] = Field(default_factory=list, max_length=50)
    """Keep items whose category path contains one of these (case-insensitive)."""
    exclude_categories: list[ShortText] = Field(default_factory=list, max_length=50)
    brands: list[ShortText] = Field(default_factory=list, max_length=50)
    """Keep items of these brands (case-insensitive)."""
    min_price: FiniteFloat | None = Field(None, ge=0)
    max_price: FiniteFloat | None = Field(None, ge=0)
    """With a price bound, items without a price are left out."""
    exclude: list[ItemId] = Field(default_factory=list, max_length=1000)
    """Never recommend these items."""


class RecommendRequest(Input):
    """POST /v1/recommend: a list for one user; an unknown user is a cold start, not an error."""

    user_id: Id
    n: int | None = Field(None, ge=1)
    """List length (default: the settings' default_n; at most max_n)."""
    context: ContextIn = Field(default_factory=ContextIn)
    diversity: FiniteFloat | None = Field(None, ge=0.0, le=1.0)
    """Diversity knob (MMR lambda over item text vectors), 0 (relevance order) .. 1; default from settings."""
    filters: FiltersIn | None = None
    surface: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] | None = None
    """Where the list is shown ("home", "item", "cart", ...), recorded with the impression."""


class ShopRecommendRequest(RecommendRequest):
    """POST /shop/recommend: the visitor comes from the `dragonrec_visitor` cookie."""

    user_id: Id | None = None


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    source: str
    """The candidate source that proposed it: dense, cooccurrence, model, popularity, cold_start."""
    reason: str
    """One line: why this item."""


class RecommendResponse(BaseModel):
    request_id: str
    """Send it back with every event that answers this list."""
    model_version: str
    """The registry version that ranked it ("popularity": no version active yet)."""
    items: list[RecommendedItem]
    cold: bool = False
    """True when the user had no positive signal and got the cold-start list."""


# -- events ---------------------------------------------------------------------------------------------------
class EventIn(Input):
    """One thing a user did to a product."""

    event_id: Id | None = None
    """Makes retries idempotent: an event id already stored is counted as a duplicate."""
    user_id: Id
    item_id: ItemId
    action: str = Field(json_schema_extra={"enum": [a.value for a in ACTIONS]})  # other spellings: parse_action
    """view, hover, click, scroll_past, add_to_cart, remove_from_cart, purchase, review (or favorite)."""
    request_id: Id | None = None
    """The recommendation list this event answers."""
    timestamp: FiniteFloat | None = Field(None, gt=0)
    """Seconds since the epoch; default: when the server receives it."""
    value: FiniteFloat | None = None
    """A review's rating, a view's dwell milliseconds."""
    session_id: Id | None = None

    @field_validator("action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        return parse_action(v).value  # ValueError names the unknown action and the known ones

    @property
    def action_enum(self) -> Action:
        return Action(self.action)


class EventsIn(Input):
    """POST /v1/events."""

    events: list[EventIn] = Field(min_length=1)


class IngestResult(BaseModel):
    accepted: int
    """Events newly stored."""
    duplicates: int
    """Events the store already had (same event_id), not stored again."""


# -- items ----------------------------------------------------------------------------------------------------
ExtraValue = str | FiniteFloat | int | bool | None


class ItemIn(Input):
    """POST /v1/items: a new product, recommendable as soon as the call returns."""

    item_id: ItemId
    title: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    brand: Annotated[str, StringConstraints(max_length=200)] | None = None
    category: Annotated[str, StringConstraints(max_length=500)] | None = None
    """A readable path: "Beauty > Skin Care > Face"."""
    price: FiniteFloat | None = Field(None, ge=0)
    description: Annotated[str, StringConstraints(max_length=20000)] | None = None
    extra: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], ExtraValue] = Field(
        default_factory=dict, max_length=50)
    """Any other attributes (flat values)."""


class ItemPatch(Input):
    """PATCH /v1/items/{item_id}: the fields to change (null clears an optional one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})  # {} changes nothing: 422

    title: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = None
    brand: Annotated[str, StringConstraints(max_length=200)] | None = None
    category: Annotated[str, StringConstraints(max_length=500)] | None = None
    price: FiniteFloat | None = Field(None, ge=0)
    description: Annotated[str, StringConstraints(max_length=20000)] | None = None
    extra: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], ExtraValue] | None = Field(
        None, max_length=50)


class ItemPublic(BaseModel):
    item_id: str
    title: str | None = None
    brand: str | None = None
    category: str | None = None
    price: float | None = None
    description: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ItemsPublic(BaseModel):
    items: list[ItemPublic]
    total: int
    """Items matching the query (all live items for an empty query)."""
    limit: int
    offset: int


# -- users, models, loop, health ---------------------------------------------------------------------------
class HistoryEvent(BaseModel):
    item_id: str
    action: str
    timestamp: float
    request_id: str | None = None
    value: float | None = None
    origin: str
    """"dataset" (the past events the shop started from) or "live" (stored since)."""


class UserHistory(BaseModel):
    user_id: str
    events: list[HistoryEvent]
    """Oldest first."""


class ModelPublic(BaseModel):
    version: str
    method: str
    parent: str | None = None
    created: float
    metrics: dict[str, Any] = Field(default_factory=dict)
    note: str = ""
    active: bool
    """The registry's active version."""
    serving: bool
    """The version this process answers with now."""


class ModelsPublic(BaseModel):
    active: str | None
    serving: str
    loading: str | None = None
    load_error: dict[str, Any] | None = None
    versions: list[ModelPublic]


class ActivateResult(BaseModel):
    active: str
    """The registry's active version after the call."""
    serving: str
    """What this process answers with now (the new version once its load finished)."""
    loading: str | None = None


class LoopStatus(BaseModel):
    configured: bool
    running: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: str
    """"ok", or "degraded" when the active version failed to load (the previous one still serves)."""
    model_version: str
    active_version: str | None
    loading: str | None = None
    load_error: dict[str, Any] | None = None
    catalog_items: int
    store: str
    """The store backend: sqlite or postgresql."""
    uptime_s: float
