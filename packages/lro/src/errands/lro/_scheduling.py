"""Scheduling resumes: ``resume_via_tasks`` saves the operation with a fresh token and has its callback
scheduled, through core's ``StoreScheduler`` on the operation store (the save and the timer commit together)
or through a remote scheduler such as Cloud Tasks (the save first, then the task; a task that cannot be
created undoes the save)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from errands.core import StoreScheduler, get_registry, telemetry
from errands.core.errors import ConfigError, InfrastructureError, MissingDependencyError, TransientError
from errands.core.runtime import is_infrastructure_error
from errands.core.store import SQLStore

from ._config import Config
from ._operation import Operation, retoken, store_call
from ._operation_table import OperationRecord, SQLOperationStore
from ._resume import HANDLER_PATH, call_user
from ._tokens import ResumeState, claimed, parse_token, scheduled

if TYPE_CHECKING:
    from ._client import LroClient

log = logging.getLogger("errands.lro")

__all__ = ["RESUME_TOPIC", "TIMER_QUEUE", "ResumeScheduling", "cloud_tasks_scheduler", "local_scheduler"]

# Timers of ``resume_via_tasks`` go under ``lro.resume.{neuron}``, in the store queue
# ``lro.timers.{neuron}``: a queue of their own, which no other engine's timer pass claims.
RESUME_TOPIC = "lro.resume"
TIMER_QUEUE = "lro.timers"


def local_scheduler(config: Config, store: SQLStore) -> StoreScheduler:
    """core's ``StoreScheduler`` on the operation store, on this neuron's own timer queue."""
    return StoreScheduler(store, lease_for=config.lease_for, retry_delay=config.retry_delay,
                          queue=f"{TIMER_QUEUE}.{config.neuron}")


def cloud_tasks_scheduler(config: Config) -> Any:
    """The ``cloudtasks`` scheduler of errands-connectors-gcp on the queue ``config`` names."""
    cls = get_registry().schedulers.get("cloudtasks")
    if cls is None:
        raise MissingDependencyError("errands-connectors-gcp (cloudtasks scheduler)", "tasks")
    try:
        return cls(
            project=config.tasks_project, location=config.region, queue=config.queue_name,
            service_account=config.invoker_service_account, host=config.base_url, prefix=config.prefix,
            dispatch_deadline=config.dispatch_deadline,
        )
    except TypeError as exc:
        raise ConfigError(
            f"the cloudtasks scheduler {cls.__name__} does not accept project/location/queue/service_account/host/"
            f"prefix/dispatch_deadline: {exc}",
            field="lro.scheduler", value=cls.__name__,
        ) from exc


class ResumeScheduling:
    """The resumes of one client's operations: their tokens, callback URLs and tasks."""

    def __init__(self, client: LroClient) -> None:
        self.client = client
        self.topic = f"{RESUME_TOPIC}.{client.config.neuron}"
        # Resume tokens only need to be unique: a random prefix per client and a counter.
        self._token_prefix = secrets.token_hex(8)
        self._token_seq = itertools.count(1)
        self._atomic: bool | None = None

    @property
    def atomic(self) -> bool:
        """Whether the timers live in the operation store, so that a save and its timer commit together."""
        atomic = self._atomic
        if atomic is None:
            client = self.client
            atomic = self._atomic = (
                isinstance(client.scheduler, StoreScheduler)
                and isinstance(client.store, SQLOperationStore)
                and client.scheduler.store is client.store.store
            )
        return atomic

    def callback_url(self, name: str, path: str, token: str | None = None) -> str | None:
        """``{host}{prefix}{path}?operation={name}[&token=...]`` or None without a host."""
        config = self.client.config
        base = config.base_url
        if base is None:
            return None
        url = f"{base}{config.prefix}{path}?operation={quote(name, safe='')}"
        return url + (f"&token={token}" if token else "")

    def payload(self, name: str, path: str, token: str) -> dict[str, Any]:
        """What a resume's timer or task carries."""
        payload: dict[str, Any] = {"neuron": self.client.config.neuron, "name": name, "path": path, "token": token}
        url = self.callback_url(name, path, token)
        if url:
            payload["url"] = url
        trace = telemetry.carrier()  # the resume continues the trace of the request that scheduled it
        if trace is not None:
            payload[telemetry.TRACE_KEY] = trace
        return payload

    def require_scheduler(self) -> None:
        """Raise ``ConfigError``: this client has no scheduler to resume operations with."""
        raise ConfigError(
            "this client has no scheduler (lro.scheduler is None and lro.store is not an errands SQL store): it "
            "can read, list, wait for, cancel and delete operations, but not resume them; set lro.scheduler",
            field="lro.scheduler", value=None,
        )

    def save_and_schedule(self, op: Operation, path: str, delay: timedelta | float) -> None:
        """Save ``op`` with a fresh resume token and schedule its callback; ``op`` holds what was saved."""
        client = self.client
        if client.scheduler is None:
            self.require_scheduler()
        if not isinstance(path, str) or (path not in client._handlers and not HANDLER_PATH.match(path)):
            raise ConfigError(f"resume path must look like 'create-agent', got {path!r}", field="path", value=path)
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ConfigError(f"delay must be a timedelta or seconds >= 0, got {delay!r}", field="delay", value=delay)
        token = f"{self._token_prefix}{next(self._token_seq):x}"
        if self.atomic:
            self._save_with_timer(op, path, token, float(seconds))
        else:
            self._save_then_schedule(op, path, token, float(seconds))

    def _save_with_timer(self, op: Operation, path: str, token: str, seconds: float) -> None:
        """The save and its timer in one transaction: the open batch's, or one of their own."""
        store = self.client.store
        assert isinstance(store, SQLOperationStore)
        queue = self.client.scheduler.queue
        what = f"scheduling operation {op.name!r}"
        # The timer first: if the save then loses (LeaseLostError) the timer carries a token that never
        # becomes current and is acknowledged as stale, so no savepoint is needed.
        timer = [(f"lro-{token}", {"topic": self.topic, "payload": self.payload(op.name, path, token)},
                  store.now() + seconds)]
        with op._guard():
            record = op._snapshot(resume_path=path, resume_token=token)
            tx = store.current_tx()
            if tx is not None:
                store_call(what, store.store.enqueue, queue, timer, tx=tx)
                op._record = store_call(what, store.save, record, expected_version=record.version)
                return

            def save() -> OperationRecord:
                with store.batch() as tx:
                    store.store.enqueue(queue, timer, tx=tx)
                    return store.save(record, expected_version=record.version)

            try:
                op._record = store_call(what, save)
            except InfrastructureError:
                # Perhaps only the answer of the commit was lost: then the save and its timer are in.
                committed = self.read_back(op.name, token)
                if committed is None:
                    raise
                op._record = committed

    def _save_then_schedule(self, op: Operation, path: str, token: str, seconds: float) -> None:
        """The save first, then the task: a task created first could call back before the save commits and
        be acknowledged as stale. If the task cannot be created, the save is undone, so that the operation
        is as it was (a callback that rescheduled is retried with its own token) and ``op`` can retry."""
        store = self.client.store
        current_tx = getattr(store, "current_tx", None)
        if current_tx is not None and current_tx() is not None:
            name = type(self.client.scheduler).__name__
            raise ConfigError(
                f"resume_via_tasks with the {name} scheduler cannot join a batch: its task must be created after "
                "the save commits; call it after the batch",
                field="lro.scheduler", value=name,
            )
        what = f"scheduling operation {op.name!r}"
        with op._guard():
            before = op._record
            record = op._snapshot(resume_path=path, resume_token=scheduled(token, store.now() + seconds))
            try:
                saved = op._record = store_call(what, store.save, record, expected_version=record.version)
            except InfrastructureError:
                # Perhaps only the answer of the commit was lost. If the read-back cannot tell, create the
                # task all the same: should the save not have committed, its callback is merely stale.
                committed = self.read_back(op.name, token)
                if committed is None:
                    with contextlib.suppress(Exception):
                        self._schedule_retrying(record, path, token, seconds)
                    raise
                saved = op._record = committed
        try:
            self._schedule_retrying(saved, path, token, seconds)
        except BaseException:
            self._undo_save(op, before, saved)
            raise

    def read_back(self, name: str, token: str | None) -> OperationRecord | None:
        """After a write whose answer was lost: the stored record if it carries ``token`` (the write
        committed), else None (it did not, or the store cannot tell now)."""
        try:
            current = self.client.store.get(name)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            return None
        return current if parse_token(current.resume_token).token == token else None

    def _schedule_retrying(self, record: OperationRecord, path: str, token: str, seconds: float) -> None:
        pauses = self.client._schedule_backoff
        for attempt in range(len(pauses) + 1):
            try:
                self.schedule(record, path, token, seconds, key=f"lro-{token}")
                return
            except TransientError:
                if attempt == len(pauses):
                    raise
                time.sleep(pauses[attempt])

    def _undo_save(self, op: Operation, before: OperationRecord, saved: OperationRecord) -> None:
        """The task of ``saved`` could not be created: put the operation back as it was ``before``. A hold
        ``before`` had on its resume is restored with a fresh expiry, for the handler still runs."""
        store = self.client.store
        state = parse_token(before.resume_token)
        if state.claim and state.token is not None:
            before = retoken(before, claimed(state.token, store.now() + self.client.config.lease_for, state.claim))
        with op._guard():
            try:
                op._record = store_call(f"undoing the save of {op.name!r}", store.save, before,
                                        expected_version=saved.version)
            except Exception as undo_error:
                current = self.read_back(op.name, parse_token(before.resume_token).token) if (
                    isinstance(undo_error, InfrastructureError)) else None
                if current is not None and current.version == saved.version + 1:
                    op._record = current  # only the answer of the undo's commit was lost
                    return
                # The operation keeps a resume whose task does not exist. ``op`` holds what was saved, so
                # that the caller's next resume_via_tasks (a retry) replaces it, and a stale callback of
                # the operation creates the task after all.
                log.error("operation %s was saved for a resume whose task could not be created, and the save "
                          "could not be undone (%s); call resume_via_tasks again", op.name,
                          type(undo_error).__name__)

    def schedule(self, record: OperationRecord, path: str, token: str, seconds: float, *, key: str) -> None:
        """Have the scheduler call back ``record``'s resume ``token`` at ``path`` in ``seconds``."""
        if self.client.scheduler is None:
            self.require_scheduler()
        at = datetime.fromtimestamp(self.client.store.now() + seconds, tz=timezone.utc)
        call_user(self.client.scheduler.schedule, self.topic, self.payload(record.name, path, token), at, key=key)

    def ensure_task(self, record: OperationRecord, state: ResumeState) -> None:
        """Create the task of the operation's pending resume again, in case it went missing (its creation
        failed and so did undoing its save). Its name comes from its token, so a task that exists is not
        doubled; one that already ran finds its token spent and is stale."""
        if record.resume_path is None or state.token is None:
            return
        delay = max(0.0, state.due - self.client.store.now()) if state.due else 0.0
        try:
            self.schedule(record, record.resume_path, state.token, delay, key=f"lro-{state.token}")
        except TransientError:
            raise
        except Exception as exc:
            log.warning("could not make sure the pending resume of %s has its task: %s", record.name,
                        type(exc).__name__)
