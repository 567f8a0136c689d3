"""errands-core: effects, obligations, connectors, sinks, the store and the engines.

Example:
    >>> from errands.core import Journal, open_store
    >>> store = open_store("memory://")
    >>> Journal(store).append("orders/1", "order.placed", {"total": 5}).id
    'orders/1/1'
"""

from __future__ import annotations

import sys

from .__about__ import __version__
from ._app import App
from ._clock import Clock, FakeClock, SystemClock
from ._fanout import DeadEvent, FanOut, Route, RouteState, RouteStatus
from ._hookspecs import hookimpl, hookspec
from ._journal import DueTimer, Journal, StoreScheduler
from ._leases import DEFAULT_LEASE_FOR, Beat, heartbeat, is_infrastructure_error
from ._plugins import (
    ErrandsConfig,
    PluginInfo,
    Registry,
    get_registry,
    load_config,
    register_connector,
    register_sink,
    reset_registry,
)
from ._protocols import (
    CompensatingConnector,
    Connector,
    ObservingConnector,
    Scheduler,
    Sink,
    capabilities_of,
)
from ._reactor import Reaction, Reactor
from ._retry_after import MAX_RETRY_AFTER, clamp_retry_after, parse_retry_after
from ._tasks import ScheduleRecord, TaskContext, TaskEngine, TaskRecord, TaskStatus, typed_handler
from ._values import (
    CompensationOutcome,
    CompensationResult,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    Event,
    Lease,
    Obligation,
    Observation,
    ObservationOutcome,
    Semantics,
)
from ._worker import Worker
from .errors import (
    AlreadyExistsError,
    ConfigError,
    DeliveryError,
    EffectConflictError,
    ErrandsError,
    InfrastructureError,
    InvalidTaskIdError,
    LeaseLostError,
    MissingDependencyError,
    NotFoundError,
    PayloadError,
    PermanentError,
    PluginError,
    TransientError,
)
from .outbox import (
    EffectOutcome,
    EffectRecord,
    ObligationOutcome,
    ObligationRecord,
    ObligationStatus,
    Outbox,
)
from .store._sql import Migration, Tx
from .store._stores import MemoryStore, NewEvent, PostgresStore, SQLiteStore, SQLStore, open_store

__all__ = [
    "AlreadyExistsError",
    "App",
    "Beat",
    "Clock",
    "CompensatingConnector",
    "CompensationOutcome",
    "CompensationResult",
    "ConfigError",
    "Connector",
    "ConnectorCapabilities",
    "DEFAULT_LEASE_FOR",
    "DeadEvent",
    "DeliveryError",
    "DispatchOutcome",
    "DispatchResult",
    "DueTimer",
    "Effect",
    "EffectConflictError",
    "EffectOutcome",
    "EffectRecord",
    "EffectStatus",
    "ErrandsConfig",
    "ErrandsError",
    "Event",
    "FakeClock",
    "FanOut",
    "InfrastructureError",
    "InvalidTaskIdError",
    "Journal",
    "Lease",
    "LeaseLostError",
    "MAX_RETRY_AFTER",
    "MemoryStore",
    "Migration",
    "MissingDependencyError",
    "NewEvent",
    "NotFoundError",
    "Obligation",
    "ObligationOutcome",
    "ObligationRecord",
    "ObligationStatus",
    "Observation",
    "ObservationOutcome",
    "ObservingConnector",
    "Outbox",
    "PayloadError",
    "PermanentError",
    "PluginError",
    "PluginInfo",
    "PostgresStore",
    "Reaction",
    "Reactor",
    "Registry",
    "Route",
    "RouteState",
    "RouteStatus",
    "SQLStore",
    "SQLiteStore",
    "ScheduleRecord",
    "Scheduler",
    "Semantics",
    "Sink",
    "StoreScheduler",
    "SystemClock",
    "TaskContext",
    "TaskEngine",
    "TaskRecord",
    "TaskStatus",
    "TransientError",
    "Tx",
    "Worker",
    "__version__",
    "capabilities_of",
    "clamp_retry_after",
    "get_registry",
    "heartbeat",
    "hookimpl",
    "hookspec",
    "is_infrastructure_error",
    "load_config",
    "open_store",
    "parse_retry_after",
    "register_connector",
    "register_sink",
    "reset_registry",
    "typed_handler",
]

# ``errands`` is a PEP 420 namespace (no distribution ships its ``__init__``), so ``errands.App`` is set
# here: importing any errands package (each imports errands.core) makes it available.
setattr(sys.modules[__name__.rpartition(".")[0]], "App", App)  # noqa: B010 - a namespace module has no declared attributes
