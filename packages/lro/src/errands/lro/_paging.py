"""Listing operations a page at a time: the ListOperations filter and the page tokens.

A page token is opaque to clients: the name the page ended after and the filter it was issued for,
base64url JSON, so that the next page reads on from there and a token is never used with another filter.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from errands.core.errors import ConfigError
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pool, message_factory, struct_pb2, timestamp_pb2

from ._operation_table import OperationRecord, OperationStore

__all__ = ["OperationFilter", "list_operations", "parse_filter", "parse_operation_filter"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


_TIME_FIELDS = {"create_time": "create_time", "createTime": "create_time", "update_time": "update_time",
                "updateTime": "update_time"}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq, "!=": operator.ne,
}


@dataclass(frozen=True)
class OperationFilter:
    """A parsed ListOperations filter (AIP-160 subset): clauses joined by ``AND``.

    Attributes:
        done: ``done = true|false``, ``done != …``, ``done``, ``NOT done``; None: either.
        prefix: ``name = "operations/x*"``, ``name:"operations/x"`` (a prefix).
        exact: ``name = "operations/x"``.
        times: ``(field, op, epoch seconds)`` of ``create_time`` / ``update_time`` clauses (``<``, ``<=``,
            ``>``, ``>=``, ``=``, ``!=`` against an RFC 3339 timestamp in quotes).
    """

    done: bool | None = None
    prefix: str = ""
    exact: str | None = None
    times: tuple[tuple[str, str, float], ...] = ()


def parse_operation_filter(text: str) -> OperationFilter:
    """The ``OperationFilter`` of a ListOperations filter. Raises ``ConfigError`` naming the clause it does
    not support."""
    done: bool | None = None
    prefix = ""
    exact: str | None = None
    times: list[tuple[str, str, float]] = []
    if not text or not text.strip():
        return OperationFilter()
    for clause in re.split(r"\s+AND\s+", text.strip()):
        m = re.fullmatch(r"\s*done\s*(=|!=)\s*(true|false)\s*", clause, flags=re.IGNORECASE)
        if m:
            done = (m.group(2).lower() == "true") == (m.group(1) == "=")
            continue
        m = re.fullmatch(r"\s*(NOT\s+|-)?done\s*", clause)
        if m:
            done = not m.group(1)
            continue
        m = re.fullmatch(r'\s*name\s*(=|:)\s*"([^"*]*)(\*?)"\s*', clause)
        if m:
            if m.group(1) == ":" or m.group(3):
                prefix = m.group(2)
            else:
                exact = m.group(2)
            continue
        m = re.fullmatch(r'\s*(create_time|createTime|update_time|updateTime)\s*(<=|>=|!=|<|>|=)\s*"([^"]+)"\s*',
                         clause)
        if m:
            times.append((_TIME_FIELDS[m.group(1)], m.group(2), _rfc3339(m.group(3), text)))
            continue
        raise ConfigError(
            f"filter clause {clause.strip()!r} is not supported; use 'done = true|false', 'name = \"operations/x\"', "
            "'name = \"operations/prefix*\"' or 'update_time > \"2025-01-01T00:00:00Z\"' (also create_time, with "
            "< <= > >= = !=), joined by AND",
            field="filter", value=text,
        )
    return OperationFilter(done, prefix, exact, tuple(times))


def parse_filter(text: str) -> tuple[bool | None, str, str | None]:
    """``(done, prefix, exact)`` of a ListOperations filter (see ``parse_operation_filter`` for the rest).

    Supported: clauses joined by ``AND``: ``done = true|false``, ``name = "operations/x"`` (exact),
    ``name = "operations/x*"`` or ``name:"operations/x"`` (prefix), ``create_time`` / ``update_time``
    compared with an RFC 3339 timestamp.
    """
    f = parse_operation_filter(text)
    return f.done, f.prefix, f.exact


def _rfc3339(value: str, text: str) -> float:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"filter timestamp {value!r} is not RFC 3339 (2025-01-01T00:00:00Z)", field="filter",
                          value=text) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _create_time(pb: operations_pb2.Operation) -> float | None:
    """The ``create_time`` of the operation's metadata (a message field, or a ``Struct`` key ``create_time``
    or ``createTime`` holding an RFC 3339 string), if it has one: ``google.longrunning.Operation`` itself
    has no creation time; AIP-151 metadata carries it."""
    if not pb.HasField("metadata"):
        return None
    meta = pb.metadata
    if meta.Is(struct_pb2.Struct.DESCRIPTOR):
        struct = struct_pb2.Struct()
        meta.Unpack(struct)
        for key in ("create_time", "createTime"):
            if key in struct.fields and struct.fields[key].HasField("string_value"):
                try:
                    return _rfc3339(struct.fields[key].string_value, "")
                except ConfigError:
                    return None
        return None
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(meta.TypeName())
    except KeyError:
        return None  # a message type this process does not know
    if "create_time" not in descriptor.fields_by_name:
        return None
    try:
        cls = message_factory.GetMessageClass(descriptor)
    except Exception:  # pragma: no cover - a descriptor without a class
        return None
    msg = cls()
    meta.Unpack(msg)
    ts = getattr(msg, "create_time", None)
    if not isinstance(ts, timestamp_pb2.Timestamp) or not msg.HasField("create_time"):
        return None
    return float(ts.seconds) + ts.nanos / 1e9


def _matches_times(f: OperationFilter, record: OperationRecord, pb: operations_pb2.Operation) -> bool:
    for field, op, when in f.times:
        value = record.update_time if field == "update_time" else _create_time(pb)
        if value is None or not _COMPARE[op](value, when):
            return False
    return True


def list_operations(
    store: OperationStore, filter: str, page_size: int, page_token: str, *, name: str
) -> tuple[list[operations_pb2.Operation], str]:
    """A page of ``store``'s operations ordered by name, and the token of the next page (``""`` at the end);
    see ``LroClient.list_operations``. Time clauses are checked on the page read (AIP-158: a page may hold
    fewer than ``page_size`` operations, even none, and still have a next page)."""
    f = parse_operation_filter(filter)
    prefix = f.prefix
    if name:
        collection = name.rstrip("/") + "/"
        if not prefix.startswith(collection) and not collection.startswith(prefix):
            return [], ""
        prefix = max(prefix, collection, key=len)
    if f.exact is not None:
        prefix = max(prefix, f.exact, key=len)
    if not isinstance(page_size, int) or page_size < 0:
        raise ConfigError(f"page_size must be >= 0, got {page_size!r}", field="page_size", value=page_size)
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _decode_token(page_token, filter) if page_token else ""
    rows = list(store.list(done=f.done, prefix=prefix, after=after, limit=size + 1))
    more = len(rows) > size
    rows = rows[:size]
    out = []
    for r in rows:
        if f.exact is not None and r.name != f.exact:
            continue
        pb = operations_pb2.Operation.FromString(r.operation)
        if f.times and not _matches_times(f, r, pb):
            continue
        out.append(pb)
    token = _encode_token(rows[-1].name, filter) if more and rows else ""
    return out, token


def _encode_token(after: str, filter: str) -> str:
    raw = json.dumps({"a": after, "f": filter}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, filter: str) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, was = data["a"], data["f"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigError("page_token is not one this service issued", field="page_token", value=token) from exc
    if was != filter:
        raise ConfigError(
            "page_token was issued for another filter; pass the same filter as the first page",
            field="page_token", value=token,
        )
    return str(after)
