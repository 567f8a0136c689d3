"""Histories recorded before errands named operations as AWS's SDK does still replay, on every runtime.

errands used to leave map iterations and parallel branches unnamed, leave ``wait_for_callback``'s callback
unnamed and call its submitter step ``submitter``, and keep each batch item's result as the item serdes'
text. Now they are ``map-item-<i>``, ``parallel-branch-<i>``, ``<name> create callback id`` and ``<name>
submitter``, and a batch item holds its value. Each test records the first part of an execution the old
way (``record_as_before`` puts the old naming and batch shape back), then lets today's code carry it on
from there to the end, on ``InMemoryClient`` and on ``DurableRunner`` (SQLite, PostgreSQL), with and
without ``always_replay``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import pytest
from errands.core import FakeClock
from errands.durable import (
    DurableExecutionConfig,
    DurableRunner,
    Duration,
    ExecutionStatus,
    InMemoryClient,
    NonDeterministicExecutionError,
    Operation,
    OperationStatus,
    OperationSubType,
    OperationType,
    RetryDecision,
    WaitForCallbackConfig,
    _async_context,
    _context,
    with_durable_execution,
)

_submits: dict[str, int] = {}


def _submit(callback_id: str, _: Any) -> None:
    """Fails its first attempt (retried a second later), then succeeds."""
    _submits["n"] = _submits.get("n", 0) + 1
    if _submits["n"] == 1:
        raise RuntimeError("the mail server is down")


def _retry_once(error: BaseException, attempts: int) -> RetryDecision:
    return RetryDecision.retry(Duration(seconds=1)) if attempts < 2 else RetryDecision.no_retry()


def _napping(label: str) -> Callable[[Any], Any]:
    def branch(c: Any) -> Any:
        c.wait(Duration(seconds=5), name="nap")
        return c.step(lambda _: label, name=f"branch-{label}")

    return branch


def flow(event: Any, ctx: Any) -> Any:
    tens = ctx.map([1, 2, 3], lambda c, item, i, items: c.step(lambda _: item * 10, name="times-ten"), name="tens")
    fan = ctx.parallel([_napping("a"), lambda c: c.step(lambda _: "b", name="branch-b")], name="fan")
    answer = ctx.wait_for_callback(_submit, name="review", config=WaitForCallbackConfig(retry_strategy=_retry_once))
    return {"tens": tens.results(), "fan": fan.results(), "answer": answer}


async def async_flow(event: Any, ctx: Any) -> Any:
    tens = await ctx.map([1, 2, 3], lambda c, item, i, items: c.step(lambda _: item * 10, name="times-ten"),
                         name="tens")
    fan = await ctx.parallel([_napping("a"), lambda c: c.step(lambda _: "b", name="branch-b")], name="fan")
    answer = await ctx.wait_for_callback(_submit, name="review",
                                         config=WaitForCallbackConfig(retry_strategy=_retry_once))
    return {"tens": tens.results(), "fan": fan.results(), "answer": answer}


RESULT = {"tens": [10, 20, 30], "fan": ["a", "b"], "answer": "approved"}


def record_as_before(monkeypatch: pytest.MonkeyPatch,
                     callback_and_submitter: tuple[str | None, str] = (None, "submitter")) -> None:
    """Name and encode as errands did before: unnamed iterations and branches, the callback and submitter
    named ``callback_and_submitter``, batch items holding their text."""
    monkeypatch.setattr(_context, "branch_names", lambda inner, given: list(given))
    for module in (_context, _async_context):
        monkeypatch.setattr(module, "wait_for_callback_names", lambda name: callback_and_submitter)
    monkeypatch.setattr(_context.Batch, "_item_result", lambda self, i, text: text)


def _has(ops: list[Operation], name: str | None, type_: OperationType, *statuses: OperationStatus) -> bool:
    return any(o.name == name and o.type is type_ and (not statuses or o.status in statuses) for o in ops)


#: Where the old way of recording stops: a predicate on the history recorded so far.
CUTS: dict[str, Callable[[list[Operation]], bool]] = {
    # the map done (its batch result as before), a parallel branch waiting, both branches unnamed
    "parallel": lambda ops: _has(ops, "nap", OperationType.WAIT),
    # the callback created unnamed, the submitter step failed once and waits for its retry
    "submitter-retry": lambda ops: _has(ops, "submitter", OperationType.STEP, OperationStatus.PENDING,
                                        OperationStatus.READY),
    # the submitter done: waiting for the callback
    "callback": lambda ops: _has(ops, "submitter", OperationType.STEP, OperationStatus.SUCCEEDED),
}


class Memory:
    """An execution on ``InMemoryClient``, invoked as Lambda would."""

    def __init__(self, fn: Callable[..., Any], always_replay: bool) -> None:
        self.clock = FakeClock()
        self.client = InMemoryClient(clock=self.clock)
        self.wrapped = with_durable_execution(fn, DurableExecutionConfig(client=self.client,
                                                                         always_replay=always_replay))
        self.arn = self.client.start_execution({}).durable_execution_arn
        self.status = "PENDING"
        self.out: Any = None

    def invoke(self) -> None:
        out = self.wrapped(self.client.invocation_input(self.arn))
        self.status, self.out = out.status.value, out
        self.clock.advance(5)

    def history(self) -> list[Operation]:
        return list(self.client.operations(self.arn))

    def complete_callback(self, callback_id: str) -> None:
        assert self.client.complete_callback(callback_id, json.dumps("approved"))

    def result(self) -> Any:
        assert self.status == "SUCCEEDED", self.out
        return json.loads(self.out.result)


class Runner:
    """An execution on ``DurableRunner``, run by its worker."""

    def __init__(self, url: str, fn: Callable[..., Any], always_replay: bool) -> None:
        self.clock = FakeClock()
        self.runner = DurableRunner(url, clock=self.clock, functions={"flow": fn}, always_replay=always_replay)
        self.eid = self.runner.start("flow", {})
        self.status = "PENDING"

    def invoke(self) -> None:
        self.runner.work_once()
        info = self.runner.get(self.eid)
        self.status = "PENDING" if info.status in (ExecutionStatus.RUNNING, ExecutionStatus.PENDING) else (
            info.status.value)
        self.clock.advance(5)

    def history(self) -> list[Operation]:
        return list(self.runner.history(self.eid))

    def complete_callback(self, callback_id: str) -> None:
        assert self.runner.complete_callback(callback_id, "approved")

    def result(self) -> Any:
        info = self.runner.get(self.eid)
        assert info.status is ExecutionStatus.SUCCEEDED, info
        return info.result


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def runtime(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Callable[[Callable[..., Any], bool], Any]]:
    made: list[Runner] = []

    def make(fn: Callable[..., Any], always_replay: bool) -> Any:
        if request.param == "memory":
            return Memory(fn, always_replay)
        url = (f"sqlite:///{tmp_path / 'durable.db'}" if request.param == "sqlite"
               else request.getfixturevalue("postgres_url"))
        made.append(Runner(url, fn, always_replay))
        return made[-1]

    yield make
    for r in made:
        r.runner.close()


def _drive(execution: Any, until: Callable[[list[Operation]], bool], rounds: int = 60) -> None:
    for _ in range(rounds):
        if until(execution.history()):
            return
        assert execution.status == "PENDING", execution.history()
        execution.invoke()
    raise AssertionError(f"never reached the cut: {execution.history()}")


def _finish(execution: Any) -> None:
    """Invoke until the execution ends, completing the callback once its submitter step has run."""
    completed = False
    for _ in range(60):
        if execution.status != "PENDING":
            return
        ops = execution.history()
        callback = next((o for o in ops if o.type is OperationType.CALLBACK and o.status is OperationStatus.STARTED),
                        None)
        if not completed and callback is not None and any(
                o.type is OperationType.STEP and o.parent_id == callback.parent_id
                and o.status is OperationStatus.SUCCEEDED for o in ops):
            assert callback.callback_id is not None
            execution.complete_callback(callback.callback_id)
            completed = True
        execution.invoke()
    raise AssertionError(f"the execution did not finish: {execution.history()}")


@pytest.mark.parametrize("always_replay", [False, True], ids=["replay-on-suspend", "always-replay"])
@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("fn", [flow, async_flow], ids=["sync", "async"])
def test_a_history_recorded_with_the_old_names_replays_to_the_end(
        runtime: Callable[[Callable[..., Any], bool], Any], monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any],
        cut: str, always_replay: bool) -> None:
    _submits.clear()
    execution = runtime(fn, always_replay)
    with monkeypatch.context() as before:
        record_as_before(before)
        execution.invoke()
        _drive(execution, CUTS[cut])
    old = {o.id: o.name for o in execution.history()}
    assert not any(n and (n.startswith("map-item-") or n.startswith("parallel-branch-")) for n in old.values())

    _finish(execution)  # today's code from here on

    assert execution.result() == RESULT
    ops = execution.history()
    for op in ops:  # what was recorded keeps its name; what came after is named as AWS's SDK names it
        if op.id in old:
            assert op.name == old[op.id]
    names = [o.name for o in ops]
    assert names.count("submitter") + names.count("review submitter") == 1
    assert (None in [o.name for o in ops if o.type is OperationType.CALLBACK]) is (cut != "parallel")
    if cut == "parallel":
        assert "review create callback id" in names and "review submitter" in names
    iterations = [o.name for o in ops if o.sub_type is OperationSubType.MAP_ITERATION]
    assert iterations == [None, None, None]


def test_a_new_history_names_as_aws_does(runtime: Callable[[Callable[..., Any], bool], Any]) -> None:
    _submits.clear()
    execution = runtime(flow, False)
    execution.invoke()
    _finish(execution)
    assert execution.result() == RESULT
    named = {o.name for o in execution.history()}
    assert {"map-item-0", "map-item-1", "map-item-2", "parallel-branch-0", "parallel-branch-1",
            "review create callback id", "review submitter"} <= named


def test_a_name_neither_current_nor_legacy_is_still_non_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    _submits.clear()
    execution = Memory(flow, False)
    with monkeypatch.context() as before:
        record_as_before(before, ("some other callback", "submitter"))
        execution.invoke()
        _drive(execution, CUTS["callback"])
    execution.invoke()
    assert execution.status == "FAILED"
    assert execution.out.error.type == NonDeterministicExecutionError.__name__
    assert "some other callback" in execution.out.error.message
