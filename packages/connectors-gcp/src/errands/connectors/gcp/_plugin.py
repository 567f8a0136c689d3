"""The ``gcp`` plugin: the connector, sink, scheduler and store classes errands-connectors-gcp registers."""

from __future__ import annotations

from errands.core import Connector, Scheduler, Sink, hookimpl

from ._pubsub import PubSubConnector, PubSubSink
from ._spanner_table import SpannerStore
from ._tasks import CloudTasksConnector, CloudTasksScheduler


@hookimpl
def errands_register_connectors() -> list[type[Connector]]:
    return [CloudTasksConnector, PubSubConnector]


@hookimpl
def errands_register_sinks() -> list[type[Sink]]:
    return [PubSubSink]


@hookimpl
def errands_register_schedulers() -> list[type[Scheduler]]:
    return [CloudTasksScheduler]


@hookimpl
def errands_register_stores() -> list[type]:
    return [SpannerStore]
