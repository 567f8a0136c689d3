"""An errands connector plugin: appends each effect to a JSON-lines ledger file, once per key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from errands.core import DispatchOutcome, DispatchResult, Effect, Observation, ObservationOutcome, hookimpl


class LedgerConnector:
    """``type = "ledger"`` in ``errands.toml``; ``path`` is the ledger file."""

    name: ClassVar[str] = "ledger"

    def __init__(self, path: str = "ledger.jsonl") -> None:
        self.path = Path(path)

    def _count(self, key: str) -> int:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return sum(json.loads(line)["key"] == key for line in lines)

    def dispatch(self, effect: Effect) -> DispatchResult:
        if self._count(effect.key) == 0:  # idempotent on the effect key
            with self.path.open("a") as fh:
                fh.write(json.dumps({"key": effect.key, "payload": effect.payload}) + "\n")
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=effect.key)

    def observe(self, effect: Effect) -> Observation:
        n = self._count(effect.key)
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        outcome = ObservationOutcome.CONFIRMED if n == 1 else ObservationOutcome.DUPLICATE
        return Observation(outcome=outcome, external_ref=effect.key)


@hookimpl
def errands_register_connectors() -> list[type]:
    return [LedgerConnector]
