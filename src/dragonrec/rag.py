"""The RAG baseline as one configuration of the pipeline: embed the catalog, retrieve the top K by the user's
weighted history (and stated preferences) with FAISS, let a scorer (an LLM, a local LM or another model)
re-order them, everything else below by retrieval similarity.

    rag = RAGPipeline(RAGConfig(k=50), scorer=ModelScorer(cooc)).fit(split.train, catalog)
    rec = rag.recommend_for([12, 40], ["view", "purchase"], n=10)  # rec.items, .reasons, .source, .degraded
    rec = rag.recommend_for([], context={"preferences": "vegan lipstick"}, n=10)
    scores = rag.score(histories)      # [B, n_catalog] for full-ranking evaluation
    rag.update_catalog(new_catalog)    # embeds only new/edited items, updates the index in place
    rag.save(path); RAGPipeline.load(path, catalog, scorer=...)

`RAGConfig` keeps the RAG settings (`dragonrec evaluate --recommender rag --set k=500 ...`) and translates
one to one to `PipelineConfig.rag(...)`; everything else is the pipeline's.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.query import QueryConfig
from dragonrec.candidates.sources import DenseConfig, DenseSource
from dragonrec.data.catalog import Catalog
from dragonrec.embed import Embedder
from dragonrec.index import IndexConfig, VectorIndex
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.scorers.base import Scorer
from dragonrec.text import TextTemplate


class RAGConfig(BaseModel):
    """The RAG pipeline's settings."""

    k: int = Field(50, ge=1, description="candidates retrieved and scored per user")
    exclude_history: bool = Field(True, description="never retrieve an item the user already has")
    scorer_history: int = Field(20, ge=0, description="latest history items shown to the scorer")
    query: QueryConfig = Field(default_factory=QueryConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    template: TextTemplate = Field(default_factory=TextTemplate)
    cache_dir: str | None = Field(None, description="embedding cache folder; None = no disk cache")
    scorer: str = Field("none", description="when no scorer object is given: 'none' (retrieval order), 'openai' "
                        "(DRAGONREC_LLM_* settings), 'hf:MODEL_DIR' (local causal LM) or 'model:NAME' (a dragonrec "
                        "recommender, e.g. model:cooccurrence, fitted on the same training data)")

    def pipeline(self) -> PipelineConfig:
        """The same settings as a pipeline configuration: dense retrieval alone, the scorer over its top k."""
        dense = DenseConfig(query=self.query, index=self.index, template=self.template, cache_dir=self.cache_dir)
        return PipelineConfig.rag(k=self.k, scorer=self.scorer, exclude_history=self.exclude_history,
                                  scorer_history=self.scorer_history, cold_start=self.cold_start, dense=dense)


class RAGPipeline(Pipeline):
    """The pipeline with `RAGConfig` settings; `cfg` is the pipeline's config, `rag_cfg` the RAG settings."""

    name: ClassVar[str] = "rag"

    def __init__(self, cfg: RAGConfig | None = None, scorer: Scorer | None = None, embedder: Embedder | None = None):
        self.rag_cfg = cfg or RAGConfig()
        super().__init__(self.rag_cfg.pipeline(), scorer=scorer, embedder=embedder)

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None, item_vectors: np.ndarray | None = None) -> Self:
        """Embed the catalog (or take `item_vectors`), build the index, fit the scorer (when named by
        `rag_cfg.scorer`) and the cold-start list."""
        if item_vectors is not None:
            if item_vectors.shape[0] != len(catalog):
                raise ValueError(f"{item_vectors.shape[0]} item vectors for a catalog of {len(catalog)}")
            self.given_sources["dense"] = DenseSource(self.cfg.dense, self.embedder, item_vectors)
        super().fit(train, catalog, valid)
        self.embedder = self.dense.embedder
        return self

    def config(self) -> dict:
        return self.rag_cfg.model_dump()

    @property
    def dense(self) -> DenseSource:
        return self.sources["dense"]

    @property
    def item_vectors(self) -> np.ndarray:
        return self.dense.item_vectors

    @property
    def index(self) -> VectorIndex:
        return self.dense.index

    def save(self, path: Path) -> None:
        """The index (with its metadata), item vectors, config and cold-start state; the scorer is supplied
        again on load."""
        path = Path(path)
        self.dense.save(path)
        np.save(path / "popularity.npy", self.cold.popularity)
        np.save(path / "explore_pool.npy", self.cold.explore_pool)
        (path / "config.json").write_text(self.rag_cfg.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path, catalog: Catalog, scorer: Scorer | None = None,
             embedder: Embedder | None = None) -> Self:
        """A saved RAG pipeline for `catalog` (the one it was saved with); without `scorer`, retrieval order."""
        path = Path(path)
        self = cls(RAGConfig.model_validate_json((path / "config.json").read_text()), scorer, embedder)
        dense = DenseSource.load(path, catalog, embedder, cfg=self.cfg.dense)
        dense.name = "dense"
        self.sources, self.embedder, self.catalog = {"dense": dense}, dense.embedder, catalog
        self.cold = ColdStart(self.cfg.cold_start)
        self.cold.popularity = np.load(path / "popularity.npy")
        self.cold.explore_pool = np.load(path / "explore_pool.npy")
        self._cold_scores = self.cold.scores()
        self.reset_stats()
        return self


__all__ = ["RAGConfig", "RAGPipeline"]
