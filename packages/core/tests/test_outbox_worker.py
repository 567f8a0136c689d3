"""The worker with the outbox: bounded concurrency for sync and async connectors, clean stops on
SIGTERM/SIGINT, ``errands worker`` and the ``effects`` / ``obligations`` commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from errands.core import (
    ConfigError,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    Outbox,
    Worker,
    open_store,
)
from errands.core._cli import main
from errands.core._runtime import CallRunner


class Gauge:
    """Counts calls in flight and remembers the most seen at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.done: list[str] = []

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self, key: str) -> None:
        with self.lock:
            self.now -= 1
            self.done.append(key)


class SlowSync:
    name: ClassVar[str] = "slow-sync"

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge

    def dispatch(self, effect: Effect) -> DispatchResult:
        self.gauge.enter()
        time.sleep(0.02)
        self.gauge.leave(effect.key)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


class SlowAsync:
    name: ClassVar[str] = "slow-async"

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.loops: set[int] = set()

    async def dispatch(self, effect: Effect) -> DispatchResult:
        self.loops.add(id(asyncio.get_running_loop()))
        self.gauge.enter()
        await asyncio.sleep(0.02)
        self.gauge.leave(effect.key)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, response={"async": True})


def _run_until_done(worker: Worker, outbox: Outbox, n: int) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    deadline = time.monotonic() + 30
    while outbox.stats()["effects"]["CONFIRMED"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.wake()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_max_in_flight_bounds_concurrent_calls(kind: str) -> None:
    gauge = Gauge()
    conn: Any = SlowSync(gauge) if kind == "sync" else SlowAsync(gauge)
    store = open_store("memory://")
    outbox = Outbox(store, connectors={"c": conn}, batch_size=50)
    worker = Worker(store, outbox=outbox, max_in_flight=4, poll_interval=0.01)
    outbox.submit_many([Effect(key=f"e{i}", connector="c", payload={"i": i}) for i in range(40)])
    _run_until_done(worker, outbox, 40)
    assert sorted(gauge.done) == sorted(f"e{i}" for i in range(40))
    assert 1 < gauge.peak <= 4
    assert outbox.max_in_flight == 4
    if kind == "async":
        assert len(conn.loops) == 1  # one event loop for every call: async clients stay bound to it
        assert outbox.get("e0").response == {"async": True}
    store.close()


def test_async_observe_and_compensate() -> None:
    from errands.core import CompensationOutcome, CompensationResult, Obligation, Observation, ObservationOutcome

    class AsyncBank:
        name = "abank"

        async def dispatch(self, effect: Effect) -> DispatchResult:
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN)

        async def observe(self, effect: Effect) -> Observation:
            await asyncio.sleep(0)
            return Observation(outcome=ObservationOutcome.DUPLICATE)

        async def compensate(self, obligation: Obligation) -> CompensationResult:
            return CompensationResult(outcome=CompensationOutcome.COMPENSATED)

    store = open_store("memory://")
    outbox = Outbox(store, connectors={"abank": AsyncBank()}, backoff_base=0.001)
    outbox.submit(Effect(key="a", connector="abank", payload={}))
    outbox.dispatch_once()
    time.sleep(0.01)
    assert outbox.reconcile_once()[0].status is EffectStatus.CONFIRMED
    assert outbox.compensate_once()[0].outcome is CompensationOutcome.COMPENSATED
    outbox.close()
    store.close()


def test_call_runner_reports_errors_per_item_and_lets_base_exceptions_through() -> None:
    runner = CallRunner(3)

    def fn(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        time.sleep(0.01)
        return x * 10

    try:
        out = runner.map(fn, [1, 2, 3])
        assert out[0] == (True, 10) and out[2] == (True, 30)
        assert out[1][0] is False and isinstance(out[1][1], ValueError)

        def dies(x: int) -> int:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            runner.map(dies, [1, 2])
    finally:
        runner.close()
    with pytest.raises(ConfigError, match="max_in_flight"):
        CallRunner(0)


def test_worker_keeps_calling_fanout_run_once() -> None:
    calls: list[int] = []

    class Fan:
        def run_once(self) -> int:
            calls.append(1)
            return 0

    store = open_store("memory://")
    Worker(store, fanout=Fan()).step()
    assert calls == [1]
    store.close()


# -- the command line ---------------------------------------------------------------------------

CONNECTOR_MODULE = '''
import time
from errands.core import DispatchOutcome, DispatchResult, hookimpl


class SlowLog:
    name = "slowlog"

    def __init__(self, path, delay=0.0):
        self.path, self.delay = path, delay

    def dispatch(self, effect):
        time.sleep(self.delay)
        with open(self.path, "a") as fh:
            fh.write(effect.key + "\\n")
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


@hookimpl
def errands_register_connectors():
    return [SlowLog]
'''


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "slowlog_plugin.py").write_text(CONNECTOR_MODULE)
    (tmp_path / "errands.toml").write_text(
        f'store = "sqlite:///{tmp_path / "app.db"}"\n'
        f'[connectors.ledger]\ntype = "slowlog"\npath = "{tmp_path / "ledger.txt"}"\ndelay = 0.05\n'
        "[worker]\npoll_interval = 0.02\nmax_in_flight = 4\nlease_for = 5\nbatch_size = 4\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), ERRANDS_DISABLE_PLUGIN_AUTOLOAD="1")
    return {"dir": tmp_path, "env": env, "url": f"sqlite:///{tmp_path / 'app.db'}"}


def _plugin_registry(tmp_path: Path) -> Any:
    sys.path.insert(0, str(tmp_path))
    try:
        import slowlog_plugin
    finally:
        sys.path.remove(str(tmp_path))
    from errands.core import Registry

    reg = Registry([("slowlog", slowlog_plugin)], autoload=False)
    return reg, slowlog_plugin


def _submit(url: str, n: int, conn: Any) -> None:
    store = open_store(url)
    outbox = Outbox(store, connectors={"ledger": conn})
    outbox.submit_many([Effect(key=f"k{i}", connector="ledger", payload={"i": i}) for i in range(n)])
    outbox.close()
    store.close()


WORKER_MAIN = (
    "import sys, slowlog_plugin\n"
    "from errands.core import Registry, reset_registry\n"
    "from errands.core._cli import main\n"
    "reset_registry(Registry([('slowlog', slowlog_plugin)], autoload=False))\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_command_stops_cleanly_on_signals(project: dict[str, Any], sig: int) -> None:
    _, plugin = _plugin_registry(project["dir"])
    _submit(project["url"], 60, plugin.SlowLog(str(project["dir"] / "unused.txt")))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_MAIN, "worker", "--config", str(project["dir"] / "errands.toml")],
        cwd=project["dir"], env=project["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ledger = project["dir"] / "ledger.txt"
    deadline = time.monotonic() + 30
    while (not ledger.exists() or len(ledger.read_text().split()) < 8) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "errands worker stopped" in err
    delivered = ledger.read_text().split()
    store = open_store(project["url"])
    outbox = Outbox(store, connectors={})
    stats = outbox.stats()
    # Every call in flight at the signal finished and was recorded: nothing is left leased.
    assert stats["effects"]["DISPATCHING"] == 0
    assert stats["effects"]["CONFIRMED"] == len(delivered) == len(set(delivered))
    assert 0 < len(delivered) < 60
    store.close()


def test_worker_command_drain_and_effects_commands(project: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from errands.core import reset_registry

    reg, plugin = _plugin_registry(project["dir"])
    reset_registry(reg)
    monkeypatch.chdir(project["dir"])
    try:
        store = open_store(project["url"])
        outbox = Outbox(store, connectors={"ledger": plugin.SlowLog(str(project["dir"] / "x.txt"))})
        outbox.submit_many([Effect(key="a", connector="ledger", payload={"n": 1}, tool="post"),
                            Effect(key="gated", connector="ledger", payload={"n": 2}, human_gate=True),
                            Effect(key="nope", connector="ledger", payload={"n": 3}, human_gate=True)])
        assert main(["worker", "--drain"]) == 0
        assert "drained: 1 items" in capsys.readouterr().out
        assert main(["effects", "list"]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}
        assert rows["a"][:2] == ["ledger.post", "CONFIRMED"] and rows["gated"][:2] == ["ledger", "AWAITING_APPROVAL"]
        assert "flagged 0" in out
        assert main(["effects", "approve", "gated", "--by", "ada"]) == 0
        assert capsys.readouterr().out.strip() == "gated: PENDING"
        assert main(["effects", "reject", "nope", "--reason", "not today", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "CANCELLED"
        assert main(["worker", "--drain"]) == 0
        capsys.readouterr()
        assert main(["effects", "list", "--json", "--status", "confirmed"]) == 0
        assert [r["key"] for r in json.loads(capsys.readouterr().out)] == ["a", "gated"]
        assert main(["effects", "show", "gated"]) == 0
        out = capsys.readouterr().out
        assert "effect.pending.ledger" in out and "approved_by=ada" in out and "effect.confirmed.ledger" in out
        assert main(["effects", "show", "a", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [e["type"] for e in shown["history"]] == ["effect.pending", "effect.dispatching", "effect.confirmed"]
        assert main(["effects", "redrive", "nope"]) == 0
        assert capsys.readouterr().out.strip() == "nope: PENDING"
        outbox.register_compensation("a", "refund", {"n": 1})
        assert main(["obligations", "list"]) == 0
        assert "refund" in capsys.readouterr().out
        assert main(["obligations", "list", "--json", "--status", "REGISTERED"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["kind"] == "refund"
        assert main(["effects", "approve", "a"]) == 1
        assert "cannot approve effect 'a': it is CONFIRMED" in capsys.readouterr().err
        assert main(["effects", "show", "missing"]) == 1
        assert "no effect with key 'missing'" in capsys.readouterr().err
        assert main(["effects", "list", "--status", "DONE"]) == 1
        outbox.close()
        store.close()
    finally:
        reset_registry(None)


def test_worker_command_rejects_unknown_worker_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "errands.toml").write_text(f'store = "sqlite:///{tmp_path / "w.db"}"\n[worker]\nspeed = 3\n')
    assert main(["worker", "--config", str(tmp_path / "errands.toml"), "--drain"]) == 1
    assert "worker.speed: unknown option" in capsys.readouterr().err


def test_demo_includes_the_outbox(capsys: pytest.CaptureFixture[str]) -> None:
    from errands.core._demo import run_demo
    from errands.core._outbox_demo import OutboxDemo

    assert run_demo(as_json=True, size=200, parts=lambda: [OutboxDemo()]) == 0
    [part] = json.loads(capsys.readouterr().out)
    figures = part["figures"]
    assert part["ok"] and figures["effects confirmed"] == figures["effects submitted"] == 205
    assert figures["human-gated payment"] == "pending -> confirmed"
    assert figures["saga refunds (LIFO)"] == "ship charge reserve"
    assert figures["duplicates observed and compensated"] == 1 and figures["flagged"] == 0


def test_a_store_fault_in_a_pass_is_logged_as_one_and_the_worker_carries_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from errands.core.testing import FakeConnector, faults

    store = open_store(f"sqlite:///{tmp_path / 'w.db'}")
    plan = faults.FaultPlan(match="UPDATE em_effects SET status = 'DISPATCHING'", rate=1.0, limit=1)
    with faults.inject(store, plan):
        bank = FakeConnector("bank")
        outbox = Outbox(store, connectors={"bank": bank})
        outbox.submit(Effect(key="k", connector="bank", payload={}))
        worker = Worker(store, outbox=outbox)
        with caplog.at_level("INFO", logger="errands.worker"):
            assert worker.drain() == 1
    assert outbox.get("k").status is EffectStatus.CONFIRMED and bank.deliveries("k") == 1
    [record] = [r for r in caplog.records if r.name == "errands.worker"]
    # A store fault is the infrastructure's, not a bug: a warning that names it, without a traceback.
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "outbox.dispatch_once" in record.getMessage() and "database is locked" in record.getMessage()
    store.close()
