"""The ``http`` plugin: what errands-connectors-http registers with errands-core."""

from __future__ import annotations

from errands.core import Connector, hookimpl


@hookimpl
def errands_register_connectors() -> list[type[Connector]]:
    """The ``http`` and ``http-async`` connector types (``type = "http"`` in ``errands.toml``)."""
    from ._connector import AsyncHttpConnector, HttpConnector

    return [HttpConnector, AsyncHttpConnector]


@hookimpl
def errands_register_demos() -> list[type]:
    """The ``http connector`` part of ``errands demo``."""
    from ._demo import HttpDemo

    return [HttpDemo]
