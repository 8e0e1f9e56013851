"""Create the feedback store: counters, impressions, impression_items, events.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )
    op.bulk_insert(sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger)),
                   [{"name": "ingest", "value": 0}])
    op.create_table(
        "impressions",
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("pipeline", sa.String(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=True),
        sa.Column("ingested_at", sa.Double(), nullable=False),
        sa.Column("ingest_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_impressions"),
    )
    op.create_index("ix_impressions_user_time", "impressions", ["user_id", "created_at"])
    op.create_index("ix_impressions_ingest_seq", "impressions", ["ingest_seq"])
    op.create_index("ix_impressions_created_at", "impressions", ["created_at"])
    op.create_table(
        "impression_items",
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("source", sa.String(), nullable=True),
        sa.Column("propensity", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["request_id"], ["impressions.request_id"], ondelete="CASCADE",
                                name="fk_impression_items_request_id_impressions"),
        sa.PrimaryKeyConstraint("request_id", "position", name="pk_impression_items"),
    )
    op.create_table(
        "events",
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("session_id", sa.String(), nullable=True),
        sa.Column("event_order", sa.Double(), nullable=True),
        sa.Column("ingested_at", sa.Double(), nullable=False),
        sa.Column("ingest_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_events"),
    )
    op.create_index("ix_events_user_time", "events", ["user_id", "timestamp"])
    op.create_index("ix_events_request_id", "events", ["request_id"])
    op.create_index("ix_events_ingest_seq", "events", ["ingest_seq"])
    op.create_index("ix_events_timestamp", "events", ["timestamp"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("impression_items")
    op.drop_table("impressions")
    op.drop_table("counters")
