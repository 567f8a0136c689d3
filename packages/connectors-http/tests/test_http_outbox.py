"""End to end: a Worker dispatches effects through HttpConnector to a real local HTTP server with faults."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from errands.connectors.http import AsyncHttpConnector, HttpConnector
from errands.connectors.http.testing import LedgerServer
from errands.core import Effect, EffectStatus, FakeClock, Outbox, Semantics, Worker, open_store
from pytest_httpserver import HTTPServer
from werkzeug import Response

FAST = {"backoff_base": 0.005, "backoff_cap": 0.05, "max_attempts": 25, "max_observations": 25}


def drive(store: Any, outbox: Outbox, total: int, connector: HttpConnector, timeout: float = 90.0) -> dict[str, Any]:
    """Run a Worker in a thread until every effect has settled (CONFIRMED, FAILED or CANCELLED).

    The connector is closed while the worker still runs: an async connector's pool lives on the worker's
    event loop and is closed there.
    """
    worker = Worker(store, outbox=outbox, poll_interval=0.01, max_in_flight=16)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            stats = outbox.stats()
            effects = stats["effects"]
            settled = effects["CONFIRMED"] + effects["FAILED"] + effects["CANCELLED"]
            if settled >= total or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)
    finally:
        connector.close()
        stop.set()
        worker.wake()
        thread.join(timeout=30)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    s = open_store(f"sqlite:///{tmp_path / 'outbox.db'}")
    yield s
    s.close()


@pytest.mark.parametrize("connector_class", [HttpConnector, AsyncHttpConnector])
def test_thousand_idempotent_effects_through_faults_each_performed_once(store: Any, connector_class: type) -> None:
    n = 1000
    with LedgerServer(error_rate=0.10, drop_rate=0.05, seed=11) as server:
        connector = connector_class(url=server.url("/effects"), timeout=10.0)
        outbox = Outbox(store, {"ledger": connector}, **FAST)
        outbox.submit_many([Effect(key=f"pay-{i}", connector="ledger", payload={"i": i}) for i in range(n)])
        stats = drive(store, outbox, n, connector)
        outbox.close()
        assert stats["effects"]["CONFIRMED"] == n, stats
        records = outbox.list(limit=n + 1)
        assert {r.status for r in records} == {EffectStatus.CONFIRMED}
        assert len(server.performed) == n
        assert all(count == 1 for count in server.performed.values()), "the server performed a key twice"
        # The faults really happened, and the lost answers were recovered by re-dispatch + dedup.
        assert server.faults["error"] >= 60
        assert server.faults["drop"] >= 25
        replayed = sum(1 for r in server.requests if r.answer == "replayed")
        assert replayed == server.faults["drop"]
        retried = [r for r in records if r.attempts > 1]
        assert len(retried) >= server.faults["error"] * 0.9


def test_non_idempotent_effects_are_observed_before_any_redispatch(store: Any) -> None:
    n = 300
    # dedupe=False: this counterparty performs every POST it receives, so a blind retry would show twice.
    with LedgerServer(dedupe=False, error_rate=0.10, drop_rate=0.10, seed=5) as server:
        connector = HttpConnector(url=server.url("/effects"), observe_url=server.url("/observe"), timeout=10.0)
        outbox = Outbox(store, {"ledger": connector}, **FAST)
        outbox.submit_many([Effect(key=f"wire-{i}", connector="ledger", payload={"i": i},
                                   semantics=Semantics.NON_IDEMPOTENT) for i in range(n)])
        stats = drive(store, outbox, n, connector)
        outbox.close()
        assert stats["effects"]["CONFIRMED"] == n, stats
        assert all(count == 1 for count in server.performed.values()), "a key was performed twice"
        assert len(server.performed) == n
        assert server.faults["drop"] >= 15 and server.faults["error"] >= 15
        observed_after_drop = 0
        for key in server.performed:
            history = server.history(key)
            for before, after in itertools.pairwise(history):
                if before.startswith("effects:") and before != "effects:performed":
                    assert after.startswith("observe:"), f"{key}: {history} re-dispatched without observing"
                    if before == "effects:dropped":
                        observed_after_drop += 1
                        assert after == "observe:1", f"{key}: {history}"
            assert history.count("effects:performed") + history.count("effects:dropped") == 1
        assert observed_after_drop == server.faults["drop"]
        confirmed_by_observation = [r for r in outbox.list(limit=n + 1) if r.observations > 0]
        assert len(confirmed_by_observation) >= server.faults["drop"]


def test_idempotent_effects_with_observe_endpoint_are_confirmed_by_observation(store: Any) -> None:
    n = 200
    with LedgerServer(drop_rate=0.2, seed=3) as server:
        connector = HttpConnector(url=server.url("/effects"), observe_url=server.url("/observe"))
        outbox = Outbox(store, {"ledger": connector}, **FAST)
        outbox.submit_many([Effect(key=f"k-{i}", connector="ledger", payload={}) for i in range(n)])
        stats = drive(store, outbox, n, connector)
        outbox.close()
        assert stats["effects"]["CONFIRMED"] == n, stats
        assert all(count == 1 for count in server.performed.values())
        # A dropped answer is settled by one observation, not by a second POST.
        assert sum(1 for r in server.requests if r.endpoint == "effects") == n


def test_errands_attempt_on_compensation_is_the_outbox_attempt(tmp_path: Path, httpserver: HTTPServer) -> None:
    answers = iter([503, 200])
    httpserver.expect_request("/pay").respond_with_data("ok")
    httpserver.expect_request("/refund").respond_with_handler(
        lambda _req: Response("", status=next(answers)))
    clock = FakeClock()
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", clock=clock)
    connector = HttpConnector(url=httpserver.url_for("/pay"), compensate_url=httpserver.url_for("/refund"))
    outbox = Outbox(store, {"bank": connector}, **FAST)
    outbox.submit(Effect(key="order-1", connector="bank", payload={}))
    assert [o.status for o in outbox.dispatch_once()] == [EffectStatus.CONFIRMED]
    outbox.register_compensation("order-1", "refund", {"amount": 5}, due=True)
    first = outbox.compensate_once()
    clock.advance(60)
    second = outbox.compensate_once()
    refunds = [req for req, _ in httpserver.log if req.path == "/refund"]
    assert [(o.attempts, o.status.value) for o in first + second] == [(1, "PENDING"), (2, "COMPENSATED")]
    assert [req.headers["Errands-Attempt"] for req in refunds] == ["1", "2"], \
        "the header carries the attempt the outbox records, not one more"
    outbox.close()
    connector.close()
    store.close()
