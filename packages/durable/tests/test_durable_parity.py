"""Versioning, replay, events, timeouts, continue-as-new and children nothing waits for, on SQLite and
PostgreSQL: ``ctx.patched``, ``DurableRunner.replay`` (and ``errands executions replay``), ``ctx.set_event`` /
``DurableRunner.get_event``, ``start(timeout=...)``, ``StepConfig(timeout=...)``, ``ctx.continue_as_new`` and
``ctx.start_child``."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterator

import pytest
from errands.core import ConfigError, FakeClock, NotFoundError, PayloadError
from errands.core._cli import main
from errands.durable import (
    AsyncDurableContext,
    DurableContext,
    DurableExecutionConfig,
    DurableRunner,
    ExecutionStatus,
    InMemoryClient,
    InvocationStatus,
    OperationSubType,
    RetryDecision,
    RetryPresets,
    StepConfig,
    StepError,
    with_durable_execution,
)

RUNS: Counter[str] = Counter()


def counted(key: str, value: Any) -> Any:
    def run(_: Any) -> Any:
        RUNS[key] += 1
        return value

    return run


# -- versions of one function ---------------------------------------------------------------------
def old_code(event: Any, ctx: DurableContext) -> Any:
    a = ctx.step("a", counted("a", 1))
    ctx.wait("w", 10)
    return ctx.step("b", counted("b", a + 1))


def new_code(event: Any, ctx: DurableContext) -> Any:
    if ctx.patched("v2"):
        a = ctx.step("a2", counted("a2", 100))
    else:
        a = ctx.step("a", counted("a", 1))
    ctx.wait("w", 10)
    return ctx.step("b", counted("b", a + 1))


async def new_code_async(event: Any, ctx: AsyncDurableContext) -> Any:
    if ctx.patched("v2"):
        a = await ctx.step("a2", counted("a2", 100))
    else:
        a = await ctx.step("a", counted("a", 1))
    await ctx.wait("w", 10)
    return await ctx.step("b", counted("b", a + 1))


def renamed_code(event: Any, ctx: DurableContext) -> Any:
    a = ctx.step("a", counted("a", 1))
    ctx.wait("w-renamed", 10)
    return ctx.step("b", counted("b", a + 1))


def shorter_code(event: Any, ctx: DurableContext) -> Any:
    return ctx.step("a", counted("a", 1))


def longer_code(event: Any, ctx: DurableContext) -> Any:
    old_code(event, ctx)
    return ctx.step("c", counted("c", 3))


# -- events, children, continue as new, timeouts --------------------------------------------------
def publisher(event: Any, ctx: DurableContext) -> Any:
    ctx.set_event("progress", {"done": 0})
    ctx.step("work", counted("work", 1))
    ctx.set_event("progress", {"done": 1})
    try:
        ctx.set_event("bad", object())
    except PayloadError as exc:
        bad = str(exc)
    got = ctx.wait_for_signal("go")
    ctx.set_event("progress", {"done": 2, "got": got})
    return bad


async def publisher_async(event: Any, ctx: AsyncDurableContext) -> Any:
    await ctx.set_event("stage", "one")
    await ctx.wait("pause", 5)
    await ctx.set_event("stage", "two")
    return "ok"


def child(event: Any, ctx: DurableContext) -> Any:
    return ctx.step("child-step", counted(f"child-{event}", event))


def parent(event: Any, ctx: DurableContext) -> Any:
    first = ctx.start_child("child", 1)
    second = ctx.start_child("child", 2, name="second")
    ctx.wait("after", 1)
    return [first, second]


async def parent_async(event: Any, ctx: AsyncDurableContext) -> Any:
    started = await ctx.start_child("child", 3)
    await ctx.wait("after", 1)
    return started


def looping(event: Any, ctx: DurableContext) -> Any:
    n = event["n"]
    ctx.step(f"round-{n}", counted("round", n))
    ctx.wait("breathe", 1)
    if n < 5:
        ctx.continue_as_new({"n": n + 1})
    return n


async def looping_async(event: Any, ctx: AsyncDurableContext) -> Any:
    n = event["n"]
    await ctx.step("round", counted("round-async", n))
    if n < 3:
        ctx.continue_as_new({"n": n + 1})
    return n


def slow_family(event: Any, ctx: DurableContext) -> Any:
    ctx.start_child("sleeper", None)
    ctx.invoke("sleeper", None, name="invoked")
    return "never"


def sleeper(event: Any, ctx: DurableContext) -> Any:
    ctx.wait("long", 3600)
    return "slept"


FUNCTIONS: dict[str, Any] = {
    "flow": old_code, "publisher": publisher, "publisher_async": publisher_async, "child": child,
    "parent": parent, "parent_async": parent_async, "looping": looping, "looping_async": looping_async,
    "slow_family": slow_family, "sleeper": sleeper,
}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=[False, True], ids=["plain", "always_replay"])
def runner(request: pytest.FixtureRequest, url: str) -> Iterator[DurableRunner]:
    RUNS.clear()
    r = DurableRunner(url, clock=FakeClock(), functions=FUNCTIONS, always_replay=request.param)
    try:
        yield r
    finally:
        r.close()


def deploy(runner: DurableRunner, **functions: Any) -> DurableRunner:
    """A runner of the next deploy: the same store and clock, other code under the same names."""
    return DurableRunner(runner.store, functions={**FUNCTIONS, **functions}, always_replay=runner.always_replay)


def advance(runner: DurableRunner, seconds: float) -> None:
    clock: FakeClock = runner.clock  # type: ignore[assignment]
    clock.advance(seconds)


# -- versioning -----------------------------------------------------------------------------------
@pytest.mark.parametrize("new", [new_code, new_code_async], ids=["sync", "async"])
def test_a_patched_deploy_finishes_old_executions_on_the_old_path_and_new_ones_on_the_new(
        runner: DurableRunner, new: Any) -> None:
    old_eid = runner.start("flow", {}, execution_id="old")
    runner.drain()
    assert runner.get(old_eid).status is ExecutionStatus.PENDING  # suspended in the wait, on the old code

    after = deploy(runner, flow=new)
    new_eid = after.start("flow", {}, execution_id="new")
    after.drain()
    advance(runner, 11)
    after.drain()
    assert after.get(old_eid).status is ExecutionStatus.SUCCEEDED and after.get(old_eid).result == 2
    assert after.get(new_eid).status is ExecutionStatus.SUCCEEDED and after.get(new_eid).result == 101
    assert [o.name for o in after.history(old_eid)] == ["a", "w", "b"]
    new_history = after.history(new_eid)
    assert [(o.name, o.sub_type) for o in new_history][:2] == [("v2", OperationSubType.PATCH),
                                                               ("a2", OperationSubType.STEP)]
    assert RUNS["a"] == 1 and RUNS["a2"] == 1  # every replay of either agreed with its own history
    # and each history replays cleanly against the patched code
    assert after.replay(old_eid, new).ok and after.replay(new_eid, new).ok


def cleaned_code(event: Any, ctx: DurableContext) -> Any:
    ctx.deprecate_patch("v2")
    a = ctx.step("a2", counted("a2", 100))
    ctx.wait("w", 10)
    return ctx.step("b", counted("b", a + 1))


def test_deprecate_patch_replays_histories_with_the_marker_and_writes_none(runner: DurableRunner) -> None:
    patched_deploy = deploy(runner, flow=new_code)
    marked = patched_deploy.start("flow", {}, execution_id="marked")
    patched_deploy.drain()  # suspended in the wait, with the marker in its history
    assert patched_deploy.replay(marked, cleaned_code).ok
    cleaned = deploy(runner, flow=cleaned_code)
    fresh = cleaned.start("flow", {}, execution_id="fresh")
    cleaned.drain()
    advance(runner, 11)
    cleaned.drain()
    assert cleaned.get(marked).result == 101 and cleaned.get(fresh).result == 101
    assert [o.name for o in cleaned.history(marked)] == ["v2", "a2", "w", "b"]
    assert [o.name for o in cleaned.history(fresh)] == ["a2", "w", "b"]


def test_patched_needs_a_change_id(runner: DurableRunner) -> None:
    def bad(event: Any, ctx: DurableContext) -> Any:
        try:
            ctx.patched("")
        except ConfigError as exc:
            return str(exc)
        return "accepted"

    runner.register("bad", bad)
    assert "change id" in runner.run("bad", {}).result


# -- replay ---------------------------------------------------------------------------------------
def test_replay_reports_no_divergence_on_unchanged_code_and_writes_nothing(runner: DurableRunner) -> None:
    pending = runner.start("flow", {}, execution_id="pending")
    runner.drain()
    done = runner.start("flow", {}, execution_id="done")
    runner.drain()
    advance(runner, 11)
    runner.drain()
    RUNS.clear()
    before = {eid: runner.history(eid) for eid in (pending, done)}
    found = runner.replay(done, old_code)
    assert found.ok and found.outcome == "SUCCEEDED" and found.reached == found.operations == 3
    # the pending one woke meanwhile and finished too; a fresh one stays suspended in its wait
    waiting = runner.start("flow", {}, execution_id="waiting")
    runner.drain()
    RUNS.clear()
    found = runner.replay(waiting, old_code)
    assert found.ok and found.outcome == "PENDING" and found.operations == 2
    assert {eid: runner.history(eid) for eid in (pending, done)} == before
    assert sum(RUNS.values()) == 0  # no step body ran


def test_replay_reports_the_first_divergence(runner: DurableRunner) -> None:
    eid = runner.start("flow", {}, execution_id="e")
    runner.drain()
    advance(runner, 11)
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.SUCCEEDED
    RUNS.clear()

    renamed = runner.replay(eid, renamed_code)
    assert not renamed.ok and renamed.divergence is not None
    d = renamed.divergence
    assert d.index == 2 and d.operation_id == runner.history(eid)[1].id
    assert d.expected == {"type": "WAIT", "sub_type": "Wait", "name": "w"}
    assert d.got == {"type": "WAIT", "sub_type": "Wait", "name": "w-renamed"}

    shorter = runner.replay(eid, shorter_code).divergence
    assert shorter is not None and shorter.index == 2 and shorter.got is None
    assert shorter.expected == {"type": "WAIT", "sub_type": "Wait", "name": "w"}

    longer = runner.replay(eid, longer_code).divergence  # more than an execution that ended did
    assert longer is not None and longer.index == 4 and longer.expected is None
    assert longer.got == {"type": "STEP", "sub_type": "Step", "name": "c"}

    patched = runner.replay(eid, new_code).divergence  # the patch must not change a finished history
    assert patched is None
    assert sum(RUNS.values()) == 0

    with pytest.raises(NotFoundError, match="nope"):
        runner.replay("nope", old_code)

    def cut_off(event: Any, ctx: DurableContext) -> Any:
        ctx.step("a", counted("a", 1))
        return ctx.step("b", lambda _: runner.terminate(ctx.execution_id, "cut off in step b"))

    runner.register("cut_off", cut_off)
    cut = runner.start("cut_off", {})
    runner.drain()
    assert runner.get(cut).status is ExecutionStatus.TERMINATED and len(runner.history(cut)) == 1
    found = runner.replay(cut, cut_off)  # cut off by an operator, not ended by its code: it may go on
    assert found.ok and found.outcome == "END_OF_HISTORY"


def fan_out(event: Any, ctx: DurableContext) -> Any:
    doubled = ctx.map("m", [1, 2, 3], lambda c, item, i, items: c.step(f"s{i}", lambda _: item * 2))
    inner = ctx.run_in_child_context("child", lambda c: c.step("inner", lambda _: 5))
    ctx.parallel("p", [lambda c: c.step("x", lambda _: 1), lambda c: c.wait("pw", 5)])
    return [doubled.get_results(), inner]


def fan_in_only(event: Any, ctx: DurableContext) -> Any:
    return ctx.map("m", [1, 2, 3], lambda c, item, i, items: c.step(f"s{i}", lambda _: item * 2)).get_results()


def test_replay_walks_maps_child_contexts_and_parallel_branches(runner: DurableRunner) -> None:
    runner.register("fan_out", fan_out)
    eid = runner.start("fan_out", {})
    runner.drain()  # suspended in a parallel branch's wait
    same = runner.replay(eid, fan_out)
    assert same.ok and same.outcome == "PENDING" and same.reached == same.operations
    cut = runner.replay(eid, fan_in_only).divergence
    assert cut is not None and cut.expected == {"type": "CONTEXT", "sub_type": "RunInChildContext", "name": "child"}
    assert cut.got is None and cut.index == 1 + 3 * 2 + 1  # after the map, its three branches and their steps


def test_cli_replay_exits_non_zero_on_a_divergence(url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    runner = DurableRunner(url, functions=FUNCTIONS)
    runner.register("short", shorter_code)
    eid = runner.run("short", {}, execution_id="cli-1").execution_id
    runner.close()
    (tmp_path / "deploy_v2.py").write_text(
        "def same(event, ctx):\n    return ctx.step('a', lambda _: 1)\n\n"
        "def changed(event, ctx):\n    return ctx.step('a-new', lambda _: 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["executions", "replay", eid, "--function", "deploy_v2:same", "--store", url]) == 0
        assert "no divergence" in capsys.readouterr().out
        assert main(["executions", "replay", eid, "--function", "deploy_v2:changed", "--store", url]) == 1
        out = capsys.readouterr().out
        assert "#1" in out and "'a-new'" in out and "'a'" in out
        assert main(["executions", "replay", eid, "--function", "deploy_v2:changed", "--store", url,
                     "--json"]) == 1
        found = json.loads(capsys.readouterr().out)
        assert found["ok"] is False and found["divergence"]["index"] == 1
        assert found["divergence"]["expected"]["name"] == "a" and found["divergence"]["got"]["name"] == "a-new"
        assert main(["executions", "replay", eid, "--function", "deploy_v2", "--store", url]) != 0
        assert "module:function" in capsys.readouterr().err
    finally:
        sys.modules.pop("deploy_v2", None)


# -- events ---------------------------------------------------------------------------------------
def test_set_event_latest_value_wins_and_a_bad_value_is_refused(runner: DurableRunner) -> None:
    eid = runner.start("publisher", {})
    runner.drain()
    assert runner.get_event(eid, "progress", timeout=0) == {"done": 1}
    assert runner.get_event(eid, "missing", timeout=0.05) is None  # not set within the timeout
    runner.send_signal(eid, "go", "now")
    info = runner.wait(eid, timeout=30)
    assert "the value of event 'bad' must be JSON" in info.result
    assert runner.get_event(eid, "progress") == {"done": 2, "got": "now"}
    assert runner.get_event(eid, "missing") is None  # the execution ended: nothing more can come
    assert RUNS["work"] == 1
    assert [o.name for o in runner.history(eid) if o.sub_type is OperationSubType.SET_EVENT] == ["progress"] * 3
    with pytest.raises(NotFoundError, match="no-such-execution"):
        runner.get_event("no-such-execution", "progress", timeout=0)
    with pytest.raises(ConfigError, match="key"):
        runner.get_event(eid, "", timeout=0)


def test_get_event_waits_for_an_event_set_by_a_worker_thread(url: str) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow_publisher(event: Any, ctx: DurableContext) -> Any:
        def work(_: Any) -> int:
            started.set()
            release.wait(30)
            return 7

        ctx.set_event("result", ctx.step("work", work))
        return "done"

    worker = DurableRunner(url, functions={"slow": slow_publisher})
    reader = DurableRunner(url, functions={"slow": slow_publisher})
    eid = reader.start("slow", {})
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, args=(stop,), kwargs={"poll_interval": 0.01})
    thread.start()
    got: list[Any] = []
    try:
        assert started.wait(30)
        waiter = threading.Thread(target=lambda: got.append(reader.get_event(eid, "result", timeout=30)))
        waiter.start()
        assert reader.get_event(eid, "result", timeout=0) is None  # not set yet: the step is still running
        release.set()
        waiter.join(30)
    finally:
        release.set()
        stop.set()
        thread.join(30)
        worker.close()
        reader.close()
    assert got == [7]


def test_async_set_event_and_get_event_async(runner: DurableRunner) -> None:
    eid = runner.start("publisher_async", {})
    runner.drain()
    assert asyncio.run(runner.get_event_async(eid, "stage", timeout=0)) == "one"
    advance(runner, 6)
    runner.drain()
    assert asyncio.run(runner.get_event_async(eid, "stage")) == "two"
    assert runner.get(eid).result == "ok"


# -- timeouts -------------------------------------------------------------------------------------
def test_a_timeout_ends_the_execution_and_its_children_timed_out(runner: DurableRunner) -> None:
    eid = runner.start("slow_family", {}, execution_id="fam", timeout=60)
    runner.drain()
    family = runner.list(parent_id=eid)
    assert len(family) == 2 and all(c.status is ExecutionStatus.PENDING for c in family)
    advance(runner, 59)
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.PENDING
    advance(runner, 2)
    assert runner.next_due() is not None and runner.next_due() <= runner.clock.now()  # type: ignore[operator]
    runner.drain()
    info = runner.get(eid)
    assert info.status is ExecutionStatus.TIMED_OUT and info.error is not None
    assert info.error.type == "ExecutionTimedOut"
    assert {c.status for c in runner.list(parent_id=eid)} == {ExecutionStatus.TIMED_OUT}
    assert [i.execution_id for i in runner.list(ExecutionStatus.TIMED_OUT)].count(eid) == 1
    advance(runner, 3600)
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.TIMED_OUT  # nothing ran after it
    assert runner.purge(eid) == 3


def test_a_deadline_holds_for_the_children_an_execution_left_running(runner: DurableRunner) -> None:
    def leaves(event: Any, ctx: DurableContext) -> Any:
        return ctx.start_child("sleeper", None)

    runner.register("leaves", leaves)
    eid = runner.start("leaves", {}, timeout=30)
    runner.drain()
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED
    assert runner.get(info.result).status is ExecutionStatus.PENDING
    advance(runner, 31)
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.SUCCEEDED  # its own outcome stays
    assert runner.get(info.result).status is ExecutionStatus.TIMED_OUT


def test_a_timeout_ends_an_execution_whose_worker_is_busy_or_gone(url: str) -> None:
    clock = FakeClock()
    entered = threading.Event()
    release = threading.Event()
    ran_after: list[str] = []

    def busy(event: Any, ctx: DurableContext) -> Any:
        def hold(_: Any) -> str:
            entered.set()
            release.wait(30)
            return "held"

        ctx.step("hold", hold)
        ctx.step("after", lambda _: ran_after.append("after"))
        return "finished"

    def gone(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("s", lambda _: ran_after.append("gone"))

    functions = {"busy": busy, "gone": gone}
    # leases outlast the test: the other worker must not take the execution over, only time it out
    holder = DurableRunner(url, clock=clock, functions=functions, lease_for=3600)
    other = DurableRunner(url, clock=clock, functions=functions, lease_for=3600)
    eid = other.start("busy", {}, timeout=30)
    thread = threading.Thread(target=holder.work_once)
    thread.start()
    try:
        assert entered.wait(30)
        clock.advance(31)
        other.work_once()  # the other worker ends it while the holder is still inside the step
        assert other.get(eid).status is ExecutionStatus.TIMED_OUT
        # a worker that claimed an execution and died: its lease is held, nobody runs it
        lost = other.start("gone", {}, timeout=5)
        assert other.store.claim_keys("durable.work", [lost], lease_for=3600)
        clock.advance(6)
        other.work_once()
        assert other.get(lost).status is ExecutionStatus.TIMED_OUT
    finally:
        release.set()
        thread.join(30)
    assert other.get(eid).status is ExecutionStatus.TIMED_OUT  # the holder's late checkpoint was fenced out
    assert ran_after == [] and "after" not in [o.name for o in other.history(eid)]
    holder.close()
    other.close()


def test_start_refuses_a_bad_timeout(runner: DurableRunner) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        runner.start("flow", {}, timeout=0)
    assert runner.list() == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_step_attempt_that_runs_too_long_fails_and_is_retried(url: str, kind: str) -> None:
    attempts: list[int] = []
    release = threading.Event()
    cancelled: list[bool] = []

    def sync_body(step: Any) -> str:
        attempts.append(step.attempt)
        if step.attempt == 1:
            release.wait(30)  # cannot be stopped: abandoned, its late result ignored
            return "late"
        return "on time"

    async def async_body(step: Any) -> str:
        attempts.append(step.attempt)
        if step.attempt == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return "late"
        return "on time"

    body = sync_body if kind == "sync" else async_body
    def retry(error: Exception, attempts: int) -> RetryDecision:  # at once, so the test needs no clock
        return RetryDecision.retry(0) if attempts < 3 else RetryDecision(False)

    def wf(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("slow", body, StepConfig(timeout=0.2, retry_strategy=retry))

    def no_retry(event: Any, ctx: DurableContext) -> Any:
        try:
            return ctx.step("slow", lambda _: release.wait(30),
                            StepConfig(timeout=0.2, retry_strategy=RetryPresets.none()))
        except StepError as exc:
            return [exc.error_type, exc.error_message]

    runner = DurableRunner(url, functions={"wf": wf, "no_retry": no_retry})
    try:
        info = runner.wait(runner.start("wf", {}), timeout=60)
        assert info.status is ExecutionStatus.SUCCEEDED and info.result == "on time"
        assert attempts == [1, 2]
        if kind == "async":
            assert cancelled == [True]
        failed = runner.wait(runner.start("no_retry", {}), timeout=60)
        assert failed.result[0] == "StepTimeoutError" and "timeout of 0.2s" in failed.result[1]
    finally:
        release.set()
        runner.close()


# -- continue as new and children -----------------------------------------------------------------
@pytest.mark.parametrize("function,last,key", [("looping", 5, "round"), ("looping_async", 3, "round-async")])
def test_continue_as_new_keeps_the_execution_and_bounds_its_history(runner: DurableRunner, function: str,
                                                                    last: int, key: str) -> None:
    eid = runner.start(function, {"n": 1}, execution_id=f"loop-{function}")
    for _ in range(20):
        runner.drain()
        advance(runner, 2)
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == last and info.input == {"n": last}
    assert RUNS[key] == last  # each run's step ran once
    history = runner.history(eid)
    assert len(history) <= 2 and history[0].name in (f"round-{last}", "round")  # the last run's history only
    events = [e.type for e in runner.store.read_events(stream=f"durable/{eid}")]
    assert events.count("durable.execution.continued") == last - 1


@pytest.mark.parametrize("function", ["parent", "parent_async"])
def test_start_child_starts_without_waiting_once(runner: DurableRunner, function: str) -> None:
    eid = runner.start(function, {}, execution_id=f"p-{function}")
    runner.drain()
    children = runner.list(parent_id=eid)
    assert runner.get(eid).status is ExecutionStatus.PENDING  # in its own wait, not waiting for the children
    assert all(c.status is ExecutionStatus.SUCCEEDED for c in children)
    advance(runner, 2)
    runner.drain()
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED
    ids = info.result if isinstance(info.result, list) else [info.result]
    assert sorted(ids) == sorted(c.execution_id for c in children) and all(i.startswith(eid + "/") for i in ids)
    assert sum(v for k, v in RUNS.items() if k.startswith("child-")) == len(ids)  # each child ran once


def test_start_child_refuses_an_unknown_function(runner: DurableRunner) -> None:
    def orphan(event: Any, ctx: DurableContext) -> Any:
        try:
            ctx.start_child("nobody", {})
        except ConfigError as exc:
            return str(exc)
        return "started"

    runner.register("orphan", orphan)
    assert "nobody" in runner.run("orphan", {}).result


def test_under_the_lambda_wrapper_patched_events_and_step_timeouts_work_and_children_are_refused() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> Any:
        ctx.set_event("k", 1)
        value = ctx.step("s", lambda _: 2, StepConfig(timeout=5))
        try:
            ctx.start_child("child", 1)
        except ConfigError as exc:
            return [ctx.patched("x"), value, str(exc)]
        return "started"

    def continuing(event: Any, ctx: DurableContext) -> Any:
        ctx.continue_as_new(1)

    out = with_durable_execution(handler, DurableExecutionConfig(client=client))(client.start_execution({}))
    assert out.status is InvocationStatus.SUCCEEDED
    assert json.loads(out.result or "null") == [True, 2, "start_child needs a DurableRunner (the Lambda API has "
                                                         "no such operation)"]
    out = with_durable_execution(continuing, DurableExecutionConfig(client=client))(client.start_execution({}))
    assert out.status is InvocationStatus.FAILED and out.error is not None
    assert "continue_as_new needs a DurableRunner" in (out.error.message or "")


def test_rerun_from_keeps_the_events_its_kept_operations_set(runner: DurableRunner) -> None:
    eid = runner.start("publisher", {})
    runner.drain()
    new_id = runner.rerun_from(eid, "go")  # keeps both set_event operations before the wait
    assert runner.get_event(new_id, "progress", timeout=0) == {"done": 1}


STUCK_WORKER = """
import pathlib, sys, time
from errands.durable import DurableRunner

url, marker = sys.argv[1], pathlib.Path(sys.argv[2])

def sleeper(event, ctx):
    ctx.wait("long", 3600)

def stuck(event, ctx):
    ctx.start_child("sleeper", None)
    def hang(step):
        marker.write_text(step.execution_id)
        time.sleep(3600)
    return ctx.step("hang", hang)

runner = DurableRunner(url, functions={"stuck": stuck, "sleeper": sleeper}, lease_for=3600)
print("ready", flush=True)
runner.serve(poll_interval=0.01)
"""


@pytest.mark.crash
def test_a_timeout_ends_an_execution_whose_worker_process_was_killed(url: str, tmp_path: Any) -> None:
    from errands.core.testing import faults

    script, marker = tmp_path / "stuck_worker.py", tmp_path / "in-step"
    script.write_text(STUCK_WORKER)
    # the leases outlast the test: only the deadline can end the execution the dead worker holds
    runner = DurableRunner(url, functions={"stuck": lambda e, c: None, "sleeper": sleeper},
                           lease_for=3600)
    worker = faults.python_worker(script, url, str(marker)).start()
    try:
        eid = runner.start("stuck", {}, timeout=1.0)
        for _ in range(3000):
            if marker.exists():
                break
            time.sleep(0.01)
        assert marker.read_text() == eid  # the worker is inside the step
        worker.kill()
        for _ in range(3000):
            runner.work_once()
            if runner.get(eid).status.terminal:
                break
            time.sleep(0.01)
    finally:
        worker.kill()
    info = runner.get(eid)
    assert info.status is ExecutionStatus.TIMED_OUT
    assert [c.status for c in runner.list(parent_id=eid)] == [ExecutionStatus.TIMED_OUT]
    runner.close()
