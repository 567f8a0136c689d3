"""The shop's own tables (orders, webhook deliveries received) and its async SQLAlchemy engine."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Integer, String, event, func
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from . import settings


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shop_orders"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    customer: Mapped[str] = mapped_column(String(200))
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 default=lambda: datetime.now(timezone.utc))


class WebhookDelivery(Base):
    """One event received by the webhook route: ``deliveries`` counts at-least-once redeliveries."""

    __tablename__ = "shop_webhook_events"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    order_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def make_engine(url: str = settings.DATABASE_URL, **options: Any) -> AsyncEngine:
    """The async engine. On SQLite every transaction begins ``IMMEDIATE``: it takes the write lock at once
    (waiting up to the busy timeout) instead of failing when a read transaction later tries to write."""
    if url.startswith("sqlite"):
        options.setdefault("connect_args", {"timeout": 30})
    engine = create_async_engine(url, **options)
    if url.startswith("sqlite"):
        @event.listens_for(engine.sync_engine, "connect")
        def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, begins transactions

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


engine = make_engine()
Session = async_sessionmaker(engine, expire_on_commit=False)
