"""Alembic migrations of the feedback store, inside the package so that an installed dragonrec migrates."""
