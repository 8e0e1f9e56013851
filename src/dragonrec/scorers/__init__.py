"""Relevance scorers behind one interface (`base.Scorer`): OpenAI-compatible chat LLM, local HF causal LM,
and any fitted dragonrec Recommender. Backends import their heavy dependencies only when used."""

from dragonrec.scorers.base import ItemView, Scorer, ScoreRequest, ScoreResult, Usage

__all__ = ["ItemView", "ScoreRequest", "ScoreResult", "Scorer", "Usage"]
