"""Group commit: concurrent writers share one store transaction, each returning once its own work is committed.

``SQLStore.group_commit(work)`` runs ``work(tx)`` in a transaction of the store's own. Callers that arrive while
another group is being written queue up; when that group has committed, the first of them leads the next group:
it opens one transaction, runs every queued member's work inside a savepoint of its own, commits once and wakes
the others. The window of a group is the previous group's commit: a caller that finds no group being written
never waits (its group is itself, with no savepoint), and the busier the store, the larger the groups.

- A member returns only after the group's commit: its row is durable (at the store's ``synchronous`` level) when
  it returns, and a crash before the commit loses only work whose call had not returned.
- A member whose work raises (a conflict, bad input) is rolled back to its savepoint and gets its own error; the
  others go on. A failure of the transaction itself (the commit, a dropped connection) is every member's error:
  none of them returned a value for work that was not committed.
- The leader runs the others' work in its thread: ``work`` must touch only ``tx`` (no thread-bound state).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from ._sql import Tx

if TYPE_CHECKING:  # pragma: no cover
    from ._stores import SQLStore

_T = TypeVar("_T")

#: The most members of one group: a bound on the leader's transaction (and on how long its lock is held).
MAX_GROUP = 256


class _Member(Generic[_T]):
    """A follower's work in a group, and what became of it."""

    __slots__ = ("batch", "done", "error", "value", "work")

    def __init__(self, work: Callable[[Tx], _T]) -> None:
        self.work = work
        # Held until the member's group has committed, or until it is to lead the next group (``batch`` set).
        self.done = threading.Lock()
        self.done.acquire()
        self.batch: list[_Member[Any]] | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> _T:
        if self.error is not None:
            raise self.error
        value: _T = self.value
        return value


class GroupCommitter:
    """The leader/follower batcher of one store (``SQLStore.group_commit``).

    Args:
        store: the store whose transactions the groups use.
        max_group: the most members of one group.
    """

    def __init__(self, store: SQLStore, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max = max_group
        self._lock = threading.Lock()
        self._queue: list[_Member[Any]] = []
        self._leading = False

    def run(self, work: Callable[[Tx], _T]) -> _T:
        """``work(tx)`` committed, in a group with the calls of other threads; its result or its own error."""
        lock = self._lock
        with lock:
            if not self._leading:
                self._leading = True
                member = None
            else:
                member = _Member(work)
                self._queue.append(member)
        if member is None:
            # No group is being written: this call is a group of its own, with no savepoint and no wait (the hot
            # path of one writer); calls arriving meanwhile form the next group.
            try:
                with self._store.transaction() as tx:
                    return work(tx)
            finally:
                self._hand_over()
        member.done.acquire()  # released when this member's group has committed, or when it is to lead
        batch = member.batch
        if batch is not None:
            try:
                self._commit(batch)
            finally:
                self._hand_over()
                for m in batch[1:]:
                    m.done.release()
        return member.result()

    def _hand_over(self) -> None:
        """Make the next group of the callers waiting and wake its leader, or, if none waits, lead no more."""
        with self._lock:
            queue = self._queue
            if not queue:
                self._leading = False
                return
            batch = queue[:self._max]
            del queue[:self._max]
        batch[0].batch = batch
        batch[0].done.release()

    def _commit(self, batch: list[_Member[Any]]) -> None:
        """Write every member's work in one transaction, each in a savepoint; settle every member."""
        try:
            with self._store.transaction() as tx:
                for i, m in enumerate(batch):
                    savepoint = f"em_group_{i}"
                    tx.execute(f"SAVEPOINT {savepoint}")
                    try:
                        m.value = m.work(tx)
                    except Exception as exc:
                        # This member's failure is its own: undo its statements, keep the others'.
                        tx.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                        m.value, m.error = None, exc
                    tx.execute(f"RELEASE SAVEPOINT {savepoint}")
        except BaseException as exc:
            # Nothing of the group was committed: every member that had no error of its own gets this one.
            for m in batch:
                if m.error is None:
                    m.value, m.error = None, exc
