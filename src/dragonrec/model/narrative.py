"""Session narratives: a user's events as readable text (for pretrained LLMs) or as tokens (for `SeqRecLM`).

    User viewed "Rose Hand Cream", "Argan Oil Shampoo", added "Nail Polish Red" to cart, purchased "Lip Balm".
    Recommend: "Night Cream", "Eye Serum".

    [BOS] [USER] <view> <item_3> <item_5> <add_to_cart> <item_9> <purchase> <item_1> [RECOMMEND] <item_8> [EOS]

Consecutive events with the same action are grouped ("viewed A, B"). Products appear by their TITLE, never
by their raw id: in Amazon Beauty same-day items are listed in ascending ASIN order, so an id shown as text
leaks the answer. `ItemNames` makes every catalog title a unique, quote-free name (so text parses back
without ambiguity); with `item_token` (pretrained models) each title is followed by its product token, and
the recommended items are written as tokens alone, since those are what the model predicts.

Both forms parse back (`parse_text`, `parse_tokens`) into the same `Narrative`, so narrative -> events ->
narrative is the identity.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dragonrec.data.catalog import Catalog
from dragonrec.schema import ACTIONS, Action, parse_action

# verb before the items, suffix after them: "added "A", "B" to cart"
ACTION_PHRASES: dict[Action, tuple[str, str]] = {
    Action.VIEW: ("viewed", ""),
    Action.HOVER: ("hovered over", ""),
    Action.CLICK: ("clicked", ""),
    Action.SCROLL_PAST: ("scrolled past", ""),
    Action.ADD_TO_CART: ("added", " to cart"),
    Action.REMOVE_FROM_CART: ("removed", " from cart"),
    Action.PURCHASE: ("purchased", ""),
    Action.REVIEW: ("reviewed", ""),
    Action.FAVORITE: ("saved", " to favorites"),
}
assert set(ACTION_PHRASES) == set(ACTIONS), "every Action needs a phrase"
NO_HISTORY = "User has no history yet."
_ITEM_TOKEN = re.compile(r"<item_(\d+)>")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass
class Narrative:
    """One user's events (catalog indices with their actions, oldest first) and, optionally, what to recommend.

    `recommend` None: no recommendation part; []: a prompt that ends where the recommendations begin.
    """

    history: np.ndarray
    actions: list[str]
    recommend: list[int] | None = None

    def __post_init__(self) -> None:
        self.history = np.asarray(self.history, dtype=np.int64)
        self.actions = [parse_action(a).value for a in self.actions]
        if len(self.actions) != len(self.history):
            raise ValueError(f"{len(self.actions)} actions for {len(self.history)} history items")
        if self.recommend is not None:
            self.recommend = [int(i) for i in self.recommend]


def group_actions(history: Sequence[int], actions: Sequence[str]) -> list[tuple[Action, list[int]]]:
    """Runs of consecutive events with the same action: [(view, [a, b]), (add_to_cart, [c]), ...]."""
    groups: list[tuple[Action, list[int]]] = []
    for item, action in zip(history, actions, strict=True):
        a = parse_action(action)
        if groups and groups[-1][0] is a:
            groups[-1][1].append(int(item))
        else:
            groups.append((a, [int(item)]))
    return groups


class ItemNames:
    """A unique, readable, quote-free name per catalog item, made from its title (never from its id).

    Double quotes become single ones and whitespace is collapsed; titles are cut to `max_chars`. Items without
    a title are named from brand and category leaf. Items sharing a name get " (variant k)" suffixes, numbered
    in a seeded random order (catalog order may follow the id order that must not leak).
    """

    def __init__(self, catalog: Catalog, max_chars: int = 80, seed: int = 0):
        items = catalog.items
        titles = items["title"] if "title" in items else [None] * len(items)
        brands = items["brand"] if "brand" in items else [None] * len(items)
        cats = catalog.categories
        base = [self._clean(t, max_chars) or self._untitled(b, c) for t, b, c in zip(titles, brands, cats)]
        by_name: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(base):
            by_name[name].append(i)
        rng = np.random.default_rng(seed)
        self.names = list(base)
        for name, idx in by_name.items():
            if len(idx) > 1:
                for k, i in enumerate(rng.permutation(idx).tolist(), start=1):
                    self.names[i] = f"{name} (variant {k})"
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):  # a "(variant k)" collided with a real title
            raise ValueError("item names are not unique after disambiguation")

    @staticmethod
    def _clean(text, max_chars: int) -> str:
        if text is None or (isinstance(text, float) and np.isnan(text)):
            return ""
        text = " ".join(str(text).replace('"', "'").split())
        return text if len(text) <= max_chars else text[:max_chars - 3].rstrip() + "..."

    @classmethod
    def _untitled(cls, brand, category) -> str:
        leaf = str(category).split(">")[-1].strip() if category else ""
        return " ".join(p for p in (cls._clean(brand, 40), leaf or "product", "(untitled)") if p)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, catalog_idx: int) -> str:
        return self.names[int(catalog_idx)]

    def index(self, name: str) -> int:
        """The catalog index of a name; ValueError for a name no item has."""
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"no catalog item is named {name!r}") from None


def to_text(narrative: Narrative, names: ItemNames, item_token: Callable[[int], str | None] | None = None) -> str:
    """The narrative as one line of English. `item_token(catalog_idx)` (e.g. "<item_5>", or None for an item
    without a token) puts each history item's token after its title and writes recommendations as tokens."""

    def item(i: int) -> str:
        token = item_token(i) if item_token is not None else None
        return f'"{names.name(i)}"' + (f" {token}" if token else "")

    if len(narrative.history):
        clauses = []
        for action, group in group_actions(narrative.history, narrative.actions):
            verb, suffix = ACTION_PHRASES[action]
            clauses.append(f"{verb} {', '.join(item(i) for i in group)}{suffix}")
        text = "User " + ", ".join(clauses) + "."
    else:
        text = NO_HISTORY
    if narrative.recommend is not None:
        text += " Recommend:"
        if narrative.recommend:
            if item_token is not None:
                tokens = [item_token(i) for i in narrative.recommend]
                if any(t is None for t in tokens):
                    raise ValueError("a recommended item has no product token")
                text += " " + ", ".join(tokens) + "."
            else:
                text += " " + ", ".join(item(i) for i in narrative.recommend) + "."
    return text


class _Cursor:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def take(self, s: str) -> bool:
        if self.text.startswith(s, self.pos):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str) -> None:
        if not self.take(s):
            self.fail(f"expected {s!r}")

    def fail(self, what: str):
        raise ValueError(f"not a narrative: {what} at character {self.pos}: "
                         f"{self.text[max(0, self.pos - 20):self.pos + 30]!r}")


def parse_text(text: str, names: ItemNames, token_item: Callable[[int], int] | None = None) -> Narrative:
    """The inverse of `to_text`. `token_item(k)` maps the k of "<item_k>" to a catalog index (needed when the
    text holds product tokens); a title and the token after it must name the same item."""
    c = _Cursor(text.strip())
    verbs = sorted(((v, s, a) for a, (v, s) in ACTION_PHRASES.items()), key=lambda t: -len(t[0]))

    def item() -> int:
        found: list[int] = []
        m = _QUOTED.match(c.text, c.pos)
        if m:
            found.append(names.index(m.group(1)))
            c.pos = m.end()
            if c.text.startswith(" <item_", c.pos):
                c.pos += 1
        m = _ITEM_TOKEN.match(c.text, c.pos)
        if m:
            if token_item is None:
                c.fail("a product token, but no token_item mapping was given")
            found.append(int(token_item(int(m.group(1)))))
            c.pos = m.end()
        if not found:
            c.fail("expected a quoted product title or a product token")
        if len(set(found)) > 1:
            c.fail(f"title names catalog item {found[0]} but its token names {found[1]}")
        return found[0]

    def items() -> list[int]:
        out = [item()]
        while c.text.startswith(", ", c.pos) and c.text[c.pos + 2:c.pos + 3] in ('"', "<"):
            c.pos += 2
            out.append(item())
        return out

    history: list[int] = []
    actions: list[str] = []
    if not c.take(NO_HISTORY):
        c.expect("User ")
        while True:
            for verb, suffix, action in verbs:
                if c.take(verb + " "):
                    break
            else:
                c.fail("expected an action verb")
            group = items()
            if suffix:
                c.expect(suffix)
            history += group
            actions += [action.value] * len(group)
            if c.take("."):
                break
            c.expect(", ")
    recommend = None
    if c.take(" Recommend:"):
        recommend = []
        if c.take(" "):
            recommend = items()
            c.expect(".")
    if c.pos != len(c.text):
        c.fail("unexpected text")
    return Narrative(np.asarray(history, dtype=np.int64), actions, recommend)


def to_tokens(narrative: Narrative, tokenizer, grouped: bool = True) -> list[int]:
    """Token ids in `dragonrec.model.lm`'s layout: [BOS] [USER] <action> <item>... [RECOMMEND] <item>... [EOS].

    `tokenizer` is an `ItemTokenizer`. grouped=True writes an action token once per run of equal actions,
    grouped=False before every item (as `ItemTokenizer.encode(narrative=True)` does). History items without a
    product token are dropped (as `encode` drops them); a recommended item without one is an error.
    """
    from dragonrec.model.lm import BOS_ID, EOS_ID, ITEM_OFFSET, RECOMMEND_ID, USER_ID

    ids = tokenizer.item_ids(narrative.history)
    keep = ids >= 0
    out = [BOS_ID, USER_ID]
    last = None
    for k, action in zip(ids[keep].tolist(), np.asarray(narrative.actions, dtype=object)[keep]):
        a = tokenizer.action_token(action)
        if a != last or not grouped:
            out.append(a)
        out.append(ITEM_OFFSET + k)
        last = a
    if narrative.recommend is not None:
        out.append(RECOMMEND_ID)
        if narrative.recommend:
            rec = tokenizer.item_ids(np.asarray(narrative.recommend, dtype=np.int64))
            if (rec < 0).any():
                raise ValueError("a recommended item has no product token (it was not seen in training)")
            out += (ITEM_OFFSET + rec).tolist() + [EOS_ID]
    return out


def parse_tokens(token_ids: Sequence[int], tokenizer) -> Narrative:
    """The inverse of `to_tokens` (grouped or not): an action token applies to every item until the next one."""
    from dragonrec.model.lm import ACTION_OFFSET, BOS_ID, EOS_ID, ITEM_OFFSET, PAD_ID, RECOMMEND_ID, USER_ID

    history, actions, recommend = [], [], None
    action = None
    for t in map(int, token_ids):
        if t in (PAD_ID, BOS_ID, USER_ID):
            continue
        if t == EOS_ID:
            break
        if t == RECOMMEND_ID:
            recommend = []
        elif t >= ITEM_OFFSET:
            if t - ITEM_OFFSET >= tokenizer.n_items:
                raise ValueError(f"token id {t} is past the vocabulary ({tokenizer.vocab_size})")
            i = int(tokenizer.vocab.catalog_index[t - ITEM_OFFSET])
            if recommend is not None:
                recommend.append(i)
            elif action is None:
                raise ValueError(f"item token {t} has no action token before it")
            else:
                history.append(i)
                actions.append(action)
        elif t >= ACTION_OFFSET:
            if recommend is not None:
                raise ValueError("an action token after [RECOMMEND]")
            action = ACTIONS[t - ACTION_OFFSET].value
        else:
            raise ValueError(f"unexpected token id {t} in a narrative")
    return Narrative(np.asarray(history, dtype=np.int64), actions, recommend)
