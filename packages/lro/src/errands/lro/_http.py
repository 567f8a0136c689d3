"""The callback endpoint, written directly against ASGI and WSGI (no web framework).

``PUT {prefix}{path}?operation={url-encoded name}&token={resume token}`` resumes the operation with the
handler at ``path``. Answers: 200 with ``{"operation", "outcome"}`` when the callback is settled (ran,
completed, failed, cancelled, stale, already done, lost a race: none of these should be retried); 400 for a
malformed request (no operation, no token); 401 for missing or bad credentials (nothing changes); 404 for an
unknown operation or path; 405 for other methods; 503 with ``Retry-After`` when the handler raised
``TransientError``, while another delivery of the same resume still runs (``busy``), or when the store
failed (``unavailable``); 500 for anything else. Cloud Tasks and the local scheduler retry 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple
from urllib.parse import parse_qs, quote

from errands.core.errors import ConfigError, InfrastructureError, NotFoundError, TransientError

from ._resume import ResumeBusyError, aresume, resume

if TYPE_CHECKING:
    from ._client import LroClient

log = logging.getLogger("errands.lro.http")

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 500: "Internal Server Error", 503: "Service Unavailable"}


class _Request:
    """What both servers need from a request."""

    def __init__(self, method: str, path: str, raw_path: str, query: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.target = f"{raw_path}?{query}" if query else raw_path
        self.query = parse_qs(query, keep_blank_values=True)
        self.headers = headers


Response = tuple[int, list[tuple[str, str]], bytes]


class _Callback(NamedTuple):
    """A well-formed callback request, to resume once it is authenticated."""

    name: str
    path: str
    token: str


def _json(status: int, body: dict[str, Any], extra: Iterable[tuple[str, str]] = ()) -> Response:
    data = json.dumps(body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(data))), *extra]
    return status, headers, data


class _Endpoint:
    def __init__(self, client: LroClient, prefix: str) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ConfigError(f"prefix must start and end with '/', got {prefix!r}", field="prefix", value=prefix)
        client.check_callback_auth()
        self.client = client
        self.prefix = prefix

    def route(self, req: _Request) -> Response | _Callback:
        """Either a finished response, or the callback to resume after authentication."""
        if not req.path.startswith(self.prefix) or len(req.path) == len(self.prefix):
            return _json(404, {"error": f"no callback here; callbacks are PUT {self.prefix}{{path}}"})
        if req.method != "PUT":
            return _json(405, {"error": "callbacks use PUT"}, [("allow", "PUT")])
        names = req.query.get("operation") or []
        if len(names) != 1 or not names[0]:
            return _json(400, {"error": "query parameter 'operation' (the url-encoded operation name) is required"})
        tokens = req.query.get("token") or []
        if len(tokens) != 1 or not tokens[0]:
            # Without its token a callback could be neither fenced against a duplicate nor refused as a replay.
            return _json(400, {"error": "query parameter 'token' (the resume token of resume_via_tasks) is required"})
        return _Callback(names[0], req.path[len(self.prefix):], tokens[0])

    def settle(self, name: str, outcome: Any = None, error: BaseException | None = None) -> Response:
        if error is None:
            return _json(200, {"operation": name, "outcome": str(outcome)})
        if isinstance(error, NotFoundError):
            return _json(404, {"operation": name, "error": str(error)})
        if isinstance(error, TransientError):
            kind = "busy" if isinstance(error, ResumeBusyError) else "transient"
            extra = [("retry-after", str(max(1, round(error.retry_after))))] if error.retry_after else []
            return _json(503, {"operation": name, "error": kind, "message": str(error)}, extra)
        if isinstance(error, InfrastructureError):
            log.warning("callback for %s abandoned: %s", name, error)
            return _json(503, {"operation": name, "error": "unavailable"}, [("retry-after", "1")])
        if isinstance(error, ConfigError):
            return _json(400, {"operation": name, "error": str(error)})
        log.error("callback for %s failed", name, exc_info=error)
        return _json(500, {"operation": name, "error": type(error).__name__})


async def answer_lifespan(receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
    """Answer an ASGI lifespan's startup and shutdown (nothing to start or stop); returns at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_response(send: Callable[[dict[str, Any]], Any], response: Response) -> None:
    """Send ``(status, headers, body)`` over ASGI (the resume routes' and the REST Operations API's)."""
    status, headers, body = response
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})


def wsgi_respond(start_response: Callable[..., Any], response: Response) -> list[bytes]:
    """Start a WSGI response of ``(status, headers, body)`` and return its body."""
    status, headers, body = response
    start_response(f"{status} {_REASONS.get(status, '')}", headers)
    return [body]


class AsgiApp(_Endpoint):
    """The ASGI 3 callback application (``client.asgi_app()``); also answers lifespan events."""

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        more = True
        while more:  # the body carries nothing; drain it
            message = await receive()
            more = bool(message.get("more_body")) and message["type"] == "http.request"
        raw = scope.get("raw_path")
        raw_path = raw.decode("latin-1") if raw else quote(scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        req = _Request(scope["method"].upper(), scope["path"], raw_path, scope.get("query_string", b"").decode("latin-1"), headers)
        routed = self.route(req)
        if not isinstance(routed, _Callback):
            await send_response(send, routed)
            return
        name, path, token = routed
        allowed = await asyncio.to_thread(self.client.callback_auth().check, req.headers, req.method, req.target)
        if not allowed:
            await send_response(send, _json(401, {"error": "unauthenticated"}, [("www-authenticate", "Bearer")]))
            return
        try:
            outcome = await aresume(self.client, name, path, token, parent=req.headers)
        except Exception as exc:
            await send_response(send, self.settle(name, error=exc))
            return
        await send_response(send, self.settle(name, outcome))


class WsgiApp(_Endpoint):
    """The WSGI callback application (``client.wsgi_app()``)."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        length = environ.get("CONTENT_LENGTH") or "0"
        stream = environ.get("wsgi.input")
        if stream is not None and length.isdigit() and int(length) > 0:
            stream.read(int(length))
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        path = environ.get("PATH_INFO", "")
        script = environ.get("SCRIPT_NAME", "")
        # PATH_INFO is decoded (as latin-1 per PEP 3333); REQUEST_URI, when the server gives it, is raw.
        uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
        raw_path = uri.split("?", 1)[0] if uri else quote((script + path).encode("latin-1").decode("utf-8"))
        req = _Request(environ.get("REQUEST_METHOD", "GET").upper(), path, raw_path, environ.get("QUERY_STRING", ""), headers)
        routed = self.route(req)
        if not isinstance(routed, _Callback):
            return wsgi_respond(start_response, routed)
        name, rpath, token = routed
        if not self.client.callback_auth().check(req.headers, req.method, req.target):
            return wsgi_respond(start_response, _json(401, {"error": "unauthenticated"}, [("www-authenticate", "Bearer")]))
        try:
            outcome = resume(self.client, name, rpath, token, hold=token is not None, parent=req.headers)
        except Exception as exc:
            return wsgi_respond(start_response, self.settle(name, error=exc))
        return wsgi_respond(start_response, self.settle(name, outcome))

