"""Recommenders: every model honours the contract in `base.py`.

`build(name)` is the one place that turns a name from the command line into a model; heavy models are
imported only when asked for.
"""

from __future__ import annotations

import importlib

from dragonrec.recommenders.base import Recommender, top_n

# name -> "module:Class"; imported lazily (torch and sentence-transformers take seconds to import).
RECOMMENDERS: dict[str, str] = {
    "popularity": "dragonrec.recommenders.popularity:PopularityRecommender",
    "cooccurrence": "dragonrec.recommenders.cooccurrence:CooccurrenceRecommender",
}


def recommender_class(name: str) -> type[Recommender]:
    try:
        module, cls = RECOMMENDERS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown recommender {name!r} (available: {', '.join(RECOMMENDERS)})") from None
    return getattr(importlib.import_module(module), cls)


def build(name: str, overrides: dict | None = None) -> Recommender:
    """A new recommender by name, its config fields overridden by `overrides` (validated by its config)."""
    cls = recommender_class(name)
    model = cls()
    if overrides:
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise ValueError(f"{name} has no config to override")
        unknown = set(overrides) - set(type(cfg).model_fields)
        if unknown:
            raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))} "
                             f"(settings: {', '.join(type(cfg).model_fields)})")
        model.cfg = type(cfg).model_validate({**cfg.model_dump(), **overrides})
    return model


__all__ = ["RECOMMENDERS", "Recommender", "build", "recommender_class", "top_n"]
