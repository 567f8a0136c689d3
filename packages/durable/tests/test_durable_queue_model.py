"""A model test of queue admission (hypothesis, stateful): random starts with priorities and dedup ids, two
workers with their own ``worker_concurrency``, executions finishing and terminated at random, the clock
jumping. Checked after every step: the queue's ``concurrency``, each worker's ``worker_concurrency`` and the
rate limit hold; each admission took the lowest priority (then the oldest) of what waited; a dedup id is
refused exactly while an unfinished execution holds it; at the end everything ran once."""

from __future__ import annotations

from typing import Any

from errands.core import FakeClock, open_store
from errands.core.testing import faults
from errands.durable import DurableContext, DurableRunner, ExecutionStatus, QueueDeduplicatedError
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

CONCURRENCY = 3
WORKER_CONCURRENCY = 2
RATE = (4, 10.0)


def _job(event: Any, ctx: DurableContext) -> Any:
    ctx.wait_for_signal("done")
    return event


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = open_store("memory://", clock=self.clock)
        self.runners = [DurableRunner(self.store, functions={"job": _job}) for _ in range(2)]
        for r in self.runners:
            r.add_queue("q", concurrency=CONCURRENCY, worker_concurrency=WORKER_CONCURRENCY, rate_limit=RATE)
        self.waiting: dict[str, tuple[int, int]] = {}  # id -> (priority, start order)
        self.admitted: dict[str, int] = {}  # id -> the worker that admitted it, while unfinished
        self.admissions: list[float] = []
        self.dedup: dict[str, str] = {}  # dedup id -> unfinished holder
        self.finished: set[str] = set()
        self.count = 0

    def teardown(self) -> None:
        try:
            self.check_drained()
        finally:
            for r in self.runners:
                r.close()
            self.store.close()

    def _status(self, eid: str) -> ExecutionStatus:
        return self.runners[0].get(eid).status

    def _ended(self, eid: str) -> None:
        self.admitted.pop(eid, None)
        self.waiting.pop(eid, None)
        self.finished.add(eid)
        for key, holder in list(self.dedup.items()):
            if holder == eid:
                del self.dedup[key]

    @rule(priority=st.integers(0, 2), dedup=st.sampled_from([None, "a", "b"]))
    def start(self, priority: int, dedup: str | None) -> None:
        eid = f"e{self.count:04d}"  # ids sort as they were started (ties of time)
        self.count += 1
        try:
            self.runners[0].start("job", eid, execution_id=eid, queue="q", priority=priority, dedup_id=dedup)
        except QueueDeduplicatedError as exc:
            assert dedup in self.dedup and exc.execution_id == self.dedup[dedup]
            return
        assert dedup is None or dedup not in self.dedup
        if dedup is not None:
            self.dedup[dedup] = eid
        self.waiting[eid] = (priority, self.count)
        assert self._status(eid) is ExecutionStatus.ENQUEUED

    @rule(worker=st.integers(0, 1))
    def work(self, worker: int) -> None:
        before = dict(self.waiting)
        self.runners[worker].work_once()
        now_admitted = [eid for eid in before if self._status(eid) is not ExecutionStatus.ENQUEUED]
        for eid in now_admitted:
            rank = before[eid]
            still = [before[o] for o in before if o not in now_admitted]
            assert all(rank < other for other in still), (eid, rank, still)  # lowest priority, then oldest
            del self.waiting[eid]
            self.admitted[eid] = worker
            self.admissions.append(self.clock.now())
        for eid in list(self.admitted):
            if self._status(eid).terminal:
                self._ended(eid)

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        running = sorted(self.admitted)
        if running:
            self.runners[0].send_signal(data.draw(st.sampled_from(running)), "done")

    @rule(data=st.data())
    def terminate(self, data: st.DataObject) -> None:
        live = sorted({*self.admitted, *self.waiting})
        if live:
            eid = data.draw(st.sampled_from(live))
            self.runners[1].terminate(eid)
            self._ended(eid)

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def limits_hold(self) -> None:
        assert len(self.admitted) <= CONCURRENCY
        for worker in (0, 1):
            assert sum(1 for w in self.admitted.values() if w == worker) <= WORKER_CONCURRENCY
        now = self.clock.now()
        assert sum(1 for t in self.admissions if t > now - RATE[1]) <= RATE[0]

    def check_drained(self) -> None:
        for _ in range(200):
            for eid in sorted(self.admitted):
                self.runners[0].send_signal(eid, "done")
            for r in self.runners:
                r.drain()
            self.work(0)
            if not self.waiting and not self.admitted:
                break
            self.clock.advance(11)
        assert not self.waiting and not self.admitted
        for eid in self.finished:
            assert self._status(eid).terminal


QueueModel.TestCase.settings = faults.model_settings()
test_queue_model = QueueModel.TestCase
