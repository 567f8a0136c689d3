"""The ``sinks`` plugin: what errands-sinks registers with errands-core."""

from __future__ import annotations

from errands.core import Connector, Sink, hookimpl


@hookimpl
def errands_register_connectors() -> list[type[Connector]]:
    from ._log_connector import LogConnector

    return [LogConnector]


@hookimpl
def errands_register_sinks() -> list[type[Sink]]:
    from ._log_sink import LogSink
    from ._webhook import WebhookSink

    return [LogSink, WebhookSink]
