"""The durable and lro engines start work inside the caller's ORM transaction, as the outbox does: a SQLAlchemy
``Session`` (sync) or ``AsyncSession`` (the ``_async`` twins), on SQLite and on PostgreSQL. Commit keeps both the
caller's row and the execution or operation; rollback keeps neither."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from errands.core.errors import NotFoundError
from errands.core.store import SQLStore, open_store
from errands.durable import DurableRunner
from errands.lro import Config, LroClient

sa = pytest.importorskip("sqlalchemy")
sa_orm = pytest.importorskip("sqlalchemy.orm")
sa_async = pytest.importorskip("sqlalchemy.ext.asyncio")


class Base(sa_orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "engine_orders"
    id = sa.Column(sa.String(64), primary_key=True)


def greet(event: Any, ctx: Any) -> str:
    return ctx.step("hello", lambda _: f"hello {event['name']}")


@pytest.fixture(params=["sqlite", "postgres"])
def urls(request: Any, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The store URL, SQLAlchemy's sync URL and its async URL, for one database."""
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        url = f"sqlite:///{path}"
        sync_url, async_url = url, f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_url")
        sync_url = async_url = url.replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(sync_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    yield url, sync_url, async_url


def _orders(sync_url: str) -> set[str]:
    engine = sa.create_engine(sync_url)
    try:
        with engine.connect() as c:
            return {row[0] for row in c.execute(sa.text("SELECT id FROM engine_orders"))}
    finally:
        engine.dispose()


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_a_durable_execution_starts_in_the_callers_session(urls: tuple[str, str, str], commit: bool) -> None:
    url, sync_url, async_url = urls
    store = open_store(url)
    runner = DurableRunner(store, functions={"greet": greet})
    engine = sa.create_engine(sync_url)
    sync_id, async_id = f"sync-{uuid.uuid4().hex}", f"async-{uuid.uuid4().hex}"
    try:
        with sa_orm.Session(engine) as session:
            session.begin()
            session.add(Order(id=sync_id))
            runner.start("greet", {"name": "alice"}, execution_id=sync_id, conn=session)
            session.commit() if commit else session.rollback()

        async def main() -> None:
            aengine = sa_async.create_async_engine(async_url)
            try:
                async with sa_async.AsyncSession(aengine) as session:
                    await session.begin()
                    session.add(Order(id=async_id))
                    await runner.start_async("greet", {"name": "bob"}, execution_id=async_id, conn=session)
                    await (session.commit() if commit else session.rollback())
            finally:
                await aengine.dispose()
                await store.close_async()

        asyncio.run(main())
        assert _orders(sync_url) == ({sync_id, async_id} if commit else set())
        for execution_id, name in ((sync_id, "alice"), (async_id, "bob")):
            if commit:
                assert runner.wait(execution_id, timeout=10).result == f"hello {name}"
            else:
                with pytest.raises(NotFoundError):
                    runner.get(execution_id)
    finally:
        engine.dispose()
        runner.close()
        store.close()


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_an_operation_is_created_in_the_callers_session(urls: tuple[str, str, str], commit: bool) -> None:
    url, sync_url, async_url = urls
    store: SQLStore = open_store(url)
    client = LroClient(Config(neuron="shop", store=store))
    engine = sa.create_engine(sync_url)
    sync_name, async_name = f"operations/sync-{uuid.uuid4().hex}", f"operations/async-{uuid.uuid4().hex}"
    try:
        with sa_orm.Session(engine) as session:
            session.begin()
            session.add(Order(id=sync_name))
            client.new_operation(sync_name, {"step": 1}, conn=session)
            session.commit() if commit else session.rollback()

        async def main() -> None:
            aengine = sa_async.create_async_engine(async_url)
            try:
                async with sa_async.AsyncSession(aengine) as session:
                    await session.begin()
                    session.add(Order(id=async_name))
                    await client.new_operation_async(async_name, {"step": 1}, conn=session)
                    await (session.commit() if commit else session.rollback())
            finally:
                await aengine.dispose()
                await store.close_async()

        asyncio.run(main())
        assert _orders(sync_url) == ({sync_name, async_name} if commit else set())
        for name in (sync_name, async_name):
            if commit:
                assert client.get_operation(name).name == name
            else:
                with pytest.raises(NotFoundError):
                    client.get_operation(name)
    finally:
        engine.dispose()
        client.close()
        store.close()
