"""The ``http`` plugin: what emissary-connectors-http registers with emissary-core."""

from __future__ import annotations

from emissary.core import hookimpl


@hookimpl
def emissary_register_connectors() -> list[type]:
    """The ``http`` and ``http-async`` connector types (``type = "http"`` in ``emissary.toml``)."""
    from ._connector import AsyncHttpConnector, HttpConnector

    return [HttpConnector, AsyncHttpConnector]


@hookimpl
def emissary_register_demos() -> list[type]:
    """The ``http connector`` part of ``emissary demo``."""
    from ._demo import HttpDemo

    return [HttpDemo]
