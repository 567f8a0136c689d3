"""Conversions between user values and what an operation stores.

Metadata and responses are protobuf messages, or dicts packed as ``google.protobuf.Struct``. Private state
is JSON: a dict, a dataclass, a pydantic model or a protobuf message (as proto3 JSON); never pickle.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, TypeVar, cast

from errands.core import ConfigError, PayloadError
from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import Message

T = TypeVar("T")

# One encoder and one decoder for every operation: ``json.dumps`` with options builds a new encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_decode_json = json.JSONDecoder().decode
_STRUCT_URL = "type.googleapis.com/google.protobuf.Struct"


def pack_any(value: Any, *, field: str) -> any_pb2.Any:
    """``value`` (a message, a mapping, a dataclass or a pydantic model) as an ``Any``."""
    if type(value) is dict:
        struct = struct_pb2.Struct()
        try:
            struct.update(value)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"{field} cannot be packed as google.protobuf.Struct: {exc}", field=field) from exc
        return any_pb2.Any(type_url=_STRUCT_URL, value=struct.SerializeToString())
    out = any_pb2.Any()
    if isinstance(value, any_pb2.Any):
        out.CopyFrom(value)
        return out
    if isinstance(value, Message):
        out.Pack(value)
        return out
    data = to_jsonable(value, field=field)
    if not isinstance(data, Mapping):
        raise PayloadError(
            f"{field} must be a protobuf message or a mapping (packed as google.protobuf.Struct), "
            f"got {type(value).__name__}",
            field=field, value=type(value).__name__,
        )
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{field} cannot be packed as google.protobuf.Struct: {exc}", field=field) from exc
    out.Pack(struct)
    return out


def to_jsonable(value: Any, *, field: str) -> Any:
    """Plain JSON data of a dict, dataclass, pydantic model or protobuf message."""
    if type(value) is dict:
        return value
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    if value is None or isinstance(value, (str, int, float, bool, list)):
        return value
    raise PayloadError(
        f"{field} must be a dict, a dataclass, a pydantic model or a protobuf message, got {type(value).__name__}",
        field=field, value=type(value).__name__,
    )


def encode_state(value: Any) -> bytes:
    """Private state as compact JSON bytes."""
    data = value if type(value) is dict else to_jsonable(value, field="private_state")
    try:
        return _encode_json(data).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"private_state must be JSON-serialisable: {exc}", field="private_state") from exc


def from_jsonable(data: Any, type_: type[T] | None, *, field: str) -> T:
    """Build ``type_`` from plain JSON data (dict / dataclass / pydantic / message); None keeps the data."""
    # ``type_`` is only known at run time, so what is built here is ``T`` by construction: ``cast`` says so.
    if type_ is None or type_ is dict or type_ is Any:
        return cast(T, data)
    try:
        if isinstance(type_, type) and issubclass(type_, Message):
            msg = type_()
            json_format.ParseDict(data or {}, msg, ignore_unknown_fields=True)
            return cast(T, msg)
        validate = getattr(type_, "model_validate", None)
        if callable(validate):
            return cast(T, validate(data))
        if dataclasses.is_dataclass(type_):
            return type_(**(data or {}))
        return cast(Callable[[Any], T], type_)(data)
    except Exception as exc:
        raise ConfigError(
            f"{field} does not decode as {getattr(type_, '__name__', type_)}: {exc}", field=field,
            value=getattr(type_, "__name__", repr(type_)),
        ) from exc


def decode_state(raw: bytes | None, type_: type[T] | None) -> T | None:
    if raw is None:
        return None
    data = _decode_json(raw.decode("utf-8")) if type(raw) is bytes else json.loads(raw)
    if type_ is None or type_ is dict:
        return cast(T, data)
    return from_jsonable(data, type_, field="private_state")


def unpack_any(value: any_pb2.Any, type_: type[T] | None, *, field: str) -> T:
    """The content of an ``Any`` as ``type_`` (a message class, dict, dataclass or pydantic model)."""
    if isinstance(type_, type) and issubclass(type_, Message):
        if value.TypeName() == type_.DESCRIPTOR.full_name:  # ``value.Is``, on either descriptor implementation
            msg = type_()
            value.Unpack(msg)
            return cast(T, msg)
        if value.Is(struct_pb2.Struct.DESCRIPTOR):
            return from_jsonable(_struct_dict(value), type_, field=field)
        raise ConfigError(
            f"{field} holds {value.type_url or 'nothing'}, not {type_.DESCRIPTOR.full_name}",
            field=field, value=value.type_url,
        )
    if not value.type_url:
        return from_jsonable({}, type_, field=field)
    if value.Is(struct_pb2.Struct.DESCRIPTOR):
        return from_jsonable(_struct_dict(value), type_, field=field)
    raise ConfigError(
        f"{field} holds {value.type_url}; pass its message class to decode it", field=field, value=value.type_url
    )


def _struct_dict(value: any_pb2.Any) -> dict[str, Any]:
    """A ``Struct`` as JSON values. ``Struct`` holds every number as a double (the Struct double rule), so a
    number with no fractional part within 2**53 comes back as an ``int``: ``{"step": 1}`` round-trips as
    ``{"step": 1}``, not ``{"step": 1.0}``. Integers beyond 2**53 lose precision in a ``Struct``: send them
    as strings, or use a message of your own for metadata."""
    struct = struct_pb2.Struct()
    value.Unpack(struct)
    return cast(dict[str, Any], _integers(json_format.MessageToDict(struct)))


_EXACT = float(2**53)


def _integers(data: Any) -> Any:
    if type(data) is float:
        return int(data) if data.is_integer() and -_EXACT <= data <= _EXACT else data
    if type(data) is dict:
        return {k: _integers(v) for k, v in data.items()}
    if type(data) is list:
        return [_integers(v) for v in data]
    return data
