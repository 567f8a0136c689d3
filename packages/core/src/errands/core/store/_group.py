"""Group commit: concurrent writers share one store transaction, each returning once its own work is committed.

``SQLStore.group_commit(work)`` runs ``work(tx)`` in a transaction of the store's own. Callers that arrive while
another group is being written queue up; when that group has committed, the first of them leads the next group:
it opens one transaction, runs every queued member's work inside a savepoint of its own, commits once and wakes
the others. The window of a group is the previous group's commit: a caller that finds no group being written
never waits (its group is itself, with no savepoint), and the busier the store, the larger the groups.

- A member returns only after the group's commit: its row is durable (at the store's ``synchronous`` level) when
  it returns, and a crash before the commit loses only work whose call had not returned.
- A member whose work raises (a conflict, bad input, an engine's ``BaseException`` signal such as a fenced-out
  write) is rolled back to its savepoint and gets its own error; the others go on. A failure of the transaction
  itself (the commit, a dropped connection) is every member's error: none of them returned a value for work that
  was not committed.
- The leader runs the others' work in its thread: ``work`` must touch only ``tx`` (no thread-bound state). It runs
  in a copy of its caller's context (``contextvars``): what it reads of the current context (the trace context a
  row stores, a span it starts) is its caller's, not the leader's.
- A member may bring a ``Batch`` beside its work: the same kind of write as others' (an outbox's submit), that the
  leader writes for all the members of its group with the same ``Batch.write`` in one call (a multi-row statement
  per table instead of a few statements per member), first in the transaction and with no savepoint (each
  statement it spares is a step that lets the process's other threads take the interpreter while the leader holds
  the store). ``write`` answers per member: its result, or ``Batch.OWN`` for a member it left to its own ``work``
  (a key taken before, say), which runs after, in a savepoint of its own as any member's. If ``write`` raises, the
  group's transaction, which held nothing but the batch, is rolled back and every member runs its own ``work`` in
  a new one: a member's fault is still that member's alone. ``write`` runs in the leader's context and must read
  only its arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from . import _async
from ._sql import Tx

if TYPE_CHECKING:  # pragma: no cover
    from ._stores import SQLStore

_T = TypeVar("_T")

#: The most members of one group: a bound on the leader's transaction (and on how long its lock is held).
MAX_GROUP = 256

#: The longest a caller that finds no group being written waits for the writers the last group woke (seconds):
#: it waits at most as long as the last group's transaction took, and never longer than this.
MAX_GATHER = 0.002

_MAIN_THREAD = threading.main_thread().ident


class Batch:
    """What a member of a group may bring beside its work: ``item``, written with the other members' of the same
    ``write`` by ``write(tx, items)`` in one call, which returns one result per item, in order (``Batch.OWN``: this
    member's own work is to run instead)."""

    __slots__ = ("item", "write")

    #: A result of ``write`` meaning: not written with the others; run the member's own work.
    OWN: Any = object()

    def __init__(self, write: Callable[[Tx, list[Any]], list[Any]], item: Any) -> None:
        self.write = write
        self.item = item


class _Member(Generic[_T]):
    """A follower's work in a group, and what became of it. ``done`` (a thread's) or ``future`` (a coroutine's, in
    a bridge on its event loop) is released when the member's group has committed, or when it is to lead the next
    group (``batch`` set)."""

    __slots__ = ("batch", "chained", "done", "enter", "error", "future", "next", "together", "value", "work")

    def __init__(self, enter: Callable[..., Any], work: Callable[[Tx], _T],
                 future: asyncio.Future[None] | None = None, together: Batch | None = None) -> None:
        self.enter = enter  # runs ``work`` in the caller's context: ``enter(work, tx)``
        self.work = work
        self.together = together  # this member's part of a write made with others
        self.future = future
        self.done: Any = None
        # A thread's member is woken by the member woken before it (``next``), the main thread's by the leader: only
        # the main thread is interrupted (KeyboardInterrupt), and an interrupted member must not hold up the rest.
        self.chained = False
        if future is None:
            self.done = threading.Lock()
            self.done.acquire()
            self.chained = threading.get_ident() != _MAIN_THREAD
        self.batch: list[_Member[Any]] | None = None
        self.next: _Member[Any] | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.future is None:
            self.done.release()
        elif not self.future.done():
            self.future.set_result(None)

    def result(self) -> _T:
        if self.error is not None:
            raise self.error
        value: _T = self.value
        return value


class _Groups:
    """Callers waiting to be written, and whether a group is being written: of the threads of a store (under its
    committer's lock), or of the coroutines of one event loop (all in its thread: greenlets switch only where
    they await)."""

    __slots__ = ("gathering", "leading", "queue")

    def __init__(self) -> None:
        self.leading = False
        self.queue: list[_Member[Any]] = []
        # A caller leading with no group queued, waiting for the writers the last group had: how many, and
        # the event it waits on (set when that many are queued).
        self.gathering: tuple[int, threading.Event] | None = None


def _direct(work: Callable[[Tx], _T], tx: Tx) -> _T:
    """How a leader runs its own work: in its own context, which is current."""
    return work(tx)


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
        self._threads = _Groups()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Groups] = weakref.WeakKeyDictionary()
        # What the threads' last group was: how many writers it had besides its leader, and how long its
        # transaction took (``_gather_first``).
        self._company = 0
        self._took = 0.0

    def run(self, work: Callable[[Tx], _T], together: Batch | None = None) -> _T:
        """``work(tx)`` committed, in a group with the calls of other threads; its result or its own error.
        ``together``: this call's part of a write its group's leader may make for several members at once."""
        groups = self._threads
        gathering: threading.Event | None = None
        with self._lock:
            if not groups.leading:
                groups.leading = True
                member = None
                if self._company:
                    gathering = threading.Event()
                    groups.gathering = (self._company, gathering)
            else:
                # Run by the leader, in this caller's context (a copy: one context is entered by one thread at a time).
                member = _Member(contextvars.copy_context().run, work, together=together)
                queue = groups.queue
                queue.append(member)
                waiting = groups.gathering
                if waiting is not None and len(queue) >= waiting[0]:
                    waiting[1].set()
        if member is None:
            if gathering is not None:
                return self._gather_first(groups, gathering, work, together)
            # No group is being written and the last one had no company: this call is a group of its own, with no
            # savepoint and no wait (the hot path of one writer); calls arriving meanwhile form the next group.
            try:
                started = time.perf_counter()
                with self._store.transaction() as tx:
                    out = work(tx)
                self._took, self._company = time.perf_counter() - started, 0
                return out
            finally:
                self._hand_over(groups, self._lock)
        try:
            member.done.acquire()  # released when this member's group has committed, or when it is to lead
            following = member.next
            if following is not None:
                # Wake the next member of the committed group now that this one runs: woken together, they would
                # each wake only to wait for the interpreter held by another, and switch twice.
                member.next = None
                following.wake()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt in the main thread): leave the queue if still in it;
            # if a group took this member already, wait for it, and lead it if this member is its leader, so that
            # no other caller is left waiting.
            with self._lock:
                queued = member in groups.queue
                if queued:
                    groups.queue.remove(member)
            if not queued:
                member.done.acquire()
                if member.batch is not None:
                    self._lead(groups, member.batch, self._lock)
            raise
        if member.batch is not None:
            self._lead(groups, member.batch, self._lock)
        return member.result()

    def _gather_first(self, groups: _Groups, gathering: threading.Event, work: Callable[[Tx], _T],
                      together: Batch | None) -> _T:
        """Lead a group, having found none being written just after one with company: the writers that group
        woke are coming back with their next calls, so wait for as many as it had (at most as long as its
        transaction took, ``MAX_GATHER`` at most) and write them with this call, one commit for all, instead of
        this call alone and them behind it. A call that comes after a group of one never waits."""
        try:
            gathering.wait(min(self._took, MAX_GATHER))
        except BaseException:
            # Interrupted before its work ran (nothing of it written): whoever queued meanwhile leads.
            with self._lock:
                groups.gathering = None
            self._hand_over(groups, self._lock)
            raise
        with self._lock:
            groups.gathering = None
        own: _Member[_T] = _Member(_direct, work, together=together)
        self._lead(groups, [own], self._lock)
        return own.result()

    def _lead(self, groups: _Groups, batch: list[_Member[Any]], lock: threading.Lock | None) -> None:
        """Write the group ``batch`` leads (with the callers queued by now), hand the lead over, wake the others
        (``lock``: the committer's, for the threads' groups; None for a loop's coroutines)."""
        self._gather(groups, batch, lock)
        try:
            started = time.perf_counter()
            self._commit(batch)
            if lock is not None:  # the threads' groups: what the next caller finding none being written waits for
                self._took, self._company = time.perf_counter() - started, len(batch) - 1
        finally:
            self._hand_over(groups, lock)
            chain: list[_Member[Any]] = []
            for m in batch[1:]:
                if m.chained:
                    chain.append(m)
                else:
                    m.wake()
            if chain:
                # The threads' members wake one another, one after the other (``run``).
                for a, b in itertools.pairwise(chain):
                    a.next = b
                chain[0].wake()

    def run_bridged(self, work: Callable[[Tx], _T], together: Batch | None = None) -> _T:
        """``run`` for a coroutine's work in a bridge of this store (``run_async`` on PostgreSQL): the groups are
        those of the coroutines of this event loop, each one's transaction on the loop's async pool, and a
        follower awaits (the loop runs on) rather than blocks."""
        loop = asyncio.get_running_loop()
        groups = self._loops.get(loop)
        if groups is None:
            with self._lock:
                groups = self._loops.setdefault(loop, _Groups())
        if not groups.leading:
            groups.leading = True
            try:
                with self._store.transaction() as tx:
                    return work(tx)
            finally:
                self._hand_over(groups, None)
        future: asyncio.Future[None] = loop.create_future()
        member = _Member(contextvars.copy_context().run, work, future, together)
        groups.queue.append(member)
        try:
            # Shielded: a cancelled caller must not cancel the wake-up a leader may be handing it.
            _async.await_(asyncio.shield(future))
        except BaseException:
            if member in groups.queue:
                groups.queue.remove(member)  # not taken into a group: nothing of it is written
            elif member.batch is not None:
                self._lead(groups, member.batch, None)  # made the next leader: the others wait for it
            raise
        if member.batch is not None:
            self._lead(groups, member.batch, None)
        if isinstance(member.error, asyncio.CancelledError) and member.batch is None:
            # The group's leader was cancelled, and the group's transaction with it; this caller was not: its work
            # goes again, in a transaction of its own.
            with self._store.transaction() as tx:
                return work(tx)
        return member.result()

    def _hand_over(self, groups: _Groups, lock: threading.Lock | None) -> None:
        """Wake the first of the callers waiting to lead the next group (it gathers the others when it starts), or,
        if none waits, lead no more (``lock``: the committer's, for the threads' groups)."""
        with lock or contextlib.nullcontext():
            queue = groups.queue
            if not queue:
                groups.leading = False
                return
            leader = queue.pop(0)
        leader.batch = [leader]
        leader.wake()

    def _gather(self, groups: _Groups, batch: list[_Member[Any]], lock: threading.Lock | None) -> None:
        """Add to the group a leader starts every caller queued by then (up to ``max_group``): those that arrived
        while it was being woken write with it, rather than wait for the next commit."""
        with lock or contextlib.nullcontext():
            queue = groups.queue
            room = self._max - len(batch)
            batch += queue[:room]
            del queue[:room]

    def _commit(self, batch: list[_Member[Any]]) -> None:
        """Write every member's work in one transaction, each in a savepoint (the members of a ``Batch`` together,
        in one call, first); settle every member."""
        try:
            try:
                with self._store.transaction() as tx:
                    if len(batch) == 1:
                        # A group of one (its caller found a group being written): its transaction is its own.
                        m = batch[0]
                        m.value = m.enter(m.work, tx)
                        return
                    self._run_each(tx, self._write_together(tx, batch))
            except _BatchFailed:
                # A batch write failed as a whole. It ran first in its transaction, which is rolled back, so nothing
                # but the batch was lost: every member runs its own work in a new one, where a member's fault is its
                # own alone.
                for m in batch:
                    m.value = m.error = None
                with self._store.transaction() as tx:
                    self._run_each(tx, batch)
        except BaseException as exc:
            # Nothing of the group was committed: every member that had no error of its own gets this one.
            for m in batch:
                if m.error is None:
                    m.value, m.error = None, exc

    @staticmethod
    def _run_each(tx: Tx, members: list[_Member[Any]]) -> None:
        """Run each member's own work in ``tx``, in a savepoint of its own."""
        for i, m in enumerate(members):
            savepoint = f"em_group_{i}"
            tx.execute(f"SAVEPOINT {savepoint}")
            try:
                m.value = m.enter(m.work, tx)
            except (KeyboardInterrupt, SystemExit):
                raise  # the leader's thread is interrupted: the group's transaction ends with it
            except BaseException as exc:
                # This member's failure is its own (an error, or an engine's signal such as a fenced-out write):
                # undo its statements, keep the others'.
                tx.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                m.value, m.error = None, exc
            tx.execute(f"RELEASE SAVEPOINT {savepoint}")

    @staticmethod
    def _write_together(tx: Tx, batch: list[_Member[Any]]) -> list[_Member[Any]]:
        """Write the members that share a ``Batch.write`` with others, each such set in one call, before any
        member's own work and with no savepoint (a failed call fails the transaction: ``_BatchFailed``); the
        members whose own work is still to run, in order."""
        sets: dict[Any, list[_Member[Any]]] = {}
        for m in batch:
            if m.together is not None:
                sets.setdefault(m.together.write, []).append(m)
        written: set[int] = set()
        for write, members in sets.items():
            if len(members) < 2:
                continue
            try:
                results = write(tx, [m.together.item for m in members if m.together is not None])
                if len(results) != len(members):
                    raise AssertionError(f"a batch write returned {len(results)} results for {len(members)} items")
            except Exception as exc:
                raise _BatchFailed from exc
            for m, result in zip(members, results):
                if result is not Batch.OWN:
                    m.value = result
                    written.add(id(m))
        return [m for m in batch if id(m) not in written] if written else batch


class _BatchFailed(Exception):
    """A ``Batch.write`` raised: its group's transaction is rolled back and every member runs its own work."""
