"""``LroClient``: creates, resumes, lists, waits for and cancels operations."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import inspect
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Mapping, Sequence
from urllib.parse import quote

from errands.core import (
    Beat,
    ConfigError,
    InfrastructureError,
    Lease,
    LeaseLostError,
    MissingDependencyError,
    NotFoundError,
    SQLStore,
    StoreScheduler,
    TransientError,
    heartbeat,
    is_infrastructure_error,
    open_store,
)
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.rpc import code_pb2  # type: ignore[import-untyped]

from ._auth import SIGNATURE_HEADER, CallbackAuth, sign
from ._codec import encode_state, pack_any
from ._config import Config, config_from_env
from ._operation import Operation, retoken, store_call
from ._operation_table import BatchAborted, OperationRecord, OperationStore, SQLOperationStore
from ._tokens import ResumeState, claimed, parse_token, scheduled, used

log = logging.getLogger("errands.lro")

__all__ = ["RESUME_TOPIC", "LroClient", "ResumableHandler", "ResumeBusyError", "ResumeOutcome"]

# Timers of ``resume_via_tasks`` go under ``lro.resume.{neuron}``, in the store queue
# ``lro.timers.{neuron}``: a queue of their own, which no other engine's timer pass claims or parks.
RESUME_TOPIC = "lro.resume"
TIMER_QUEUE = "lro.timers"

_NAME = re.compile(r"^operations/[A-Za-z0-9][A-Za-z0-9._~-]{0,199}$")
_PATH = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")

HandlerFn = Callable[[Operation], "Awaitable[None] | None"]


@dataclass(frozen=True, slots=True)
class ResumableHandler:
    """A handler that resumes operations, served at ``{prefix}{path}``.

    Args:
        path: the path under the callback prefix, e.g. ``"create-agent"``.
        fn: ``fn(op)``, sync or async. Raise ``TransientError`` to be called again later; any other
            exception fails the operation with ``INTERNAL``.
    """

    path: str
    fn: HandlerFn

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not _PATH.match(self.path):
            raise ConfigError(
                f"handler path must be URL path segments of letters, digits and '._~-' without a leading '/', "
                f"got {self.path!r}",
                field="path", value=self.path,
            )
        if not callable(self.fn):
            raise ConfigError(f"handler for {self.path!r} must be callable, got {self.fn!r}", field="fn", value=self.fn)


class ResumeBusyError(TransientError):
    """Another callback runs this resume now (a duplicate delivery, or a retry while the first attempt
    still runs): come back after ``retry_after``. Callbacks answer it with 503 and ``Retry-After``."""


class ResumeOutcome(str, enum.Enum):
    """What one callback did."""

    RAN = "ran"                    # the handler ran; the operation is still running
    COMPLETED = "completed"        # the operation is done (completed or failed by the handler)
    FAILED = "failed"              # the handler raised; the operation failed with INTERNAL
    CANCELLED = "cancelled"        # cancellation was requested; the operation ended CANCELLED
    ALREADY_DONE = "already_done"  # the operation was done before the callback
    STALE = "stale"                # a newer resume_via_tasks superseded this callback
    LOST = "lost"                  # another writer saved first; its run carries on

    def __str__(self) -> str:
        return self.value


def _run_coroutine(aw: Awaitable[Any]) -> Any:
    """Run an awaitable to completion from sync code, whether or not a loop runs on this thread."""

    async def _main() -> Any:
        return await aw

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_main())
    box: dict[str, Any] = {}

    def _thread() -> None:
        try:
            box["value"] = asyncio.run(_main())
        except BaseException as exc:  # re-raised on the calling thread
            box["error"] = exc

    t = threading.Thread(target=_thread)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    if result is not None and inspect.isawaitable(result):
        return _run_coroutine(result)
    return result


def parse_filter(text: str) -> tuple[bool | None, str, str | None]:
    """``(done, prefix, exact)`` of a ListOperations filter.

    Supported: clauses joined by ``AND``: ``done = true|false``, ``name = "operations/x"`` (exact),
    ``name = "operations/x*"`` or ``name:"operations/x"`` (prefix).
    """
    done: bool | None = None
    prefix = ""
    exact: str | None = None
    if not text or not text.strip():
        return done, prefix, exact
    for clause in re.split(r"\s+AND\s+", text.strip()):
        m = re.fullmatch(r"\s*done\s*=\s*(true|false)\s*", clause, flags=re.IGNORECASE)
        if m:
            done = m.group(1).lower() == "true"
            continue
        m = re.fullmatch(r'\s*name\s*(=|:)\s*"([^"*]*)(\*?)"\s*', clause)
        if m:
            if m.group(1) == ":" or m.group(3):
                prefix = m.group(2)
            else:
                exact = m.group(2)
            continue
        raise ConfigError(
            f"filter clause {clause.strip()!r} is not supported; use 'done = true|false', 'name = \"operations/x\"' "
            "or 'name = \"operations/prefix*\"', joined by AND",
            field="filter", value=text,
        )
    return done, prefix, exact


class _ClientBatch:
    """The context manager of ``LroClient.batch``: the store's batch, with ``BatchAborted`` reported as
    ``TransientError``."""

    __slots__ = ("_inner",)

    def __init__(self, inner: contextlib.AbstractContextManager[Any]) -> None:
        self._inner = inner

    def __enter__(self) -> None:
        self._inner.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            return bool(self._inner.__exit__(exc_type, exc, tb))
        except BatchAborted as aborted:
            raise TransientError(f"the batch was rolled back: {aborted}") from aborted


class _Renewal:
    """The heartbeat of one running handler: renews its hold on the resume and the lease of the timer that
    fired it, until ``stop``."""

    __slots__ = ("beat", "claim", "client", "finished", "lease", "op", "token")

    def __init__(self, client: LroClient, op: Operation, token: str | None, claim: str, lease: Lease | None) -> None:
        self.client, self.op, self.token, self.claim, self.lease = client, op, token, claim, lease
        self.finished = False
        self.beat: Beat = heartbeat(self.renew, lease_for=client.config.lease_for, what=f"the resume of {op.name}")

    def renew(self) -> bool:
        if self.finished:
            return True
        lease_for = self.client.config.lease_for
        if self.claim and self.token is not None:
            held = self.op._renew_hold(self.token, self.claim, lease_for)
            if held is None:  # the operation is done
                self.stop()
                return True
            if not held:
                return False
        core = self.client.core_store
        if self.lease is not None and core is not None:
            try:
                core.extend([self.lease], lease_for=lease_for)
            except LeaseLostError:
                # Without a hold, the timer's lease is what fences the run: losing it is losing the lease.
                return self.finished or bool(self.claim)
            except Exception as exc:
                log.debug("extending the timer of %s failed: %s", self.op.name, type(exc).__name__)
        return True

    def stop(self) -> None:
        self.finished = True
        self.beat.stop()


class LroClient:
    """Long-running operations in the ``google.longrunning`` shape, resumed by callbacks.

    Args:
        config: see ``Config``.
        clock: the store's time source when ``config.store`` is a URL (``FakeClock`` in tests).

    Example:
        >>> client = LroClient(Config(neuron="svc", store="memory://"))
        >>> op = client.new_operation("operations/1", {"step": "start"})
        >>> op.complete({"ok": True}).done
        True
    """

    def __init__(self, config: Config, *, clock: Any = None) -> None:
        if not isinstance(config, Config):
            raise ConfigError(f"LroClient needs a Config, got {type(config).__name__}", field="config")
        self.config = config
        self._owned: list[Any] = []
        self.core_store: SQLStore | None = None
        self.store: OperationStore = self._open_store(config.store, clock)
        self.scheduler: Any = config.scheduler
        if self.scheduler is None:
            if self.core_store is None:
                raise ConfigError(
                    "lro.scheduler is required when lro.store is not an errands SQL store", field="lro.scheduler"
                )
            self.scheduler = StoreScheduler(
                self.core_store, lease_for=config.lease_for, retry_delay=config.retry_delay,
                queue=f"{TIMER_QUEUE}.{config.neuron}",
            )
        self._handlers: dict[str, ResumableHandler] = {}
        self._secret: str | None = config.callback_secret
        self._secret_lock = threading.Lock()
        self._auth: CallbackAuth | None = None
        self._atomic: bool | None = None
        # Resume tokens only need to be unique: a random prefix per client and a counter.
        self._token_prefix = secrets.token_hex(8)
        self._topic = f"{RESUME_TOPIC}.{config.neuron}"
        self._token_seq = itertools.count(1)
        # Pauses between the attempts to create a resume's task before resume_via_tasks gives up.
        self._schedule_backoff: tuple[float, ...] = (0.05, 0.25)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_env(
        cls, neuron: str, host: str | None = None, *, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> LroClient:
        """A client configured from the alis environment variables (see the README table).

        Without ``ALIS_*`` variables it runs on the embedded ``sqlite:///ops.db`` and the local scheduler.
        With ``ALIS_OS_PROJECT`` and ``ALIS_REGION`` it schedules through the ``cloudtasks`` scheduler of
        errands-connectors-gcp on queue ``{neuron}-operations``.

        Args:
            neuron: the service name.
            host: the public base URL; default the Cloud Run URL ``https://{neuron}-{nr}.{region}.run.app``.
            env: the variables to read (default ``os.environ``, read now, never at import).
            **overrides: further ``Config`` fields.
        """
        source = os.environ if env is None else env
        config = config_from_env(neuron, host, source, **overrides)
        if config.scheduler is None and config.project and config.region:
            if config.base_url is None:
                # Checked before anything is opened or written: Cloud Tasks needs a URL to call back.
                raise ConfigError(
                    "ALIS_PROJECT_NR is not set: with ALIS_OS_PROJECT and ALIS_REGION operations resume through "
                    "Cloud Tasks, which calls back https://{neuron}-{ALIS_PROJECT_NR}.{ALIS_REGION}.run.app; set "
                    "ALIS_PROJECT_NR or pass host=",
                    field="ALIS_PROJECT_NR", value=None,
                )
            config = replace(config, scheduler=_cloud_tasks_scheduler(config))
        return cls(config)

    def _open_store(self, spec: Any, clock: Any) -> OperationStore:
        if isinstance(spec, str):
            spec = open_store(spec, clock=clock)
            self._owned.append(spec)
        if isinstance(spec, SQLStore):
            self.core_store = spec
            return SQLOperationStore(spec, self.config.neuron)
        factory = getattr(spec, "operation_store", None)
        if callable(factory):
            store: OperationStore = factory(neuron=self.config.neuron, table=self.config.spanner_table)
            return store
        if isinstance(spec, OperationStore):
            return spec
        raise ConfigError(
            f"lro.store must be a store URL, an errands store or an OperationStore, got {type(spec).__name__}",
            field="lro.store", value=type(spec).__name__,
        )

    def close(self) -> None:
        """Close the stores this client opened."""
        for s in self._owned:
            s.close()
        self._owned.clear()

    def __enter__(self) -> LroClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def neuron(self) -> str:
        return self.config.neuron

    @property
    def resume_topic(self) -> str:
        """The scheduler topic of this neuron's callbacks: ``lro.resume.{neuron}``."""
        return self._topic

    # -- handlers --------------------------------------------------------------------------------
    def add_resumable_handlers(self, *handlers: ResumableHandler) -> None:
        """Register handlers at startup. A path registered twice raises ``ConfigError`` and registers
        none of ``handlers``."""
        seen = dict(self._handlers)
        problems = []
        for h in handlers:
            if not isinstance(h, ResumableHandler):
                raise ConfigError(f"expected a ResumableHandler, got {type(h).__name__}", field="handlers")
            if h.path in seen:
                problems.append(h.path)
            seen[h.path] = h
        if problems:
            raise ConfigError(
                f"resumable handler path(s) {', '.join(map(repr, problems))} registered twice; each path has one handler",
                field="handlers.path", value=problems[0],
            )
        self._handlers = seen

    add_resumable_handler = add_resumable_handlers

    @property
    def handlers(self) -> Mapping[str, ResumableHandler]:
        return dict(self._handlers)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Commit every operation change made on this thread inside the block in one transaction.

        ``new_operation`` followed by ``resume_via_tasks`` then costs one commit, and creating many
        operations costs one. If the block raises, none of it happens. Other threads using the same SQLite
        store wait until the block ends: keep it short.

        Raises:
            ConfigError: the store has no transactions spanning calls (it is not an errands SQL store).
            TransientError: the batch could not be committed and was rolled back.
        """
        batch = getattr(self.store, "batch", None)
        if batch is None:
            raise ConfigError(
                f"{type(self.store).__name__} cannot group calls into one transaction; use a SQL store",
                field="lro.store", value=type(self.store).__name__,
            )
        return _ClientBatch(batch())

    # -- operations ------------------------------------------------------------------------------
    def new_operation(
        self, name: str | None = None, metadata: Any = None, *, private_state: Any = None
    ) -> Operation:
        """Create an operation (not done).

        Args:
            name: ``operations/{id}``; default ``operations/{uuid4}``.
            metadata: a protobuf message or a dict (packed as ``google.protobuf.Struct``).
            private_state: initial private state (JSON).

        Raises:
            ConfigError: the name is malformed or the metadata/state cannot be encoded.
            AlreadyExistsError: an operation of that name exists.
        """
        name = name if name is not None else f"operations/{uuid.uuid4()}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"operation name must be 'operations/{{id}}' with an id of letters, digits and '._~-', got {name!r}",
                field="name", value=name,
            )
        pb = operations_pb2.Operation(name=name)
        if metadata is not None:
            pb.metadata.CopyFrom(pack_any(metadata, field="metadata"))
        state = encode_state(private_state) if private_state is not None else None
        record = OperationRecord(name=name, operation=pb.SerializeToString(deterministic=True), state=state)
        return Operation(self, self.store.create(record), pb)

    def get_operation(self, name: str) -> Operation:
        """The operation, to read or change. Raises ``NotFoundError``."""
        return Operation(self, self.store.get(name))

    def get_operation_pb(self, name: str) -> operations_pb2.Operation:
        """The ``google.longrunning.Operation``. Raises ``NotFoundError``."""
        return operations_pb2.Operation.FromString(self.store.get(name).operation)

    def list_operations(
        self, filter: str = "", page_size: int = 0, page_token: str = "", *, name: str = ""
    ) -> tuple[list[operations_pb2.Operation], str]:
        """A page of operations ordered by name, and the token of the next page (``""`` at the end).

        Args:
            filter: see ``parse_filter``: ``done = true``, ``name = "operations/abc*"``, joined by ``AND``.
            page_size: at most this many (default 100, at most 1000).
            page_token: the token a previous page returned, with the same filter.
            name: the collection (``operations``); its operations are those named ``{name}/...``.
        """
        done, prefix, exact = parse_filter(filter)
        if name:
            collection = name.rstrip("/") + "/"
            if not prefix.startswith(collection) and not collection.startswith(prefix):
                return [], ""
            prefix = max(prefix, collection, key=len)
        if exact is not None:
            prefix = max(prefix, exact, key=len)
        if not isinstance(page_size, int) or page_size < 0:
            raise ConfigError(f"page_size must be >= 0, got {page_size!r}", field="page_size", value=page_size)
        size = min(page_size or 100, 1000)
        after = self._decode_token(page_token, filter) if page_token else ""
        rows = list(self.store.list(done=done, prefix=prefix, after=after, limit=size + 1))
        more = len(rows) > size
        rows = rows[:size]
        out = [operations_pb2.Operation.FromString(r.operation) for r in rows if exact is None or r.name == exact]
        token = self._encode_token(rows[-1].name, filter) if more and rows else ""
        return out, token

    @staticmethod
    def _encode_token(after: str, filter: str) -> str:
        raw = json.dumps({"a": after, "f": filter}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_token(token: str, filter: str) -> str:
        try:
            data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            after, was = data["a"], data["f"]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ConfigError("page_token is not one this service issued", field="page_token", value=token) from exc
        if was != filter:
            raise ConfigError(
                "page_token was issued for another filter; pass the same filter as the first page",
                field="page_token", value=token,
            )
        return str(after)

    def wait_operation(self, name: str, timeout: float | timedelta | None = None) -> operations_pb2.Operation:
        """Wait until the operation is done or ``timeout`` passes; returns its latest state either way.

        Polls the store starting at ``config.wait_initial`` seconds, growing by ``wait_multiplier`` up to
        ``wait_maximum``.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if seconds is None or seconds <= 0:
            seconds = self.config.wait_default_timeout
        deadline = time.monotonic() + seconds
        interval = self.config.wait_initial
        while True:
            pb = self.get_operation_pb(name)
            left = deadline - time.monotonic()
            if pb.done or left <= 0:
                return pb
            time.sleep(min(interval, left))
            interval = min(interval * self.config.wait_multiplier, self.config.wait_maximum)

    def cancel_operation(self, name: str) -> None:
        """Ask for cancellation. Cooperative: a running handler sees ``op.cancel_requested``; the next
        callback (scheduled now) ends the operation ``CANCELLED`` unless it finished meanwhile. An
        operation with no resume pending (never scheduled, or its last callback ran) is cancelled at once.
        Done operations are unchanged.

        Raises:
            NotFoundError: no such operation.
        """
        record = store_call(f"cancelling {name!r}", self.store.get, name)
        if record.done:
            return
        record = store_call(f"cancelling {name!r}", self.store.request_cancel, name)
        if record.done:
            return
        state = parse_token(record.resume_token)
        if record.resume_path is None or state.token is None or state.used:
            for _ in range(10):
                try:
                    self._finish_cancelled(Operation(self, record))
                    return
                except LeaseLostError:
                    record = store_call(f"cancelling {name!r}", self.store.get, name)
                    if record.done:
                        return
                    state = parse_token(record.resume_token)
                    if state.token is not None and not state.used and record.resume_path is not None:
                        break  # a resume was scheduled meanwhile: its callback ends it
            else:
                raise LeaseLostError(f"operation {name!r} kept changing while it was being cancelled; try again")
        assert record.resume_path is not None and state.token is not None
        self._schedule(record, record.resume_path, state.token, 0.0, key=f"lro-{state.token}-cancel")

    def delete_operation(self, name: str) -> None:
        """Delete the operation. Raises ``NotFoundError``."""
        if not self.store.delete(name):
            raise NotFoundError(f"operation {name!r} not found")

    def purge_expired(self) -> int:
        """Delete operations not saved for ``config.ttl`` (90 days by default). Returns how many."""
        return self.store.purge(self.store.now() - self.config.ttl.total_seconds())

    # -- scheduling ------------------------------------------------------------------------------
    def _atomic_timers(self) -> bool:
        atomic = self._atomic
        if atomic is None:
            atomic = self._atomic = (
                isinstance(self.scheduler, StoreScheduler)
                and isinstance(self.store, SQLOperationStore)
                and self.scheduler.store is self.store.store
            )
        return atomic

    def _payload(self, name: str, path: str, token: str) -> dict[str, Any]:
        payload = {"neuron": self.neuron, "name": name, "path": path, "token": token}
        url = self.callback_url(name, path, token)
        if url:
            payload["url"] = url
        return payload

    def callback_url(self, name: str, path: str, token: str | None = None) -> str | None:
        """``{host}{prefix}{path}?operation={name}[&token=...]`` or None without a host."""
        base = self.config.base_url
        if base is None:
            return None
        url = f"{base}{self.config.prefix}{path}?operation={quote(name, safe='')}"
        return url + (f"&token={token}" if token else "")

    def _save_and_schedule(self, op: Operation, path: str, delay: timedelta | float) -> None:
        """Save ``op`` with a fresh resume token and schedule its callback; ``op`` holds what was saved."""
        if not isinstance(path, str) or (path not in self._handlers and not _PATH.match(path)):
            raise ConfigError(f"resume path must look like 'create-agent', got {path!r}", field="path", value=path)
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ConfigError(f"delay must be a timedelta or seconds >= 0, got {delay!r}", field="delay", value=delay)
        token = f"{self._token_prefix}{next(self._token_seq):x}"
        what = f"scheduling operation {op.name!r}"
        if self._atomic_timers():
            store = self.store
            assert isinstance(store, SQLOperationStore)
            # The timer first: if the save then loses (LeaseLostError) the timer carries a token that never
            # becomes current and is acknowledged as stale, so no savepoint is needed.
            timer = [(f"lro-{token}", {"topic": self._topic, "payload": self._payload(op.name, path, token)},
                      store.now() + float(seconds))]
            with op._guard():
                record = op._snapshot(resume_path=path, resume_token=token)
                tx = store.current_tx()
                if tx is not None:
                    store_call(what, store.store.enqueue, self.scheduler.queue, timer, tx=tx)
                    op._record = store_call(what, store.save, record, expected_version=record.version)
                    return
                try:
                    op._record = store_call(what, self._save_with_timer, store, timer, record, record.version)
                except InfrastructureError:
                    # Perhaps only the answer of the commit was lost: then the save and its timer are in.
                    committed = self._read_back(op.name, token)
                    if committed is None:
                        raise
                    op._record = committed
            return
        current_tx = getattr(self.store, "current_tx", None)
        if current_tx is not None and current_tx() is not None:
            raise ConfigError(
                f"resume_via_tasks with the {type(self.scheduler).__name__} scheduler cannot join a batch: its task "
                "must be created after the save commits; call it after the batch",
                field="lro.scheduler", value=type(self.scheduler).__name__,
            )
        # The save first, then the task: a task created first could call back before the save commits and be
        # acknowledged as stale. If the task cannot be created, the save is undone, so that the operation is
        # as it was (a callback that rescheduled is retried with its own token) and ``op`` can retry.
        with op._guard():
            before = op._record
            record = op._snapshot(resume_path=path, resume_token=scheduled(token, self.store.now() + float(seconds)))
            try:
                saved = op._record = store_call(what, self.store.save, record, expected_version=record.version)
            except InfrastructureError:
                # Perhaps only the answer of the commit was lost. If the read-back cannot tell, create the
                # task all the same: should the save not have committed, its callback is merely stale.
                committed = self._read_back(op.name, token)
                if committed is None:
                    with contextlib.suppress(Exception):
                        self._schedule_retrying(record, path, token, float(seconds))
                    raise
                saved = op._record = committed
        try:
            self._schedule_retrying(saved, path, token, float(seconds))
        except BaseException:
            self._undo_save(op, before, saved)
            raise

    def _read_back(self, name: str, token: str | None) -> OperationRecord | None:
        """After a write whose answer was lost: the stored record if it carries ``token`` (the write
        committed), else None (it did not, or the store cannot tell now)."""
        try:
            current = self.store.get(name)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            return None
        return current if parse_token(current.resume_token).token == token else None

    def _save_with_timer(
        self, store: SQLOperationStore, timer: list[tuple[str, Any, float]], record: OperationRecord, expected: int
    ) -> OperationRecord:
        with store.batch() as tx:
            store.store.enqueue(self.scheduler.queue, timer, tx=tx)
            return store.save(record, expected_version=expected)

    def _schedule_retrying(self, record: OperationRecord, path: str, token: str, seconds: float) -> None:
        backoff = self._schedule_backoff
        for attempt in range(len(backoff) + 1):
            try:
                self._schedule(record, path, token, seconds, key=f"lro-{token}")
                return
            except TransientError:
                if attempt == len(backoff):
                    raise
                time.sleep(backoff[attempt])

    def _undo_save(self, op: Operation, before: OperationRecord, saved: OperationRecord) -> None:
        """The task of ``saved`` could not be created: put the operation back as it was ``before``. A hold
        ``before`` had on its resume is restored with a fresh expiry, for the handler still runs."""
        state = parse_token(before.resume_token)
        if state.claim and state.token is not None:
            before = retoken(before, claimed(state.token, self.store.now() + self.config.lease_for, state.claim))
        with op._guard():
            try:
                op._record = store_call(f"undoing the save of {op.name!r}", self.store.save, before,
                                        expected_version=saved.version)
            except Exception as undo_error:
                current = self._read_back(op.name, parse_token(before.resume_token).token) if (
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

    def _schedule(self, record: OperationRecord, path: str, token: str, seconds: float, *, key: str) -> None:
        at = datetime.fromtimestamp(self.store.now() + seconds, tz=timezone.utc)
        _call(self.scheduler.schedule, self.resume_topic, self._payload(record.name, path, token), at, key=key)

    # -- resuming --------------------------------------------------------------------------------
    def _begin(
        self, name: str, path: str, token: str | None, record: OperationRecord | None = None, *, hold: bool = False
    ) -> tuple[ResumeOutcome | None, Operation | None, Any, str]:
        """Decide what a callback does. Returns ``(outcome, None, None, "")`` when it is settled without the
        handler, else ``(None, op, fn, claim)``: ``claim`` is the id of the hold taken on the resume
        (``""`` without one).

        Raises:
            NotFoundError: no such operation or handler.
            ResumeBusyError: another callback runs this resume now; come back later.
            InfrastructureError: the store failed; retry.
        """
        handler = self._handlers.get(path)
        if handler is None:
            raise NotFoundError(
                f"no resumable handler at path {path!r}; registered: {', '.join(sorted(self._handlers)) or 'none'}"
            )
        if record is None:
            record = store_call(f"resuming {name!r}", self.store.get, name)
        if record.done:
            return ResumeOutcome.ALREADY_DONE, None, None, ""
        state = parse_token(record.resume_token)
        now = self.store.now() if state.expires else 0.0
        held = state.held(now)
        if token is not None and (token != state.token or state.used):
            if record.cancel_requested and not held:
                # A cancellation is never lost to a stale callback: end it now.
                return self._cancel_now(Operation(self, record)), None, None, ""
            if not held and not state.used and state.token is not None and not self._atomic_timers():
                self._ensure_task(record, state)
            return ResumeOutcome.STALE, None, None, ""
        if held:
            raise ResumeBusyError(
                f"operation {name!r} is being resumed by another callback; retry later",
                retry_after=max(1.0, state.expires - now),
            )
        if record.cancel_requested:
            return self._cancel_now(Operation(self, record)), None, None, ""
        claim = ""
        if hold and token is not None:
            claim = secrets.token_hex(6)
            raw = claimed(token, self.store.now() + self.config.lease_for, claim)
            try:
                record = store_call(f"resuming {name!r}", self.store.save, retoken(record, raw),
                                    expected_version=record.version)
            except LeaseLostError as exc:
                raise ResumeBusyError(
                    f"operation {name!r} changed while its callback started; retry later", retry_after=1.0
                ) from exc
        return None, Operation(self, record), handler.fn, claim

    def _ensure_task(self, record: OperationRecord, state: ResumeState) -> None:
        """Create the task of the operation's pending resume again, in case it went missing (its creation
        failed and so did undoing its save). Its name comes from its token, so a task that exists is not
        doubled; one that already ran finds its token spent and is stale."""
        if record.resume_path is None or state.token is None:
            return
        delay = max(0.0, state.due - self.store.now()) if state.due else 0.0
        try:
            self._schedule(record, record.resume_path, state.token, delay, key=f"lro-{state.token}")
        except TransientError:
            raise
        except Exception as exc:
            log.warning("could not make sure the pending resume of %s has its task: %s", record.name,
                        type(exc).__name__)

    def _cancel_now(self, op: Operation) -> ResumeOutcome:
        try:
            self._finish_cancelled(op)
        except LeaseLostError:
            return ResumeOutcome.LOST
        return ResumeOutcome.CANCELLED

    def _finish_cancelled(self, op: Operation) -> None:
        op.fail("operation cancelled", code=code_pb2.CANCELLED)

    def _end(self, op: Operation, error: BaseException | None, token: str | None, claim: str) -> ResumeOutcome:
        if op.done:
            if error is not None and not isinstance(error, LeaseLostError):
                log.warning("handler for %s raised after finishing it: %r", op.name, error)
            return ResumeOutcome.COMPLETED
        if error is None:
            try:
                if token is not None:
                    # The handler ended without scheduling another resume: spend the token, so that a
                    # replay of this callback runs nothing.
                    spent = op._set_hold(used(token), token=token, claim=claim)
                    if spent is not None:
                        return self._cancel_now(op) if spent.cancel_requested else ResumeOutcome.RAN
                if op.cancel_requested:
                    self._finish_cancelled(op)
                    return ResumeOutcome.CANCELLED
            except LeaseLostError:
                return ResumeOutcome.LOST
            return ResumeOutcome.RAN
        if isinstance(error, LeaseLostError):
            return ResumeOutcome.LOST
        if isinstance(error, (TransientError, InfrastructureError)):
            # Asked to come back, or the store failed under the handler: give the resume back at once so
            # that the retry need not wait for the hold to lapse.
            if claim and token is not None:
                try:
                    op._set_hold(token, token=token, claim=claim)
                except Exception as release_error:
                    log.info("the hold on %s lapses by itself (%s)", op.name, type(release_error).__name__)
            if isinstance(error, InfrastructureError):
                log.warning("resuming %s abandoned: %s; it is retried", op.name, error)
            raise error
        log.error("handler for %s failed; the operation fails with INTERNAL", op.name, exc_info=error)
        try:
            op.fail("%s", str(error) or type(error).__name__, code=code_pb2.INTERNAL)
        except LeaseLostError:
            return ResumeOutcome.LOST
        return ResumeOutcome.FAILED

    def _heartbeat(self, op: Operation, token: str | None, claim: str, lease: Lease | None) -> _Renewal | None:
        """While the handler of ``op`` runs, renew its hold on ``token`` (if it took one) and the timer
        ``lease`` that fired it (if any). None: nothing to renew."""
        if not claim and lease is None:
            return None
        if claim:
            op._lock = threading.Lock()
        return _Renewal(self, op, token, claim, lease)

    def resume(self, name: str, path: str, token: str | None = None) -> ResumeOutcome:
        """Run the handler at ``path`` on the operation now, in this process (no HTTP).

        Args:
            name: the operation.
            path: a registered handler path.
            token: the token of the ``resume_via_tasks`` that scheduled this; a superseded or spent token
                is ignored (``STALE``), and while another callback runs the same token ``ResumeBusyError``
                (a ``TransientError``) says to come back later. None always runs.

        Raises:
            NotFoundError: no such operation, or no handler at ``path``.
            TransientError: the handler asked to be called again later, or the resume is busy.
            InfrastructureError: the store failed; nothing was recorded, call again.
        """
        return self._resume(name, path, token, None, hold=token is not None)

    def _resume(
        self, name: str, path: str, token: str | None, record: OperationRecord | None, *, hold: bool = False,
        lease: Lease | None = None,
    ) -> ResumeOutcome:
        outcome, op, fn, claim = self._begin(name, path, token, record, hold=hold)
        if outcome is not None:
            return outcome
        assert op is not None
        beat = self._heartbeat(op, token, claim, lease)
        try:
            _call(fn, op)
        except Exception as exc:
            if beat is not None:
                beat.stop()
            return self._end(op, exc, token, claim)
        if beat is not None:
            beat.stop()
        return self._end(op, None, token, claim)

    async def aresume(self, name: str, path: str, token: str | None = None) -> ResumeOutcome:
        """``resume`` for async code: store calls and sync handlers run in a thread, async handlers on
        the running loop."""
        outcome, op, fn, claim = await asyncio.to_thread(self._begin, name, path, token, hold=token is not None)
        if outcome is not None:
            return outcome
        assert op is not None
        beat = self._heartbeat(op, token, claim, None)
        try:
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
                await fn(op)
            else:
                result = await asyncio.to_thread(fn, op)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            if beat is not None:
                beat.stop()
            return await asyncio.to_thread(self._end, op, exc, token, claim)
        if beat is not None:
            beat.stop()
        return await asyncio.to_thread(self._end, op, None, token, claim)

    # -- the local scheduler ---------------------------------------------------------------------
    def callback_secret(self) -> str | None:
        """The HMAC key of local callbacks: ``config.callback_secret``, or one kept in the store."""
        if self._secret is not None or self.core_store is None:
            return self._secret
        with self._secret_lock:
            if self._secret is None:
                got = self.core_store.kv_get("lro", "callback-secret")
                if got is None:
                    try:
                        self.core_store.kv_put("lro", "callback-secret", secrets.token_hex(32), expected_version=0)
                    except LeaseLostError:
                        pass  # another process created it first
                    got = self.core_store.kv_get("lro", "callback-secret")
                assert got is not None
                self._secret = str(got[0])
        return self._secret

    def run_due(self, limit: int = 100) -> int:
        """Fire this neuron's due local callbacks: in-process without a host, else an HTTP ``PUT`` with
        the HMAC header to ``{host}{prefix}{path}``. The worker job of the lro engine.

        Returns:
            How many callbacks were acknowledged.
        """
        core = self.core_store
        if core is None or not isinstance(self.scheduler, StoreScheduler):
            return 0
        try:
            leases = core.claim(self.scheduler.queue, limit, lease_for=self.config.lease_for)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("claiming callbacks failed (%s); trying again at the next pass", type(exc).__name__)
            return 0
        if not leases:
            return 0
        mine, others = [], []
        for lease in leases:
            p: dict[str, Any] = lease.payload if isinstance(lease.payload, dict) else {}
            inner = p.get("payload")
            if p.get("topic") == self._topic and isinstance(inner, dict):
                mine.append(lease)
            else:
                others.append(lease)
        if others:
            self._give_back(others, 0.0)
        if not mine:
            return 0
        done: list[Lease] = []
        retry: list[Lease] = []
        if self.config.base_url is not None:
            for lease in mine:
                (done if self._fire_http(lease) else retry).append(lease)
            self._ack(done, retry)
            return len(done)
        step = self.config.resume_batch
        if step > 1 and isinstance(self.store, SQLOperationStore) and self.store.store is core:
            for i in range(0, len(mine), step):
                chunk = mine[i:i + step]
                d: list[Lease] = []
                r: list[Lease] = []
                try:
                    with self.store.batch() as tx:
                        # One read for the chunk; rows a handler writes meanwhile are served from the batch.
                        read = self.store.get_many([str(lease.payload["payload"].get("name")) for lease in chunk])
                        written = self.store.written()
                        for lease in chunk:
                            p = lease.payload["payload"]
                            name = str(p.get("name"))
                            record = written.get(name) or read.get(name)
                            (d if self._fire_payload(lease.key, p, record, in_batch=True) else r).append(lease)
                        core.complete(d, tx=tx)
                        if r:
                            core.release(r, delay=self.config.retry_delay, tx=tx)
                except BatchAborted:
                    # Nothing of the chunk happened: its callbacks are retried.
                    log.exception("a batch of %d callbacks was rolled back", len(chunk))
                    self._give_back(chunk, self.config.retry_delay)
                    continue
                except Exception as exc:
                    if not is_infrastructure_error(exc):
                        raise
                    # The store failed under the batch: nothing of it is recorded (or, if only the answer
                    # of its commit was lost, all of it is); either way its callbacks are retried.
                    log.warning("a batch of %d callbacks was abandoned: %s; retrying", len(chunk), exc)
                    self._give_back(chunk, self.config.retry_delay)
                    continue
                done += d
            return len(done)
        for lease in mine:
            (done if self._fire_direct(lease) else retry).append(lease)
        self._ack(done, retry)
        return len(done)

    def _give_back(self, leases: Sequence[Lease], delay: float) -> None:
        """Release timers this worker will not fire now; one taken meanwhile, or a failing store, leaves
        them to lapse."""
        assert self.core_store is not None
        core = self.core_store
        try:
            core.release(leases, delay=delay)
            return
        except LeaseLostError:
            pass
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("releasing %d callbacks failed (%s); their leases lapse", len(leases), type(exc).__name__)
            return
        for lease in leases:
            try:
                core.release([lease], delay=delay)
            except LeaseLostError:
                pass  # completed after all (only the answer of its commit was lost), or taken meanwhile
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # Left to lapse.

    def _ack(self, done: Sequence[Lease], retry: Sequence[Lease]) -> None:
        assert self.core_store is not None
        core = self.core_store
        try:
            with core.transaction() as tx:
                core.complete(done, tx=tx)
                core.release(retry, delay=self.config.retry_delay, tx=tx)
            return
        except LeaseLostError:
            pass  # a lease lapsed while its callback ran and another worker took it: settle the rest alone
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("acknowledging %d callbacks failed (%s); settling them one by one", len(done) + len(retry),
                     type(exc).__name__)
        for lease, finished in [(lease, True) for lease in done] + [(lease, False) for lease in retry]:
            try:
                if finished:
                    core.complete([lease])
                else:
                    core.release([lease], delay=self.config.retry_delay)
            except LeaseLostError:
                pass
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # Left to lapse: a done callback then fires again and is acknowledged as stale or done.

    def _fire_direct(self, lease: Lease) -> bool:
        # The timer's lease, renewed while the handler runs, fences this run: no hold on the row is needed
        # (and no commit spent on one).
        return self._fire_payload(lease.key, lease.payload["payload"], lease=lease)

    def _fire_payload(
        self, key: str, p: Mapping[str, Any], record: OperationRecord | None = None, *, in_batch: bool = False,
        lease: Lease | None = None,
    ) -> bool:
        try:
            self._resume(p["name"], p["path"], p.get("token"), record, hold=not in_batch and lease is None,
                         lease=lease)
            return True
        except NotFoundError as exc:
            log.warning("callback %s dropped: %s", key, exc)
            return True
        except TransientError as exc:
            log.info("callback for %s asked to retry: %s", p.get("name"), exc)
            return False
        except InfrastructureError:
            if in_batch:
                raise  # the batch's transaction is not to be trusted: abandon all of it
            return False
        except Exception:
            log.exception("callback for %s failed; retrying in %ss", p.get("name"), self.config.retry_delay)
            return False

    def _fire_http(self, lease: Lease) -> bool:
        core = self.core_store
        assert core is not None
        lease_for = self.config.lease_for
        finished = threading.Event()

        def renew() -> bool:
            if finished.is_set():
                return True
            try:
                core.extend([lease], lease_for=lease_for)
            except LeaseLostError:
                return finished.is_set()
            return True

        with heartbeat(renew, lease_for=lease_for, what=f"callback {lease.key}"):
            try:
                return self._post(lease.key, lease.payload["payload"])
            finally:
                finished.set()

    def _post(self, key: str, p: Mapping[str, Any]) -> bool:
        url = self.callback_url(p["name"], p["path"], p.get("token"))
        assert url is not None
        target = url[len(self.config.base_url or ""):]
        headers = {"content-length": "0"}
        secret = self.callback_secret()
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, "PUT", target)
        req = urllib.request.Request(url, data=b"", method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.config.http_timeout) as resp:
                resp.read()
                return True
        except urllib.error.HTTPError as exc:
            with exc:
                exc.read()
            if exc.code == 404:
                log.warning("callback %s answered 404; dropped", key)
                return True
            log.warning("callback %s answered %s; retrying in %ss", key, exc.code, self.config.retry_delay)
            return False
        except OSError as exc:
            log.warning("callback %s failed (%s); retrying in %ss", key, type(exc).__name__, self.config.retry_delay)
            return False

    def fire(self, topic: str, payload: Mapping[str, Any]) -> None:
        """A core timer handler for this neuron's callbacks (``worker.on_timer(client.resume_topic,
        client.fire)``): in-process without a host, else over HTTP with the HMAC header.

        Raises:
            TransientError: the callback should fire again later.
        """
        key = f"lro-{payload.get('token')}"
        ok = self._post(key, payload) if self.config.base_url is not None else self._fire_payload(key, payload)
        if not ok:
            raise TransientError(f"callback for {payload.get('name')!r} will be retried")

    def attach(self, worker: Any) -> None:
        """Fire this neuron's callbacks from a core ``Worker``: ``run_due`` becomes one of its jobs.

        The callbacks' timers live in a queue of their own (``lro.timers.{neuron}``), so the worker's timer
        pass never claims them, and they never hold up its other timers. Only a client configured with the
        worker's own scheduler has its callbacks fired by the worker's timer pass (``worker.on_timer``).
        """
        mine, theirs = self.scheduler, getattr(worker, "scheduler", None)
        if (isinstance(mine, StoreScheduler) and isinstance(theirs, StoreScheduler) and mine.store is theirs.store
                and mine.queue == theirs.queue):
            worker.on_timer(self.resume_topic, self.fire)
        else:
            worker.add_job(f"lro.{self.neuron}.run_due", self.run_due)

    # -- serving ---------------------------------------------------------------------------------
    def callback_auth(self) -> CallbackAuth:
        if self._auth is None:
            cfg = self.config
            self._auth = CallbackAuth(
                secret=self.callback_secret(), audience=cfg.audience, service_accounts=cfg.accepted_service_accounts,
                certs_url=cfg.oidc_certs_url, issuers=cfg.oidc_issuers, allow_unauthenticated=cfg.allow_unauthenticated,
            )
        return self._auth

    def check_callback_auth(self) -> None:
        """Refuse to serve callbacks that could not be authenticated: a remote scheduler (Cloud Tasks)
        calls back with OIDC tokens, which are accepted only from a known service account.

        Raises:
            ConfigError: a remote scheduler, no accepted service account, and not ``allow_unauthenticated``.
        """
        cfg = self.config
        if cfg.allow_unauthenticated or isinstance(self.scheduler, StoreScheduler) or cfg.accepted_service_accounts:
            return
        raise ConfigError(
            f"callbacks from the {type(self.scheduler).__name__} scheduler carry Google OIDC tokens, and no service "
            "account is accepted: set lro.oidc_service_accounts (or lro.service_account, or lro.project for the "
            "alis default alis-build@{project}.iam.gserviceaccount.com)",
            field="lro.oidc_service_accounts", value=None,
        )

    def asgi_app(self, prefix: str | None = None) -> Any:
        """An ASGI application serving ``PUT {prefix}{path}?operation={name}`` callbacks."""
        from ._http import AsgiApp

        return AsgiApp(self, prefix or self.config.prefix)

    def wsgi_app(self, prefix: str | None = None) -> Any:
        """A WSGI application serving ``PUT {prefix}{path}?operation={name}`` callbacks."""
        from ._http import WsgiApp

        return WsgiApp(self, prefix or self.config.prefix)

    def register_grpc(self, server: Any) -> Any:
        """Serve ``google.longrunning.Operations`` (Get, List, Delete, Cancel, Wait) on a ``grpc.Server``.

        Raises:
            MissingDependencyError: grpcio is not installed (``pip install 'errands-lro[grpc]'``).
        """
        from ._grpc import OperationsServicer, add_servicer

        servicer = OperationsServicer(self)
        add_servicer(servicer, server)
        return servicer


def _cloud_tasks_scheduler(config: Config) -> Any:
    from errands.core import get_registry

    cls = get_registry().schedulers.get("cloudtasks")
    if cls is None:
        raise MissingDependencyError("errands-connectors-gcp (cloudtasks scheduler)", "tasks")
    try:
        return cls(
            project=config.project, location=config.region, queue=config.queue_name,
            service_account=config.invoker_service_account, host=config.base_url, prefix=config.prefix,
            dispatch_deadline=config.dispatch_deadline,
        )
    except TypeError as exc:
        raise ConfigError(
            f"the cloudtasks scheduler {cls.__name__} does not accept project/location/queue/service_account/host/"
            f"prefix/dispatch_deadline: {exc}",
            field="lro.scheduler", value=cls.__name__,
        ) from exc
