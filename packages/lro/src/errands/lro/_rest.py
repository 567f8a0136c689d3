"""``google.longrunning.Operations`` over HTTP/JSON, as google-cloud-python's REST transport calls it, written
directly against ASGI and WSGI (no web framework).

The routes are those of ``google/longrunning/operations.proto``, under ``prefix`` (``/v1/``), for names of any
collection ending in ``operations`` (``operations/{id}``, ``projects/*/locations/*/operations/{id}``, AIP-151):

| request | method |
|---|---|
| ``GET {prefix}{name}`` | GetOperation (``name`` = ``…operations/{id}``) |
| ``GET {prefix}{collection}?filter=&pageSize=&pageToken=`` | ListOperations (``collection`` = ``operations``, or ``…/operations``) |
| ``DELETE {prefix}{name}`` | DeleteOperation, answers ``{}`` |
| ``POST {prefix}{name}:cancel`` | CancelOperation, answers ``{}`` |
| ``POST {prefix}{name}:wait`` (body ``{"timeout": "5s"}``) | WaitOperation |

Bodies are the proto3 JSON mapping (``json_format``: camelCase fields, ``Any`` with ``@type``). Errors carry the
``google.rpc.Status`` shape Google APIs answer with, ``{"error": {"code", "message", "status"}}``, which
google-api-core turns back into its exceptions: not found 404 ``NOT_FOUND``, bad input 400
``INVALID_ARGUMENT``, a lost race 409 ``ABORTED``, a store fault 503 ``UNAVAILABLE``. Requests outside
``prefix`` go to ``fallback`` (the resume routes' app, say), or are answered 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import parse_qs

from errands.core.errors import (
    AlreadyExistsError,
    ConfigError,
    InfrastructureError,
    LeaseLostError,
    NotFoundError,
    TransientError,
)
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format

from ._http import Response, answer_lifespan, send_response, wsgi_respond

if TYPE_CHECKING:
    from ._client import LroClient

__all__ = ["OperationsRestApi", "RestAsgiApp", "RestWsgiApp"]

log = logging.getLogger("errands.lro.rest")

_MAX_BODY = 1 << 16


def _json(status: int, body: Any, extra: Iterable[tuple[str, str]] = ()) -> Response:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return status, [("content-type", "application/json; charset=utf-8"), ("content-length", str(len(data))),
                    *extra], data


def _error(status: int, code: str, message: str, extra: Iterable[tuple[str, str]] = ()) -> Response:
    return _json(status, {"error": {"code": status, "message": message, "status": code}}, extra)


def _message(msg: Any) -> Response:
    return _json(200, json_format.MessageToJson(msg, indent=None))


class OperationsRestApi:
    """The Operations methods of one ``LroClient`` over HTTP/JSON, as plain functions of a request.

    Args:
        client: the client whose operations are served.
        prefix: the path the routes live under (``/v1/``).
    """

    def __init__(self, client: LroClient, prefix: str = "/v1/") -> None:
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
            raise ConfigError(f"prefix must start and end with '/', got {prefix!r}", field="prefix", value=prefix)
        self.client = client
        self.prefix = prefix

    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of these routes (else it belongs to the fallback app)."""
        return path.startswith(self.prefix)

    def handle(self, method: str, path: str, query: str, body: bytes) -> Response:
        """Answer one request (``path`` decoded, ``query`` raw)."""
        rest = path[len(self.prefix):]
        try:
            return self._dispatch(method, rest, parse_qs(query, keep_blank_values=True), body)
        except NotFoundError as exc:
            return _error(404, "NOT_FOUND", str(exc))
        except (ConfigError, json_format.ParseError, ValueError) as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        except AlreadyExistsError as exc:
            return _error(409, "ALREADY_EXISTS", str(exc))
        except LeaseLostError as exc:
            return _error(409, "ABORTED", str(exc))
        except (InfrastructureError, TransientError) as exc:
            log.warning("operations request %s %s abandoned: %s", method, path, exc)
            return _error(503, "UNAVAILABLE", "the operation store is unavailable; retry", [("retry-after", "1")])
        except Exception:
            log.exception("operations request %s %s failed", method, path)
            return _error(500, "INTERNAL", "internal error")

    def _dispatch(self, method: str, rest: str, query: dict[str, list[str]], body: bytes) -> Response:
        client = self.client
        verb = ""
        if ":" in rest.rsplit("/", 1)[-1]:
            rest, verb = rest.rsplit(":", 1)
        if not rest or rest.startswith("/") or "//" in rest:
            return _error(404, "NOT_FOUND", f"no Operations route at {self.prefix}{rest}")
        collection = rest == "operations" or rest.endswith("/operations")
        if verb:
            if verb not in ("cancel", "wait") or collection:
                return _error(404, "NOT_FOUND", f"no Operations method {verb!r}; use :cancel or :wait")
            if method != "POST":
                return _error(405, "METHOD_NOT_ALLOWED", f":{verb} takes POST", [("allow", "POST")])
            if verb == "cancel":
                client.cancel_operation(rest)
                return _json(200, {})
            wait = operations_pb2.WaitOperationRequest()
            if body.strip():
                json_format.Parse(body, wait, ignore_unknown_fields=True)
            timeout = wait.timeout.ToTimedelta().total_seconds() if wait.HasField("timeout") else None
            return _message(client.wait_operation(rest, timeout))
        if collection:
            if method != "GET":
                return _error(405, "METHOD_NOT_ALLOWED", "a collection of operations takes GET", [("allow", "GET")])

            def one(*keys: str) -> str:
                for key in keys:
                    values = query.get(key)
                    if values:
                        return values[-1]
                return ""

            size_text = one("pageSize", "page_size") or "0"
            if not size_text.isdigit():
                raise ConfigError(f"pageSize must be a non-negative integer, got {size_text!r}", field="page_size",
                                  value=size_text)
            ops, token = client.list_operations(one("filter"), int(size_text), one("pageToken", "page_token"),
                                                name=rest)
            return _message(operations_pb2.ListOperationsResponse(operations=ops, next_page_token=token))
        if method == "GET":
            return _message(client.get_operation_pb(rest))
        if method == "DELETE":
            client.delete_operation(rest)
            return _json(200, {})
        return _error(405, "METHOD_NOT_ALLOWED", "an operation takes GET or DELETE", [("allow", "GET, DELETE")])


class RestAsgiApp:
    """The ASGI 3 application of the Operations REST routes (``client.operations_asgi_app()``); requests
    outside its prefix go to ``fallback`` (another ASGI app) when given. Store calls run in a thread."""

    def __init__(self, api: OperationsRestApi, fallback: Any = None) -> None:
        self.api = api
        self.fallback = fallback

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                       send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] != "http" or not self.api.owns(scope["path"]):
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
                return
            if scope["type"] == "lifespan":
                await answer_lifespan(receive, send)
                return
            if scope["type"] != "http":
                return
            await send_response(send, _error(404, "NOT_FOUND", f"no route at {scope['path']}"))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= _MAX_BODY:
                chunks.append(chunk)
            more = bool(message.get("more_body")) and message["type"] == "http.request"
        if size > _MAX_BODY:
            await send_response(send, _error(400, "INVALID_ARGUMENT", "request body too large"))
            return
        response = await asyncio.to_thread(self.api.handle, scope["method"].upper(), scope["path"],
                                           scope.get("query_string", b"").decode("latin-1"), b"".join(chunks))
        await send_response(send, response)



class RestWsgiApp:
    """The WSGI application of the Operations REST routes (``client.operations_wsgi_app()``); requests
    outside its prefix go to ``fallback`` (another WSGI app) when given."""

    def __init__(self, api: OperationsRestApi, fallback: Any = None) -> None:
        self.api = api
        self.fallback = fallback

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # PATH_INFO is decoded as latin-1 (PEP 3333); names are UTF-8.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        if not self.api.owns(path):
            if self.fallback is not None:
                result: Iterable[bytes] = self.fallback(environ, start_response)
                return result
            return wsgi_respond(start_response, _error(404, "NOT_FOUND", f"no route at {path}"))
        length = environ.get("CONTENT_LENGTH") or "0"
        stream = environ.get("wsgi.input")
        body = b""
        if stream is not None and length.isdigit() and int(length) > 0:
            if int(length) > _MAX_BODY:
                return wsgi_respond(start_response, _error(400, "INVALID_ARGUMENT", "request body too large"))
            body = stream.read(int(length))
        response = self.api.handle(environ.get("REQUEST_METHOD", "GET").upper(), path,
                                   environ.get("QUERY_STRING", ""), body)
        return wsgi_respond(start_response, response)

