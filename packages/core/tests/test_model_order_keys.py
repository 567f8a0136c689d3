"""Model-based test of the task claim with ordering keys, priorities, retries, cancels and lapsed leases,
on SQLite and PostgreSQL: random submits (keyed or not, of several priorities), claims by two workers,
outcomes (success, a retry later, dead, cancelled), cancels of pending tasks and clock jumps, checked
against a small model of what a claim may take.

After every claim:
- every task claimed was claimable: due and pending, or running with a lapsed lease, and, when keyed, the
  head of its key (no task of the key with a lower ``order_seq`` pending or running);
- the claim took as many as it could (``min(limit, claimable)``) and by priority: none left behind had a
  higher priority than one taken.
After every step: the statuses in the store are the model's, and no two tasks of one key run at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from errands.core import TaskEngine, open_store
from errands.core import _tasks_table as table
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

LEASE = 10.0
KEYS = st.sampled_from([None, "k0", "k1", "k2"])


@dataclass
class Task:
    key: str | None
    seq: int
    priority: int
    status: str = "PENDING"
    available_at: float = 0.0
    lease: float = 0.0
    token: int = 0


class OrderKeys(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.store = open_store(self.url)
        TaskEngine(self.store)  # the tasks tables
        with self.store.transaction() as tx:
            tx.execute("DELETE FROM em_tasks")
        self.now = 1_000_000.0
        self.tasks: dict[str, Task] = {}

    def teardown(self) -> None:
        self.store.close()

    def _live(self, task: Task) -> bool:
        return task.status in ("PENDING", "RUNNING")

    def _claimable(self, task_id: str) -> bool:
        t = self.tasks[task_id]
        due = (t.status == "PENDING" and t.available_at <= self.now) or (t.status == "RUNNING" and t.lease <= self.now)
        if not due or t.key is None:
            return due
        return not any(o.key == t.key and self._live(o) and o.seq < t.seq for o in self.tasks.values())

    @rule(key=KEYS, priority=st.integers(-1, 2))
    def submit(self, key: str | None, priority: int) -> None:
        task_id = f"t{len(self.tasks)}"
        with self.store.transaction() as tx:
            table.insert(tx, task_id, "x", None, self.now, None, self.now, priority=priority, order_key=key,
                         order_seq=None if key is None else len(self.tasks))
        self.tasks[task_id] = Task(key=key, seq=len(self.tasks), priority=priority, available_at=self.now)

    @rule(owner=st.sampled_from(["w1", "w2"]), limit=st.integers(1, 3))
    def claim(self, owner: str, limit: int) -> None:
        claimable = {i for i in self.tasks if self._claimable(i)}
        with self.store.transaction() as tx:
            got = table.claim(tx, "x", owner, [], limit, self.now + LEASE, self.now)
        taken = {c.id for c in got}
        assert taken <= claimable, (taken - claimable, self.tasks)
        assert len(taken) == min(limit, len(claimable)), (taken, claimable)
        left = claimable - taken
        if taken and left:
            assert min(self.tasks[i].priority for i in taken) >= max(self.tasks[i].priority for i in left)
        for c in got:
            t = self.tasks[c.id]
            t.status, t.lease, t.token = "RUNNING", self.now + LEASE, c.token

    def _running(self) -> list[str]:
        return sorted(i for i, t in self.tasks.items() if t.status == "RUNNING")

    @precondition(lambda self: any(t.status == "RUNNING" for t in self.tasks.values()))
    @rule(data=st.data(), outcome=st.sampled_from(["SUCCEEDED", "retry", "DEAD", "CANCELLED"]))
    def finish(self, data: Any, outcome: str) -> None:
        task_id = data.draw(st.sampled_from(self._running()))
        t = self.tasks[task_id]
        columns: dict[str, Any] = ({"status": "PENDING", "available_at": self.now + 5} if outcome == "retry"
                                   else {"status": outcome, "finished_at": self.now})
        with self.store.transaction() as tx:
            assert table.finish(tx, task_id, t.token, columns, self.now)
        t.status = str(columns["status"])
        if outcome == "retry":
            t.available_at = self.now + 5

    @precondition(lambda self: any(t.status == "PENDING" for t in self.tasks.values()))
    @rule(data=st.data())
    def cancel(self, data: Any) -> None:
        task_id = data.draw(st.sampled_from(sorted(i for i, t in self.tasks.items() if t.status == "PENDING")))
        with self.store.transaction() as tx:
            table.cancel(tx, task_id, self.now)
        self.tasks[task_id].status = "CANCELLED"

    @rule(seconds=st.sampled_from([1.0, 6.0, 11.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def the_store_is_the_model(self) -> None:
        with self.store.transaction() as tx:
            rows = dict(tx.query("SELECT id, status FROM em_tasks"))
        assert rows == {i: t.status for i, t in self.tasks.items()}
        running = [t.key for t in self.tasks.values() if t.status == "RUNNING" and t.key is not None]
        assert len(running) == len(set(running)), "two tasks of one key run at once"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def test_claims_of_keyed_tasks_follow_the_model(backend: str, request: Any, tmp_path: Any) -> None:
    OrderKeys.url = (str(request.getfixturevalue("postgres_url")) if backend == "postgres"
                     else f"sqlite:///{tmp_path / 'keys.db'}")
    run_state_machine_as_test(OrderKeys, settings=settings(max_examples=40, stateful_step_count=40, deadline=None,
                                                           suppress_health_check=[HealthCheck.too_slow]))
