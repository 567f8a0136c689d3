"""``google.longrunning.Operations`` over gRPC: Get, List, Delete, Cancel and Wait."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, TypeVar

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


class OperationsServicer:
    """Implements ``google.longrunning.Operations`` on an ``LroClient``. Errors map to status codes:
    not found → NOT_FOUND, bad input → INVALID_ARGUMENT, exists → ALREADY_EXISTS, lost race → ABORTED."""

    def __init__(self, client: LroClient) -> None:
        _require()
        self.client = client

    def _guard(self, context: Any, fn: Callable[[], T]) -> T:
        assert grpc is not None
        try:
            return fn()
        except NotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ConfigError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AlreadyExistsError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except LeaseLostError as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    def GetOperation(self, request: operations_pb2.GetOperationRequest, context: Any) -> operations_pb2.Operation:
        return self._guard(context, lambda: self.client.get_operation_pb(request.name))

    def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Any
    ) -> operations_pb2.ListOperationsResponse:
        def run() -> operations_pb2.ListOperationsResponse:
            ops, token = self.client.list_operations(
                request.filter, request.page_size, request.page_token, name=request.name
            )
            return operations_pb2.ListOperationsResponse(operations=ops, next_page_token=token)

        return self._guard(context, run)

    def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest, context: Any) -> empty_pb2.Empty:
        self._guard(context, lambda: self.client.delete_operation(request.name))
        return empty_pb2.Empty()

    def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context: Any) -> empty_pb2.Empty:
        self._guard(context, lambda: self.client.cancel_operation(request.name))
        return empty_pb2.Empty()

    def WaitOperation(self, request: operations_pb2.WaitOperationRequest, context: Any) -> operations_pb2.Operation:
        timeout: float | None = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        if remaining is not None and (timeout is None or timeout <= 0 or remaining < timeout):
            timeout = max(remaining - 0.05, 0.001)
        return self._guard(context, lambda: self.client.wait_operation(request.name, timeout))


def add_servicer(servicer: OperationsServicer, server: Any) -> None:
    _require()
    assert operations_pb2_grpc is not None
    operations_pb2_grpc.add_OperationsServicer_to_server(servicer, server)
