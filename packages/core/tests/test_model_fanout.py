"""Model-based test of fan-out: random appends (one by one and in batches, some events refused for good by
some sinks), relay passes, sinks failing transiently (with or without ``retry_after``, or with an unexpected
exception), redrives, sinks that recover, relay restarts, clock jumps and injected store faults, checked
against a model of what each route must deliver.

Invariants, after every step:
- in order per stream: a sink never receives an event before every earlier event of its stream that the
  route takes (a parked event is the one exception: it is redriven later);
- a route only receives events its subjects match;
- parked only for ``PermanentError``: every parked event is one its sink refused for good;
- no route is stopped (nothing here asks for that);
- nothing lost: an append that returned is in the journal (one that failed on a fault may or may not be);
and at the end, with faults paused, the sinks recovered, parked events redriven and time moved on: every
event reached every route it matches at least once, nothing is parked, and every route is at the head.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Sequence

from errands.core import (
    Event,
    FakeClock,
    FanOut,
    Journal,
    NewEvent,
    PermanentError,
    Route,
    RouteState,
    TransientError,
    is_infrastructure_error,
    open_store,
)
from errands.core.store import subject_matcher
from errands.core.testing import faults
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

STREAMS = ["s0", "s1", "s2"]
SUBJECTS = ["order.placed", "order.paid.eu", "audit.login"]
ROUTES = {
    # name: (subjects, batch_size, max_in_flight)
    "all": ((), 2, 1),
    "orders": (("order.**",), 3, 2),
}


class ModelSink:
    """A sink that checks order per stream as it receives, refuses its poison events for good until healed,
    and fails transiently on demand (per stream, so that concurrent lanes fail alike whatever their timing)."""

    def __init__(self, model: FanOutModel, route: str) -> None:
        self.model = model
        self.route = route
        self.lock = threading.Lock()
        self.poison: set[str] = set()
        self.failing: dict[str, tuple[int, str]] = {}  # stream -> (calls left, how)
        self.received: list[str] = []
        self.seen: set[str] = set()

    def publish(self, events: Sequence[Event]) -> None:
        with self.lock:
            for stream in sorted({e.stream for e in events}):
                left, how = self.failing.get(stream, (0, ""))
                if left > 0:
                    self.failing[stream] = (left - 1, how)
                    if how == "retry_after":
                        raise TransientError("planned busy sink", retry_after=2.0)
                    if how == "unexpected":
                        raise RuntimeError("planned unexpected sink error")
                    raise TransientError("planned busy sink")
            bad = [e.id for e in events if e.id in self.poison]
            if bad:
                raise PermanentError(f"planned refusal of {bad[0]}")
            for e in events:
                self.model.check_delivery(self.route, e, self.seen)
                self.received.append(e.id)
                self.seen.add(e.id)


class FanOutModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = open_store("memory://", clock=self.clock)
        self.journal = Journal(self.store)
        self.plan = faults.FaultPlan()
        self.stack = contextlib.ExitStack()
        self.sinks = {name: ModelSink(self, name) for name in ROUTES}
        self.matchers = {name: subject_matcher(list(spec[0])) for name, spec in ROUTES.items()}
        self.fanout: FanOut | None = None
        self.events: dict[str, list[tuple[str, str]]] = defaultdict(list)  # stream -> [(id, subject)] in order
        self.subject_of: dict[str, str] = {}
        self.ever_poisoned: dict[str, set[str]] = {name: set() for name in ROUTES}
        self.violations: list[str] = []

    # -- the system under test -----------------------------------------------------------------------
    def _new_fanout(self) -> None:
        if self.fanout is not None:
            with self.plan.paused():
                self.fanout.close()
        with self.plan.paused():  # a process that cannot open its store is restarted: not modelled here
            self.fanout = FanOut(self.store, [Route(name, self.sinks[name], subjects=list(subjects), batch_size=size,
                                                    max_in_flight=lanes)
                                              for name, (subjects, size, lanes) in ROUTES.items()],
                                 retry_base=0.5, retry_cap=4.0)

    @property
    def fo(self) -> FanOut:
        assert self.fanout is not None
        return self.fanout

    def takes(self, route: str, subject: str) -> bool:
        return bool(self.matchers[route](subject))

    def check_delivery(self, route: str, event: Event, seen: set[str]) -> None:
        subject = self.subject_of.get(event.id)
        if subject is None:
            self.violations.append(f"{route} received {event.id}, which was never appended")
            return
        if not self.takes(route, subject):
            self.violations.append(f"{route} received {event.id} ({subject}), which its subjects do not match")
        for earlier, earlier_subject in self.events[event.stream]:
            if earlier == event.id:
                break
            if (self.takes(route, earlier_subject) and earlier not in self.ever_poisoned[route]
                    and earlier not in seen):
                self.violations.append(f"{route} received {event.id} before {earlier}")
                return

    def _journal_of(self, stream: str) -> list[Event]:
        with self.plan.paused():
            return self.journal.read(after=0, limit=100_000, stream=stream)

    def _append(self, batch: list[tuple[str, str, list[str]]]) -> None:
        """Append ``(stream, subject, routes that refuse it)`` events in one transaction, under faults. When a
        fault leaves it unknown whether they were appended, the journal says."""
        before = {s: len(self._journal_of(s)) for s in STREAMS}
        news = [NewEvent(stream, subject.split(".")[0] + ".event", {"n": i}, subject) for i, (stream, subject, _p)
                in enumerate(batch)]
        try:
            got = self.journal.append_many(news)
        except Exception as exc:
            assert is_infrastructure_error(exc), repr(exc)
            after = {s: self._journal_of(s) for s in STREAMS}
            added = sum(len(after[s]) - before[s] for s in STREAMS)
            if added == 0:
                return
            assert added == len(batch), "an append was torn"
            counts: dict[str, int] = defaultdict(int)
            got = []
            for stream, _subject, _p in batch:
                got.append(after[stream][before[stream] + counts[stream]])
                counts[stream] += 1
        for event, (stream, subject, refuse) in zip(got, batch):
            assert event.stream == stream and event.subject == subject
            self.events[stream].append((event.id, subject))
            self.subject_of[event.id] = subject
            for route in refuse:
                self.sinks[route].poison.add(event.id)
                self.ever_poisoned[route].add(event.id)

    # -- rules ---------------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.0, 0.03, 0.1, 0.25]))
    def start(self, seed: int, rate: float) -> None:
        self.plan = faults.FaultPlan(seed=seed, rate=rate, kinds=faults.KINDS, when=faults.WHEN)
        self.stack.enter_context(faults.inject(self.store, self.plan))
        self._new_fanout()

    @rule(events=st.lists(st.tuples(st.sampled_from(STREAMS), st.sampled_from(SUBJECTS),
                                    st.lists(st.sampled_from(sorted(ROUTES)), max_size=1)),
                          min_size=1, max_size=5))
    def append(self, events: list[tuple[str, str, list[str]]]) -> None:
        self._append(events)

    @rule()
    def run_once(self) -> None:
        try:
            self.fo.run_once()
        except Exception as exc:
            assert is_infrastructure_error(exc), f"a relay pass raised {exc!r}"

    @rule(route=st.sampled_from(sorted(ROUTES)), stream=st.sampled_from(STREAMS), calls=st.integers(1, 3),
          how=st.sampled_from(["transient", "retry_after", "unexpected"]))
    def sink_fails(self, route: str, stream: str, calls: int, how: str) -> None:
        with self.sinks[route].lock:
            self.sinks[route].failing[stream] = (calls, how)

    @rule(route=st.sampled_from(sorted(ROUTES)))
    def sink_recovers(self, route: str) -> None:
        """The sink accepts its refused events from now on (a human fixed them)."""
        with self.sinks[route].lock:
            self.sinks[route].poison.clear()

    @precondition(lambda self: self.fanout is not None)
    @rule(route=st.sampled_from(sorted(ROUTES)))
    def redrive(self, route: str) -> None:
        try:
            self.fo.redrive(route)
        except Exception as exc:
            assert is_infrastructure_error(exc), repr(exc)

    @rule()
    def restart(self) -> None:
        self._new_fanout()

    @rule(seconds=st.sampled_from([0.5, 3.0, 30.0]))
    def jump(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        assert not self.violations, self.violations
        if self.fanout is None:
            return
        with self.plan.paused():
            for dead in self.fo.dead(limit=100_000):
                assert dead.event.id in self.ever_poisoned[dead.route], (
                    f"{dead.route} parked {dead.event.id}, which its sink never refused for good: {dead.error}")
                assert "planned refusal" in dead.error, dead.error
            for status in self.fo.status():
                assert status.state is RouteState.RUNNING, (status.name, status.reason)
            for stream in STREAMS:
                ids = [e.id for e in self._journal_of(stream)]
                assert ids[:len(self.events[stream])] == [i for i, _s in self.events[stream]], f"{stream} lost events"

    def teardown(self) -> None:
        try:
            if self.fanout is not None:
                self._settle()
        finally:
            if self.fanout is not None:
                with self.plan.paused():
                    self.fanout.close()
            self.stack.close()
            self.store.close()

    def _settle(self) -> None:
        """Faults stop, the sinks recover, parked events are redriven, time passes: everything is delivered."""
        with self.plan.paused():
            for sink in self.sinks.values():
                with sink.lock:
                    sink.poison.clear()
                    sink.failing.clear()
            for route in ROUTES:
                self.fo.redrive(route)
            for _ in range(6):
                self.clock.advance(120.0)
                self.fo.drain()
            self.holds()
            for route, sink in self.sinks.items():
                for stream in STREAMS:
                    for event_id, subject in self.events[stream]:
                        if self.takes(route, subject):
                            assert event_id in sink.seen, f"{route} never received {event_id}"
            assert self.fo.dead(limit=100_000) == [], "events still parked after a redrive to healthy sinks"
            assert all(s.behind == 0 for s in self.fo.status()), self.fo.status()


FanOutModel.TestCase.settings = faults.model_settings()
test_fanout_model = FanOutModel.TestCase
