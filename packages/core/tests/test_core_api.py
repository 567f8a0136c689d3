"""The public surface of ``errands.core``: names outside code relies on (DESIGN §2, §11)."""

from __future__ import annotations

import importlib
import inspect

import errands.core
import errands.core.errors
import pytest

# Sorted. A name added to errands.core.__all__ is added here in the same change; a name removed
# from here is a breaking change.
EXPECTED_ALL = [
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


def test_all_is_pinned() -> None:
    assert errands.core.__all__ == EXPECTED_ALL


def test_all_is_sorted_and_unique() -> None:
    assert EXPECTED_ALL == sorted(set(EXPECTED_ALL))
    assert errands.core.__all__ == sorted(set(errands.core.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_name_resolves(name: str) -> None:
    assert getattr(errands.core, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from errands.core import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


def test_errors_module_exports_the_tree() -> None:
    errors = errands.core.errors
    classes = sorted(n for n, o in vars(errors).items() if inspect.isclass(o) and issubclass(o, Exception)
                     and o.__module__ == errors.__name__)
    assert errors.__all__ == classes
    for name in classes:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ErrandsError)
        assert getattr(errands.core, name) is cls, f"{name} is not re-exported from errands.core"
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree in the errors docstring"


def test_missing_dependency_error_is_an_import_error() -> None:
    err = errands.core.MissingDependencyError("psycopg", "postgres")
    assert isinstance(err, ImportError)
    assert "pip install 'errands[postgres]'" in str(err)


def test_version_matches_about() -> None:
    about = importlib.import_module("errands.core.__about__")
    assert errands.core.__version__ == about.__version__
    assert all(part.isdigit() for part in about.__version__.split(".")[:2])


def test_design_signatures() -> None:
    from errands.core import DispatchOutcome, DispatchResult, Effect, Observation, ObservationOutcome, Semantics

    effect = Effect(key="order-42", connector="bank.wire", payload={"amount": 1})
    assert effect.tool == "" and effect.semantics is Semantics.IDEMPOTENT and effect.human_gate is False
    result = DispatchResult(outcome=DispatchOutcome.CONFIRMED, response={"ok": True}, external_ref="x",
                            error=None, retry_after=None)
    assert result.outcome == "CONFIRMED"
    assert Observation(outcome=ObservationOutcome.ABSENT, response=None, external_ref=None).outcome == "ABSENT"


def test_outbox_signatures() -> None:
    from errands.core import EffectStatus, Outbox, open_store
    from errands.core.testing import ChaosConnector, ConnectorContract, FakeConnector

    assert ConnectorContract is not None and ChaosConnector is not None
    outbox = Outbox(open_store("memory://"), connectors={"bank.wire": FakeConnector()})
    rec = outbox.submit(errands.core.Effect(key="order-42", connector="bank.wire", payload={"a": 1}), conn=None)
    assert rec.status is EffectStatus.PENDING
    assert [o.status for o in outbox.dispatch_once()] == [EffectStatus.CONFIRMED]
    assert outbox.reconcile_once() == [] and outbox.compensate_once() == []
    rec = outbox.get("order-42")
    assert (rec.status, rec.attempts, rec.external_ref) == (EffectStatus.CONFIRMED, 1, "fake-order-42")
    assert rec.response == {"received": "order-42"}
    for name in ("submit_many", "run_inline", "approve", "reject", "redrive", "register_compensation",
                 "compensate_run", "compensator", "list", "stats"):
        assert callable(getattr(outbox, name)), name


def test_design_signatures_of_fanout_reactions_and_tasks() -> None:
    from errands.core import FanOut, Journal, Reactor, Route, TaskEngine, open_store
    from errands.core.testing import InMemorySink

    store = open_store("memory://")
    journal = Journal(store)
    event = journal.append("orders/42", "order.placed", {"total": 1}, subject="order.placed")
    fanout = FanOut(store, routes=[Route(name="audit", sink=InMemorySink(), subjects=["order.**"])])
    assert fanout.run_once() == 1
    assert fanout.dead("audit") == [] and fanout.redrive("audit") == 0
    reactor = Reactor(store)
    reactor.on("order.*", lambda e: None, max_concurrency=1, rate_limit_per_s=None, debounce_ms=0, retry_max=5,
               dlq_after=5)
    engine = TaskEngine(store, handlers={"t": lambda p: p})
    task_id = engine.submit("t", {"a": 1}, id=None)
    assert engine.get(task_id) is not None and engine.recent(10) and engine.remove(task_id)
    assert event.to_cloudevent()["specversion"] == "1.0"
    for part in (fanout, reactor, engine):
        part.close()
    store.close()
