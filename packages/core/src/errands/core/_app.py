"""``errands.App``: one object that wires every engine of a service and of its worker.

The same module serves both processes. The API process submits: it needs the store and the *names* of
the connectors it may submit to, never their instances (no clients, no secrets). The worker process
(``app.worker()``, ``errands worker --app module:app``) builds the instances from their factories (or
from ``errands.toml``) and runs every engine in one loop with one concurrency budget.

Example::

    app = errands.App("sqlite:///app.db", connectors={"bank": lambda: HttpConnector(name="bank", url=URL)})

    @app.task("emails.send")
    def send(params): ...

    app.outbox.submit(Effect(key="pay-1", connector="bank", payload={...}))   # API: no connector built
    app.worker().run()                                                       # worker: builds "bank"

With ``App(..., worker_in_process=True)``, ``FastAPI(lifespan=app.lifespan)`` runs that worker inside the
API process, on its event loop (``Worker.run_async``), from startup to shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Mapping, TypeVar, Union

from ._clock import Clock
from ._plugins import connector_names
from .cli import read_config_table, resolve_store_url
from .errors import ConfigError
from .store import SQLStore, open_store

if TYPE_CHECKING:
    from ._tasks import TaskEngine
    from ._worker import Worker
    from .outbox import Outbox

log = logging.getLogger("errands.app")

F = TypeVar("F", bound=Callable[..., Any])

#: A connector or sink given to ``App``: an instance (its ``name`` names it) or, under a name, a class or a
#: zero-argument factory that the worker calls when it starts.
Part = Union[Any, Callable[[], Any]]


def _is_factory(value: Any) -> bool:
    return isinstance(value, type) or (callable(value) and not hasattr(value, "dispatch")
                                       and not hasattr(value, "publish"))


class _Parts:
    """Named connectors or sinks: instances, or factories built once, on first ``build``."""

    def __init__(self, kind: str, method: str) -> None:
        self.kind, self.method = kind, method
        self._given: dict[str, Part] = {}
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add(self, name: Any, part: Part) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}", field=self.kind,
                              value=name)
        if name in self._given:
            raise ConfigError(f"{self.kind} {name!r} is declared twice; give each a name of its own",
                              field=f"{self.kind}.{name}", value=name)
        if not _is_factory(part) and not callable(getattr(part, self.method, None)):
            raise ConfigError(
                f"{self.kind} {name!r} must be an object with {self.method}(), a class, or a factory "
                f"returning one; got {type(part).__name__}", field=f"{self.kind}.{name}", value=type(part).__name__)
        self._given[name] = part

    def add_all(self, parts: Mapping[str, Part] | Iterable[Any] | None) -> None:
        if parts is None:
            return
        if isinstance(parts, Mapping):
            for name, part in parts.items():
                self.add(name, part)
            return
        for part in parts:
            name = getattr(part, "name", None)
            if name is None:
                raise ConfigError(f"a {self.kind} given without a name must have a .name; pass "
                                  f"{{name: factory}} instead", field=self.kind, value=type(part).__name__)
            self.add(name, part)

    @property
    def names(self) -> list[str]:
        return list(self._given)

    def build(self) -> dict[str, Any]:
        with self._lock:
            for name, part in self._given.items():
                if name not in self._built:
                    built = part() if _is_factory(part) else part
                    if not callable(getattr(built, self.method, None)):
                        raise ConfigError(f"the factory of {self.kind} {name!r} returned "
                                          f"{type(built).__name__}, which has no {self.method}()",
                                          field=f"{self.kind}.{name}", value=type(built).__name__)
                    self._built[name] = built
            return dict(self._built)


class App:
    """Wires a store, the outbox and its connectors, fan-out routes, reactions, tasks and attached
    engines (``LroClient``, ``DurableRunner``: anything with ``attach(worker)``), from code or
    ``errands.toml``.

    Args:
        store: a store URL or an open store; default the config's ``store``, ``$ERRANDS_STORE``, then
            ``sqlite:///errands.db`` (the precedence of every ``errands`` command).
        config: an ``errands.toml`` path or parsed mapping: its store, and its connectors and sinks, whose
            names the API process knows at once and whose instances only the worker builds.
        connectors: ``{name: instance | class | factory}``, or instances with a ``name``.
        sinks: ``{route name: sink | class | factory}`` fed from the whole journal; ``route()`` for more.
        max_in_flight: the worker's one concurrency budget: connector calls and sink batches share a call
            runner of this size, and task handlers run at most this many at once.
        poll_interval: seconds the worker sleeps after a pass that found nothing.
        clock: the time source (``FakeClock`` in tests).
        outbox_options: passed to the worker's ``Outbox`` (``lease_for``, ``batch_size``, ...).
        worker_in_process: whether ``lifespan`` also runs the worker (``app.worker()``) in this process, on
            the application's event loop (``Worker.run_async``) from startup to shutdown. Default False: the
            worker runs elsewhere (``errands worker --app module:app``).
    """

    def __init__(
        self, store: str | SQLStore | None = None, *, config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        connectors: Mapping[str, Part] | Iterable[Any] | None = None,
        sinks: Mapping[str, Part] | Iterable[Any] | None = None, max_in_flight: int = 16,
        poll_interval: float = 0.2, clock: Clock | None = None, outbox_options: Mapping[str, Any] | None = None,
        worker_in_process: bool = False,
    ) -> None:
        raw: dict[str, Any] = {}
        if config is not None:
            raw = dict(config) if isinstance(config, Mapping) else read_config_table(os.fspath(config))
        self._raw_config = raw
        if isinstance(store, SQLStore):
            self._store: SQLStore | None = store
            self._store_url = store.redacted_url
            self._owns_store = False
        else:
            if store is not None and not isinstance(store, str):
                raise ConfigError(f"store must be a URL or an open store, got {type(store).__name__}",
                                  field="store", value=type(store).__name__)
            configured = raw.get("store")
            self._store_url = resolve_store_url(store, configured if isinstance(configured, str) else None)
            self._store = None
            self._owns_store = True
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be a positive integer, got {max_in_flight!r}",
                              field="max_in_flight", value=max_in_flight)
        self.max_in_flight = max_in_flight
        self.poll_interval = float(poll_interval)
        self.clock = clock
        self.outbox_options = dict(outbox_options or {})
        if not isinstance(worker_in_process, bool):
            raise ConfigError(f"worker_in_process must be True or False, got {worker_in_process!r}",
                              field="worker_in_process", value=worker_in_process)
        self.worker_in_process = worker_in_process
        self._running_worker: Worker | None = None
        self._connectors = _Parts("connectors", "dispatch")
        self._connectors.add_all(connectors)
        self._sinks = _Parts("sinks", "publish")
        self._sinks.add_all(sinks)
        self._routes: dict[str, dict[str, Any]] = {}
        declared = connector_names(raw) if raw else []
        self._config_connectors = [n for n in declared if n not in self._connectors.names]
        self._config_sinks = [n for n in raw.get("sinks", {}) or {} if n not in self._sinks.names]
        self._tasks: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        self._reactions: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        self._engines: list[Any] = []
        self._outbox: Outbox | None = None
        self._task_engine: TaskEngine | None = None
        self._lock = threading.RLock()

    # -- declaring ---------------------------------------------------------------------------------
    @property
    def connector_names(self) -> list[str]:
        """Every connector this app may submit to: declared in code or in the config."""
        return [*self._connectors.names, *self._config_connectors]

    def connector(self, name: str) -> Callable[[F], F]:
        """Declare the factory of connector ``name``: called by the worker only.

        Example:
            >>> app = App("memory://")
            >>> @app.connector("bank")
            ... def bank(): ...
            >>> app.connector_names
            ['bank']
        """
        def register(factory: F) -> F:
            self._connectors.add(name, factory)
            return factory

        return register

    def route(self, name: str, sink: Part, **options: Any) -> None:
        """Feed the journal to ``sink`` (an instance, class or factory, built by the worker) under route
        ``name``; ``options`` are ``Route``'s (``subjects``, ``batch_size``, ``max_in_flight``)."""
        self._sinks.add(name, sink)
        self._routes[name] = dict(options)

    def task(self, type: str, **options: Any) -> Callable[[F], F]:
        """Run tasks of ``type`` with the decorated handler (``TaskEngine.register`` options)."""
        def register(fn: F) -> F:
            self._tasks.append((type, fn, dict(options)))
            self._task_engine = None  # rebuilt with every handler on next use
            return fn

        return register

    def on(self, subject_pattern: str, **options: Any) -> Callable[[F], F]:
        """React to journal events matching ``subject_pattern`` with the decorated handler
        (``Reactor.on`` options)."""
        def register(fn: F) -> F:
            self._reactions.append((subject_pattern, fn, dict(options)))
            return fn

        return register

    def attach(self, engine: Any) -> Any:
        """Run ``engine`` (an ``LroClient``, a ``DurableRunner``: anything with ``attach(worker)``) in the
        worker. Returns it. An engine on this app's store that takes an outbox (``use_outbox``, as a
        ``DurableRunner`` does for ``ctx.effect``) and has none gets ``app.outbox``."""
        if not callable(getattr(engine, "attach", None)):
            raise ConfigError(f"engines given to App.attach must have attach(worker); {type(engine).__name__} "
                              "has not", field="engine", value=type(engine).__name__)
        use_outbox = getattr(engine, "use_outbox", None)
        if (callable(use_outbox) and getattr(engine, "outbox", None) is None and self._store is not None
                and getattr(engine, "store", None) is self._store):
            use_outbox(self.outbox)
        self._engines.append(engine)
        return engine

    # -- the API side ------------------------------------------------------------------------------
    @property
    def store(self) -> SQLStore:
        """The store, opened (and migrated) on first use."""
        with self._lock:
            if self._store is None:
                self._store = open_store(self._store_url, clock=self.clock)
            return self._store

    @property
    def outbox(self) -> Outbox:
        """An outbox that submits to the declared connector names without building any connector."""
        with self._lock:
            if self._outbox is None:
                from .outbox import Outbox

                self._outbox = Outbox(self.store, connectors=self.connector_names, **self._admission_options())
            return self._outbox

    def _admission_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.outbox_options.items() if k in ("payload_limit",)}

    @property
    def tasks(self) -> TaskEngine:
        """The task engine with every ``@app.task`` handler (submitting needs no worker)."""
        with self._lock:
            if self._task_engine is None:
                from ._tasks import TaskEngine

                engine = TaskEngine(self.store, concurrency=self.max_in_flight)
                for type_, fn, options in self._tasks:
                    engine.register(type_, fn, **options)
                self._task_engine = engine
            return self._task_engine

    def console(self, **options: Any) -> Any:
        """The web console over this app's store, an ASGI application to mount at a prefix of yours
        (``Mount("/console", app.console(token=...))``). It comes from errands-console (the
        ``errands_console_app`` hook); ``options`` are its ``console_app`` arguments (``access``, ``token``,
        ``neurons``, ``refresh``).

        Raises:
            ConfigError: no installed plugin provides a console.
        """
        from ._plugins import get_registry

        asgi = get_registry().pm.hook.errands_console_app(app=self, options=dict(options))
        if asgi is None:
            raise ConfigError("App.console() needs errands-console: pip install errands-console", field="console")
        return asgi

    # -- the worker side ---------------------------------------------------------------------------
    def worker(self, **overrides: Any) -> Worker:
        """A ``Worker`` running every engine of this app; it builds the connectors and sinks now.

        ``overrides``: ``max_in_flight``, ``poll_interval``. Close it by stopping ``run()`` (or
        ``close_worker`` after ``drain()``)."""
        from ._fanout import FanOut, Route
        from ._reactor import Reactor
        from ._worker import Worker
        from .outbox import Outbox

        unknown = set(overrides) - {"max_in_flight", "poll_interval"}
        if unknown:
            raise ConfigError(f"App.worker: unknown option(s) {', '.join(sorted(unknown))}; known: "
                              "max_in_flight, poll_interval", field="worker", value=sorted(unknown))
        max_in_flight = overrides.get("max_in_flight", self.max_in_flight)
        connectors = self._connectors.build()
        sinks = self._sinks.build()
        routes_options: dict[str, dict[str, Any]] = dict(self._routes)
        if self._config_connectors or self._config_sinks:
            from ._plugins import load_config

            loaded = load_config(self._raw_config)  # the table read at construction: no second read
            connectors.update({n: loaded.connectors[n] for n in self._config_connectors})
            sinks.update({n: loaded.sinks[n] for n in self._config_sinks})
            routes_options.update({n: loaded.routes.get(n, {}) for n in self._config_sinks})
        store = self.store
        outbox = Outbox(store, connectors=connectors, max_in_flight=max_in_flight, **self.outbox_options)
        fanout = FanOut(store, [Route(n, s, **routes_options.get(n, {})) for n, s in sinks.items()]) if sinks else None
        jobs: list[Callable[[], Any]] = []
        if self._tasks or self._reactions:
            engine = self.tasks
            if self._reactions:
                reactor = Reactor(store, engine)
                for pattern, fn, options in self._reactions:
                    reactor.on(pattern, fn, **options)
                jobs.append(reactor.run_once)
            else:
                jobs.append(engine.run_once)
        worker = Worker(store, outbox=outbox, fanout=fanout, jobs=jobs, max_in_flight=max_in_flight,
                        poll_interval=overrides.get("poll_interval", self.poll_interval))
        for attached in self._engines:
            attached.attach(worker)
        return worker

    # -- lifetime ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _asgi_app: Any = None) -> AsyncIterator[None]:
        """``FastAPI(lifespan=app.lifespan)``: open (and migrate) the store at startup, so a bad URL fails
        the deploy instead of the first request, and close the app at shutdown.

        With ``worker_in_process=True`` it also builds the worker at startup and runs it as a background
        task on the application's loop (``Worker.run_async``); at shutdown it stops the worker, which
        finishes the calls and tasks in flight and closes, before the app closes. Opening, building and
        closing run in threads: the loop is never blocked by them.
        """
        await asyncio.to_thread(getattr, self, "store")  # opening is the point
        worker_task: asyncio.Task[None] | None = None
        stop = asyncio.Event()
        try:
            if self.worker_in_process:
                worker = await asyncio.to_thread(self.worker)
                self._running_worker = worker
                worker_task = asyncio.create_task(worker.run_async(stop), name="errands-worker")
                worker_task.add_done_callback(_report_worker_end)
            yield
        finally:
            try:
                if worker_task is not None:
                    stop.set()
                    await asyncio.wait([worker_task])  # its end is reported by _report_worker_end
            finally:
                self._running_worker = None
                await asyncio.to_thread(self.close)

    @property
    def running_worker(self) -> Worker | None:
        """The worker ``lifespan`` runs in this process (``worker_in_process=True``) while it runs, else None.
        ``app.running_worker.wake()`` after a submit starts its next pass now."""
        return self._running_worker

    def close(self) -> None:
        """Close the engines this app built and, if it opened it, the store."""
        with self._lock:
            for part in (self._outbox, self._task_engine):
                if part is not None:
                    part.close()
            self._outbox = self._task_engine = None
            if self._store is not None and self._owns_store:
                self._store.close()
                self._store = None

    def __repr__(self) -> str:
        return f"App(store={self._store_url!r}, connectors={self.connector_names!r})"


def _report_worker_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("the in-process worker stopped on an error; this process delivers nothing more", exc_info=exc)


def load_app(spec: str) -> App:
    """The ``App`` named by ``module:attribute`` (``errands worker --app myservice.jobs:app``)."""
    import importlib
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app must look like 'package.module:app', got {spec!r}", field="app", value=spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {spec!r}: module {module_name!r} could not be imported ({exc})", field="app",
                          value=spec) from exc
    found = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(f"--app {spec!r}: {module_name} has no attribute {attr!r}", field="app",
                              value=spec) from None
    if callable(found) and not isinstance(found, App):
        found = found()  # an app factory
    if not isinstance(found, App):
        raise ConfigError(f"--app {spec!r} names a {type(found).__name__}, not an errands.App", field="app",
                          value=spec)
    return found
