"""Traces, metrics and structured logs of every engine, through the OpenTelemetry API when it is installed.

``pip install 'errands-core[otel]'`` brings ``opentelemetry-api``; configure a tracer and a meter provider (the
SDK, an exporter) as for any instrumented library. Without the API nothing here imports it, every helper is a
no-op and the engines' hot paths pay one module-constant check (``ENABLED``); with the API and no tracer provider
set, they pay one check more (``tracing``): no span is started and no trace context is read or stored.

Spans, named ``errands.<engine>.<verb>`` (``SPANS`` lists each once with the attributes it may carry):

===============================  =================================================================================
``errands.outbox.submit``        effects recorded (``Outbox.submit``): effect key, connector, run id; count
                                 (``submit_many``)
``errands.outbox.dispatch``      one dispatch attempt: effect key, connector, run id, attempt, lease owner, status
``errands.outbox.observe``       one observation of an effect whose outcome is unknown: as dispatch
``errands.outbox.compensate``    one compensation attempt: effect key, obligation kind, attempt, lease owner
``errands.journal.append``       events appended (``Journal.append``): stream, subject
``errands.fanout.batch``         one pass of a route's pipelined relay (its batches): route, count
``errands.fanout.publish``       one sink publish of that batch: route, sink, count, status
``errands.tasks.submit``         a task queued (``TaskEngine.submit``): task type, task id
``errands.tasks.run``            one task attempt on a worker: task type, task id, attempt, lease owner, status
``errands.lro.save``             an operation created or saved (``new_operation``): operation
``errands.lro.resume``           an operation resumed by its callback: operation, status
``errands.lro.complete``         an operation completed: operation, status
``errands.durable.start``        an execution started (``DurableRunner.start``): execution id, function
``errands.durable.invocation``   one invocation of an execution on a worker: execution id, lease owner, status
``errands.durable.step``         one step run inside an invocation: execution id, step, attempt, status
``errands.demo.counterparty``    the counterparty of ``errands demo``: its request, in the caller's trace
===============================  =================================================================================

Attributes are ids, names, counts and statuses, never payloads, responses or secrets.

Context travels with the work: the W3C trace context current when work is recorded (an effect, a task, a
durable execution, an lro callback) is stored with it (``carrier``; an effect keeps it in its metadata under
``errands.trace``, a task in ``em_tasks.trace``, a journal event in ``em_events.trace`` (a reaction's task takes
it), an execution and a callback in their queue payload) and restored as the parent of the worker's span
(``span(..., parent=...)``), so a worker's
spans, in another thread or another process, are in the request's trace. Outgoing calls carry ``traceparent``
(``inject``): the HTTP connector's and the webhook sink's headers, Pub/Sub attributes, Cloud Tasks headers.

Metrics (``METRICS``), through the meter ``errands``:

====================================  ==========  =======================================================
``errands.outbox.effects``            counter     effects reaching a status by a worker's step (``status``)
``errands.outbox.dispatch.duration``  histogram   seconds per dispatch call (``connector``)
``errands.outbox.dispatch.attempts``  counter     dispatch attempts made (``connector``)
``errands.fanout.lag``                gauge       journal events behind the head, per route (``route``)
``errands.queue.depth``               gauge       work due now, per engine (``engine``: ``outbox``, ``tasks``)
``errands.queue.age``                 gauge       seconds the oldest due work has waited (``engine``)
``errands.lease.lost``                counter     leases lost to another worker (``engine``)
``errands.durable.executions``        counter     durable executions reaching a status (``status``)
====================================  ==========  =======================================================

Logs: ``ERRANDS_LOG_FORMAT=json`` makes ``configure_logging`` (the ``errands worker`` command calls it) write one
JSON object per line, canonical keys first (``LOG_KEYS``), then the current ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import weakref
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, MutableMapping, TextIO, TypeVar

try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # the optional dependency is absent: every helper below is a no-op
    ENABLED = False
else:
    ENABLED = True
    # A proxy until a tracer provider is set, then that provider's tracer: asked for once, not per span.
    _TRACER = _trace.get_tracer("errands")
    _FLAGS = {0: _trace.TraceFlags(0), 1: _trace.TraceFlags(1)}

__all__ = [
    "ATTRIBUTES",
    "ENABLED",
    "LOG_KEYS",
    "METRICS",
    "SPANS",
    "TRACE_KEY",
    "JsonFormatter",
    "annotate",
    "answered",
    "backlog",
    "carrier",
    "carrier_text",
    "configure_logging",
    "count",
    "dispatched",
    "gauge",
    "inject",
    "is_enabled",
    "log_formatter",
    "parsed",
    "queued",
    "record",
    "resumed",
    "set_status",
    "span",
    "spanned",
    "stored",
    "tracing",
    "traced_effect",
    "use_providers",
    "watch",
    "with_trace",
]

#: Where an effect's metadata keeps the trace context current at its submit.
TRACE_KEY = "errands.trace"

#: Attribute keyword (as ``span`` takes it) -> attribute name on the span.
ATTRIBUTES: Mapping[str, str] = {
    "effect_key": "errands.effect_key",
    "connector": "errands.connector",
    "run_id": "errands.run_id",
    "attempt": "errands.attempt",
    "status": "errands.status",
    "lease_owner": "errands.lease_owner",
    "kind": "errands.obligation_kind",
    "stream": "errands.stream",
    "subject": "errands.subject",
    "route": "errands.route",
    "sink": "errands.sink",
    "count": "errands.count",
    "task_type": "errands.task_type",
    "task_id": "errands.task_id",
    "operation": "errands.operation",
    "execution_id": "errands.execution_id",
    "function": "errands.function",
    "step": "errands.step",
}

_WORK = ("attempt", "lease_owner", "status")

#: Every span errands starts, with the attributes it may carry (keywords of ``ATTRIBUTES``).
SPANS: Mapping[str, tuple[str, ...]] = {
    "errands.outbox.submit": ("effect_key", "connector", "run_id", "count"),
    "errands.outbox.dispatch": ("effect_key", "connector", "run_id", *_WORK),
    "errands.outbox.observe": ("effect_key", "connector", "run_id", *_WORK),
    "errands.outbox.compensate": ("effect_key", "kind", *_WORK),
    "errands.journal.append": ("stream", "subject", "count"),
    "errands.fanout.batch": ("route", "count"),
    "errands.fanout.publish": ("route", "sink", "count", "status"),
    "errands.tasks.submit": ("task_type", "task_id", "count"),
    "errands.tasks.run": ("task_type", "task_id", *_WORK),
    "errands.lro.save": ("operation",),
    "errands.lro.resume": ("operation", "status"),
    "errands.lro.complete": ("operation", "status"),
    "errands.durable.start": ("execution_id", "function"),
    "errands.durable.invocation": ("execution_id", "function", "lease_owner", "status"),
    "errands.durable.step": ("execution_id", "step", "attempt", "status"),
    "errands.demo.counterparty": (),
}

#: Every instrument errands records: name -> (kind, unit, description).
METRICS: Mapping[str, tuple[str, str, str]] = {
    "errands.outbox.effects": ("counter", "{effect}", "effects reaching a status"),
    "errands.outbox.dispatch.duration": ("histogram", "s", "seconds per dispatch call"),
    "errands.outbox.dispatch.attempts": ("counter", "{attempt}", "dispatch attempts made"),
    "errands.fanout.lag": ("gauge", "{event}", "journal events behind the head, per route"),
    "errands.queue.depth": ("gauge", "{item}", "work due now, per engine"),
    "errands.queue.age": ("gauge", "s", "seconds the oldest due work has waited, per engine"),
    "errands.lease.lost": ("counter", "{lease}", "leases lost to another worker"),
    "errands.durable.executions": ("counter", "{execution}", "durable executions reaching a status"),
}

#: The keys a JSON log line starts with, in this order (those the record has).
LOG_KEYS = ("ts", "level", "logger", "msg", "effect_key", "run_id", "execution_id", "operation", "task_id",
            "route", "connector", "attempt", "status", "lease_owner", "trace_id", "span_id")

T = TypeVar("T")
H = TypeVar("H", bound=MutableMapping[str, str])
_NULL: ContextManager[None] = contextlib.nullcontext()
_instruments: dict[str, Any] = {}
_gauges: dict[str, list[Callable[[], Any]]] = {}
_PROPAGATE: Any = None


def _propagator() -> Any:
    """``opentelemetry.propagate`` (the configured propagators), imported at its first use: it reads the
    entry points of every installed propagator, a cost an import of errands should not pay."""
    global _PROPAGATE
    if _PROPAGATE is None:
        from opentelemetry import propagate

        _PROPAGATE = propagate
    return _PROPAGATE


_by_provider: weakref.WeakKeyDictionary[Any, tuple[Any, dict[str, Any], dict[str, list[Callable[[], Any]]]]] = \
    weakref.WeakKeyDictionary()
_METER: Any = None  # the meter ``errands`` of the global provider (a proxy until one is set), asked for once


def _meter() -> Any:
    global _METER
    if _METER is None:
        _METER = _metrics.get_meter("errands")
    return _METER


@contextlib.contextmanager
def use_providers(tracer_provider: Any = None, meter_provider: Any = None) -> Iterator[None]:
    """Record errands' spans with ``tracer_provider`` and its metrics with ``meter_provider`` instead of the
    global ones while the block runs, in every thread (the demo, a benchmark or a test suite that must not set
    OpenTelemetry's process-wide providers, which can be set only once). None keeps the current one."""
    global _TRACER, _METER, _instruments, _gauges
    if not ENABLED:
        yield
        return
    before = _TRACER, _METER, _instruments, _gauges
    if tracer_provider is not None:
        _TRACER = tracer_provider.get_tracer("errands")
    if meter_provider is not None:
        # One meter and one set of instruments per provider, kept for the next block: a meter answers a second
        # creation of an instrument with the first one (and without its new callbacks).
        kept = _by_provider.get(meter_provider)
        if kept is None:
            kept = _by_provider[meter_provider] = (meter_provider.get_meter("errands"), {}, {})
        _METER, _instruments, _gauges = kept
    try:
        yield
    finally:
        _TRACER, _METER, _instruments, _gauges = before


def tracing() -> bool:
    """Whether errands records spans now: the API is installed and a tracer provider is set (OpenTelemetry's
    global one, or one of ``use_providers``). Without one, ``span`` is a shared null context and ``carrier`` None at
    the cost of this check: the engines' hot paths pay nothing more until tracing is configured."""
    return ENABLED and (_TRACER.__class__ is not _trace.ProxyTracer or _trace._TRACER_PROVIDER is not None)


def is_enabled() -> bool:
    """Whether ``opentelemetry-api`` is installed (a constant of the process: ``ENABLED``)."""
    return ENABLED


def span(name: str, parent: Mapping[str, str] | None = None, **attributes: Any) -> ContextManager[Any]:
    """Start span ``name`` (one of ``SPANS``) as the current one for a ``with`` block; yields the span (None
    without the API). ``parent``: a stored carrier (``stored``) whose trace the span continues, instead of the
    current context's. Attributes are ``ATTRIBUTES`` keywords; None values are left out."""
    if not tracing():
        return _NULL
    attrs = {ATTRIBUTES[k]: v for k, v in attributes.items() if v is not None}
    return _Current(_TRACER.start_span(name, context=_parent_context(parent) if parent else None, attributes=attrs))


class _Current:
    """A started span as the current one for a ``with`` block, then ended: what the tracer's
    ``start_as_current_span`` does (an exception is recorded on the span and sets its status to ERROR), as one
    small object instead of two generator-based context managers, on a path every effect takes twice."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any) -> None:
        self._span = span

    def __enter__(self) -> Any:
        self._token = _context.attach(_trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        _context.detach(self._token)
        current = self._span
        # As the API's ``use_span``: exceptions only, not BaseException (GeneratorExit, a control signal).
        if isinstance(exc, Exception) and current.is_recording():
            current.record_exception(exc)
            current.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        current.end()


def _parent_context(parent: Mapping[str, str]) -> Any:
    """The context of a stored ``carrier``: its span as a remote parent (the W3C form ``carrier`` writes; any
    other form through the configured propagator). Header names are matched in any case."""
    found = parent.get("traceparent")
    if found is None:
        parent = {str(k).lower(): v for k, v in parent.items()}
        found = parent.get("traceparent")
    # Version 00 as ``carrier`` writes it: ``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``.
    if type(found) is not str or len(found) != 55 or not found.startswith("00-") or found[35] != "-" \
            or found[52] != "-":
        return _extracted(parent)
    try:
        trace_id, span_id, flags = int(found[3:35], 16), int(found[36:52], 16), int(found[53:], 16)
    except ValueError:
        return _extracted(parent)
    state = parent.get("tracestate")
    if state is not None and type(state) is not str:
        state = None
    remote = _trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=_FLAGS.get(flags) or
                                _trace.TraceFlags(flags),
                                trace_state=_trace.TraceState.from_header([state]) if state else None)
    if not remote.is_valid:
        return _extracted(parent)
    return _trace.set_span_in_context(_trace.NonRecordingSpan(remote))


def _extracted(parent: Mapping[str, Any]) -> Any:
    """The context the configured propagator reads from a stored carrier that is not ``carrier``'s W3C form; a
    context of no span when it reads nothing (a carrier that no propagator can read starts a trace of its own: it
    must not fail the work it came with)."""
    try:
        return _propagator().extract({k: v for k, v in parent.items() if isinstance(v, str)},
                                     context=_context.Context())
    except Exception:  # a broken propagator or carrier: no parent, the work goes on
        logging.getLogger("errands.telemetry").debug("a stored trace context could not be read", exc_info=True)
        return _context.Context()


@contextlib.contextmanager
def _attached(ctx: Any) -> Iterator[None]:
    token = _context.attach(ctx)
    try:
        yield
    finally:
        _context.detach(token)


def resumed(parent: Mapping[str, str] | None) -> ContextManager[None]:
    """Make a stored carrier (``stored``) the current context for a ``with`` block, starting no span: work
    recorded inside (``carrier``, ``queued``) continues that trace. Nothing for None (or without the API)."""
    if not ENABLED or not parent:
        return _NULL
    return _attached(_parent_context(parent))


def answered(current: Any, result: T) -> T:
    """``result`` (a connector's or sink's answer), its outcome set as the ``errands.status`` of span ``current``."""
    if current is not None:
        outcome = getattr(result, "outcome", None)
        if outcome is not None:
            current.set_attribute(ATTRIBUTES["status"], str(outcome))
    return result


def dispatched(connector: str, started: float) -> float:
    """The seconds since ``started`` (``time.perf_counter``), recorded as the duration of one dispatch call of
    ``connector``. The outbox counts the attempts (``errands.outbox.dispatch.attempts``) once per batch."""
    seconds = time.perf_counter() - started
    if ENABLED:
        _instrument("errands.outbox.dispatch.duration").record(seconds, {"connector": connector})
    return seconds


def spanned(fn: Callable[..., T], name: str, **attributes: Any) -> Callable[..., T]:
    """``fn`` run inside span ``name`` (``span``) at each call; ``fn`` itself when nothing records spans
    (``tracing``)."""
    if not tracing():
        return fn

    def call(*args: Any, **kwargs: Any) -> T:
        with span(name, **attributes) as current:
            result = fn(*args, **kwargs)
            set_status(current, "SUCCEEDED")
            return result

    return call


def queued(text: str | None = None) -> dict[str, Any] | None:
    """The payload that carries the current trace context with a queued item (``stored`` reads it back); None
    when there is none. With ``text`` (what ``carrier_text`` wrote earlier, kept with the work), that context
    instead: None when ``text`` holds none."""
    found = carrier() if text is None else parsed(text)
    return None if found is None else {TRACE_KEY: found}


def set_status(current: Any, status: Any) -> None:
    """Set the ``errands.status`` attribute of a span ``span`` yielded (nothing for None)."""
    if current is not None:
        current.set_attribute(ATTRIBUTES["status"], str(status))


def annotate(current: Any, **attributes: Any) -> None:
    """Set attributes (``ATTRIBUTES`` keywords; None values left out) on a span ``span`` yielded, known only once
    its work is done (nothing for None)."""
    if current is not None:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(ATTRIBUTES[key], value)


def carrier() -> dict[str, str] | None:
    """The W3C trace context current now (``traceparent``, ``tracestate``), to store with work; None when no span
    is current (or without the API)."""
    if not tracing():
        return None
    # Written directly in the W3C form (what the trace-context propagator writes), at a fraction of its cost:
    # this runs on every submit.
    ctx = _trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    out = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags) & 0xFF:02x}"}
    if ctx.trace_state:
        out["tracestate"] = ctx.trace_state.to_header()
    return out


def carrier_text() -> str | None:
    """``carrier()`` as JSON text, for a text column; None when no span is current."""
    found = carrier()
    return None if found is None else json.dumps(found, separators=(",", ":"))


def parsed(text: str | None) -> Mapping[str, str] | None:
    """The carrier ``carrier_text`` wrote (None for None or anything else)."""
    if not text or not ENABLED:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def with_trace(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """``metadata`` with the current trace context under ``TRACE_KEY`` (the same object when there is none, or
    the key is set already)."""
    if not ENABLED or TRACE_KEY in metadata:
        return metadata
    found = carrier()
    return metadata if found is None else {**metadata, TRACE_KEY: found}


def traced_effect(effect: T) -> T:
    """``effect`` (an ``Effect``) with the current trace context in its metadata (``with_trace``); the same
    object when there is none."""
    metadata = getattr(effect, "metadata", None)
    if not isinstance(metadata, dict):
        return effect
    traced = with_trace(metadata)
    return effect if traced is metadata else dataclasses.replace(effect, metadata=traced)  # type: ignore[type-var]


def stored(metadata: Mapping[str, Any] | None) -> Mapping[str, str] | None:
    """The trace context ``with_trace`` stored in ``metadata`` (None if none)."""
    if not metadata:
        return None
    found = metadata.get(TRACE_KEY)
    # ``isinstance`` against ``Mapping`` costs a walk of the ABC's registry: a dict (or nothing) is checked first.
    return found if found is None or type(found) is dict or isinstance(found, Mapping) else None


def inject(headers: H) -> H:
    """Add the current trace context (``traceparent``, ``tracestate``) to outgoing ``headers``; returns them."""
    if ENABLED:
        _propagator().inject(headers)
    return headers


# -- metrics ------------------------------------------------------------------------------------------------------
def _instrument(name: str) -> Any:
    found = _instruments.get(name)
    if found is None:
        kind, unit, description = METRICS[name]
        meter = _meter()
        make = meter.create_counter if kind == "counter" else meter.create_histogram
        found = _instruments[name] = make(name, unit=unit, description=description)
    return found


def count(name: str, amount: int = 1, **attributes: Any) -> None:
    """Add ``amount`` to counter ``name`` (one of ``METRICS``)."""
    if ENABLED:
        _instrument(name).add(amount, {k: str(v) for k, v in attributes.items()})


def record(name: str, value: float, **attributes: Any) -> None:
    """Record ``value`` on histogram ``name`` (one of ``METRICS``)."""
    if ENABLED:
        _instrument(name).record(value, {k: str(v) for k, v in attributes.items()})


def gauge(name: str, read: Callable[[], Iterable[tuple[float, Mapping[str, str]]] | None]) -> None:
    """Report gauge ``name`` (one of ``METRICS``) at each collection with ``read()``: (value, attributes) pairs.
    Each name is one instrument whatever the number of reads; a read that fails reports nothing that time (a store
    down must not break the exporter), one that returns None is dropped (what it read is gone)."""
    if not ENABLED:
        return
    reads = _gauges.get(name)
    if reads is None:
        reads = _gauges[name] = []
        _kind, unit, description = METRICS[name]

        def observe(_options: Any) -> Iterable[Any]:
            out: list[Any] = []
            for each in list(reads):
                try:
                    found = each()
                    if found is None:
                        reads.remove(each)
                        continue
                    out.extend(_metrics.Observation(value, dict(attrs)) for value, attrs in found)
                except Exception:  # a collection that fails reports nothing; the next one asks again
                    logging.getLogger("errands.telemetry").debug("gauge %s could not be read", name, exc_info=True)
            return out

        _meter().create_observable_gauge(name, callbacks=[observe], unit=unit,
                                                              description=description)
    reads.append(read)


def watch(worker: Any) -> None:
    """Report ``errands.fanout.lag`` of each route of a worker's fan-out while the worker lives."""
    if not ENABLED:
        return
    ref = weakref.ref(worker)

    def lag() -> list[tuple[float, Mapping[str, str]]] | None:
        w = ref()
        if w is None:
            return None
        status = getattr(w.fanout, "status", None)
        return [(route.behind, {"route": route.name}) for route in status()] if callable(status) else []

    gauge("errands.fanout.lag", lag)


def backlog(engine: str, owner: Any, read: Callable[[Any, Any, float], tuple[int, float | None]]) -> None:
    """Report ``errands.queue.depth`` and ``errands.queue.age`` of ``engine`` while ``owner`` (an engine with a
    ``store``) lives: ``read(owner, tx, now)`` answers how many items are due and the due time of the oldest."""
    if not ENABLED:
        return
    ref = weakref.ref(owner)

    def measure() -> tuple[int, float] | None:
        found = ref()
        if found is None:
            return None
        store = found.store
        now = store.clock.now()
        with store.read() as tx:
            depth, oldest = read(found, tx, now)
        return depth, 0.0 if oldest is None else max(0.0, now - oldest)

    def depth() -> list[tuple[float, Mapping[str, str]]] | None:
        got = measure()
        return None if got is None else [(got[0], {"engine": engine})]

    def age() -> list[tuple[float, Mapping[str, str]]] | None:
        got = measure()
        return None if got is None else [(got[1], {"engine": engine})]

    gauge("errands.queue.depth", depth)
    gauge("errands.queue.age", age)


# -- logs ---------------------------------------------------------------------------------------------------------
_LOG_FIELD = {name: key for key, name in ATTRIBUTES.items()}
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("authorization", "password", "secret", "token", "cookie", "credential", "api_key", "apikey")


def _redacted(key: str, value: Any) -> Any:
    lower = key.lower()
    return "***" if any(word in lower for word in _SECRET_WORDS) else value


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``LOG_KEYS`` first (those present), then the record's other extras; values of
    keys that name a secret (``authorization``, ``token``, ``password``, ...) are ``***``. Messages are formatted as
    in text logs, where errands redacts URLs and headers before logging them."""

    def format(self, record: logging.LogRecord) -> str:
        found: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                found[key] = _redacted(key, value)
        if ENABLED:
            current = _trace.get_current_span()
            ctx = current.get_span_context()
            if ctx.is_valid:
                found["trace_id"], found["span_id"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
                # The errands span's attributes name the work the line is about (effect key, lease owner, ...).
                for name, value in (getattr(current, "attributes", None) or {}).items():
                    field = _LOG_FIELD.get(name)
                    if field is not None:
                        found.setdefault(field, value)
        if record.exc_info:
            found["exc"] = self.formatException(record.exc_info)
        line = {key: found.pop(key) for key in LOG_KEYS if key in found}
        line.update(found)
        return json.dumps(line, default=str)


def log_formatter() -> logging.Formatter:
    """``JsonFormatter`` when ``ERRANDS_LOG_FORMAT=json``, else text lines ``time logger level message``."""
    if os.environ.get("ERRANDS_LOG_FORMAT", "").strip().lower() == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")


def configure_logging(level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` with ``log_formatter()``, as ``logging.basicConfig`` does: nothing
    changes when the root logger has handlers already (the application configured logging)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(log_formatter())
    root.addHandler(handler)
    root.setLevel(level)
