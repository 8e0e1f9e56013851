"""Item text: the one template that turns a catalog row into the sentence we embed and show to an LLM."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.data.catalog import Catalog

_SPACES = re.compile(r"\s+")


class TextTemplate(BaseModel):
    """Which item fields make an item's text, in which order, and how they are labelled.

    A field that is missing for an item (None, NaN, empty) is left out, label and all, so an item without a
    brand reads "Title. Category: ..." rather than "Brand: None".
    """

    model_config = ConfigDict(frozen=True)

    fields: tuple[str, ...] = ("title", "brand", "category", "price", "description")
    """Catalog columns to use, in order (any column of `catalog.items`, extras included)."""
    labels: dict[str, str] = Field(default_factory=lambda: {
        "brand": "Brand", "category": "Category", "price": "Price", "description": "Description"})
    """Label printed before a field's value ("Brand: Maybelline"); fields without a label print bare."""
    sep: str = ". "
    """Separator between fields."""
    max_chars: int = 1000
    """Texts are cut to this many characters (MiniLM reads 256 word pieces; longer text is truncated anyway)."""
    format: str | None = None
    """A str.format pattern instead of fields/labels, e.g. "{title} by {brand}"; missing values become ''."""


DEFAULT_TEMPLATE = TextTemplate()


def _clean(value: Any) -> str | None:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = _SPACES.sub(" ", str(value)).strip()
    return text or None


def _format_value(name: str, value: Any) -> str | None:
    if name == "price" and value is not None and value is not pd.NA:
        try:
            price = float(value)
        except (TypeError, ValueError):
            return _clean(value)
        return None if math.isnan(price) else f"${price:.2f}"
    return _clean(value)


def item_text(row: Mapping[str, Any], template: TextTemplate | str | None = None) -> str:
    """The text of one item (a mapping of column -> value, e.g. a catalog row or `Item.model_dump()`)."""
    tpl = _as_template(template)
    if tpl.format is not None:
        names = {f for _, f, _, _ in string.Formatter().parse(tpl.format) if f}
        values = {n: _format_value(n, row.get(n)) or "" for n in names}
        text = _SPACES.sub(" ", tpl.format.format(**values)).strip()
    else:
        parts = []
        for name in tpl.fields:
            value = _format_value(name, row.get(name))
            if value is None:
                continue
            if tpl.sep.strip() and value.endswith(tpl.sep.strip()):
                value = value.rstrip(tpl.sep.strip()).rstrip() or value  # no "1oz.." before the separator
            label = tpl.labels.get(name)
            parts.append(f"{label}: {value}" if label else value)
        text = tpl.sep.join(parts)
    return text[: tpl.max_chars]


def catalog_texts(catalog: Catalog, template: TextTemplate | str | None = None) -> list[str]:
    """One text per catalog item, in catalog order."""
    tpl = _as_template(template)
    items = catalog.items
    if tpl.format is None:
        unknown = [f for f in tpl.fields if f not in items.columns]
        # Optional canonical columns may be absent from a small catalog; an unknown extra is a typo.
        unknown = [f for f in unknown if f not in ("title", "brand", "category", "price", "description")]
        if unknown:
            raise ValueError(f"text template names columns the catalog lacks: {unknown} "
                             f"(columns: {list(items.columns)})")
    cols = [c for c in items.columns]
    return [item_text(dict(zip(cols, row)), tpl) for row in items.itertuples(index=False, name=None)]


def _as_template(template: TextTemplate | str | None) -> TextTemplate:
    if template is None:
        return DEFAULT_TEMPLATE
    if isinstance(template, str):
        return TextTemplate(format=template)
    if isinstance(template, TextTemplate):
        return template
    raise TypeError(f"template must be a TextTemplate, a format string or None, not {type(template).__name__}")
