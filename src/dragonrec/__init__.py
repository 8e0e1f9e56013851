"""dragonrec: train, serve and keep improving a language-model product recommender."""

__version__ = "0.1.0"
