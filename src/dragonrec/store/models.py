"""The feedback store's tables: impressions (and the items they showed), events, the ingestion counter, and the
text of reviews written on the storefront.

One schema for SQLite and PostgreSQL. Times are seconds since the epoch as doubles, as in `dragonrec.schema`.
The migrations in `migrations/versions/` create exactly these tables; a test compares the two.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Double, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Fixed constraint names, so that migrations can name what they alter on both backends.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
INGEST_COUNTER = "ingest"  # the counter row whose value orders every ingested event and impression


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class CounterRow(Base):
    """Named counters. Writers take the next values of `ingest` inside their transaction: the row lock
    orders commits, so a reader that saw `ingest_seq` s has also seen every smaller one (a safe cursor)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ImpressionRow(Base):
    """A recommendation list as it was shown."""

    __tablename__ = "impressions"

    request_id: Mapped[str] = mapped_column(String, primary_key=True)
    user_id: Mapped[str] = mapped_column(String, nullable=False)
    model_version: Mapped[str | None] = mapped_column(String)
    pipeline: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[float | None] = mapped_column(Double)  # when it was shown (Impression.timestamp)
    ingested_at: Mapped[float] = mapped_column(Double, nullable=False)  # when the store received it
    ingest_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)  # ingestion cursor (see CounterRow)

    __table_args__ = (
        Index("ix_impressions_user_time", "user_id", "created_at"),
        Index("ix_impressions_ingest_seq", "ingest_seq"),
        Index("ix_impressions_created_at", "created_at"),
    )


class ImpressionItemRow(Base):
    """One slot of an impression: the item shown at a position, and what the pipeline knew about it."""

    __tablename__ = "impression_items"

    request_id: Mapped[str] = mapped_column(
        String, ForeignKey("impressions.request_id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 = first shown
    item_id: Mapped[str] = mapped_column(String, nullable=False)
    score: Mapped[float | None] = mapped_column(Double)
    source: Mapped[str | None] = mapped_column(String)
    propensity: Mapped[float | None] = mapped_column(Double)  # P(this item in this slot); None: deterministic


class EventRow(Base):
    """One thing one user did to one item."""

    __tablename__ = "events"

    event_id: Mapped[str] = mapped_column(String, primary_key=True)
    user_id: Mapped[str] = mapped_column(String, nullable=False)
    item_id: Mapped[str] = mapped_column(String, nullable=False)
    action: Mapped[str] = mapped_column(String, nullable=False)  # an `Action` value
    timestamp: Mapped[float] = mapped_column(Double, nullable=False)
    # No foreign key: an event may arrive before the impression it answers (see Store.add_events).
    request_id: Mapped[str | None] = mapped_column(String)
    value: Mapped[float | None] = mapped_column(Double)
    session_id: Mapped[str | None] = mapped_column(String)
    event_order: Mapped[float | None] = mapped_column(Double)  # order among one user's same-time events
    ingested_at: Mapped[float] = mapped_column(Double, nullable=False)
    ingest_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (
        Index("ix_events_user_time", "user_id", "timestamp"),
        Index("ix_events_request_id", "request_id"),
        Index("ix_events_ingest_seq", "ingest_seq"),
        Index("ix_events_timestamp", "timestamp"),
    )


class ReviewRow(Base):
    """The text of a review written on the storefront, keyed by its review event's id (the event's value carries
    the stars; text has no place in the event schema)."""

    __tablename__ = "shop_reviews"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String, nullable=False, index=True)
    user_id: Mapped[str] = mapped_column(String, nullable=False)
    stars: Mapped[int] = mapped_column(Integer, nullable=False)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[float] = mapped_column(Double, nullable=False)


metadata = Base.metadata
counters = CounterRow.__table__
impressions = ImpressionRow.__table__
impression_items = ImpressionItemRow.__table__
events = EventRow.__table__
reviews = ReviewRow.__table__
