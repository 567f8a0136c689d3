"""``LedgerServer``: a real local HTTP counterparty for tests and benchmarks, with faults on demand."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRequest:
    """One request the ledger received: which endpoint, which key, what it answered."""

    endpoint: str
    key: str
    attempt: str | None
    answer: str
    at: float


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    ledger: LedgerServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        # The work is done but the answer never leaves: the client sees the connection close.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_POST(self) -> None:
        self.server.ledger.client_ports.add(int(self.client_address[1]))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        ledger = self.server.ledger
        if ledger.latency:
            time.sleep(ledger.latency)
        path = self.path.split("?", 1)[0]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._answer(400, {"error": "body is not JSON"})
            return
        if path == "/effects":
            key = self.headers.get("Idempotency-Key")
            if not key:
                self._answer(400, {"error": "Idempotency-Key header is required"})
                return
            status, answer, drop = ledger._perform(key, self.headers.get("Errands-Attempt"), body)
            if drop:
                self._drop()
            else:
                self._answer(status, answer)
        elif path == "/observe":
            key = body.get("idempotency_key") if isinstance(body, dict) else None
            if not isinstance(key, str):
                self._answer(400, {"error": "idempotency_key is required"})
                return
            self._answer(200, ledger._observe(key, self.headers.get("Errands-Attempt")))
        elif path == "/compensate":
            key = self.headers.get("Idempotency-Key") or ""
            self._answer(200, ledger._compensate(key, body))
        else:
            self._answer(404, {"error": f"no endpoint {path}"})


class LedgerServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that performs effects and counts how often it did.

    Endpoints (all POST, JSON):

    - ``/effects``: performs the effect named by ``Idempotency-Key``. With ``dedupe=True`` a key seen
      before is answered with its first result and not performed again (an idempotent counterparty);
      with ``dedupe=False`` every request performs (a non-idempotent one).
    - ``/observe``: ``{"idempotency_key": ...}`` -> ``{"count": <times performed>}``.
    - ``/compensate``: records a compensation for ``Idempotency-Key``.

    Faults, drawn per ``/effects`` request from a seeded generator: ``error_rate`` answers 500 without
    performing; ``drop_rate`` performs, then closes the connection without answering (the response is
    lost). ``latency`` sleeps that many seconds before each answer.

    Example:
        >>> with LedgerServer(error_rate=0.1) as server:
        ...     server.url("/effects").startswith("http://127.0.0.1:")
        True
    """

    def __init__(self, *, dedupe: bool = True, error_rate: float = 0.0, drop_rate: float = 0.0,
                 latency: float = 0.0, seed: int = 7, port: int = 0) -> None:
        self.dedupe = dedupe
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.latency = latency
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.performed: Counter[str] = Counter()
        self.compensated: Counter[str] = Counter()
        self.requests: list[LedgerRequest] = []
        self.faults: Counter[str] = Counter()
        self.client_ports: set[int] = set()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.ledger = self
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/effects") -> str:
        """The URL of an endpoint of this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> LedgerServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"ledger-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LedgerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def history(self, key: str) -> list[str]:
        """The endpoints and answers of every request for ``key``, in arrival order."""
        with self._lock:
            return [f"{r.endpoint}:{r.answer}" for r in self.requests if r.key == key]

    # -- request handling (called from the server threads) -------------------------------------
    def _perform(self, key: str, attempt: str | None, body: Any) -> tuple[int, Any, bool]:
        with self._lock:
            roll = self._random.random()
            if roll < self.error_rate:
                self.faults["error"] += 1
                self._record("effects", key, attempt, "500")
                return 500, {"error": "injected failure"}, False
            if self.dedupe and self.performed[key]:
                self._record("effects", key, attempt, "replayed")
                return 200, {"id": key, "replayed": True}, False
            self.performed[key] += 1
            drop = roll < self.error_rate + self.drop_rate
            if drop:
                self.faults["drop"] += 1
            self._record("effects", key, attempt, "dropped" if drop else "performed")
            return 201, {"id": key, "replayed": False}, drop

    def _observe(self, key: str, attempt: str | None) -> dict[str, Any]:
        with self._lock:
            count = self.performed[key]
            self._record("observe", key, attempt, str(count))
            return {"count": count}

    def _compensate(self, key: str, body: Any) -> dict[str, Any]:
        with self._lock:
            self.compensated[key] += 1
            self._record("compensate", key, None, "compensated")
            return {"compensated": True}

    def _record(self, endpoint: str, key: str, attempt: str | None, answer: str) -> None:
        self.requests.append(LedgerRequest(endpoint=endpoint, key=key, attempt=attempt, answer=answer,
                                           at=time.monotonic()))
