"""Serdes: how operation results become checkpoint text. JSON by default; never pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from errands.core.store import loads

from ._errors import SerdesError

#: ``JsonSerdes``' encoder, made once (``json.dumps`` with these options makes one for every value).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True)


@dataclass(frozen=True, slots=True)
class SerdesContext:
    """Where a value is being (de)serialised."""

    operation_id: str = ""
    durable_execution_arn: str = ""


@runtime_checkable
class Serdes(Protocol):
    """Turns values into checkpoint text and back. Implement both methods."""

    def serialize(self, value: Any, context: SerdesContext) -> str: ...

    def deserialize(self, data: str, context: SerdesContext) -> Any: ...


class JsonSerdes:
    """Compact JSON with sorted keys (the default, encoded as the reference SDK encodes). Tuples come back
    as lists on the first run as on replay."""

    def serialize(self, value: Any, context: SerdesContext) -> str:
        try:
            return _ENCODER.encode(value)
        except (TypeError, ValueError) as exc:
            raise SerdesError(
                f"result of operation {context.operation_id or '?'} is not JSON-serialisable ({exc}); "
                "return JSON values or pass a serdes in the operation's config"
            ) from exc

    def deserialize(self, data: str, context: SerdesContext) -> Any:
        try:
            # (the store's reader: compact JSON at once, anything else through ``json.loads``)
            return loads(data) if data is not None else json.loads(data)
        except ValueError as exc:
            raise SerdesError(f"checkpoint of operation {context.operation_id or '?'} is not JSON: {exc}") from exc


class PassThroughSerdes:
    """Stores text as it is (your own JSON or base64); any other value is JSON-encoded, as by
    ``JsonSerdes``. Deserialising gives the text back."""

    def serialize(self, value: Any, context: SerdesContext) -> str:
        if isinstance(value, str):
            return value
        return JsonSerdes().serialize(value, context)

    def deserialize(self, data: str, context: SerdesContext) -> Any:
        return data


DEFAULT_SERDES: Serdes = JsonSerdes()
