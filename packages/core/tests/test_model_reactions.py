"""Model-based test of reactions: random events of a few entities, handler failures, two workers,
crashes and restarts, clock jumps and injected store faults, checked against the journal itself.

Four reactions read the same journal: ``every`` (no debounce) must run once for every matching event;
``latest`` (debounced, default key: one entity per stream ``orders/<n>``), ``by_order`` (debounced on the
shared stream ``shop`` with ``key="data.order"``) and ``confirmed`` (debounced, default key, on the
outbox's one stream per connector ``effects/<connector>``: one entity per effect) must run for the last
event of every entity, and every event they skip must have a later event of the same entity that ran.

Invariants, after every step: no fault recorded on a task (every error is the handler's own); a finished
task never changes and its handler never runs again. At the end, with faults paused and time moved on:
nothing lost, every debounced entity got its reaction, no task stuck or leased.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errands.core import Effect, Event, Journal, Outbox, Reactor, TaskEngine, TransientError, open_store
from errands.core.testing import FakeConnector, faults
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

LEASE_FOR = 5.0
DEBOUNCE_MS = 500
REACTIONS = ("every", "latest", "by_order", "confirmed")
PATTERNS = {"every": "order.*", "latest": "order.*", "by_order": "shop.*", "confirmed": "effect.confirmed.**"}
FINAL = ("SUCCEEDED", "FAILED", "DEAD")


class Crashed(BaseException):
    """The worker process running this handler died."""


def planned_failures(event: Event) -> int:
    """How many times the handlers fail on ``event`` before they succeed (0, 1 or 2)."""
    return zlib.crc32(event.id.encode()) % 3


@dataclass
class Call:
    reaction: str
    event: Event
    worker: int
    gen: int
    ok: bool = False


class ReactionModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="errands-model-reactions-"))
        self.url = f"sqlite:///{self.dir / 'reactions.db'}"
        self.clock = faults.JumpClock()
        self.plan = faults.FaultPlan()
        self.stack = contextlib.ExitStack()
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.gens = [0, 0]
        self.crashed: set[tuple[int, int]] = set()
        self.workers: list[tuple[Any, Reactor] | None] = [None, None]
        self.finished: dict[str, tuple[Any, ...]] = {}
        self.calls_when_finished: dict[str, int] = {}
        self.task_of: dict[str, tuple[str, str]] = {}  # task id -> (reaction, event id)
        self.started = False
        self.effects = 0

    # -- the system under test ---------------------------------------------------------------------
    def _handler(self, reaction: str, worker: int, gen: int) -> Any:
        def handle(event: Event) -> str:
            call = Call(reaction=reaction, event=event, worker=worker, gen=gen)
            with self.lock:
                self.calls.append(call)
                tries = sum(1 for c in self.calls if c.reaction == reaction and c.event.id == event.id)
            if (worker, gen) in self.crashed:
                raise Crashed()
            if tries <= planned_failures(event):
                raise TransientError(f"planned failure {tries} of {event.id}", retry_after=0)
            call.ok = True
            return event.id

        return handle

    def _start_worker(self, worker: int) -> None:
        gen = self.gens[worker]
        with self.plan.paused():
            store = open_store(self.url, clock=self.clock)
            self.stack.enter_context(faults.inject(store, self.plan))
            engine = TaskEngine(store, concurrency=4, lease_for=LEASE_FOR, retry_base=0.001, retry_cap=0.002)
            reactor = Reactor(store, engine, batch_size=7)
            for name in REACTIONS:
                debounce = 0 if name == "every" else DEBOUNCE_MS
                key = "data.order" if name == "by_order" else None
                reactor.on(PATTERNS[name], self._handler(name, worker, gen), name=name, debounce_ms=debounce, key=key,
                           max_concurrency=2, retry_max=10, dlq_after=10)
        self.workers[worker] = (store, reactor)

    def _stop_worker(self, worker: int, *, crash: bool) -> None:
        got = self.workers[worker]
        if got is None:
            return
        store, reactor = got
        if crash:
            self.crashed.add((worker, self.gens[worker]))
        reactor.close(wait=True)
        with self.plan.paused():
            store.close()
        self.workers[worker] = None
        self.gens[worker] += 1

    def _store(self) -> Any:
        return next(got[0] for got in self.workers if got is not None)

    def _quiesce(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(got is None or got[1].engine.in_flight == 0 for got in self.workers):
                return
            time.sleep(0.001)

    def _tasks(self) -> dict[str, tuple[Any, ...]]:
        with self.plan.paused(), self._store().read() as tx:
            rows = tx.query("SELECT id, type, status, attempts, result, error, owner, params FROM em_tasks")
        return {r[0]: (r[1], r[2], r[3], None if r[4] is None else json.loads(r[4]), *r[5:]) for r in rows}

    # -- rules -------------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.0, 0.05, 0.15, 0.3]))
    def start(self, seed: int, rate: float) -> None:
        self.plan = faults.FaultPlan(seed=seed, rate=rate, kinds=faults.KINDS, when=faults.WHEN)
        self.started = True
        for w in (0, 1):
            self._start_worker(w)

    @rule(entity=st.integers(0, 2), kind=st.sampled_from(["order", "shop", "noise"]), burst=st.integers(1, 3))
    def append(self, entity: int, kind: str, burst: int) -> None:
        """Append a burst of events; a fault may leave any of them written or not (the journal tells)."""
        journal = Journal(self._store())
        for i in range(burst):
            with contextlib.suppress(Exception):
                if kind == "order":
                    journal.append(f"orders/{entity}", "order.changed", {"rev": i})
                elif kind == "shop":
                    journal.append("shop", "shop.changed", {"order": entity, "rev": i})
                else:
                    journal.append(f"orders/{entity}", "noise.seen", {"rev": i})

    @rule(burst=st.integers(1, 3))
    def effects_confirmed(self, burst: int) -> None:
        """The outbox confirms a burst of distinct effects of one connector (its store calls unfaulted: the
        outbox is not under test here)."""
        with self.plan.paused():
            outbox = Outbox(self._store(), connectors={"bank": FakeConnector("bank")})
            for _ in range(burst):
                self.effects += 1
                outbox.submit(Effect(key=f"e{self.effects}", connector="bank", payload={"n": self.effects}))
            outbox.dispatch_once()

    @rule(worker=st.integers(0, 1))
    def run_once(self, worker: int) -> None:
        got = self.workers[worker]
        if got is not None:
            got[1].run_once()

    @rule(seconds=st.sampled_from([0.2, 0.6, 1.0]))
    def time_passes(self, seconds: float) -> None:
        """Handlers finish, then the clock moves on (debounce windows close)."""
        self._quiesce()
        self.clock.jump(seconds)

    @rule()
    def leases_lapse(self) -> None:
        self._quiesce()
        self.clock.jump(LEASE_FOR + 1)

    @rule(worker=st.integers(0, 1), crash=st.booleans())
    def restart(self, worker: int, crash: bool) -> None:
        self._stop_worker(worker, crash=crash)
        self._start_worker(worker)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        tasks = self._tasks()
        with self.lock:
            calls = list(self.calls)
        for task_id, (type_, status, attempts, result, error, _owner, _params) in tasks.items():
            if error is not None:
                assert error.startswith("TransientError: planned failure"), f"a fault was recorded: {error}"
            assert status not in ("FAILED", "DEAD"), f"task {task_id} ended {status}: {error}"
            if task_id in self.finished:
                assert (status, attempts, result) == self.finished[task_id], f"finished task {task_id} changed"
                reaction = type_.removeprefix("reaction:")
                n = sum(1 for c in calls if c.reaction == reaction and c.event.id == result)
                assert n == self.calls_when_finished[task_id], f"finished task {task_id} ran again"
            elif status in FINAL:
                reaction = type_.removeprefix("reaction:")
                self.finished[task_id] = (status, attempts, result)
                self.calls_when_finished[task_id] = sum(
                    1 for c in calls if c.reaction == reaction and c.event.id == result)

    def teardown(self) -> None:
        try:
            if self.started:
                self._settle()
        finally:
            for got in self.workers:
                if got is not None:
                    got[1].close(wait=True)
            self.stack.close()
            for got in self.workers:
                if got is not None:
                    got[0].close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _settle(self) -> None:
        with self.plan.paused():
            self._quiesce()
            self.clock.jump(LEASE_FOR + 1)
            store = self._store()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for got in self.workers:
                    if got is not None:
                        got[1].run_once()
                self._quiesce()
                cursors = [store.kv_get("cursor", f"reactor:{n}") for n in REACTIONS]
                tasks = self._tasks()
                if all(c is not None and int(c[0]) == store.last_position() for c in cursors) and all(
                        t[1] in FINAL for t in tasks.values()):
                    break
                self.clock.jump(DEBOUNCE_MS / 1000)
            self.holds()
            self._check_outcome(store)

    def _check_outcome(self, store: Any) -> None:
        events = store.read_events(0, limit=100_000)
        tasks = self._tasks()
        stuck = {t: r for t, r in tasks.items() if r[1] not in FINAL or r[5] is not None}
        assert not stuck, f"tasks stuck or still leased: {stuck}"
        ran = {(r[0].removeprefix("reaction:"), r[3]) for r in tasks.values() if r[1] == "SUCCEEDED"}
        with self.lock:
            handled = {(c.reaction, c.event.id) for c in self.calls if c.ok}
        assert ran <= handled, "a task succeeded without its handler having succeeded"
        orders = [e for e in events if e.type == "order.changed"]
        shop = [e for e in events if e.type == "shop.changed"]
        # every: one task per matching event, none for the others
        assert {eid for r, eid in ran if r == "every"} == {e.id for e in orders}, "an event lost its reaction"
        every_tasks = [t for t in tasks.values() if t[0] == "reaction:every"]
        assert len(every_tasks) == len(orders)
        confirmed = [e for e in events if e.type == "effect.confirmed"]
        assert len({e.data["key"] for e in confirmed}) == self.effects
        for name, matching, entity_of in (("latest", orders, lambda e: e.stream),
                                          ("by_order", shop, lambda e: e.data["order"]),
                                          ("confirmed", confirmed, lambda e: e.data["key"])):
            done = {eid for r, eid in ran if r == name}
            last: dict[Any, Event] = {}
            for e in matching:
                last[entity_of(e)] = e
            for entity, e in last.items():
                assert e.id in done, f"{name}: entity {entity!r} never got a reaction to its last event {e.id}"
            for e in matching:
                if e.id not in done:
                    later = [x for x in matching if entity_of(x) == entity_of(e) and x.position > e.position
                             and x.id in done]
                    assert later, f"{name}: event {e.id} was dropped without a later event of its entity running"
            assert done <= {e.id for e in matching}, f"{name}: ran for an event it does not match"


ReactionModel.TestCase.settings = faults.model_settings()
test_reactions_model = ReactionModel.TestCase
