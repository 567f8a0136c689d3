"""``google.longrunning.Operations`` over gRPC: Get, List, Delete, Cancel and Wait, for a ``grpc.Server``
(``OperationsServicer``) and for a ``grpc.aio`` server (``AsyncOperationsServicer``), with one error mapping."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from errands.core import AlreadyExistsError, ConfigError, LeaseLostError, MissingDependencyError, NotFoundError
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import empty_pb2

if TYPE_CHECKING:
    from ._client import LroClient

T = TypeVar("T")

# Both optional (the ``grpc`` extra), so both are ``Any`` here; the generated stubs module has no types anyway.
grpc: Any
operations_pb2_grpc: Any
try:
    import grpc

    operations_pb2_grpc = importlib.import_module("google.longrunning.operations_pb2_grpc")
except ImportError:  # pragma: no cover - exercised only without the grpc extra
    grpc = None
    operations_pb2_grpc = None


def _require() -> None:
    if grpc is None or operations_pb2_grpc is None:
        raise MissingDependencyError("grpcio", "lro")


# The errors the Operations service answers with a status of their own (anything else is UNKNOWN, as gRPC does),
# by the name of the ``grpc.StatusCode``; in this order, the first class that matches. Both servicers use it.
_STATUS: tuple[tuple[type[Exception], str], ...] = (
    (NotFoundError, "NOT_FOUND"),
    (ConfigError, "INVALID_ARGUMENT"),
    (AlreadyExistsError, "ALREADY_EXISTS"),
    (LeaseLostError, "ABORTED"),
)
_MAPPED = tuple(kind for kind, _ in _STATUS)


def status_code(exc: BaseException) -> Any:
    """The ``grpc.StatusCode`` an error of the service is answered with (``exc`` is one of ``_MAPPED``)."""
    assert grpc is not None
    return next(getattr(grpc.StatusCode, code) for kind, code in _STATUS if isinstance(exc, kind))


def wait_timeout(request: operations_pb2.WaitOperationRequest, context: Any) -> float | None:
    """How long ``WaitOperation`` waits: the request's timeout, cut short by the call's own deadline (less a
    margin to answer in); None: the client's default."""
    timeout: float | None = None
    if request.HasField("timeout"):
        timeout = request.timeout.ToTimedelta().total_seconds()
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
    if remaining is not None and (timeout is None or timeout <= 0 or remaining < timeout):
        timeout = max(remaining - 0.05, 0.001)
    return timeout


def _page(ops: list[operations_pb2.Operation], token: str) -> operations_pb2.ListOperationsResponse:
    return operations_pb2.ListOperationsResponse(operations=ops, next_page_token=token)


class OperationsServicer:
    """Implements ``google.longrunning.Operations`` on an ``LroClient`` for a ``grpc.Server``. Errors map to
    status codes: not found → NOT_FOUND, bad input → INVALID_ARGUMENT, exists → ALREADY_EXISTS, lost race →
    ABORTED."""

    def __init__(self, client: LroClient) -> None:
        _require()
        self.client = client

    def _guard(self, context: Any, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _MAPPED as exc:
            context.abort(status_code(exc), str(exc))
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    def GetOperation(self, request: operations_pb2.GetOperationRequest, context: Any) -> operations_pb2.Operation:
        return self._guard(context, lambda: self.client.get_operation_pb(request.name))

    def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Any
    ) -> operations_pb2.ListOperationsResponse:
        def run() -> operations_pb2.ListOperationsResponse:
            return _page(*self.client.list_operations(
                request.filter, request.page_size, request.page_token, name=request.name
            ))

        return self._guard(context, run)

    def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest, context: Any) -> empty_pb2.Empty:
        self._guard(context, lambda: self.client.delete_operation(request.name))
        return empty_pb2.Empty()

    def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context: Any) -> empty_pb2.Empty:
        self._guard(context, lambda: self.client.cancel_operation(request.name))
        return empty_pb2.Empty()

    def WaitOperation(self, request: operations_pb2.WaitOperationRequest, context: Any) -> operations_pb2.Operation:
        timeout = wait_timeout(request, context)
        return self._guard(context, lambda: self.client.wait_operation(request.name, timeout))


class AsyncOperationsServicer:
    """``OperationsServicer`` for a ``grpc.aio`` server: the same methods and status codes, each a coroutine
    over the client's ``*_async`` twins, so that no call blocks the server's event loop (``WaitOperation``
    pauses with ``asyncio.sleep``)."""

    def __init__(self, client: LroClient) -> None:
        _require()
        self.client = client

    async def _guard(self, context: Any, call: Awaitable[T]) -> T:
        try:
            return await call
        except _MAPPED as exc:
            await context.abort(status_code(exc), str(exc))
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: Any
    ) -> operations_pb2.Operation:
        return await self._guard(context, self.client.get_operation_pb_async(request.name))

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Any
    ) -> operations_pb2.ListOperationsResponse:
        page = await self._guard(context, self.client.list_operations_async(
            request.filter, request.page_size, request.page_token, name=request.name
        ))
        return _page(*page)

    async def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: Any
    ) -> empty_pb2.Empty:
        await self._guard(context, self.client.delete_operation_async(request.name))
        return empty_pb2.Empty()

    async def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: Any
    ) -> empty_pb2.Empty:
        await self._guard(context, self.client.cancel_operation_async(request.name))
        return empty_pb2.Empty()

    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: Any
    ) -> operations_pb2.Operation:
        timeout = wait_timeout(request, context)
        return await self._guard(context, self.client.wait_operation_async(request.name, timeout))


def add_servicer(servicer: OperationsServicer | AsyncOperationsServicer, server: Any) -> None:
    """Add ``servicer`` to ``server`` (a ``grpc.Server``, or a ``grpc.aio.Server`` for the async one)."""
    _require()
    assert operations_pb2_grpc is not None
    operations_pb2_grpc.add_OperationsServicer_to_server(servicer, server)
