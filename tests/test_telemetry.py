"""Traces, metrics and logs (``errands.core.telemetry``) with the OpenTelemetry SDK's in-memory exporter and reader.

An effect submitted inside a request's span is dispatched later by a worker, in another thread and in another
process (the trace context carried through the store), in the request's trace; the counterparty (a real local
HTTP server) receives a ``traceparent`` of that trace. Without opentelemetry (its import blocked in a subprocess)
nothing of it is imported and the outbox works as before.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from errands.connectors.http import HttpConnector
from errands.core import DispatchOutcome, DispatchResult, Effect, EffectStatus, Outbox, open_store, telemetry
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_httpserver import HTTPServer

_EXPORTER = InMemorySpanExporter()
_READER = InMemoryMetricReader()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
_METERS = MeterProvider(metric_readers=[_READER])
_SHOP = _PROVIDER.get_tracer("shop")  # the application's own spans (a request's)

# The worker of the subprocess test: its own SDK, its spans' (name, trace id, parent span id) printed as JSON.
WORKER = """
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from errands.connectors.http import HttpConnector
from errands.core import Outbox, open_store

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
store = open_store(sys.argv[1])
outbox = Outbox(store, connectors={"bank": HttpConnector(url=sys.argv[2])})
outbox.drain()
print(json.dumps([[s.name, format(s.context.trace_id, "032x"), s.parent and format(s.parent.span_id, "016x")]
                  for s in exporter.get_finished_spans()]))
"""

# A task worker in a process of its own: the handler calls the counterparty with the current trace context.
TASK_WORKER = """
import json, sys
import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from errands.core import TaskEngine, open_store, telemetry

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
store = open_store(sys.argv[1])
engine = TaskEngine(store, {"ship": lambda params: httpx.post(sys.argv[2], json=params,
                                                              headers=telemetry.inject({})).status_code})
engine.drain()
engine.close()
print(json.dumps([[s.name, format(s.context.trace_id, "032x"), s.parent and format(s.parent.span_id, "016x")]
                  for s in exporter.get_finished_spans()]))
"""

# A durable worker in a process of its own, with the same function as the test's.
DURABLE_WORKER = """
import json, sys
import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from errands.core import telemetry
from errands.durable import DurableRunner

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
runner = DurableRunner(sys.argv[1])
runner.register("pay", lambda event, ctx: ctx.step(
    lambda _: httpx.post(sys.argv[2], json={}, headers=telemetry.inject({})).status_code, name="call"))
runner.drain()
runner.close()
print(json.dumps([[s.name, format(s.context.trace_id, "032x"), s.parent and format(s.parent.span_id, "016x")]
                  for s in exporter.get_finished_spans()]))
"""

# Without opentelemetry: its import is refused, as if it were not installed.
UNTRACED = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"no module named {name!r}")
        return None

sys.meta_path.insert(0, Refuse())
from errands.connectors.http import HttpConnector
from errands.core import Effect, Outbox, open_store, telemetry

store = open_store(sys.argv[1])
outbox = Outbox(store, connectors={"bank": HttpConnector(url=sys.argv[2])})
with telemetry.span("errands.outbox.submit", effect_key="k"):
    outbox.submit(Effect(key="plain", connector="bank", payload={"n": 1}))
outbox.drain()
telemetry.count("errands.outbox.effects", status="CONFIRMED")
from errands.core import TaskEngine
from errands.durable import DurableRunner
from errands.lro import Config, LroClient, ResumableHandler
import errands.sinks, errands.connectors.gcp

tasks = TaskEngine(store, {"ship": lambda params: params["n"]})
task = tasks.wait(tasks.submit("ship", {"n": 2}), timeout=60)
runner = DurableRunner(store)
runner.register("pay", lambda event, ctx: ctx.step(lambda _: 3, name="one"))
runner.add_queue("orders")
execution = runner.start("pay", {})
queued = runner.start("pay", {}, queue="orders")
runner.drain()
assert runner.get(queued).result == 3, runner.get(queued)
with store.read() as tx:
    assert tx.one("SELECT trace FROM durable_queue_items WHERE execution_id = ?", (queued,))[0] is None
lro = LroClient(Config(neuron="svc", store=store))
lro.add_resumable_handlers(ResumableHandler("h", lambda op: op.complete({"ok": True})))
lro.new_operation("operations/o1").resume_via_tasks("h")
lro.run_due()
assert str(task.status) == "SUCCEEDED" and runner.get(execution).result == 3, (task, runner.get(execution))
assert lro.get_operation("operations/o1").done
tasks.close(); runner.close(); lro.close()
print(json.dumps({"enabled": telemetry.ENABLED, "status": str(outbox.get("plain").status),
                  "metadata": outbox.get("plain").metadata,
                  "imported": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
"""


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """errands' spans and metrics recorded by the SDK in memory (the process's global providers are left as they
    are, for the tests that run after these), spans cleared."""
    _EXPORTER.clear()
    with telemetry.use_providers(tracer_provider=_PROVIDER, meter_provider=_METERS):
        yield _EXPORTER
    finished = _EXPORTER.get_finished_spans()
    _EXPORTER.clear()
    # Every span errands started is one SPANS lists, with attributes it lists for it.
    for s in finished:
        if s.name.startswith("errands."):
            assert s.name in telemetry.SPANS, s.name
            allowed = {telemetry.ATTRIBUTES[k] for k in telemetry.SPANS[s.name]}
            assert set(s.attributes or {}) <= allowed, (s.name, s.attributes)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'errands.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _trace_id(s: ReadableSpan) -> str:
    assert s.context is not None
    return format(s.context.trace_id, "032x")


def _by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _traceparents(server: HTTPServer) -> list[str]:
    return [req.headers.get("traceparent", "") for req, _ in server.log]


def _submit_in_request(outbox: Outbox, key: str) -> str:
    """Submit an effect inside a request's span; returns the request's trace id."""
    with _SHOP.start_as_current_span("POST /orders") as request:
        outbox.submit(Effect(key=key, connector="bank", payload={"cents": 500}))
    return format(request.get_span_context().trace_id, "032x")


def test_a_worker_thread_dispatches_in_the_request_trace_and_the_counterparty_gets_traceparent(
        spans: InMemorySpanExporter, httpserver: HTTPServer, store_url: str) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_json({"ok": True})
    store = open_store(store_url)
    try:
        outbox = Outbox(store, connectors={"bank": HttpConnector(url=httpserver.url_for("/pay"))})
        trace_id = _submit_in_request(outbox, "order-1")
        assert outbox.get("order-1").metadata[telemetry.TRACE_KEY]["traceparent"].split("-")[1] == trace_id

        worker = threading.Thread(target=outbox.drain)
        worker.start()
        worker.join()

        assert outbox.get("order-1").status is EffectStatus.CONFIRMED
        (submit,) = _by_name(spans, "errands.outbox.submit")
        (dispatch,) = _by_name(spans, "errands.outbox.dispatch")
        assert {_trace_id(submit), _trace_id(dispatch)} == {trace_id}
        assert dispatch.parent is not None and submit.context is not None
        assert dispatch.parent.span_id == submit.context.span_id  # request -> submit -> dispatch
        assert dispatch.attributes is not None
        assert dispatch.attributes["errands.effect_key"] == "order-1"
        assert dispatch.attributes["errands.connector"] == "bank"
        assert dispatch.attributes["errands.status"] == "CONFIRMED"
        assert dispatch.attributes["errands.attempt"] == 1
        assert "cents" not in json.dumps(dict(dispatch.attributes))  # never the payload
        (parent,) = _traceparents(httpserver)
        assert parent.split("-")[1] == trace_id
        assert dispatch.context is not None and parent.split("-")[2] == format(dispatch.context.span_id, "016x")
    finally:
        store.close()


def test_a_worker_process_dispatches_in_the_request_trace(
        spans: InMemorySpanExporter, httpserver: HTTPServer, store_url: str) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_json({"ok": True})
    url = httpserver.url_for("/pay")
    store = open_store(store_url)
    try:
        outbox = Outbox(store, connectors={"bank": HttpConnector(url=url)})
        trace_id = _submit_in_request(outbox, "order-2")
        done = subprocess.run([sys.executable, "-c", WORKER, store_url, url], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        worker_spans = json.loads(done.stdout.strip().splitlines()[-1])
        assert [name for name, _, _ in worker_spans] == ["errands.outbox.dispatch"]
        (submit,) = _by_name(spans, "errands.outbox.submit")
        assert submit.context is not None
        assert worker_spans[0][1:] == [trace_id, format(submit.context.span_id, "016x")]
        (parent,) = _traceparents(httpserver)
        assert parent.split("-")[1] == trace_id
        assert outbox.get("order-2").status is EffectStatus.CONFIRMED
    finally:
        store.close()


def test_metrics_carry_the_documented_names(spans: InMemorySpanExporter, httpserver: HTTPServer,
                                            tmp_path: Path) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_json({"ok": True})
    store = open_store(f"sqlite:///{tmp_path / 'errands.db'}")
    try:
        outbox = Outbox(store, connectors={"bank": HttpConnector(url=httpserver.url_for("/pay"))})
        _submit_in_request(outbox, "order-3")
        outbox.drain()
    finally:
        store.close()
    data = _READER.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name == "errands":
                for metric in scope.metrics:
                    points[metric.name] = list(metric.data.data_points)
    assert set(points) <= set(telemetry.METRICS)
    assert {"errands.outbox.effects", "errands.outbox.dispatch.duration", "errands.outbox.dispatch.attempts"} \
        <= set(points)
    statuses = {dict(p.attributes)["status"] for p in points["errands.outbox.effects"]}
    assert "CONFIRMED" in statuses
    assert {dict(p.attributes)["connector"] for p in points["errands.outbox.dispatch.attempts"]} == {"bank"}


class _Answers:
    """A connector that gives every effect the same answer."""

    def __init__(self, name: str, outcome: DispatchOutcome) -> None:
        self.name, self.outcome = name, outcome

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=self.outcome)


def _histogram_counts(name: str) -> dict[str, int]:
    """How many values histogram ``name`` recorded, by its attributes."""
    data = _READER.get_metrics_data()
    assert data is not None
    return {",".join(f"{k}={v}" for k, v in sorted(dict(p.attributes).items())): p.count
            for resource in data.resource_metrics for scope in resource.scope_metrics for metric in scope.metrics
            if metric.name == name for p in metric.data.data_points}


@pytest.mark.parametrize("traced", [True, False])
def test_a_dispatched_batch_counts_one_attempt_and_one_status_per_effect(traced: bool, tmp_path: Path) -> None:
    names = ("errands.outbox.dispatch.attempts", "errands.outbox.effects")
    providers = {"tracer_provider": _PROVIDER} if traced else {}
    with telemetry.use_providers(meter_provider=_METERS, **providers):
        before = {name: _gauge_points(name) for name in names}
        durations = _histogram_counts("errands.outbox.dispatch.duration")
        store = open_store(f"sqlite:///{tmp_path / 'errands.db'}")
        try:
            outbox = Outbox(store, connectors={"ok": _Answers("ok", DispatchOutcome.CONFIRMED),
                                               "no": _Answers("no", DispatchOutcome.FAILED)})
            for i in range(5):
                outbox.submit(Effect(key=f"e-{i}", connector="ok" if i < 3 else "no", payload={"i": i}))
            assert len(outbox.dispatch_once()) == 5
        finally:
            store.close()

        def added(name: str) -> dict[str, float]:
            after = _gauge_points(name)
            return {k: v - before[name].get(k, 0) for k, v in after.items() if v != before[name].get(k, 0)}

        assert added("errands.outbox.dispatch.attempts") == {"connector=ok": 3, "connector=no": 2}
        assert added("errands.outbox.effects") == {"status=CONFIRMED": 3, "status=FAILED": 2}
        counts = _histogram_counts("errands.outbox.dispatch.duration")
        assert {k: n - durations.get(k, 0) for k, n in counts.items() if n != durations.get(k, 0)} == {
            "connector=ok": 3, "connector=no": 2}


def _gauge_points(name: str) -> dict[str, float]:
    """The points of instrument ``name`` (a gauge's values, a counter's sums) by their attributes."""
    data = _READER.get_metrics_data()
    assert data is not None
    found: dict[str, float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        found[",".join(f"{k}={v}" for k, v in sorted(dict(p.attributes).items()))] = p.value
    return found


def test_gauges_report_queue_depth_and_age_and_route_lag(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    from errands.core import FakeClock, FanOut, Journal, Route, TaskEngine, Worker

    class Held:
        def publish(self, events: Any) -> None:
            raise AssertionError("the route is not run in this test")

    clock = FakeClock()
    store = open_store(f"sqlite:///{tmp_path / 'errands.db'}", clock=clock)
    try:
        outbox = Outbox(store, connectors={"bank": HttpConnector(url="http://127.0.0.1:9/pay")})
        tasks = TaskEngine(store, {"ship": lambda params: None})
        fanout = FanOut(store, routes=[Route(name="audit", sink=Held(), subjects=["order.**"])])
        worker = Worker(store, outbox=outbox, fanout=fanout)
        outbox.submit(Effect(key="order-5", connector="bank", payload={}))
        tasks.submit("ship", {"order": 5})
        Journal(store).append("orders/5", "order.placed", {"total": 5})
        clock.advance(30)
        depth, age = _gauge_points("errands.queue.depth"), _gauge_points("errands.queue.age")
        assert depth["engine=outbox"] == 1 and depth["engine=tasks"] == 1
        assert age["engine=outbox"] == 30 and age["engine=tasks"] == 30
        assert _gauge_points("errands.fanout.lag")["route=audit"] >= 1
        worker.close()
        tasks.close()
    finally:
        store.close()


def test_every_span_name_is_errands_engine_verb_and_its_attributes_are_known() -> None:
    for name, attributes in telemetry.SPANS.items():
        prefix, engine, verb = name.split(".")
        assert prefix == "errands" and engine and verb
        assert set(attributes) <= set(telemetry.ATTRIBUTES)
    assert all(name.startswith("errands.") for name in telemetry.METRICS)


def test_json_logs_put_canonical_keys_first_with_the_trace_and_redact_secrets(
        spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_LOG_FORMAT", "json")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(telemetry.log_formatter())
    log = logging.getLogger("errands.test.telemetry")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        with _SHOP.start_as_current_span("POST /orders") as request:
            log.warning("lease on effect %s lapsed", "order-4",
                        extra={"lease_owner": "w1", "effect_key": "order-4", "authorization": "Bearer s3cret"})
        with telemetry.span("errands.outbox.dispatch", effect_key="order-9", lease_owner="w2", attempt=2):
            log.info("dispatching")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    first, second = out.getvalue().splitlines()
    inside = json.loads(second)  # the errands span's attributes name the work
    assert list(inside)[:7] == ["ts", "level", "logger", "msg", "effect_key", "attempt", "lease_owner"]
    assert (inside["effect_key"], inside["attempt"], inside["lease_owner"]) == ("order-9", 2, "w2")
    line = json.loads(first)
    assert list(line)[:6] == ["ts", "level", "logger", "msg", "effect_key", "lease_owner"]
    assert line["msg"] == "lease on effect order-4 lapsed" and line["level"] == "WARNING"
    assert line["trace_id"] == format(request.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(request.get_span_context().span_id, "016x")
    assert line["authorization"] == "***" and "s3cret" not in out.getvalue()


def test_text_logs_stay_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERRANDS_LOG_FORMAT", raising=False)
    assert not isinstance(telemetry.log_formatter(), telemetry.JsonFormatter)


def test_without_opentelemetry_nothing_is_imported_and_the_outbox_works(httpserver: HTTPServer,
                                                                       tmp_path: Path) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_json({"ok": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", UNTRACED, f"sqlite:///{tmp_path / 'errands.db'}",
                           httpserver.url_for("/pay")], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"enabled": False, "status": "CONFIRMED", "metadata": {}, "imported": []}
    assert _traceparents(httpserver) == [""]


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_durable_step_runs_in_the_trace_of_the_start(spans: InMemorySpanExporter, httpserver: HTTPServer,
                                                        store_url: str, where: str) -> None:
    from errands.durable import DurableRunner

    httpserver.expect_request("/hook", method="POST").respond_with_json({"ok": True})
    url = httpserver.url_for("/hook")
    runner = DurableRunner(store_url)
    try:
        def pay(event: Any, ctx: Any) -> Any:
            return ctx.step(lambda _: _ship(url)({}), name="call")

        runner.register("pay", pay)
        with _SHOP.start_as_current_span("POST /payments") as request:
            execution_id = runner.start("pay", {"cents": 5})
        trace_id = format(request.get_span_context().trace_id, "032x")
        (start,) = _by_name(spans, "errands.durable.start")
        assert start.context is not None
        start_span = format(start.context.span_id, "016x")
        if where == "thread":
            worker = threading.Thread(target=runner.drain)
            worker.start()
            worker.join()
            (invocation,) = _by_name(spans, "errands.durable.invocation")
            (step,) = _by_name(spans, "errands.durable.step")
            assert {_trace_id(invocation), _trace_id(step)} == {trace_id}
            assert invocation.parent is not None and format(invocation.parent.span_id, "016x") == start_span
            assert step.attributes is not None and step.attributes["errands.step"] == "call"
            assert step.context is not None
            step_span = format(step.context.span_id, "016x")
        else:
            done = subprocess.run([sys.executable, "-c", DURABLE_WORKER, store_url, url], capture_output=True,
                                  text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr
            found = {name: rest for name, *rest in json.loads(done.stdout.strip().splitlines()[-1])}
            assert found["errands.durable.invocation"] == [trace_id, start_span]
            assert found["errands.durable.step"][0] == trace_id
            step_span = ""
        assert runner.get(execution_id).result == 200
        if where == "thread":
            executions = _gauge_points("errands.durable.executions")
            assert executions["status=STARTED"] >= 1 and executions["status=SUCCEEDED"] >= 1
        (parent,) = _traceparents(httpserver)
        assert parent.split("-")[1] == trace_id
        assert not step_span or parent.split("-")[2] == step_span
    finally:
        runner.close()


def test_parallel_invocations_branches_and_ctx_effect_stay_in_the_trace_of_the_start(
        spans: InMemorySpanExporter, store_url: str) -> None:
    """With ``max_parallelism`` (invocations on the runner's threads), a ``map``'s branches (on threads of their
    own) and a ``ctx.effect`` (submitted later by the checkpoint, dispatched by the outbox): every step, and the
    effect's dispatch, are in the trace of the request that started the execution."""
    from errands.core.testing import FakeConnector
    from errands.durable import DurableRunner

    store = open_store(store_url)
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    runner = DurableRunner(store, outbox=outbox, max_parallelism=2)
    try:
        def order(event: Any, ctx: Any) -> Any:
            doubled = ctx.map("lines", event["lines"], lambda c, item, i, items: c.step(lambda _: item * 2,
                                                                                         name=f"line-{i}"))
            ctx.effect("charge", Effect(key="-", connector="bank", payload={"cents": sum(doubled.results())}))
            return sum(doubled.results())

        runner.register("order", order)
        traces: dict[str, str] = {}
        for _ in range(2):
            with _SHOP.start_as_current_span("POST /orders") as request:
                eid = runner.start("order", {"lines": [1, 2, 3]})
            traces[eid] = format(request.get_span_context().trace_id, "032x")
        for _ in range(50):
            runner.drain()
            outbox.drain()
            if all(runner.get(e).status.terminal for e in traces):
                break
        assert [runner.get(e).result for e in traces] == [12, 12]
        by_execution: dict[str, set[str]] = {}
        for s in _by_name(spans, "errands.durable.step") + _by_name(spans, "errands.durable.invocation"):
            assert s.attributes is not None
            by_execution.setdefault(str(s.attributes["errands.execution_id"]), set()).add(_trace_id(s))
        assert by_execution == {e: {trace} for e, trace in traces.items()}
        steps = _by_name(spans, "errands.durable.step")
        assert len({(s.attributes or {}).get("errands.step") for s in steps}) >= 3
        dispatches = {str((s.attributes or {})["errands.run_id"]): _trace_id(s)
                      for s in _by_name(spans, "errands.outbox.dispatch")}
        assert dispatches == traces
    finally:
        runner.close()
        outbox.close()
        store.close()


def test_a_queued_start_runs_in_the_trace_of_the_start_when_a_worker_admits_it(
        spans: InMemorySpanExporter, store_url: str) -> None:
    """An execution started on a queue keeps the start's trace context until a worker (another thread) admits
    it: its invocation is a child of the start's span and its steps are in the request's trace."""
    from errands.durable import DurableRunner

    runner = DurableRunner(store_url)
    try:
        runner.register("pay", lambda event, ctx: ctx.step(lambda _: event["cents"] * 2, name="double"))
        runner.add_queue("payments", concurrency=1)
        with _SHOP.start_as_current_span("POST /payments") as request:
            execution_id = runner.start("pay", {"cents": 5}, queue="payments")
        trace_id = format(request.get_span_context().trace_id, "032x")
        assert str(runner.get(execution_id).status) == "ENQUEUED"
        (start,) = _by_name(spans, "errands.durable.start")
        assert start.context is not None
        worker = threading.Thread(target=runner.drain)
        worker.start()
        worker.join()
        assert runner.get(execution_id).result == 10
        (invocation,) = _by_name(spans, "errands.durable.invocation")
        (step,) = _by_name(spans, "errands.durable.step")
        assert {_trace_id(invocation), _trace_id(step)} == {trace_id}
        assert invocation.parent is not None and invocation.parent.span_id == start.context.span_id
        assert step.attributes is not None and step.attributes["errands.step"] == "double"
    finally:
        runner.close()


def _ship(url: str) -> Any:
    import httpx

    return lambda params: httpx.post(url, json=params, headers=telemetry.inject({})).status_code


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_task_runs_in_the_trace_of_its_submit(spans: InMemorySpanExporter, httpserver: HTTPServer, store_url: str,
                                                where: str) -> None:
    from errands.core import TaskEngine

    httpserver.expect_request("/ship", method="POST").respond_with_json({"ok": True})
    url = httpserver.url_for("/ship")
    store = open_store(store_url)
    engine = TaskEngine(store, {"ship": _ship(url)})
    try:
        with _SHOP.start_as_current_span("POST /orders") as request:
            task_id = engine.submit("ship", {"order": 7})
        trace_id = format(request.get_span_context().trace_id, "032x")
        (submit,) = _by_name(spans, "errands.tasks.submit")
        assert submit.context is not None
        if where == "thread":
            worker = threading.Thread(target=engine.drain)
            worker.start()
            worker.join()
            (run,) = _by_name(spans, "errands.tasks.run")
            assert run.parent is not None and run.context is not None
            assert (_trace_id(run), run.parent.span_id) == (trace_id, submit.context.span_id)
            assert run.attributes is not None and run.attributes["errands.task_id"] == task_id
            run_span = format(run.context.span_id, "016x")
        else:
            done = subprocess.run([sys.executable, "-c", TASK_WORKER, store_url, url], capture_output=True,
                                  text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr
            (found,) = [s for s in json.loads(done.stdout.strip().splitlines()[-1]) if s[0] == "errands.tasks.run"]
            assert found[1:] == [trace_id, format(submit.context.span_id, "016x")]
            run_span = ""
        (parent,) = _traceparents(httpserver)
        assert parent.split("-")[1] == trace_id
        assert not run_span or parent.split("-")[2] == run_span
        record = engine.get(task_id)
        assert record is not None and str(record.status) == "SUCCEEDED"
    finally:
        engine.close()
        store.close()


def test_a_reaction_task_runs_in_the_trace_of_the_append_that_triggered_it(spans: InMemorySpanExporter,
                                                                          store_url: str) -> None:
    """Events appended concurrently from requests of their own (so that group commit writes some of them from
    another request's thread): each reaction task runs in the trace of its own event's request."""
    from errands.core import Event, Journal, Reactor

    store = open_store(store_url)
    reactor = Reactor(store)
    seen: dict[int, str] = {}

    def on_placed(event: Event) -> None:
        found = telemetry.carrier()
        assert found is not None
        seen[event.data["order"]] = found["traceparent"].split("-")[1]

    reactor.on("order.placed", on_placed, max_concurrency=None, name="on_placed")
    journal = Journal(store)
    traces: dict[int, str] = {}
    start = threading.Barrier(4)

    def request(order: int) -> None:
        start.wait()
        with _SHOP.start_as_current_span("POST /orders") as span:
            journal.append(f"orders/{order}", "order.placed", {"order": order})
        traces[order] = format(span.get_span_context().trace_id, "032x")

    try:
        callers = [threading.Thread(target=request, args=(order,)) for order in range(4)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        journal.append("orders/9", "order.placed", {"order": 9})  # outside any request: a trace of its own
        worker = threading.Thread(target=lambda: [reactor.run_once() for _ in range(3)] and reactor.engine.drain())
        worker.start()
        worker.join()
        assert len(set(traces.values())) == 4 and set(seen) == {0, 1, 2, 3, 9}
        assert {order: seen[order] for order in traces} == traces
        assert seen[9] not in traces.values()
        runs = {s.attributes["errands.task_id"]: s for s in _by_name(spans, "errands.tasks.run")
                if s.attributes is not None}
        assert len(runs) == 5
        assert {_trace_id(s) for s in runs.values()} == set(seen.values())
    finally:
        reactor.close()
        store.close()


def test_an_lro_resume_continues_the_trace_of_the_request_that_scheduled_it(
        spans: InMemorySpanExporter, httpserver: HTTPServer, store_url: str) -> None:
    from errands.lro import Config, LroClient, Operation, ResumableHandler

    httpserver.expect_request("/provision", method="POST").respond_with_json({"ok": True})
    url = httpserver.url_for("/provision")
    client = LroClient(Config(neuron="svc", store=store_url))

    def provision(op: Operation) -> None:
        _ship(url)({"operation": op.name})
        op.complete({"ready": True})

    client.add_resumable_handlers(ResumableHandler("provision", provision))
    try:
        with _SHOP.start_as_current_span("POST /machines") as request:
            op = client.new_operation("operations/m1")
            op.resume_via_tasks("provision")
        trace_id = format(request.get_span_context().trace_id, "032x")
        worker = threading.Thread(target=client.run_due)
        worker.start()
        worker.join()
        assert client.get_operation("operations/m1").done
        (resume,) = _by_name(spans, "errands.lro.resume")
        (complete,) = _by_name(spans, "errands.lro.complete")
        (save,) = _by_name(spans, "errands.lro.save")
        assert {_trace_id(resume), _trace_id(complete), _trace_id(save)} == {trace_id}
        assert resume.parent is not None and resume.parent.span_id == request.get_span_context().span_id
        assert resume.attributes is not None and resume.attributes["errands.operation"] == "operations/m1"
        (parent,) = _traceparents(httpserver)
        assert resume.context is not None
        assert parent.split("-")[1:3] == [trace_id, format(resume.context.span_id, "016x")]
    finally:
        client.close()


def test_the_demo_says_how_to_see_a_trace_without_the_sdk(tmp_path: Path) -> None:
    script = UNTRACED.split("from errands.connectors.http")[0] + (
        "from errands.core._demo import DemoContext\n"
        "from errands.core._telemetry_demo import TelemetryDemo\n"
        "print(json.dumps(TelemetryDemo().run(DemoContext(store_url='', workdir=sys.argv[1], size=1))))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "pip install 'errands-core[otel]' opentelemetry-sdk" in done.stderr
    assert "not shown" in json.loads(done.stdout.strip().splitlines()[-1])["trace tree"]


def test_the_demo_prints_one_trace_tree(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    from errands.core._demo import DemoContext
    from errands.core._telemetry_demo import TelemetryDemo

    figures = TelemetryDemo().run(DemoContext(store_url="", workdir=str(tmp_path), size=1, quiet=True))
    assert figures["trace tree"].split(" > ") == [
        "POST /orders", "errands.outbox.submit", "errands.outbox.dispatch", "errands.demo.counterparty"]
    assert (figures["traces"], figures["depth"]) == (1, 4)  # one trace, each span the child of the one before


def test_webhooks_pubsub_messages_and_cloud_tasks_carry_traceparent(spans: InMemorySpanExporter,
                                                                     httpserver: HTTPServer) -> None:
    from datetime import datetime, timezone

    from errands.connectors.gcp import CloudTasksConnector, PubSubConnector
    from errands.core import Event
    from errands.sinks import WebhookSink

    class Queue:
        """Takes the task a connector creates, as the Cloud Tasks client would."""

        def __init__(self) -> None:
            self.tasks: list[Any] = []

        def create_task(self, *, parent: str, task: Any, timeout: float, retry: Any) -> Any:
            self.tasks.append(task)
            return task

    httpserver.expect_request("/hook", method="POST").respond_with_data("", status=204)
    effect = Effect(key="order-6", connector="bus", payload={"cents": 5})
    event = Event(id="orders/6/1", stream="orders/6", seq=1, subject="order.placed", type="order.placed",
                  data={"total": 5}, time=datetime.now(timezone.utc))
    queue = Queue()
    with _SHOP.start_as_current_span("POST /orders") as request:
        _, attributes = PubSubConnector("p", "orders", publisher=object()).message(effect)
        CloudTasksConnector("p", "l", "q", "https://svc.example/run", client=queue).dispatch(effect)
        WebhookSink(httpserver.url_for("/hook"), "whsec_" + "a" * 32).publish([event])
    expected = f"00-{request.get_span_context().trace_id:032x}-{request.get_span_context().span_id:016x}-"
    assert attributes["traceparent"].startswith(expected)
    (task,) = queue.tasks
    assert task.http_request.headers["traceparent"].startswith(expected)
    (parent,) = _traceparents(httpserver)
    assert parent.startswith(expected)


def test_journal_fanout_and_observe_spans(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    from errands.core import (
        DispatchOutcome,
        DispatchResult,
        FakeClock,
        FanOut,
        Journal,
        Observation,
        ObservationOutcome,
        Route,
    )

    class Unsure:
        def dispatch(self, effect: Effect) -> DispatchResult:
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, error="timed out")

        def observe(self, effect: Effect) -> Observation:
            return Observation(outcome=ObservationOutcome.CONFIRMED)

    class Kept:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def publish(self, events: Any) -> None:
            self.events.extend(events)

    clock = FakeClock()
    store = open_store(f"sqlite:///{tmp_path / 'errands.db'}", clock=clock)
    try:
        sink = Kept()
        fanout = FanOut(store, routes=[Route(name="audit", sink=sink, subjects=["order.**"])])
        outbox = Outbox(store, connectors={"unsure": Unsure()})
        with _SHOP.start_as_current_span("POST /orders") as request:
            Journal(store).append("orders/8", "order.placed", {"total": 8})
            outbox.submit(Effect(key="order-8", connector="unsure", payload={}))
        outbox.drain()
        clock.advance(3600)  # the observation is due after a backoff
        outbox.drain()
        fanout.run_once()
        fanout.close()
        assert outbox.get("order-8").status is EffectStatus.CONFIRMED and len(sink.events) == 1
        (append,) = _by_name(spans, "errands.journal.append")
        (observe,) = _by_name(spans, "errands.outbox.observe")
        (dispatch,) = _by_name(spans, "errands.outbox.dispatch")
        trace_id = format(request.get_span_context().trace_id, "032x")
        assert {_trace_id(append), _trace_id(observe), _trace_id(dispatch)} == {trace_id}
        assert dispatch.attributes is not None and dispatch.attributes["errands.status"] == "UNKNOWN"
        assert observe.attributes is not None and observe.attributes["errands.status"] == "CONFIRMED"
        (batch,) = _by_name(spans, "errands.fanout.batch")
        (publish,) = _by_name(spans, "errands.fanout.publish")
        assert publish.parent is not None and batch.context is not None
        assert publish.parent.span_id == batch.context.span_id
        assert publish.attributes is not None and publish.attributes["errands.status"] == "DELIVERED"
    finally:
        store.close()


def test_an_lro_callback_over_http_continues_the_trace(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from errands.lro import Config, LroClient, Operation, ResumableHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    db = f"sqlite:///{tmp_path / 'ops.db'}"
    server = make_server("127.0.0.1", 0, lambda environ, start: [], handler_class=Quiet)  # its app comes next
    host = f"http://127.0.0.1:{server.server_port}"
    server_client = LroClient(Config(neuron="svc", store=db, host=host))
    server.set_app(server_client.wsgi_app())
    worker_client = LroClient(Config(neuron="svc", store=db, host=host))
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        server_client.add_resumable_handlers(ResumableHandler("provision", lambda op: op.complete({"ok": True})))
        with _SHOP.start_as_current_span("POST /machines") as request:
            op: Operation = server_client.new_operation("operations/m2")
            op.resume_via_tasks("provision")
        worker = threading.Thread(target=worker_client.run_due)
        worker.start()
        worker.join()
        assert worker_client.get_operation("operations/m2").done
        (resume,) = _by_name(spans, "errands.lro.resume")  # in the server's thread, from the callback's header
        assert resume.parent is not None and resume.parent.span_id == request.get_span_context().span_id
        assert _trace_id(resume) == format(request.get_span_context().trace_id, "032x")
    finally:
        server.shutdown()
        server.server_close()
        server_client.close()
        worker_client.close()


def test_the_worker_command_logs_json_lines(tmp_path: Path) -> None:
    script = (
        "import logging, sys\n"
        "from errands.core import telemetry\n"
        "telemetry.configure_logging(logging.INFO)\n"
        "logging.getLogger('errands.outbox').warning('lease on effect %s lapsed', 'k1', "
        "extra={'effect_key': 'k1', 'lease_owner': 'w1'})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "ERRANDS_LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(text) for text in done.stderr.splitlines()]
    assert list(line) == ["ts", "level", "logger", "msg", "effect_key", "lease_owner"]
    assert line["msg"] == "lease on effect k1 lapsed" and line["logger"] == "errands.outbox"


def test_an_async_connector_runs_inside_its_dispatch_span(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    from errands.core import DispatchOutcome, DispatchResult

    class Async:
        def __init__(self) -> None:
            self.sent: list[dict[str, str]] = []

        async def dispatch(self, effect: Effect) -> DispatchResult:
            self.sent.append(telemetry.inject({}))  # on the runner's event loop thread
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    store = open_store(f"sqlite:///{tmp_path / 'errands.db'}")
    connector = Async()
    outbox = Outbox(store, connectors={"bank": connector})
    try:
        trace_id = _submit_in_request(outbox, "order-10")
        outbox.drain()
        (dispatch,) = _by_name(spans, "errands.outbox.dispatch")
        assert dispatch.context is not None
        (headers,) = connector.sent
        assert headers["traceparent"].split("-")[1:3] == [trace_id, format(dispatch.context.span_id, "016x")]
    finally:
        outbox.close()
        store.close()


def test_without_a_tracer_provider_nothing_is_traced(spans: InMemorySpanExporter, tmp_path: Path) -> None:
    """The API installed and no provider set (a fresh process): ``tracing()`` is false, no span is started and the
    effect's metadata takes nothing; inside ``use_providers`` it is true."""
    code = ("import json, sys\nfrom errands.core import Effect, Outbox, open_store, telemetry\n"
            "store = open_store(sys.argv[1])\nout = Outbox(store, connectors=['bank'])\n"
            "record = out.submit(Effect(key='k', connector='bank', payload={}))\n"
            "print(json.dumps([telemetry.tracing(), dict(record.metadata), telemetry.span('errands.outbox.submit') is "
            "telemetry.span('errands.tasks.run')]))\nstore.close()\n")
    done = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'errands.db'}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, {}, True]
    assert telemetry.tracing()  # the fixture's providers


class _Refused(Exception):
    pass


class _RefusingConnector:
    name = "bank"

    def dispatch(self, effect: Effect) -> Any:
        raise _Refused("the bank is down")


def test_a_failing_dispatch_records_its_exception_on_its_span_and_the_context_is_restored(
        spans: InMemorySpanExporter, tmp_path: Path) -> None:
    """A connector that raises: its dispatch span ends with status ERROR and the exception as an event (as the
    tracer's ``start_as_current_span`` does), the effect is retried as a transient fault, and the worker's thread
    is back in the context it had before the span."""
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    store = open_store(f"sqlite:///{tmp_path / 'errands.db'}")
    outbox = Outbox(store, connectors={"bank": _RefusingConnector()})
    _submit_in_request(outbox, "order-1")
    before = trace.get_current_span()
    outbox.dispatch_once()
    assert trace.get_current_span() is before
    (dispatch,) = _by_name(spans, "errands.outbox.dispatch")
    assert dispatch.status.status_code is StatusCode.ERROR
    assert "_Refused: the bank is down" in (dispatch.status.description or "")
    assert [e.name for e in dispatch.events] == ["exception"]
    assert outbox.get("order-1").status is EffectStatus.PENDING
    outbox.close()
    store.close()


@pytest.mark.parametrize("carrier", [
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"TraceParent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "shop=1"},
])
def test_a_stored_carrier_is_the_parent_of_the_workers_span(spans: InMemorySpanExporter,
                                                            carrier: dict[str, str]) -> None:
    with telemetry.span("errands.outbox.dispatch", carrier) as current:
        context = current.get_span_context()
    assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    (finished,) = _by_name(spans, "errands.outbox.dispatch")
    assert finished.parent is not None and format(finished.parent.span_id, "016x") == "b7ad6b7169203331"
    assert finished.parent.is_remote
    if "tracestate" in carrier:
        assert context.trace_state.get("shop") == "1"


@pytest.mark.parametrize("carrier", [
    {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},  # an all-zero trace id is invalid
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01"},  # a short span id
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01"},  # not hex
    {"traceparent": 7},
    {},
])
def test_a_malformed_stored_carrier_starts_a_trace_of_its_own(spans: InMemorySpanExporter,
                                                              carrier: dict[str, Any]) -> None:
    """What no propagator can read is no parent: the worker's span starts a new trace instead of failing."""
    with telemetry.span("errands.outbox.dispatch", carrier):
        pass
    (finished,) = _by_name(spans, "errands.outbox.dispatch")
    assert finished.parent is None
    assert finished.context is not None and finished.context.trace_id != 0


def test_a_durable_executions_events_keep_the_trace_of_their_append(spans: InMemorySpanExporter,
                                                                    store_url: str) -> None:
    """``durable.execution.started`` keeps the trace context of the start, ``.succeeded`` the one of the invocation
    that ended it (in the start's trace): a reaction to either continues the request's trace."""
    from errands.durable import DurableRunner

    runner = DurableRunner(store_url, functions={"echo": lambda event, ctx: ctx.step("echo", lambda _: event)})
    try:
        with _SHOP.start_as_current_span("POST /echo") as request:
            execution_id = runner.start("echo", 7)
        runner.drain()
        assert runner.get(execution_id).result == 7
        trace_id = format(request.get_span_context().trace_id, "032x")
        with runner.store.read() as tx:
            rows = tx.query("SELECT type, seq, position, trace FROM em_events WHERE stream = ? ORDER BY position",
                            (f"durable/{execution_id}",))
        assert [r[0] for r in rows] == ["durable.execution.started", "durable.execution.succeeded"]
        assert all(seq == position for _, seq, position, _ in rows)  # the engine's stream: seq is the position
        assert [json.loads(r[3])["traceparent"].split("-")[1] for r in rows] == [trace_id, trace_id]
    finally:
        runner.close()
