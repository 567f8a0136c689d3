"""``conn=`` of every kind: sqlite3, psycopg (sync and async), SQLAlchemy Connection / Session / AsyncConnection /
AsyncSession, and Django's connection, on SQLite and on PostgreSQL. The effect (and its event) commits or rolls
back with the caller's own row; a connection to another database is refused and changes nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from errands.core import Effect, Journal, Outbox, TaskEngine
from errands.core.errors import ConfigError, NotFoundError
from errands.core.store import SQLStore, open_store

sa = pytest.importorskip("sqlalchemy")
sa_orm = pytest.importorskip("sqlalchemy.orm")
sa_async = pytest.importorskip("sqlalchemy.ext.asyncio")


class Base(sa_orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id = sa.Column(sa.String(64), primary_key=True)


@dataclass
class DB:
    kind: str
    store: SQLStore
    url: str  # the store's
    sa_url: str
    sa_async_url: str
    other: Any  # () -> a store URL of another database (made on demand)

    @property
    def other_url(self) -> str:
        url: str = self.other()
        return url


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: Any, tmp_path: Path) -> Iterator[DB]:
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        url = f"sqlite:///{path}"
        sa_url, sa_async_url = url, f"sqlite+aiosqlite:///{path}"

        def other() -> str:
            return f"sqlite:///{tmp_path / 'other.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = request.getfixturevalue("postgres_url")
        made: list[str] = []

        def other() -> str:
            if not made:
                made.append(server.create_database())
                request.addfinalizer(lambda: server.drop_database(made[0]))
            return made[0]

        sa_url = sa_async_url = url.replace("postgresql://", "postgresql+psycopg://")
    store = open_store(url)
    engine = sa.create_engine(sa_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    try:
        yield DB(request.param, store, url, sa_url, sa_async_url, other)
    finally:
        store.close()


def effect(key: str) -> Effect:
    return Effect(key=key, connector="bank", payload={"cents": 5})


def key() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


def stored(db: DB, k: str) -> bool:
    """Whether effect ``k`` and its submitted event are in the store (seen from the store's own connection)."""
    try:
        Outbox(db.store, connectors=["bank"]).get(k)
    except NotFoundError:
        in_table = False
    else:
        in_table = True
    events = [e for e in db.store.read_events(0, 100_000) if isinstance(e.data, dict) and e.data.get("key") == k]
    assert in_table == bool(events), (in_table, events)
    return in_table


def own_row(db: DB, k: str) -> bool:
    engine = sa.create_engine(db.sa_url)
    try:
        with engine.connect() as c:
            return bool(c.execute(sa.text("SELECT count(*) FROM orders WHERE id = :id"), {"id": k}).scalar())
    finally:
        engine.dispose()


def raw_connect(db: DB) -> Any:
    if db.kind == "sqlite":
        return sqlite3.connect(db.store.path)  # type: ignore[attr-defined]
    import psycopg

    return psycopg.connect(db.url)


# -- sync kinds ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_raw_dbapi_connection(db: DB, commit: bool) -> None:
    outbox, k = Outbox(db.store, connectors=["bank"]), key()
    conn = raw_connect(db)
    try:
        ph = "?" if db.kind == "sqlite" else "%s"
        conn.execute(f"INSERT INTO orders (id) VALUES ({ph})", (k,))
        outbox.submit(effect(k), conn=conn)
        conn.commit() if commit else conn.rollback()
    finally:
        conn.close()
    assert own_row(db, k) is commit and stored(db, k) is commit


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_sqlalchemy_connection(db: DB, commit: bool) -> None:
    outbox, k = Outbox(db.store, connectors=["bank"]), key()
    engine = sa.create_engine(db.sa_url)
    try:
        with engine.connect() as c:
            c.execute(sa.insert(Order.__table__).values(id=k))
            outbox.submit(effect(k), conn=c)
            c.commit() if commit else c.rollback()
    finally:
        engine.dispose()
    assert own_row(db, k) is commit and stored(db, k) is commit


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_sqlalchemy_session_with_orm_objects(db: DB, commit: bool) -> None:
    outbox, journal, tasks, k = Outbox(db.store, connectors=["bank"]), Journal(db.store), TaskEngine(db.store), key()
    engine = sa.create_engine(db.sa_url)
    try:
        with sa_orm.Session(engine) as session:
            session.add(Order(id=k))
            outbox.submit(effect(k), conn=session)  # the session begins its transaction; the order flushes later
            journal.append(f"orders/{k}", "order.placed", {"id": k}, conn=session)
            task = tasks.submit("emails.send", {"id": k}, conn=session)
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()
    assert own_row(db, k) is commit and stored(db, k) is commit
    assert bool(journal.read(stream=f"orders/{k}")) is commit
    assert (tasks.get(task) is not None) is commit


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_sqlalchemy_session_before_its_first_statement(db: DB, commit: bool) -> None:
    """A session that has not begun yet: the effect begins its transaction, which the session then commits."""
    outbox, k = Outbox(db.store, connectors=["bank"]), key()
    engine = sa.create_engine(db.sa_url)
    try:
        with sa_orm.Session(engine) as session:
            outbox.submit(effect(k), conn=session)
            session.add(Order(id=k))
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()
    assert own_row(db, k) is commit and stored(db, k) is commit


def test_a_connection_to_another_database_is_refused(db: DB) -> None:
    other = open_store(db.other_url)  # creates the other database's tables (for SQLite, its file)
    other.close()
    outbox, k = Outbox(db.store, connectors=["bank"]), key()
    engine = sa.create_engine(db.other_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with sa_orm.Session(engine) as session:
            with pytest.raises(ConfigError) as err:
                outbox.submit(effect(k), conn=session)
            session.commit()
    finally:
        engine.dispose()
    assert err.value.field == "conn"
    message = str(err.value)
    if db.kind == "sqlite":
        assert "other.db" in message and "app.db" in message
    else:
        theirs, ours = db.other_url.rsplit("/", 1)[1], db.url.rsplit("/", 1)[1]
        assert repr(theirs) in message and repr(ours) in message
    assert not stored(db, k)
    reopened = open_store(db.other_url)
    try:
        assert not stored(DB(db.kind, reopened, db.other_url, "", "", None), k)
    finally:
        reopened.close()


def test_an_unknown_kind_lists_the_accepted_ones(db: DB) -> None:
    with pytest.raises(ConfigError) as err:
        Outbox(db.store, connectors=["bank"]).submit(effect(key()), conn=object())
    for kind in ("sqlite3.Connection", "psycopg.Connection", "AsyncSession", "Django", "builtins.object"):
        assert kind in str(err.value)


def test_a_connection_of_the_other_dialect_is_refused(db: DB, tmp_path: Path) -> None:
    if db.kind == "sqlite":
        pytest.skip("the PostgreSQL side covers it")
    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(ConfigError, match="SQLite connection, but this store is PostgreSQL"):
        Outbox(db.store, connectors=["bank"]).submit(effect(key()), conn=conn)
    conn.close()


def test_an_autocommit_connection_outside_a_transaction_is_refused(db: DB) -> None:
    if db.kind == "sqlite":
        conn: Any = sqlite3.connect(db.store.path, isolation_level=None)  # type: ignore[attr-defined]
    else:
        import psycopg

        conn = psycopg.connect(db.url, autocommit=True)
    k = key()
    with pytest.raises(ConfigError, match="autocommit"):
        Outbox(db.store, connectors=["bank"]).submit(effect(k), conn=conn)
    conn.close()
    assert not stored(db, k)


# -- async kinds --------------------------------------------------------------------------------------------------


def test_a_sync_method_given_an_async_connection_points_to_the_twin(db: DB) -> None:
    async def main() -> None:
        engine = sa_async.create_async_engine(db.sa_async_url)
        try:
            async with engine.connect() as c:
                with pytest.raises(ConfigError, match="submit_async"):
                    Outbox(db.store, connectors=["bank"]).submit(effect(key()), conn=c)
        finally:
            await engine.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_psycopg_async_connection(db: DB, commit: bool) -> None:
    if db.kind == "sqlite":
        pytest.skip("psycopg speaks PostgreSQL only")
    import psycopg

    outbox, k = Outbox(db.store, connectors=["bank"]), key()

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(db.url)
        try:
            await conn.execute("INSERT INTO orders (id) VALUES (%s)", (k,))
            await outbox.submit_async(effect(k), conn=conn)
            await (conn.commit() if commit else conn.rollback())
        finally:
            await conn.close()

    asyncio.run(main())
    assert own_row(db, k) is commit and stored(db, k) is commit


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_sqlalchemy_async_connection(db: DB, commit: bool) -> None:
    outbox, k = Outbox(db.store, connectors=["bank"]), key()

    async def main() -> None:
        engine = sa_async.create_async_engine(db.sa_async_url)
        try:
            async with engine.connect() as c:
                await c.execute(sa.insert(Order.__table__).values(id=k))
                await outbox.submit_many_async([effect(k)], conn=c)
                await (c.commit() if commit else c.rollback())
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert own_row(db, k) is commit and stored(db, k) is commit


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_sqlalchemy_async_session_with_orm_objects(db: DB, commit: bool) -> None:
    outbox, journal, tasks, k = Outbox(db.store, connectors=["bank"]), Journal(db.store), TaskEngine(db.store), key()
    task_id: list[str] = []

    async def main() -> None:
        engine = sa_async.create_async_engine(db.sa_async_url)
        try:
            async with sa_async.AsyncSession(engine) as session:
                session.add(Order(id=k))
                await outbox.submit_async(effect(k), conn=session)
                await journal.append_async(f"orders/{k}", "order.placed", {"id": k}, conn=session)
                task_id.append(await tasks.submit_async("emails.send", {"id": k}, conn=session))
                await (session.commit() if commit else session.rollback())
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert own_row(db, k) is commit and stored(db, k) is commit
    assert bool(journal.read(stream=f"orders/{k}")) is commit
    assert (tasks.get(task_id[0]) is not None) is commit


def test_an_async_connection_to_another_database_is_refused(db: DB) -> None:
    other = open_store(db.other_url)
    other.close()
    url = db.other_url.replace("postgresql://", "postgresql+psycopg://").replace("sqlite://", "sqlite+aiosqlite://")
    k = key()

    async def main() -> None:
        engine = sa_async.create_async_engine(url)
        try:
            async with sa_async.AsyncSession(engine) as session:
                with pytest.raises(ConfigError, match="pass a connection to the store's database"):
                    await Outbox(db.store, connectors=["bank"]).submit_async(effect(k), conn=session)
                await session.commit()
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert not stored(db, k)


def test_the_database_of_an_async_connection_is_asked_once_and_still_refused_after(db: DB) -> None:
    if db.kind != "sqlite":
        pytest.skip("PostgreSQL's address comes from libpq, without a statement")
    aiosqlite = pytest.importorskip("aiosqlite")
    other = open_store(db.other_url)
    other.close()
    asked: list[str] = []

    async def main() -> None:
        async with aiosqlite.connect(db.store.path) as mine:  # type: ignore[attr-defined]
            await mine.set_trace_callback(lambda sql: asked.append(sql) if "database_list" in sql else None)
            outbox = Outbox(db.store, connectors=["bank"])
            await mine.execute("BEGIN")
            for k in ("first", "second", "third"):
                await outbox.submit_async(effect(k), conn=mine)
            await mine.commit()
        async with aiosqlite.connect(other.path) as theirs:  # type: ignore[attr-defined]
            await theirs.execute("BEGIN")
            for _ in range(2):  # the verdict is remembered, never the connection's admission
                with pytest.raises(ConfigError, match="pass a connection to the store's database"):
                    await Outbox(db.store, connectors=["bank"]).submit_async(effect("nope"), conn=theirs)
            await theirs.rollback()

    asyncio.run(main())
    assert len(asked) == 1
    assert all(stored(db, k) for k in ("first", "second", "third")) and not stored(db, "nope")


# -- Django -------------------------------------------------------------------------------------------------------


_django_models: dict[str, Any] = {}


def _django(tmp_path_factory: Any) -> Any:
    django = pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        default = tmp_path_factory.mktemp("django") / "default.db"
        settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(default)}},
                           INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
    if "order" not in _django_models:
        from django.db import models

        class DjangoOrder(models.Model):
            id = models.CharField(primary_key=True, max_length=64)

            class Meta:
                app_label = "errands_tests"
                db_table = "django_orders"

        _django_models["order"] = DjangoOrder
    return _django_models["order"]


def _django_alias(db: DB) -> str:
    """A Django database alias for ``db``, added to the connection handler at run time."""
    from django.db import connections

    alias = f"db_{uuid.uuid4().hex[:8]}"
    if db.kind == "sqlite":
        cfg = {"ENGINE": "django.db.backends.sqlite3", "NAME": db.store.path}  # type: ignore[attr-defined]
    else:
        from urllib.parse import urlsplit

        parts = urlsplit(db.url)
        cfg = {"ENGINE": "django.db.backends.postgresql", "NAME": parts.path.lstrip("/"), "USER": parts.username,
               "HOST": parts.hostname, "PORT": str(parts.port)}
    connections.settings[alias] = connections.configure_settings({"default": {}, alias: cfg})[alias]
    return alias


class _Rollback(Exception):
    pass


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_django_connection_inside_atomic(db: DB, commit: bool, tmp_path_factory: Any) -> None:
    DjangoOrder = _django(tmp_path_factory)
    from django.db import connections, transaction

    alias = _django_alias(db)
    conn = connections[alias]
    with conn.schema_editor() as editor:
        editor.create_model(DjangoOrder)
    outbox, k = Outbox(db.store, connectors=["bank"]), key()
    try:
        with transaction.atomic(using=alias):
            DjangoOrder.objects.using(alias).create(id=k)
            outbox.submit(effect(k), conn=conn)
            if not commit:
                raise _Rollback
    except _Rollback:
        pass
    assert DjangoOrder.objects.using(alias).filter(id=k).exists() is commit
    conn.close()
    assert stored(db, k) is commit


def test_django_default_connection_and_atomic_required(tmp_path_factory: Any) -> None:
    DjangoOrder = _django(tmp_path_factory)
    from django.db import connection, transaction

    with connection.schema_editor() as editor:
        editor.create_model(DjangoOrder)
    store = open_store(f"sqlite:///{connection.settings_dict['NAME']}")
    outbox, k = Outbox(store, connectors=["bank"]), key()
    try:
        with pytest.raises(ConfigError, match=r"transaction\.atomic"):
            outbox.submit(effect(k), conn=connection)
        with transaction.atomic():
            DjangoOrder.objects.create(id=k)
            outbox.submit(effect(k), conn=connection)  # the module-level proxy, django.db.connection
        assert DjangoOrder.objects.filter(id=k).exists()
        assert outbox.get(k).key == k
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(DjangoOrder)
        connection.close()
        store.close()
