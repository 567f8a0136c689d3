"""``Operation``: one long-running operation as a handler sees it, and the metadata helpers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from errands.core import ConfigError, InfrastructureError, LeaseLostError, is_infrastructure_error, telemetry
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import empty_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]

from ._codec import decode_state, encode_state, pack_any, unpack_any
from ._operation_table import OperationDoneError, OperationRecord, SQLOperationStore
from ._tokens import claimed, parse_token

if TYPE_CHECKING:
    from ._client import LroClient

T = TypeVar("T")

__all__ = ["Operation", "must_unmarshal_metadata", "unmarshal_metadata"]

R = TypeVar("R")


class _Unlocked:
    """A context manager that does nothing (cheaper than ``contextlib.nullcontext`` on hot paths)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_UNLOCKED = _Unlocked()


def store_call(what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Call the operation store; a fault of its database (locked, dropped, serialization) comes out as
    ``InfrastructureError`` so that the engine abandons and retries instead of failing the operation."""
    try:
        return fn(*args, **kwargs)
    except InfrastructureError:
        raise
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise InfrastructureError(f"{what}: the operation store failed ({type(exc).__name__}: {exc})") from exc
        raise


async def run_async(client: LroClient, fn: Callable[..., R], /, *args: Any, conn: Any = None, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)`` (a sync method of the client or of an operation) for a coroutine, without
    blocking its event loop: the one path of every ``*_async`` twin.

    On an errands SQL store it is that store's ``run_async``; on another operation store (Spanner) a thread of
    ``asyncio.to_thread``. Inside a ``client.batch()`` open on the calling thread the call runs right there:
    the batch's transaction belongs to that thread, and a call from another thread would wait for it.
    """
    ops = client.store
    current = getattr(ops, "current_tx", None)
    if current is not None and current() is not None:
        return fn(*args, **kwargs) if conn is None else fn(*args, conn=conn, **kwargs)
    core = client.core_store
    if core is None and isinstance(ops, SQLOperationStore):
        core = ops.store
    if core is not None:
        return await core.run_async(fn, *args, conn=conn, **kwargs)
    if conn is not None:
        kwargs["conn"] = conn
    return await asyncio.to_thread(fn, *args, **kwargs)


def retoken(r: OperationRecord, raw: str | None) -> OperationRecord:
    """``r`` with another ``ResumeToken`` column value."""
    return OperationRecord(
        name=r.name, operation=r.operation, state=r.state, resume_point=r.resume_point, update_time=r.update_time,
        version=r.version, done=r.done, cancel_requested=r.cancel_requested, resume_path=r.resume_path,
        resume_token=raw,
    )


def _code_value(code: Any) -> int:
    """A ``google.rpc.Code`` number from an int, a ``code_pb2`` value or a ``grpc.StatusCode``."""
    value = getattr(code, "value", code)
    if isinstance(value, tuple):  # grpc.StatusCode.value is (number, "name")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value not in code_pb2.Code.values():
        raise ConfigError(
            f"code must be a google.rpc.Code (an int 1-16 or grpc.StatusCode), got {code!r}", field="code", value=code
        )
    return int(value)


class Operation:
    """One operation: its ``google.longrunning.Operation``, private state and resume point.

    ``set_*`` methods change the local copy; ``save_*``, ``save``, ``complete``, ``fail`` and
    ``resume_via_tasks`` write it with compare-and-set on ``version``. After ``LeaseLostError`` this object
    is stale: load the operation again with ``client.get_operation``. A write that fails for any other
    reason (``InfrastructureError``, a failed task creation) leaves this object as it was before the call,
    so the same call can be retried.
    """

    __slots__ = ("_client", "_lock", "_pb", "_point", "_raw", "_record", "_state")

    def __init__(self, client: LroClient, record: OperationRecord, pb: operations_pb2.Operation | None = None) -> None:
        self._client = client
        self._record = record
        self._state = record.state
        self._point = record.resume_point
        self._pb = pb if pb is not None else operations_pb2.Operation.FromString(record.operation)
        # The serialised ``_pb`` while it is unchanged, so saves that only touch the state or the resume
        # point do not serialise it again. Every change to ``_pb`` clears it.
        self._raw: bytes | None = record.operation
        # Set while a heartbeat renews this operation's hold on its resume: writes and renewals take turns.
        self._lock: threading.Lock | None = None

    def __repr__(self) -> str:
        return f"Operation({self.name!r}, version={self.version}, done={self.done})"

    # -- reading ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``operations/{id}``."""
        return self._record.name

    @property
    def version(self) -> int:
        """The stored version this object was loaded at (or last saved as)."""
        return self._record.version

    @property
    def done(self) -> bool:
        return bool(self._pb.done)

    @property
    def resume_point(self) -> str:
        """The handler's own marker of where to pick up; ``""`` until set."""
        return self._point

    @property
    def cancel_requested(self) -> bool:
        """Whether a client asked to cancel. Read from the store on each access, so a long handler
        sees a request made while it runs; a handler that notices should stop and return."""
        if self._record.cancel_requested:
            return True
        return store_call(f"operation {self.name!r}", self._client.store.get, self.name).cancel_requested

    def operation_pb(self) -> operations_pb2.Operation:
        """A copy of the ``google.longrunning.Operation``."""
        out = operations_pb2.Operation()
        out.CopyFrom(self._pb)
        return out

    def decode_private_state(self, type_: type[T] | None = None) -> T | None:
        """The private state as ``type_`` (dataclass, pydantic model, message; None or dict: a dict).

        Returns:
            None if no state was saved.
        """
        return decode_state(self._state, type_)

    # -- changing --------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._pb.done:
            raise OperationDoneError(f"operation {self.name!r} is done; a done operation is final")

    def set_metadata(self, metadata: Any) -> Operation:
        """Replace the metadata (a protobuf message or a dict packed as ``google.protobuf.Struct``)."""
        self._open()
        self._pb.metadata.CopyFrom(pack_any(metadata, field="metadata"))
        self._raw = None
        return self

    def save_metadata(self, metadata: Any) -> Operation:
        """``set_metadata`` and ``save``."""
        return self.set_metadata(metadata).save()

    def set_private_state(self, state: Any) -> Operation:
        """Replace the private state (JSON: a dict, a dataclass, a pydantic model or a message)."""
        self._open()
        self._state = encode_state(state)
        return self

    def save_private_state(self, state: Any) -> Operation:
        """``set_private_state`` and ``save``."""
        return self.set_private_state(state).save()

    def set_resume_point(self, point: str) -> Operation:
        """Record where the handler should pick up next time."""
        self._open()
        if not isinstance(point, str):
            raise ConfigError(f"resume point must be a string, got {point!r}", field="resume_point", value=point)
        self._point = point
        return self

    def save_resume_point(self, point: str) -> Operation:
        """``set_resume_point`` and ``save``."""
        return self.set_resume_point(point).save()

    def _snapshot(
        self, resume_path: str | None = None, resume_token: str | None = None, *,
        pb: operations_pb2.Operation | None = None, raw: bytes | None = None,
    ) -> OperationRecord:
        r = self._record
        if pb is None:
            pb = self._pb
            raw = self._raw
            if raw is None:
                raw = self._raw = pb.SerializeToString(deterministic=True)
        elif raw is None:
            raw = pb.SerializeToString(deterministic=True)
        return OperationRecord(
            name=r.name, operation=raw, state=self._state,
            resume_point=self._point, update_time=r.update_time, version=r.version, done=pb.done,
            cancel_requested=r.cancel_requested, resume_path=resume_path or r.resume_path,
            resume_token=resume_token or r.resume_token,
        )

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        """The lock shared with the heartbeat while one renews this operation's hold, else a no-op."""
        lock = self._lock
        return _UNLOCKED if lock is None else lock

    def _write(self, record: OperationRecord) -> OperationRecord:
        return store_call(f"saving operation {self.name!r}", self._client.store.save, record,
                          expected_version=record.version)

    def save(self) -> Operation:
        """Write every pending change, compare-and-set on ``version``.

        Raises:
            LeaseLostError: another writer saved first; nothing changed.
            OperationDoneError: the operation is done; nothing changed.
            InfrastructureError: the store failed; this object is as it was, retry the save.
        """
        self._open()
        with telemetry.span("errands.lro.save", operation=self.name):
            if self._lock is None:
                self._record = self._write(self._snapshot())
                return self
            with self._lock:
                self._record = self._write(self._snapshot())
        return self

    def complete(self, response: Any = None) -> Operation:
        """Finish successfully with ``response`` (a message, or a dict packed as ``Struct``; None packs
        ``google.protobuf.Empty``)."""
        self._open()
        packed = pack_any(empty_pb2.Empty() if response is None else response, field="response")
        pb = operations_pb2.Operation()
        pb.CopyFrom(self._pb)
        pb.ClearField("error")
        pb.response.CopyFrom(packed)
        pb.done = True
        return self._save_final(pb)

    def fail(self, message: str, *args: Any, code: Any = code_pb2.UNKNOWN) -> Operation:
        """Finish with an error: ``message % args`` and a non-zero ``google.rpc.Code``.

        Raises:
            ConfigError: ``code`` is OK (0) or not a ``google.rpc.Code``; nothing changed.
        """
        number = _code_value(code)
        if number == code_pb2.OK:
            raise ConfigError(
                "fail() needs a non-zero code: use complete() for success, or a code such as UNKNOWN or INTERNAL",
                field="code", value=code,
            )
        self._open()
        text = message % args if args else message
        pb = operations_pb2.Operation()
        pb.CopyFrom(self._pb)
        pb.ClearField("response")
        pb.error.CopyFrom(status_pb2.Status(code=number, message=text))
        pb.done = True
        return self._save_final(pb)

    def _save_final(self, pb: operations_pb2.Operation) -> Operation:
        # The finished proto is a copy: if the write fails, this object stays exactly as it was.
        raw = pb.SerializeToString(deterministic=True)
        with self._guard(), telemetry.span("errands.lro.complete", operation=self.name,
                                           status="FAILED" if pb.HasField("error") else "SUCCEEDED"):
            self._record = self._write(self._snapshot(pb=pb, raw=raw))
        self._pb, self._raw = pb, raw
        return self

    def resume_via_tasks(self, path: str, delay: timedelta | float = 0.0) -> Operation:
        """Save, and have the handler at ``path`` resume this operation after ``delay``.

        With the local scheduler on the same store, the save and the timer commit together. A callback
        left over from an earlier ``resume_via_tasks`` is ignored once a newer one is scheduled.
        """
        self._open()
        self._client._scheduling.save_and_schedule(self, path, delay)  # sets ``_record`` as it writes
        return self

    # -- from async code: the writing methods above, off the event loop (see ``run_async``) ------------------
    async def save_async(self) -> Operation:
        """``save`` for async code."""
        return await run_async(self._client, self.save)

    async def save_metadata_async(self, metadata: Any) -> Operation:
        """``save_metadata`` for async code."""
        return await run_async(self._client, self.save_metadata, metadata)

    async def save_private_state_async(self, state: Any) -> Operation:
        """``save_private_state`` for async code."""
        return await run_async(self._client, self.save_private_state, state)

    async def save_resume_point_async(self, point: str) -> Operation:
        """``save_resume_point`` for async code."""
        return await run_async(self._client, self.save_resume_point, point)

    async def complete_async(self, response: Any = None) -> Operation:
        """``complete`` for async code."""
        return await run_async(self._client, self.complete, response)

    async def fail_async(self, message: str, *args: Any, code: Any = code_pb2.UNKNOWN) -> Operation:
        """``fail`` for async code."""
        return await run_async(self._client, self.fail, message, *args, code=code)

    async def resume_via_tasks_async(self, path: str, delay: timedelta | float = 0.0) -> Operation:
        """``resume_via_tasks`` for async code."""
        return await run_async(self._client, self.resume_via_tasks, path, delay)

    # -- the hold on a resume (see ``_tokens``) ------------------------------------------------------
    def _renew_hold(self, token: str, claim: str, lease_for: float) -> bool | None:
        """Push this operation's hold on its resume out by ``lease_for``. None: the operation is done,
        nothing to renew any more; True: renewed, or not held just now (rescheduled, or a reschedule being
        undone); False: another writer took the operation."""
        with self._guard():
            r = self._record
            if self._pb.done or r.done:
                return None
            state = parse_token(r.resume_token)
            if state.token != token or state.claim != claim:
                return True
            raw = claimed(token, self._client.store.now() + lease_for, claim)
            try:
                self._record = self._write(retoken(r, raw))
            except LeaseLostError:
                return False
            return True

    def _set_hold(self, raw: str | None, *, token: str, claim: str) -> OperationRecord | None:
        """Replace this operation's hold on ``token`` (if it still has it) with the column value ``raw``:
        the token again (released) or spent. Returns the stored record, or None if the hold was gone."""
        with self._guard():
            r = self._record
            state = parse_token(r.resume_token)
            if r.done or state.token != token or state.claim != claim:
                return None
            self._record = self._write(retoken(r, raw))
            return self._record


def unmarshal_metadata(op: Operation | operations_pb2.Operation, type_: type[T] | None = None) -> T | None:
    """The operation's metadata as ``type_`` (a message class, dict, dataclass or pydantic model).

    Returns:
        None when the operation has no metadata.

    Raises:
        ConfigError: the metadata is of another message type.
    """
    pb = op._pb if isinstance(op, Operation) else op
    if not pb.HasField("metadata"):
        return None
    return unpack_any(pb.metadata, type_, field="metadata")


def must_unmarshal_metadata(op: Operation | operations_pb2.Operation, type_: type[T] | None = None) -> T:
    """Like ``unmarshal_metadata``, but a missing metadata raises ``ConfigError``."""
    value = unmarshal_metadata(op, type_)
    if value is None:
        name = op.name
        raise ConfigError(f"operation {name!r} has no metadata", field="metadata", value=None)
    return value
