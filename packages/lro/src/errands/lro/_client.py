"""``LroClient``: creates, lists, waits for and cancels operations, and hands their resumes to the modules
that carry them out: ``_scheduling`` (``resume_via_tasks``), ``_resume`` (running a handler),
``_local_callbacks`` (the local scheduler's timers) and ``_paging`` (listings)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any, Mapping

from errands.core import StoreScheduler, open_store, telemetry
from errands.core.errors import ConfigError, LeaseLostError, NotFoundError, TransientError
from errands.core.store import SQLStore
from google.longrunning import operations_pb2  # type: ignore[import-untyped]

from . import _paging, _resume
from ._auth import CallbackAuth
from ._codec import encode_state, pack_any
from ._config import Config, config_from_env
from ._hygiene import ExpiredPurge
from ._local_callbacks import LocalCallbacks
from ._operation import Operation, run_async, store_call
from ._operation_table import BatchAborted, OperationRecord, OperationStore, SQLOperationStore
from ._resume import BatchLoops, ResumableHandler
from ._scheduling import ResumeScheduling, cloud_tasks_scheduler, local_scheduler
from ._tokens import parse_token
from ._transitions import ResumeOutcome, pending_resume

__all__ = ["LroClient"]

# ``operations/{id}``, or AIP-151 names in a parent collection: ``projects/p/locations/l/operations/{id}``.
_NAME = re.compile(r"^(?:[a-z][A-Za-z0-9]*/[A-Za-z0-9][A-Za-z0-9._~-]{0,199}/){0,4}operations/"
                   r"[A-Za-z0-9][A-Za-z0-9._~-]{0,199}$")


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


class _Polls:
    """The pauses of ``wait_operation`` (sync and async): from ``wait_initial`` seconds, growing by
    ``wait_multiplier`` up to ``wait_maximum``, never past the deadline."""

    __slots__ = ("_deadline", "_interval", "_maximum", "_multiplier")

    def __init__(self, config: Config, timeout: float | timedelta | None) -> None:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if seconds is None or seconds <= 0:
            seconds = config.wait_default_timeout
        self._deadline = time.monotonic() + seconds
        self._interval = config.wait_initial
        self._multiplier, self._maximum = config.wait_multiplier, config.wait_maximum

    def pause(self, pb: operations_pb2.Operation) -> float | None:
        """How long to pause before the next read of the operation last read as ``pb``; None: return ``pb``
        (it is done, or the deadline passed)."""
        left = self._deadline - time.monotonic()
        if pb.done or left <= 0:
            return None
        pause = min(self._interval, left)
        self._interval = min(self._interval * self._multiplier, self._maximum)
        return pause


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
        if self.scheduler is None and self.core_store is not None:
            self.scheduler = local_scheduler(config, self.core_store)
        # Without a scheduler (a read-only process such as an Operations server on Spanner) everything but
        # resume_via_tasks works (it raises ConfigError); a cancel only flags an operation whose resume is due.
        self._handlers: dict[str, ResumableHandler] = {}
        self._auth: CallbackAuth | None = None
        self._scheduling = ResumeScheduling(self)
        self._local = LocalCallbacks(self)
        self._batch_loops = BatchLoops()
        self._purge = ExpiredPurge(self)
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
            config = replace(config, scheduler=cloud_tasks_scheduler(config))
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
            extra = {"database_role": self.config.database_role} if self.config.database_role else {}
            store: OperationStore = factory(neuron=self.config.neuron, table=self.config.spanner_table, **extra)
            return store
        if isinstance(spec, OperationStore):
            return spec
        raise ConfigError(
            f"lro.store must be a store URL, an errands store or an OperationStore, got {type(spec).__name__}",
            field="lro.store", value=type(spec).__name__,
        )

    def close(self) -> None:
        """Close the stores this client opened, and the event loops of async handlers run in batches."""
        self._batch_loops.close()
        for s in self._owned:
            s.close()
        self._owned.clear()

    def __enter__(self) -> LroClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def neuron(self) -> str:
        """The service whose operations these are (``config.neuron``): it names their table rows, queue and
        topic."""
        return self.config.neuron

    @property
    def resume_topic(self) -> str:
        """The scheduler topic of this neuron's callbacks: ``lro.resume.{neuron}``."""
        return self._scheduling.topic

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

    def add_resumable_handler(self, path: str | ResumableHandler, fn: Any = None) -> None:
        """Register ``fn`` (sync or async ``fn(op)``) at ``path``, as lro/v2's ``AddResumableHandler(path,
        handler)``; a ``ResumableHandler`` alone is accepted too. A path registered twice raises
        ``ConfigError``."""
        if isinstance(path, ResumableHandler) and fn is None:
            self.add_resumable_handlers(path)
            return
        if not callable(fn):
            raise ConfigError(f"add_resumable_handler needs a callable handler for {path!r}, got {fn!r}",
                              field="handlers.handler", value=type(fn).__name__)
        self.add_resumable_handlers(ResumableHandler(str(path), fn))

    def register_http_at_prefix(self, prefix: str) -> None:
        """Serve and address callbacks under ``prefix`` (lro/v2's ``RegisterHTTPHandlersAtPrefix``): a
        leading and trailing ``/`` are added as there, callback URLs use it from now on, and ``asgi_app()``
        / ``wsgi_app()`` serve it. A remote scheduler built with the previous prefix keeps it for URLs it
        builds itself; the resume payload's ``url`` carries the new one."""
        text = prefix if isinstance(prefix, str) else ""
        text = text if text.startswith("/") else "/" + text
        text = text if text.endswith("/") else text + "/"
        self.config = replace(self.config, prefix=text)  # validated by Config

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
        self, name: str | None = None, metadata: Any = None, *, private_state: Any = None, conn: Any = None
    ) -> Operation:
        """Create an operation (not done).

        Args:
            name: ``operations/{id}`` or an AIP-151 name such as ``projects/p/locations/l/operations/{id}``;
                default ``operations/{uuid4}``.
            metadata: a protobuf message or a dict (packed as ``google.protobuf.Struct``).
            private_state: initial private state (JSON).
            conn: the caller's own connection to the store's database (a ``sqlite3.Connection``, a psycopg
                connection): the row is written in the caller's transaction and committed or rolled back
                with it. Only on an errands SQL store, and not inside ``batch()``.

        Raises:
            ConfigError: the name is malformed, the metadata/state cannot be encoded, or ``conn`` is given
                to a store that cannot join it.
            AlreadyExistsError: an operation of that name exists.
        """
        name = name if name is not None else f"operations/{uuid.uuid4()}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"operation name must be 'operations/{{id}}' (or in a parent collection, AIP-151: "
                f"'projects/{{p}}/locations/{{l}}/operations/{{id}}') with ids of letters, digits and '._~-', got {name!r}",
                field="name", value=name,
            )
        pb = operations_pb2.Operation(name=name)
        if metadata is not None:
            pb.metadata.CopyFrom(pack_any(metadata, field="metadata"))
        state = encode_state(private_state) if private_state is not None else None
        record = OperationRecord(name=name, operation=pb.SerializeToString(deterministic=True), state=state)
        if conn is None:
            with telemetry.span("errands.lro.save", operation=name):
                return Operation(self, self.store.create(record), pb)
        if not isinstance(self.store, SQLOperationStore):
            raise ConfigError(
                f"conn= needs an errands SQL store; {type(self.store).__name__} cannot join the caller's transaction",
                field="conn", value=type(conn).__name__,
            )
        return Operation(self, self.store.create(record, conn=conn), pb)

    async def new_operation_async(
        self, name: str | None = None, metadata: Any = None, *, private_state: Any = None, conn: Any = None
    ) -> Operation:
        """``new_operation`` for async code (``conn=`` as there)."""
        return await run_async(self, self.new_operation, name, metadata, private_state=private_state, conn=conn)

    def get_operation(self, name: str) -> Operation:
        """The operation, to read or change. Raises ``NotFoundError``."""
        return Operation(self, self.store.get(name))

    async def get_operation_async(self, name: str) -> Operation:
        """``get_operation`` for async code."""
        return await run_async(self, self.get_operation, name)

    def get_operation_pb(self, name: str) -> operations_pb2.Operation:
        """The ``google.longrunning.Operation``. Raises ``NotFoundError``."""
        return operations_pb2.Operation.FromString(self.store.get(name).operation)

    async def get_operation_pb_async(self, name: str) -> operations_pb2.Operation:
        """``get_operation_pb`` for async code."""
        return await run_async(self, self.get_operation_pb, name)

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
        return _paging.list_operations(self.store, filter, page_size, page_token, name=name)

    async def list_operations_async(
        self, filter: str = "", page_size: int = 0, page_token: str = "", *, name: str = ""
    ) -> tuple[list[operations_pb2.Operation], str]:
        """``list_operations`` for async code."""
        return await run_async(self, self.list_operations, filter, page_size, page_token, name=name)

    def wait_operation(self, name: str, timeout: float | timedelta | None = None) -> operations_pb2.Operation:
        """Wait until the operation is done or ``timeout`` passes; returns its latest state either way.

        Polls the store starting at ``config.wait_initial`` seconds, growing by ``wait_multiplier`` up to
        ``wait_maximum``.
        """
        polls = _Polls(self.config, timeout)
        while True:
            pb = self.get_operation_pb(name)
            pause = polls.pause(pb)
            if pause is None:
                return pb
            time.sleep(pause)

    async def wait_operation_async(
        self, name: str, timeout: float | timedelta | None = None
    ) -> operations_pb2.Operation:
        """``wait_operation`` for async code: each read runs off the event loop, and the pauses between
        them are ``asyncio.sleep``."""
        polls = _Polls(self.config, timeout)
        while True:
            pb = await self.get_operation_pb_async(name)
            pause = polls.pause(pb)
            if pause is None:
                return pb
            await asyncio.sleep(pause)

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
        if not pending_resume(state, record.resume_path):
            for _ in range(10):
                try:
                    _resume.finish_cancelled(Operation(self, record))
                    return
                except LeaseLostError:
                    record = store_call(f"cancelling {name!r}", self.store.get, name)
                    if record.done:
                        return
                    state = parse_token(record.resume_token)
                    if pending_resume(state, record.resume_path):
                        break  # a resume was scheduled meanwhile: its callback ends it
            else:
                raise LeaseLostError(f"operation {name!r} kept changing while it was being cancelled; try again")
        assert record.resume_path is not None and state.token is not None
        if self.scheduler is None:
            return  # a read-only client: the pending resume's own callback ends it CANCELLED, when it comes
        self._scheduling.schedule(record, record.resume_path, state.token, 0.0, key=f"lro-{state.token}-cancel")

    async def cancel_operation_async(self, name: str) -> None:
        """``cancel_operation`` for async code."""
        await run_async(self, self.cancel_operation, name)

    def delete_operation(self, name: str) -> None:
        """Delete the operation. Raises ``NotFoundError``."""
        if not self.store.delete(name):
            raise NotFoundError(f"operation {name!r} not found")

    async def delete_operation_async(self, name: str) -> None:
        """``delete_operation`` for async code."""
        await run_async(self, self.delete_operation, name)

    def purge_expired(self, limit: int | None = None) -> int:
        """Delete operations not saved for ``config.ttl`` (90 days by default), at most ``limit`` (None: all).
        Returns how many. A worker the client is attached to runs it in bounded batches by itself."""
        cutoff = self.store.now() - self.config.ttl.total_seconds()
        if limit is None:
            return self.store.purge(cutoff)
        return self.store.purge(cutoff, limit=limit)

    # -- resuming ------------------------------------------------------------------------------
    def callback_url(self, name: str, path: str, token: str | None = None) -> str | None:
        """``{host}{prefix}{path}?operation={name}[&token=...]`` or None without a host."""
        return self._scheduling.callback_url(name, path, token)

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
        return _resume.resume(self, name, path, token, hold=token is not None)

    async def aresume(self, name: str, path: str, token: str | None = None) -> ResumeOutcome:
        """``resume`` for async code: store calls and sync handlers run in a thread, async handlers on
        the running loop."""
        return await _resume.aresume(self, name, path, token)

    # -- the local scheduler ---------------------------------------------------------------------
    def callback_secret(self) -> str | None:
        """The HMAC key of local callbacks: ``config.callback_secret``, or one kept in the store."""
        return self._local.secret()

    def run_due(self, limit: int = 100) -> int:
        """Fire this neuron's due local callbacks: in-process without a host, else an HTTP ``PUT`` with
        the HMAC header to ``{host}{prefix}{path}``. The worker job of the lro engine.

        Returns:
            How many callbacks were acknowledged.
        """
        return self._local.run_due(limit)

    def fire(self, topic: str, payload: Mapping[str, Any]) -> None:
        """A core timer handler for this neuron's callbacks (``worker.on_timer(client.resume_topic,
        client.fire)``): in-process without a host, else over HTTP with the HMAC header.

        Raises:
            TransientError: the callback should fire again later.
        """
        self._local.fire(topic, payload)

    def attach(self, worker: Any) -> None:
        """Fire this neuron's callbacks from a core ``Worker``: ``run_due`` becomes one of its jobs.

        The callbacks' timers live in a queue of their own (``lro.timers.{neuron}``), so the worker's timer
        pass never claims them, and they never hold up its other timers. Only a client configured with the
        worker's own scheduler has its callbacks fired by the worker's timer pass (``worker.on_timer``).
        """
        self._local.attach(worker)

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

    def operations_asgi_app(self, prefix: str = "/v1/", fallback: Any = None) -> Any:
        """An ASGI application serving ``google.longrunning.Operations`` over HTTP/JSON under ``prefix``
        (see ``errands.lro._rest``); other requests go to ``fallback``, e.g. ``client.asgi_app()``."""
        from ._rest import OperationsRestApi, RestAsgiApp

        return RestAsgiApp(OperationsRestApi(self, prefix), fallback)

    def operations_wsgi_app(self, prefix: str = "/v1/", fallback: Any = None) -> Any:
        """The WSGI twin of ``operations_asgi_app``."""
        from ._rest import OperationsRestApi, RestWsgiApp

        return RestWsgiApp(OperationsRestApi(self, prefix), fallback)

    def register_grpc(self, server: Any) -> Any:
        """Serve ``google.longrunning.Operations`` (Get, List, Delete, Cancel, Wait) on a ``grpc.Server``.

        Raises:
            MissingDependencyError: grpcio is not installed (``pip install 'errands-lro[grpc]'``).
        """
        from ._grpc import OperationsServicer, add_servicer

        servicer = OperationsServicer(self)
        add_servicer(servicer, server)
        return servicer


    def register_grpc_async(self, server: Any) -> Any:
        """Serve ``google.longrunning.Operations`` on a ``grpc.aio.Server``: the methods and status codes of
        ``register_grpc``, as coroutines that never block the server's event loop.

        Raises:
            MissingDependencyError: grpcio is not installed (``pip install 'errands-lro[grpc]'``).
        """
        from ._grpc import AsyncOperationsServicer, add_servicer

        servicer = AsyncOperationsServicer(self)
        add_servicer(servicer, server)
        return servicer
