"""A model-based test of the lro engine: random operations, callbacks, cancellations, outside completions,
duplicate deliveries, process restarts and clock jumps, interleaved with random store faults (a locked
database, a serialization failure, a dropped connection; before a statement, at commit, or after commit),
checked against a small model.

Invariants: a done operation never changes; no fault marks an operation failed (every error is the
business failure a handler raised, or a requested cancellation); every step of a handler is committed at
most once (the private state's log has no repeats); every completion is journalled once; and at the end,
with faults off and leases lapsed, every operation is done and no callback is left behind (every resume
either ran or was retried).

``ERRANDS_MODEL_EXAMPLES=5000`` runs the long profile.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, TypeVar

from errands.core import (
    AlreadyExistsError,
    InfrastructureError,
    Journal,
    LeaseLostError,
    TransientError,
    is_infrastructure_error,
    StoreScheduler,
    open_store,
)
from errands.core.testing import faults
from errands.lro import Config, LroClient, Operation, OperationDoneError, ResumableHandler, unmarshal_metadata
from errands.lro._tokens import parse_token
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

T = TypeVar("T")

LEASE = 2.0
STEPS = 2  # resumes before a handler completes its operation


def _struct(pb: Any) -> dict[str, Any]:
    out = struct_pb2.Struct()
    pb.Unpack(out)
    return json_format.MessageToDict(out)


def step(op: Operation) -> None:
    state = op.decode_private_state(dict) or {"steps": 0, "log": []}
    n = state["steps"]
    if op.name.endswith("-biz") and n == 1:
        raise ValueError("business rule")
    if n < STEPS:
        op.set_private_state({"steps": n + 1, "log": [*state["log"], n]})
        op.save_metadata({"step": n + 1})
        op.resume_via_tasks("step")
    else:
        op.complete({"steps": n})


class RemoteScheduler:
    """A scheduler that is not the local one, as Cloud Tasks is not: its tasks are core timers fired by
    ``fire_due`` (through ``client.fire``), and creating one fails at random, before or after the task
    exists (a timeout whose task was created all the same)."""

    def __init__(self, inner: StoreScheduler, rng: random.Random, rate: float, plan: faults.FaultPlan) -> None:
        self.inner, self.rng, self.rate, self.plan = inner, rng, rate, plan

    def _fails(self) -> bool:
        return self.rng.random() < self.rate and not self.plan._paused  # no failures while the store's are off

    def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
        if self._fails():
            raise TransientError("Cloud Tasks is unreachable")
        try:
            got = self.inner.schedule(topic, payload, at, key=key)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise TransientError("Cloud Tasks is unreachable") from exc
            raise
        if self._fails():
            raise TransientError("deadline exceeded (the task was created)")
        return got


class LroMachine(RuleBasedStateMachine):
    """Operations resumed by the local scheduler on one store, under injected faults."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = faults.JumpClock()
        self.store = open_store("memory://", clock=self.clock)
        self.plan = faults.FaultPlan()
        self.injecting: Any = None
        self.batch = 1
        self.remote: RemoteScheduler | None = None
        self.client = self._client()
        self.names: list[str] = []
        self.cancelled: set[str] = set()
        self.external: set[str] = set()
        self.finished: dict[str, tuple[bytes, bytes | None]] = {}

    def _client(self) -> LroClient:
        client = LroClient(Config(neuron="model", store=self.store, lease_for=LEASE, retry_delay=0.0,
                                  resume_batch=self.batch, scheduler=self.remote))
        client._schedule_backoff = ()
        client.add_resumable_handlers(ResumableHandler("step", step))
        return client

    def _retrying(self, fn: Callable[[], T]) -> T:
        """A user's call, retried while the store fails (faults off after a while, as a store recovers)."""
        for _ in range(8):
            try:
                return fn()
            except Exception as exc:
                if not (isinstance(exc, (InfrastructureError, TransientError)) or is_infrastructure_error(exc)):
                    raise
        with self.plan.paused():
            for _ in range(3):
                try:
                    return fn()
                except TransientError:  # a stale copy the call itself just reloaded
                    continue
            return fn()

    def teardown(self) -> None:
        if self.injecting is not None:
            self.injecting.__exit__(None, None, None)
        self.client.close()
        self.store.close()

    # -- setup -----------------------------------------------------------------------------------
    @initialize(rate=st.sampled_from([0.0, 0.02, 0.08, 0.2]), seed=st.integers(0, 2**32 - 1),
                batch=st.sampled_from([1, 1, 4]), remote=st.booleans())
    def configure(self, rate: float, seed: int, batch: int, remote: bool) -> None:
        self.plan = faults.FaultPlan(seed=seed, rate=rate, kinds=("locked", "serialization", "dropped"),
                                     when=("before", "commit", "after_commit"))
        self.injecting = faults.inject(self.store, self.plan)
        self.injecting.__enter__()
        self.batch = batch
        if remote:
            inner = StoreScheduler(self.store, lease_for=LEASE, retry_delay=0.0, queue="model.tasks")
            self.remote = RemoteScheduler(inner, random.Random(seed), rate, self.plan)
        self.client = self._client()  # built inside the fault block

    def _fire(self) -> int:
        if self.remote is None:
            return self.client.run_due()
        return self.remote.inner.fire_due({self.client.resume_topic: self.client.fire})

    def _pending(self) -> int:
        return (self.remote.inner if self.remote is not None else self.client.scheduler).pending()

    # -- what users and the world do -------------------------------------------------------------
    @precondition(lambda self: len(self.names) < 6)
    @rule(business=st.booleans())
    def new_operation(self, business: bool) -> None:
        name = f"operations/m{len(self.names)}" + ("-biz" if business else "")

        made: list[Operation] = []

        def create() -> None:
            if not made:
                try:
                    made.append(self.client.new_operation(name, {"step": 0}, private_state={"steps": 0, "log": []}))
                except AlreadyExistsError:  # an earlier attempt committed, but its answer was lost
                    made.append(self.client.get_operation(name))
            op = made[0]
            if op.done or len(made) > 1:
                return  # scheduled already
            try:
                op.resume_via_tasks("step")  # after a failure, the same object retries
                made.append(op)
            except LeaseLostError:
                made[0] = self.client.get_operation(name)  # a stale copy: load it again and retry
                raise TransientError("stale copy") from None

        self._retrying(create)
        self.names.append(name)

    @rule()
    def run_due(self) -> None:
        try:
            self._fire()
        except Exception as exc:
            if self.remote is None or not is_infrastructure_error(exc):
                raise  # run_due copes with a failing store itself; core's fire_due is the caller's to retry

    @rule(seconds=st.sampled_from([0.5, LEASE + 0.5, 30.0]))
    def jump(self, seconds: float) -> None:
        self.clock.jump(seconds)

    @rule()
    def restart(self) -> None:
        # The process dies and starts again on the same store; whatever it held lapses with the clock.
        self.client = self._client()

    @precondition(lambda self: bool(self.names))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.names))
        self.cancelled.add(name)
        self._retrying(lambda: self.client.cancel_operation(name))

    @precondition(lambda self: bool(self.names))
    @rule(data=st.data())
    def complete_from_outside(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.names))

        def finish() -> None:
            op = self.client.get_operation(name)
            if op.done:
                return
            try:
                op.complete({"external": True})
            except OperationDoneError:
                return
            except LeaseLostError as exc:  # a stale copy: load it again and retry
                raise TransientError("stale copy") from exc

        self.external.add(name)
        self._retrying(finish)

    @precondition(lambda self: bool(self.names))
    @rule(data=st.data())
    def deliver_again(self, data: st.DataObject) -> None:
        # A callback delivered again (a duplicate Cloud Task, a replay) with the token the store holds now.
        name = data.draw(st.sampled_from(self.names))
        with self.plan.paused():
            token = parse_token(self.client.store.get(name).resume_token).token
        if token is None:
            return
        try:
            self.client.resume(name, "step", token)
        except Exception as exc:
            if not (isinstance(exc, (InfrastructureError, TransientError)) or is_infrastructure_error(exc)):
                raise

    # -- what must hold --------------------------------------------------------------------------
    def _check(self, name: str, pb: Any, state: dict[str, Any] | None) -> None:
        log = (state or {}).get("log", [])
        assert log == sorted(set(log)) and len(log) <= STEPS, f"{name}: a step was committed twice: {log}"
        if not pb.done:
            return
        if pb.HasField("error"):
            allowed = {(code_pb2.INTERNAL, "business rule")} if name.endswith("-biz") else set()
            if name in self.cancelled:
                allowed.add((code_pb2.CANCELLED, "operation cancelled"))
            assert (pb.error.code, pb.error.message) in allowed, f"{name} failed by a fault: {pb.error}"
        else:
            response = _struct(pb.response)
            allowed_responses = [{"steps": float(STEPS)}] + ([{"external": True}] if name in self.external else [])
            assert response in allowed_responses, f"{name}: unexpected response {response}"
            if response == {"steps": float(STEPS)}:
                assert log == list(range(STEPS)), f"{name}: completed after steps {log}"

    @invariant()
    def operations_are_consistent(self) -> None:
        with self.plan.paused():
            for name in self.names:
                record = self.client.store.get(name)
                op = self.client.get_operation(name)
                pb = op.operation_pb()
                if name in self.finished:
                    assert (record.operation, record.state) == self.finished[name], f"{name} changed after done"
                elif pb.done:
                    self.finished[name] = (record.operation, record.state)
                self._check(name, pb, op.decode_private_state(dict))
            assert self.client.core_store is not None
            events = Journal(self.client.core_store).read(0, limit=1000, subjects=["lro.operation.done"])
            per_op = Counter(e.data["name"] for e in events)
            assert all(v == 1 for v in per_op.values()), f"a completion journalled twice: {per_op}"
            assert set(per_op) == set(self.finished), "every done operation has its event, and only those"

    def drain(self) -> None:
        """Faults off, leases lapse: every resume still owed runs."""
        with self.plan.paused():
            for _ in range(4 * STEPS + 8):
                self.clock.jump(LEASE + 1)
                while self._fire():
                    pass
            for name in self.names:
                pb = self.client.get_operation_pb(name)
                assert pb.done, f"{name} was lost: its resume never ran ({unmarshal_metadata(pb, dict)})"
            assert self._pending() == 0, "callbacks left behind"


class LroModelTest(LroMachine):
    def teardown(self) -> None:
        try:
            self.operations_are_consistent()
            self.drain()
            self.operations_are_consistent()
        finally:
            super().teardown()


LroModelTest.TestCase.settings = faults.model_settings(steps=30)
test_lro_model = LroModelTest.TestCase

