"""Serdes: how operation results become checkpoint text. JSON by default; never pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._errors import SerdesError


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
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise SerdesError(
                f"result of operation {context.operation_id or '?'} is not JSON-serialisable ({exc}); "
                "return JSON values or pass a serdes in the operation's config"
            ) from exc

    def deserialize(self, data: str, context: SerdesContext) -> Any:
        try:
            return json.loads(data)
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
