"""Queues of executions: ``DurableRunner.add_queue`` and ``start(..., queue=...)``.

An execution started on a queue is ``ENQUEUED`` until a worker admits it. A worker admits a queue's
executions in one transaction that holds the queue's lock (a row lock on PostgreSQL, SQLite's single
writer), counts what the queue has admitted and not yet finished (every process's: ``concurrency``; this
worker's: ``worker_concurrency``) and admitted within the rate limit's period, and admits at most what the
limits leave, lowest ``priority`` first, then oldest. Admitted executions are ``RUNNING``, queued to run
and claimed by the admitting worker in the same transaction. An admitted execution counts against its
queue until it finishes, waits and suspensions included (as DBOS counts a dequeued workflow).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from errands.core import ConfigError, Lease, telemetry
from errands.core.runtime import error_text, is_infrastructure_error
from errands.core.store import SQLStore, Tx

from . import _executions as executions
from . import _schema as schema
from ._errors import QueueDeduplicatedError

log = logging.getLogger("errands.durable")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """A queue's limits, as ``DurableRunner.add_queue`` took them (None: no limit)."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    rate_limit: tuple[int, float] | None = None


def _positive_int(field: str, value: Any) -> ConfigError | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return ConfigError(f"{field} must be a positive integer or None, got {value!r}", field=field, value=value)


def _rate_limit(value: Any) -> ConfigError | None:
    if value is None:
        return None
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], int)
          and not isinstance(value[0], bool) and value[0] > 0 and isinstance(value[1], (int, float))
          and not isinstance(value[1], bool) and math.isfinite(value[1]) and value[1] > 0)
    if ok:
        return None
    return ConfigError(f"rate_limit must be (limit, period_seconds) with a positive integer limit and positive "
                       f"seconds, e.g. (10, 1.0), got {value!r}", field="rate_limit", value=value)


class Queues:
    """The queues one runner knows, and the admission of their executions by this runner's worker.

    Args:
        store: the runner's store.
        lease_for: how long the claim on an admitted execution lasts.
    """

    def __init__(self, store: SQLStore, *, lease_for: float) -> None:
        self.store = store
        self.lease_for = lease_for
        #: This worker, as the queue rows record who admitted them (``worker_concurrency`` counts its own).
        self.executor = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._queues: dict[str, QueueConfig] = {}
        self._turn = 0

    def add(self, name: Any, *, concurrency: Any = None, worker_concurrency: Any = None,
            rate_limit: Any = None) -> QueueConfig:
        """Declare (or change) a queue of this runner; every problem is reported at once."""
        problems = [p for p in (
            None if isinstance(name, str) and name.strip() else ConfigError(
                f"queue name must be a non-empty string, got {name!r}", field="name", value=name),
            _positive_int("concurrency", concurrency), _positive_int("worker_concurrency", worker_concurrency),
            _rate_limit(rate_limit)) if p is not None]
        if problems:
            raise ConfigError.collect(problems, f"queue {name!r}")
        config = QueueConfig(name=name, concurrency=concurrency, worker_concurrency=worker_concurrency,
                             rate_limit=(int(rate_limit[0]), float(rate_limit[1])) if rate_limit else None)
        self._queues[name] = config
        return config

    def get(self, name: str) -> QueueConfig:
        """The queue ``name``.

        Raises:
            ConfigError: no such queue on this runner (the message names the registered ones).
        """
        config = self._queues.get(name) if isinstance(name, str) else None
        if config is None:
            known = ", ".join(repr(q) for q in sorted(self._queues)) or "none"
            raise ConfigError(f"queue {name!r} is not registered on this runner (registered: {known}); declare it "
                              "with runner.add_queue(name, ...)", field="queue", value=name)
        return config

    # -- starting -------------------------------------------------------------------------------
    def start(self, tx: Tx, execution_id: str, function: str, input_text: str, now: float, *, queue: str,
              priority: int, dedup_id: str | None, timeout: float | None = None) -> bool:
        """Start an execution on ``queue`` (``ENQUEUED``), idempotent on its id as ``start`` is. Whether it
        was created. ``timeout`` counts from the start, time in the queue included.

        Raises:
            QueueDeduplicatedError: an unfinished execution of the queue holds ``dedup_id`` (nothing written).
            AlreadyExistsError: the id exists with another function or input.
        """
        if schema.function_and_input(tx, execution_id) is None:
            # The caller's trace context, read here in its thread, waits with the row for the admission.
            if schema.insert_queue_item(tx, execution_id, queue, priority, dedup_id, now,
                                        trace=telemetry.carrier_text()):
                return executions.start(self.store, tx, execution_id, function, input_text, now, queued=True,
                                        timeout=timeout)
            holder = schema.dedup_holder(tx, queue, dedup_id) if dedup_id is not None else None
            if holder is not None and holder != execution_id:
                raise QueueDeduplicatedError(queue, dedup_id or "", holder)
        return executions.start(self.store, tx, execution_id, function, input_text, now)

    # -- admitting ------------------------------------------------------------------------------
    def admit(self, room: int) -> list[Lease]:
        """Admit what the queues' limits allow, at most ``room`` executions in all, claimed for this worker.
        A store fault admits nothing from that queue this round."""
        leases: list[Lease] = []
        names = list(self._queues)
        if not names or room <= 0:
            return leases
        self._turn = (self._turn + 1) % len(names)  # no queue always goes first
        for name in names[self._turn:] + names[:self._turn]:
            if len(leases) >= room:
                break
            try:
                leases += self._admit(self._queues[name], room - len(leases))
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                log.warning("admitting executions of queue %r failed (%s); trying again next round", name,
                            error_text(exc))
        return leases

    def _room(self, tx: Tx, config: QueueConfig, room: int, now: float) -> int:
        since = now - config.rate_limit[1] if config.rate_limit else None
        active, mine, recent = schema.queue_load(tx, config.name, self.executor, since)
        for limit, used in ((config.concurrency, active), (config.worker_concurrency, mine),
                            (config.rate_limit[0] if config.rate_limit else None, recent)):
            if limit is not None:
                room = min(room, limit - used)
        return room

    def _admit(self, config: QueueConfig, room: int) -> list[Lease]:
        now = self.store.clock.now()
        with self.store.read() as tx:  # a look without the lock: an idle or full queue costs no write
            if not schema.has_waiting(tx, config.name) or self._room(tx, config, room, now) <= 0:
                return []
        with self.store.transaction() as tx:
            now = self.store.clock.now()
            schema.lock_queue(tx, config.name, now)
            room = self._room(tx, config, room, now)
            if room <= 0:
                return []
            admitted = schema.admit(tx, config.name, self.executor, room, now)
            if not admitted:
                return []
            # Each invocation continues the trace of its start, as one queued by an unqueued start does.
            self.store.enqueue(schema.QUEUE, [(i, telemetry.queued(trace) if trace else None, now)
                                              for i, trace in admitted], tx=tx)
            claimed: list[Lease] = self.store.claim_keys(schema.QUEUE, [i for i, _ in admitted],
                                                         lease_for=self.lease_for, tx=tx)
            return claimed


def check_start(queue: Any, priority: Any, dedup_id: Any) -> None:
    """Check a start's queue arguments (all problems at once)."""
    problems: list[ConfigError] = []
    if not isinstance(priority, int) or isinstance(priority, bool):
        problems.append(ConfigError(f"priority must be an integer (lower runs first, default 0), got {priority!r}",
                                    field="priority", value=priority))
    if dedup_id is not None and (not isinstance(dedup_id, str) or not dedup_id):
        problems.append(ConfigError(f"dedup_id must be a non-empty string or None, got {dedup_id!r}",
                                    field="dedup_id", value=dedup_id))
    if queue is None and (dedup_id is not None or priority != 0):
        problems.append(ConfigError("priority and dedup_id apply to a queue: pass queue= too", field="queue",
                                    value=None))
    if problems:
        raise ConfigError.collect(problems, "start")

