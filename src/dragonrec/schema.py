"""The nouns every stage shares: Action, Item, Event, Impression, and the table columns they map to."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Action(StrEnum):
    """What a user did to an item. The order is fixed: the integer code of an action is its position."""

    VIEW = "view"
    HOVER = "hover"
    CLICK = "click"
    SCROLL_PAST = "scroll_past"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    REVIEW = "review"
    # A wishlist / favourite, as Taobao logs it ("fav"); stores without one never emit it.
    FAVORITE = "favorite"

    @property
    def code(self) -> int:
        return ACTION_CODES[self]


ACTIONS: tuple[Action, ...] = tuple(Action)
ACTION_CODES: dict[Action, int] = {a: i for i, a in enumerate(ACTIONS)}

# Spellings found in public logs and in the seed feedback log, mapped onto the project's vocabulary.
ACTION_ALIASES: dict[str, Action] = {
    **{a.value: a for a in ACTIONS},
    "pv": Action.VIEW,
    "viewed": Action.VIEW,
    "hovered": Action.HOVER,
    "clicked": Action.CLICK,
    "scrolled_past": Action.SCROLL_PAST,
    "ignored": Action.SCROLL_PAST,
    "cart": Action.ADD_TO_CART,
    "added_to_cart": Action.ADD_TO_CART,
    "added": Action.ADD_TO_CART,
    "removed_from_cart": Action.REMOVE_FROM_CART,
    "removed": Action.REMOVE_FROM_CART,
    "buy": Action.PURCHASE,
    "purchased": Action.PURCHASE,
    "bought": Action.PURCHASE,
    "reviewed": Action.REVIEW,
    "rated": Action.REVIEW,
    "fav": Action.FAVORITE,
    "favorited": Action.FAVORITE,
    "favourite": Action.FAVORITE,
}


def parse_action(raw: str) -> Action:
    """Map a raw action spelling onto an Action; raises ValueError naming the unknown spelling."""
    key = str(raw).strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return ACTION_ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown action {raw!r} (known: {', '.join(a.value for a in ACTIONS)})") from None


class Polarity(StrEnum):
    """What an action says about the user's interest in the item."""

    POSITIVE = "positive"  # interest: a training positive and a possible evaluation target
    NEGATIVE = "negative"  # disinterest: never a positive, never a target; a reader of negatives may use it
    NEUTRAL = "neutral"  # too weak to say either way: kept in histories, never a positive or a target


class Meaning(BaseModel):
    """One row of the event-semantics table."""

    model_config = ConfigDict(frozen=True)

    polarity: Polarity
    strength: float  # how strong the signal is, signed: purchase 1.0 ... scroll_past < 0; neutral 0


# The one table of what each action means. Readers keep every event; splits pick targets, recommenders pick
# training positives, metrics pick hits from it (`is_positive`, `positive_mask`); rewards start from it.
ACTION_MEANING: dict[Action, Meaning] = {
    Action.VIEW: Meaning(polarity=Polarity.POSITIVE, strength=0.2),
    Action.HOVER: Meaning(polarity=Polarity.NEUTRAL, strength=0.0),
    Action.CLICK: Meaning(polarity=Polarity.POSITIVE, strength=0.4),
    Action.SCROLL_PAST: Meaning(polarity=Polarity.NEGATIVE, strength=-0.2),
    Action.ADD_TO_CART: Meaning(polarity=Polarity.POSITIVE, strength=0.7),
    Action.REMOVE_FROM_CART: Meaning(polarity=Polarity.NEGATIVE, strength=-0.5),
    Action.PURCHASE: Meaning(polarity=Polarity.POSITIVE, strength=1.0),
    Action.REVIEW: Meaning(polarity=Polarity.POSITIVE, strength=1.0),  # Amazon logs a purchase as its review
    Action.FAVORITE: Meaning(polarity=Polarity.POSITIVE, strength=0.6),
}
POSITIVE_ACTIONS: frozenset[str] = frozenset(a.value for a, m in ACTION_MEANING.items()
                                             if m.polarity is Polarity.POSITIVE)
NEGATIVE_ACTIONS: frozenset[str] = frozenset(a.value for a, m in ACTION_MEANING.items()
                                             if m.polarity is Polarity.NEGATIVE)


def meaning(action: str | Action) -> Meaning:
    """The table row of an action (any known spelling)."""
    return ACTION_MEANING[action if isinstance(action, Action) else parse_action(action)]


def is_positive(action: str | Action) -> bool:
    return meaning(action).polarity is Polarity.POSITIVE


def positive_mask(actions) -> np.ndarray:
    """[n] bool: which of these canonical action names (`Action` values) are positive."""
    acts = np.asarray(actions, dtype=object)
    return np.fromiter((a in POSITIVE_ACTIONS for a in acts.ravel()), dtype=bool, count=acts.size).reshape(acts.shape)


def action_strengths(actions) -> np.ndarray:
    """[n] float: the signed strength of each canonical action name."""
    table = {a.value: m.strength for a, m in ACTION_MEANING.items()}
    acts = np.asarray(actions, dtype=object)
    return np.fromiter((table[a] for a in acts.ravel()), dtype=np.float64, count=acts.size).reshape(acts.shape)


class Item(BaseModel):
    """A catalog product. `extra` keeps any attribute the catalog has beyond the common ones."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    title: str | None = None
    brand: str | None = None
    category: str | None = None  # readable path, "Beauty > Makeup > Face"
    price: float | None = None
    description: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class Event(BaseModel):
    """One thing one user did to one item, at one time."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    item_id: str
    action: Action
    timestamp: float  # seconds since the epoch
    request_id: str | None = None  # the Impression this event answers, when it answers one
    value: float | None = None  # a rating for `review`, dwell milliseconds for `view`/`hover`
    session_id: str | None = None


class Impression(BaseModel):
    """A recommendation list as it was shown: without it, feedback cannot say what was ignored."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    user_id: str
    item_ids: list[str]  # in the order shown
    model_version: str | None = None
    pipeline: str | None = None
    timestamp: float | None = None
    # Per shown item, aligned with item_ids; None where the pipeline did not say.
    scores: list[float | None] | None = None  # the score that ranked the item
    sources: list[str | None] | None = None  # the candidate source that proposed it ("dense", ...)
    propensities: list[float | None] | None = None  # P(item in this slot) under a stochastic policy, for IPS


# The canonical columns of the tables that readers produce and every stage consumes.
ITEM_COLUMNS = ("item_id", "title", "brand", "category", "price", "description")
EVENT_COLUMNS = ("user_id", "item_id", "action", "timestamp", "request_id", "value", "session_id", "order")
