"""The telemetry part of ``errands demo``: one trace from a request through the outbox to the counterparty."""

from __future__ import annotations

import http.server
import threading
import urllib.request
from typing import Any, ClassVar

from . import telemetry
from ._values import DispatchOutcome, DispatchResult, Effect
from .outbox import Outbox
from .store._stores import open_store

HOW = "pip install 'errands-core[otel]' opentelemetry-sdk"


class _Counterparty(http.server.BaseHTTPRequestHandler):
    """A local HTTP server that answers in a span of its own, continuing the caller's ``traceparent``."""

    def do_POST(self) -> None:
        with telemetry.span("errands.demo.counterparty", dict(self.headers.items())):  # its request's trace
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _PostConnector:
    name: ClassVar[str] = "bank"

    def __init__(self, url: str) -> None:
        self.url = url

    def dispatch(self, effect: Effect) -> DispatchResult:
        headers = telemetry.inject({"Idempotency-Key": effect.key, "Content-Type": "application/json"})
        with urllib.request.urlopen(urllib.request.Request(self.url, data=b"{}", headers=headers), timeout=10):
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


def _tree(spans: list[Any]) -> list[str]:
    """The spans as an indented tree, parents first."""
    children: dict[Any, list[Any]] = {}
    ids = {s.context.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_time):
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: Any, depth: int) -> None:
        for s in children.get(parent, []):
            attrs = ", ".join(f"{k.removeprefix('errands.')}={v}" for k, v in (s.attributes or {}).items()
                              if k in ("errands.effect_key", "errands.status"))
            lines.append(f"{'  ' * depth}{s.name}" + (f" ({attrs})" if attrs else ""))
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return lines


class TelemetryDemo:
    """One effect submitted inside a request's span, dispatched by a worker thread to a local counterparty."""

    name: ClassVar[str] = "telemetry"
    order: ClassVar[int] = 90

    def run(self, ctx: Any) -> dict[str, Any]:
        try:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        except ImportError:
            ctx.say(f"telemetry: no trace tree without OpenTelemetry; to see one: {HOW}")
            return {"trace tree": f"not shown ({HOW})"}
        exporter = InMemorySpanExporter()
        provider = TracerProvider()  # the demo's own: the process's providers stay as the application set them
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counterparty)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        store = open_store(f"sqlite:///{ctx.workdir}/telemetry.db")
        try:
            with telemetry.use_providers(tracer_provider=provider):
                outbox = Outbox(store, connectors={"bank": _PostConnector(f"http://127.0.0.1:{server.server_port}/pay")})
                with provider.get_tracer("demo").start_as_current_span("POST /orders"):
                    outbox.submit(Effect(key="traced-order-1", connector="bank", payload={"cents": 500}))
                worker = threading.Thread(target=outbox.drain)
                worker.start()
                worker.join()
        finally:
            server.shutdown()
            server.server_close()
            store.close()
        spans = list(exporter.get_finished_spans())
        lines = _tree(spans)
        ctx.say("one trace, request -> submit -> dispatch (a worker thread) -> the counterparty's request:")
        for line in lines:
            ctx.say("  " + line)
        return {"trace tree": " > ".join(line.strip().split(" (")[0] for line in lines),
                "traces": len({s.context.trace_id for s in spans}), "depth": max(len(line) - len(line.lstrip())
                                                                              for line in lines) // 2 + 1}
