"""The storefront's review texts (`shop_reviews`), until now created by the storefront itself outside migrations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("shop_reviews"):
        return  # made by an older storefront (the same columns and index): adopt it
    op.create_table(
        "shop_reviews",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("stars", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_shop_reviews"),
    )
    op.create_index("ix_shop_reviews_item_id", "shop_reviews", ["item_id"])


def downgrade() -> None:
    op.drop_table("shop_reviews")
