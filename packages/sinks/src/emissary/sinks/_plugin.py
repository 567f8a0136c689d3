"""The ``sinks`` plugin: what emissary-sinks registers with emissary-core."""

from __future__ import annotations

from emissary.core import hookimpl


@hookimpl
def emissary_register_connectors() -> list[type]:
    from ._log_connector import LogConnector

    return [LogConnector]


@hookimpl
def emissary_register_sinks() -> list[type]:
    from ._log_sink import LogSink
    from ._webhook import WebhookSink

    return [LogSink, WebhookSink]
