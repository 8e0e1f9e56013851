"""Candidate generation: the user query vector, dense FAISS retrieval, and the cold-start list."""

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.dense import Candidates, DenseRetriever
from dragonrec.candidates.query import (
           Preferences,
           QueryConfig,
           preference_vector,
           query_vector,
           query_vectors,
)

__all__ = ["Candidates", "ColdStart", "ColdStartConfig", "DenseRetriever", "Preferences", "QueryConfig",
           "preference_vector", "query_vector", "query_vectors"]
