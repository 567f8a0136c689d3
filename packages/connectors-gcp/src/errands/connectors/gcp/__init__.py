"""errands-connectors-gcp: errands on Google Cloud.

- ``PubSubConnector`` / ``PubSubSink`` (extra ``pubsub``): effects and journal events published to Pub/Sub.
- ``CloudTasksConnector`` / ``CloudTasksScheduler`` (extra ``tasks``): effects and timers as Cloud Tasks
  HTTP tasks.
- ``SpannerOperationStore`` (extra ``spanner``): lro's operation store on the alis Spanner table.

Importing never needs an extra; using a part whose extra is missing raises ``MissingDependencyError``.
"""

from __future__ import annotations

from .__about__ import __version__
from ._pubsub import PubSubConnector, PubSubSink
from ._spanner_table import SpannerOperationStore, SpannerStore, operations_ddl, operations_descriptor_set
from ._tasks import CloudTasksConnector, CloudTasksScheduler, task_id_for

__all__ = [
    "CloudTasksConnector",
    "CloudTasksScheduler",
    "PubSubConnector",
    "PubSubSink",
    "SpannerOperationStore",
    "SpannerStore",
    "__version__",
    "operations_ddl",
    "operations_descriptor_set",
    "task_id_for",
]
