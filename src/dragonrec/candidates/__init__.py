"""Candidate generation: the user query vector, dense FAISS retrieval, the cold-start list, complements."""

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.complements import ComplementsConfig, ComplementsSource, category_keys
from dragonrec.candidates.dense import Candidates, DenseRetriever
from dragonrec.candidates.query import (
           Preferences,
           QueryConfig,
           preference_vector,
           query_vector,
           query_vectors,
)

__all__ = ["Candidates", "ColdStart", "ColdStartConfig", "ComplementsConfig", "ComplementsSource", "DenseRetriever",
           "Preferences", "QueryConfig", "category_keys", "preference_vector", "query_vector", "query_vectors"]
