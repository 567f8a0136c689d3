"""The shop's settings, read from the environment once.

| variable | default | meaning |
|---|---|---|
| ``SHOP_DATABASE_URL`` | ``sqlite+aiosqlite:///shop.db`` | the SQLAlchemy async URL; ``postgresql+psycopg://...`` for PostgreSQL |
| ``SHOP_PROVIDER_URL`` | ``http://127.0.0.1:8001`` | the payment provider (``uvicorn shop.provider:app``) |
| ``SHOP_PUBLIC_URL`` | ``http://127.0.0.1:8000`` | where the shop's own routes are reached: the webhook sink posts here |
| ``SHOP_WEBHOOK_SECRET`` | a development secret | the Standard Webhooks secret shared by the sink and the receiver |
| ``SHOP_LEASE_FOR`` | ``10`` | seconds a worker holds an effect, an execution or a report: how soon a killed worker's work is retried |
| ``SHOP_WORKER_IN_PROCESS`` | ``0`` | ``1``: the API process also runs the worker, on its event loop (no ``errands worker``) |
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

DATABASE_URL = os.environ.get("SHOP_DATABASE_URL", "sqlite+aiosqlite:///shop.db")
PROVIDER_URL = os.environ.get("SHOP_PROVIDER_URL", "http://127.0.0.1:8001").rstrip("/")
PUBLIC_URL = os.environ.get("SHOP_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
WEBHOOK_SECRET = os.environ.get("SHOP_WEBHOOK_SECRET", "whsec_c2hvcC1kZXZlbG9wbWVudC1zZWNyZXQtMzJieXRlcyE=")
LEASE_FOR = float(os.environ.get("SHOP_LEASE_FOR", "10"))
WORKER_IN_PROCESS = os.environ.get("SHOP_WORKER_IN_PROCESS", "0").lower() in ("1", "true", "yes")


def store_url(database_url: str) -> str:
    """The errands store URL of the same database: the SQLAlchemy URL without its driver.

    >>> store_url("sqlite+aiosqlite:////var/shop.db")
    'sqlite:////var/shop.db'
    >>> store_url("postgresql+psycopg://shop@db/shop")
    'postgresql://shop@db/shop'
    """
    parts = urlsplit(database_url)
    scheme, _, driver = parts.scheme.partition("+")
    if driver == "asyncpg":
        # errands joins the session's transaction through the DBAPI connection under it: psycopg or aiosqlite.
        raise ValueError(f"SHOP_DATABASE_URL {database_url.split('@')[-1]!r}: errands joins transactions on "
                         "psycopg connections; use postgresql+psycopg://... (psycopg 3 async)")
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme == "sqlite":
        # urlsplit keeps sqlite:////abs/path's extra slash in the path; put the URL back together by hand.
        return "sqlite://" + database_url.split("://", 1)[1]
    return urlunsplit(parts._replace(scheme=scheme))


def sync_database_url(database_url: str) -> str:
    """A synchronous SQLAlchemy URL of the same database, for code that runs in the worker's threads.

    >>> sync_database_url("sqlite+aiosqlite:///shop.db")
    'sqlite:///shop.db'
    >>> sync_database_url("postgresql+psycopg://shop@db/shop")
    'postgresql+psycopg://shop@db/shop'
    """
    scheme, rest = database_url.split("://", 1)
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        return f"sqlite://{rest}"
    return f"postgresql+psycopg://{rest}"


STORE_URL = store_url(DATABASE_URL)
