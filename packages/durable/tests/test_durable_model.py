"""Model-based test of the durable engine: random starts (queued or run inline), worker rounds on two runners, callbacks completed
and failed (from outside and from inside a running step), terminations, clock jumps, restarts, workers that
die mid-step and injected store faults, checked against a small model.

Invariants, after every step:
- an execution ends SUCCEEDED or FAILED only by user code: FAILED carries the user's step error or the
  caller's callback failure, never a store error or an interruption;
- a SUCCEEDED execution returns what its steps returned last (nothing ran after its checkpoint) and what
  its callbacks were answered (or ``timeout`` when none was);
- an at-most-once step never runs one attempt twice, and no step runs while it still runs elsewhere
  (a second worker polls while steps run, with the clock moved on but within the lease);
- a finished execution never changes (status, result, error, checkpoints), and a settled callback neither;
- an execution ends TIMED_OUT only when started with a timeout, never before its deadline; a SUCCEEDED one's
  last ``set_event`` is what ``get_event`` reads; ``patched`` is True on every fresh history;
and at the end, with faults paused, open callbacks answered and time moved on: every execution finishes
and the work queue is empty (nothing stuck, every lease completed or lapsed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errands.core import FakeClock, is_infrastructure_error
from errands.core.testing import faults
from errands.durable import (
    CallbackTimeoutError,
    DurableContext,
    DurableRunner,
    Duration,
    ExecutionStatus,
    JitterStrategy,
    RetryStrategyConfig,
    StepConfig,
    StepInterruptedError,
    StepSemantics,
    WaitForCallbackConfig,
    create_retry_strategy,
)
from errands.durable._schema import DEADLINES, QUEUE
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

LEASE_FOR = 10.0
#: User failures are final; an interrupted at-most-once attempt is retried (up to far more attempts than
#: an example can interrupt).
INTERRUPTIBLE = create_retry_strategy(RetryStrategyConfig(
    max_attempts=60, initial_delay=Duration(), jitter_strategy=JitterStrategy.NONE,
    retryable_error_types=[StepInterruptedError]))
SPECS = st.sampled_from(["alo", "alo", "amo", "amo", "fail", "wait", "cb", "event", "patch"])


class ModelFaultPlan(faults.FaultPlan):
    """Faults for the statements the model's own steps cause. The heartbeat's renewals run on wall-clock
    timers; letting them draw faults would make an example depend on how fast the machine is."""

    def decide(self, sql: str) -> faults.Fault | None:
        if threading.current_thread().name.startswith("errands-heartbeat"):
            return None
        return super().decide(sql)


class UserError(Exception):
    """A step's own failure: the only kind of step failure an execution may end FAILED with."""


class Crash(BaseException):
    """The worker process dies here, in the middle of a step."""


@dataclass
class Execution:
    id: str
    specs: list[str]
    wait: float
    timeout: float
    callbacks: dict[int, str] = field(default_factory=dict)  # step index -> callback id
    terminated: bool = False
    deadline: float | None = None  # the store clock's time of its start(timeout=...) deadline


class DurableModel(RuleBasedStateMachine):
    executions = Bundle("executions")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="errands-durable-model-"))
        self.url = f"sqlite:///{self.dir / 'durable.db'}?synchronous=OFF&busy_timeout=2000"
        self.clock = FakeClock()
        self.plan: faults.FaultPlan = ModelFaultPlan(rate=0.0)
        self.injections: list[Any] = []
        self.runners: list[DurableRunner] = []
        self.model: dict[str, Execution] = {}
        self.runs: dict[tuple[str, int], list[tuple[int, str]]] = {}  # (execution, step) -> [(attempt, value)]
        self.amo_attempts: set[tuple[str, int, int]] = set()
        self.active: set[tuple[str, int]] = set()
        self.violations: list[str] = []
        self.hook: Callable[[], None] | None = None
        self.nested = False
        self.won: dict[str, tuple[bool, str]] = {}  # callback id -> (completed?, value) of the settle that won
        self.callback_owner: dict[str, tuple[str, int]] = {}
        self.callback_ids: list[str] = []  # in creation order (the ids themselves are random)
        self.finished: dict[str, Any] = {}
        self.settles = 0
        self.crashes = 0

    # -- the durable function ------------------------------------------------------------------------
    def flow(self, event: Any, ctx: DurableContext) -> list[Any]:
        eid = ctx.execution_id
        out: list[Any] = []
        for i, spec in enumerate(event["specs"]):
            if spec == "wait":
                ctx.wait(f"w{i}", event["wait"])
            elif spec == "event":
                ctx.set_event("last", i)
            elif spec == "patch":
                if not ctx.patched(f"p{i}"):
                    self.violations.append(f"patched p{i} of {eid} was False on code that always had it")
            elif spec == "cb":
                def submit(callback_id: str, _step: Any, i: int = i) -> None:
                    if callback_id not in self.callback_owner:
                        self.callback_ids.append(callback_id)
                    self.callback_owner[callback_id] = (eid, i)

                try:
                    out.append(ctx.wait_for_callback(f"cb{i}", submit,
                                                     WaitForCallbackConfig(timeout_seconds=event["timeout"])))
                except CallbackTimeoutError:
                    out.append("timeout")
            else:
                semantics = (StepSemantics.AT_MOST_ONCE_PER_RETRY if spec == "amo"
                             else StepSemantics.AT_LEAST_ONCE_PER_RETRY)
                out.append(ctx.step(f"s{i}", self.body(eid, i, spec),
                                    StepConfig(step_semantics=semantics, retry_strategy=INTERRUPTIBLE)))
        return out

    def body(self, eid: str, i: int, spec: str) -> Callable[[Any], str]:
        def run(step: Any) -> str:
            key = (eid, i)
            if key in self.active:
                self.violations.append(f"step {i} of {eid} ran while it still ran")
            if spec == "amo":
                if (eid, i, step.attempt) in self.amo_attempts:
                    self.violations.append(f"at-most-once step {i} of {eid} ran attempt {step.attempt} twice")
                self.amo_attempts.add((eid, i, step.attempt))
            history = self.runs.setdefault(key, [])
            value = f"{i}:{len(history) + 1}"
            history.append((step.attempt, value))
            self.active.add(key)
            try:
                hook, self.hook = (None, None) if self.nested else (self.hook, None)
                if hook is not None:
                    hook()
            finally:
                self.active.discard(key)
            if spec == "fail":
                raise UserError(f"user failure {eid} s{i}")
            return value

        return run

    # -- plumbing ------------------------------------------------------------------------------------
    def open_runners(self) -> None:
        for _ in range(2):
            runner = DurableRunner(self.url, clock=self.clock, functions={"flow": self.flow}, lease_for=LEASE_FOR)
            injection = faults.inject(runner.store, self.plan)
            injection.__enter__()
            self.injections.append(injection)
            self.runners.append(runner)

    def close_runners(self) -> None:
        for injection in self.injections:
            injection.__exit__(None, None, None)
        for runner in self.runners:
            runner.close()
        self.injections, self.runners = [], []

    def retrying(self, call: Callable[[], Any]) -> tuple[Any, bool]:
        """Call once under faults; after an infrastructure error, once more without. Returns the result and
        whether a fault struck the first call."""
        try:
            return call(), False
        except Exception as exc:
            assert is_infrastructure_error(exc), f"{type(exc).__name__}: {exc}"
        with self.plan.paused():
            return call(), True

    def info(self, eid: str) -> Any:
        with self.plan.paused():
            return self.runners[0].get(eid)

    # -- rules ---------------------------------------------------------------------------------------
    @initialize(rate=st.sampled_from([0.0, 0.03, 0.1, 0.25]), seed=st.integers(0, 2**16))
    def setup(self, rate: float, seed: int) -> None:
        self.plan = ModelFaultPlan(seed=seed, rate=rate, kinds=faults.KINDS, when=faults.WHEN)
        self.open_runners()

    @rule(target=executions, specs=st.lists(SPECS, min_size=1, max_size=4), wait=st.sampled_from([0.0, 1.0, 30.0]),
          timeout=st.sampled_from([0.0, 20.0]), inline=st.booleans(),
          deadline=st.sampled_from([None, None, 5.0, 45.0]))
    def start(self, specs: list[str], wait: float, timeout: float, inline: bool, deadline: float | None) -> str:
        eid = f"e{len(self.model)}"
        self.model[eid] = Execution(eid, specs, wait, timeout,
                                    deadline=None if deadline is None else self.clock.now() + deadline)
        event = {"specs": specs, "wait": wait, "timeout": timeout}
        if inline:  # the first invocation runs in the caller's thread
            try:
                self.retrying(lambda: self.runners[0].run("flow", event, execution_id=eid, timeout=deadline))
            except Crash:
                self.crashes += 1
                self.close_runners()
                self.open_runners()
        else:
            self.retrying(lambda: self.runners[0].start("flow", event, execution_id=eid, timeout=deadline))
        return eid

    @rule(worker=st.sampled_from([0, 1]))
    def work(self, worker: int) -> None:
        try:
            self.runners[worker].work_once()
        except Crash:
            self.crashes += 1
            self.close_runners()  # the process died: leases stay held until they lapse
            self.open_runners()

    @rule(seconds=st.sampled_from([0.5, 2.0, LEASE_FOR + 1, 60.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def restart(self) -> None:
        self.close_runners()
        self.open_runners()

    @rule()
    def crash_in_next_step(self) -> None:
        def crash() -> None:
            raise Crash

        self.hook = crash

    @rule(fraction=st.sampled_from([0.2, 0.9]))
    def long_next_step(self, fraction: float) -> None:
        def long() -> None:
            self.clock.advance(LEASE_FOR * fraction)  # within the lease: nobody may take the step over
            self.nested = True
            try:
                self.runners[1].work_once()
            finally:
                self.nested = False

        self.hook = long

    @rule(complete=st.booleans(), data=st.data())
    def settle_in_next_step(self, complete: bool, data: st.DataObject) -> None:
        if self.callback_ids:
            cid = data.draw(st.sampled_from(self.callback_ids))
            self.hook = lambda: self.settle_one(cid, complete)

    @precondition(lambda self: bool(self.callback_owner))
    @rule(complete=st.booleans(), data=st.data())
    def settle(self, complete: bool, data: st.DataObject) -> None:
        self.settle_one(data.draw(st.sampled_from(self.callback_ids)), complete)

    def settle_one(self, cid: str, complete: bool) -> None:
        self.settles += 1
        value = f"answer-{self.settles}"
        runner = self.runners[0]
        call = (lambda: runner.complete_callback(cid, value)) if complete else (
            lambda: runner.fail_callback(cid, value))
        settled, struck = self.retrying(call)
        if not settled and struck and cid not in self.won:
            settled = self.stored_settle(cid) == (complete, value)  # the struck call had committed
        if settled:
            assert cid not in self.won, f"callback {cid} settled twice"
            self.won[cid] = (complete, value)

    def stored_settle(self, cid: str) -> tuple[bool, str] | None:
        eid, _ = self.callback_owner[cid]
        with self.plan.paused():
            op = next(o for o in self.runners[0].history(eid) if o.callback_id == cid)
        if op.status.value == "SUCCEEDED":
            return True, json.loads(op.result) if op.result else None  # type: ignore[return-value]
        if op.status.value == "FAILED" and op.error is not None and op.error.type == "CallbackError":
            return False, op.error.message or ""
        return None

    @rule(eid=executions)
    def terminate(self, eid: str) -> None:
        before = self.info(eid).status
        self.retrying(lambda: self.runners[0].terminate(eid, "operator"))
        if not before.terminal:
            self.model[eid].terminated = True

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def nothing_broke_a_promise(self) -> None:
        assert not self.violations, self.violations
        if not self.runners:
            return
        with self.plan.paused():
            for eid, ex in self.model.items():
                info = self.runners[0].get(eid)
                if info.status.terminal:
                    self.check_finished(ex, info)

    def check_finished(self, ex: Execution, info: Any) -> None:
        ops = [(o.id, o.status, o.result, o.error) for o in self.runners[0].history(ex.id)]
        snapshot = (info.status, info.result_text, info.error, ops)
        before = self.finished.setdefault(ex.id, snapshot)
        assert before == snapshot, f"finished execution {ex.id} changed: {before} -> {snapshot}"
        if info.status is ExecutionStatus.TERMINATED:
            assert ex.terminated, f"{ex.id} TERMINATED without an operator"
            return
        if info.status is ExecutionStatus.TIMED_OUT:
            assert ex.deadline is not None, f"{ex.id} TIMED_OUT without a timeout"
            assert info.ended_at >= ex.deadline, f"{ex.id} TIMED_OUT at {info.ended_at}, before {ex.deadline}"
            assert info.error is not None and info.error.type == "ExecutionTimedOut", (ex.id, info.error)
            return
        expected: list[Any] = []
        failure: tuple[str, str] | None = None
        for i, spec in enumerate(ex.specs):
            if spec in ("wait", "event", "patch"):
                continue
            if spec == "fail":
                failure = ("UserError", f"user failure {ex.id} s{i}")
                break
            if spec == "cb":
                cid = next((c for c, owner in self.callback_owner.items() if owner == (ex.id, i)), None)
                won = self.won.get(cid) if cid is not None else None
                if won is not None and not won[0]:
                    failure = ("CallbackError", won[1])
                    break
                expected.append(won[1] if won is not None else "timeout")
                continue
            history = self.runs.get((ex.id, i))
            assert history, f"{ex.id} finished but step {i} never ran"
            expected.append(history[-1][1])
        if failure is not None:
            assert info.status is ExecutionStatus.FAILED, (ex.id, info.status, info.result, failure)
            assert info.error is not None and (info.error.type, info.error.message) == failure, (ex.id, info.error)
        else:
            assert info.status is ExecutionStatus.SUCCEEDED, (ex.id, info.status, info.error)
            assert info.result == expected, (ex.id, info.result, expected)
            last = max((i for i, spec in enumerate(ex.specs) if spec == "event"), default=None)
            assert self.runners[0].get_event(ex.id, "last", timeout=0) == last, (ex.id, last)

    def teardown(self) -> None:
        n = len(self.plan.injected)
        event(f"faults injected: {'0' if not n else '1-9' if n < 10 else '10+'}")
        event(f"workers crashed mid-step: {min(self.crashes, 3)}{'+' if self.crashes > 3 else ''}")
        try:
            if self.runners:
                self.finish_everything()
        finally:
            self.close_runners()
            shutil.rmtree(self.dir, ignore_errors=True)

    def finish_everything(self) -> None:
        self.hook = None
        with self.plan.paused():
            for _ in range(200):
                for cid in list(self.callback_ids):
                    if cid not in self.won and self.stored_settle(cid) is None:
                        self.settle_one(cid, True)
                self.runners[0].drain()
                if all(self.runners[0].get(eid).status.terminal for eid in self.model):
                    break
                self.clock.advance(LEASE_FOR + 1)
            stuck = {eid: self.runners[0].get(eid).status for eid in self.model
                     if not self.runners[0].get(eid).status.terminal}
            assert not stuck, f"executions never finished: {stuck}"
            assert self.runners[0].store.queue_size(QUEUE) == 0, "work left in the queue"
            self.clock.advance(60)  # past every deadline: each is claimed and changes no finished execution
            self.runners[0].drain()
            assert self.runners[0].store.queue_size(DEADLINES) == 0, "deadlines left in the queue"
            timed_out = sum(self.runners[0].get(eid).status is ExecutionStatus.TIMED_OUT for eid in self.model)
            event(f"executions timed out: {min(timed_out, 2)}{'+' if timed_out > 2 else ''}")
        self.nothing_broke_a_promise()


DurableModel.TestCase.settings = faults.model_settings()
test_durable_model = DurableModel.TestCase
