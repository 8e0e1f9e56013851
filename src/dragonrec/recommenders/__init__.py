"""Recommenders: every model honours the contract in `base.py`.

`build(name)` is the one place that turns a name from the command line into a model; heavy models are
imported only when asked for.
"""

from __future__ import annotations

import importlib
import typing

from dragonrec.recommenders.base import Recommender, top_n

# name -> "module:Class"; imported lazily (torch and sentence-transformers take seconds to import).
RECOMMENDERS: dict[str, str] = {
    "popularity": "dragonrec.recommenders.popularity:PopularityRecommender",
    "cooccurrence": "dragonrec.recommenders.cooccurrence:CooccurrenceRecommender",
    "sasrec": "dragonrec.recommenders.sequential:SequentialRecommender",
    "generative": "dragonrec.recommenders.sequential:GenerativeRecommender",
    "rag": "dragonrec.rag:RAGPipeline",
    "pretrained-lm": "dragonrec.recommenders.pretrained:PretrainedLMRecommender",
    # The pipeline composes the models above (candidate sources -> scorer -> re-rank); it lives a layer up and
    # is named here, lazily, so that `evaluate --recommender pipeline` builds it like any model.
    "pipeline": "dragonrec.pipeline:Pipeline",
}


def recommender_class(name: str) -> type[Recommender]:
    try:
        module, cls = RECOMMENDERS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown recommender {name!r} (available: {', '.join(RECOMMENDERS)})") from None
    return getattr(importlib.import_module(module), cls)


def config_class(cls: type[Recommender]):
    """The pydantic config type a recommender's constructor takes as `cfg` (None if it takes none)."""
    hint = typing.get_type_hints(cls.__init__).get("cfg")
    for t in (*typing.get_args(hint), hint):
        if isinstance(t, type) and hasattr(t, "model_fields"):
            return t
    return None


def build(name: str, overrides: dict | None = None) -> Recommender:
    """A new recommender by name, its config fields overridden by `overrides` (validated by its config)."""
    cls = recommender_class(name)
    if not overrides:
        return cls()
    cfg_type = config_class(cls)
    if cfg_type is None:
        raise ValueError(f"{name} has no config to override")
    unknown = set(overrides) - set(cfg_type.model_fields)
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))} "
                         f"(settings: {', '.join(cfg_type.model_fields)})")
    base = getattr(cls, "default_config", None) or {}
    settings = {**base, **overrides}
    # a setting given explicitly wins over the data-driven default that would otherwise replace it
    for auto, fields in getattr(cfg_type, "AUTO_SETTINGS", {}).items():
        if auto not in overrides and any(f in overrides for f in fields):
            settings[auto] = False
    return cls(cfg_type.model_validate(settings))


__all__ = ["RECOMMENDERS", "Recommender", "build", "recommender_class", "top_n"]
