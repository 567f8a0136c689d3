"""``LogConnector``: effects delivered as JSON lines to a file, stdout or stderr."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from typing import ClassVar

from errands.core import (
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Observation,
    ObservationOutcome,
    Semantics,
)

from ._lines import LineFile


class LogConnector:
    """Delivers each effect as one JSON line: ``{"key", "connector", "tool", "payload", "business_key",
    "run_id", "attempt", "time"}``.

    On a file, dispatch is idempotent on the effect key: keys already in the file (read once, on first
    use) are confirmed without writing again, and ``observe`` answers from the file (``ABSENT``,
    ``CONFIRMED``, or ``DUPLICATE`` if a line appears twice). On stdout/stderr only this process's
    deliveries are remembered and ``observe`` is not offered.

    Args:
        path: a file path (appended to), ``"-"`` or ``"stdout"`` for standard output, ``"stderr"``.
        fsync: force each line to disk before confirming (survives power loss, slower).

    Example:
        >>> outbox = Outbox(store, connectors={"audit": LogConnector(path="dispatch.jsonl")})
        >>> outbox.submit(Effect(key="order-42", connector="audit", payload={"total": 10}))
    """

    name: ClassVar[str] = "log"

    def __init__(self, path: str = "dispatch.jsonl", *, fsync: bool = False) -> None:
        self._out = LineFile("log connector", path, fsync)
        self.stream = self._out.stream
        self.path = path
        self.fsync = fsync
        self.capabilities = ConnectorCapabilities(
            can_observe=self.stream is None, can_compensate=False, default_semantics=Semantics.IDEMPOTENT)
        self._lock = threading.Lock()
        self._seen: Counter[str] | None = None

    def __repr__(self) -> str:
        return f"LogConnector(path={self.path!r}, fsync={self.fsync})"

    def _keys(self) -> Counter[str]:
        if self._seen is None:
            seen: Counter[str] = Counter()
            if self.stream is None and os.path.exists(self.path):
                with open(self.path, encoding="utf-8") as fh:
                    for line in fh:
                        if not line.endswith("\n"):
                            break  # a torn last line from a killed writer: not delivered
                        try:
                            seen[json.loads(line)["key"]] += 1
                        except (ValueError, KeyError, TypeError):
                            continue
            self._seen = seen
        return self._seen

    def dispatch(self, effect: Effect) -> DispatchResult:
        """Append the effect as a JSON line (once per key on a file).

        Raises:
            TransientError: the write failed (disk full, I/O error).
        """
        line = json.dumps(
            {
                "key": effect.key, "connector": effect.connector, "tool": effect.tool, "payload": effect.payload,
                "business_key": effect.business_key, "run_id": effect.run_id,
                "attempt": effect.metadata.get("errands.attempt"), "time": time.time(),
            },
            separators=(",", ":"), ensure_ascii=False,
        )
        with self._lock:
            seen = self._keys()
            if seen[effect.key]:
                return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"{self.path}#{effect.key}")
            self._out.write(line + "\n")
            seen[effect.key] += 1
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"{self.path}#{effect.key}")

    def observe(self, effect: Effect) -> Observation:
        """Whether the file holds the effect: ``ABSENT``, ``CONFIRMED`` or ``DUPLICATE`` (on stdout/stderr:
        ``UNKNOWN``)."""
        if self.stream is not None:
            return Observation(outcome=ObservationOutcome.UNKNOWN)
        with self._lock:
            self._out.flush()
            self._seen = None
            n = self._keys()[effect.key]
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED, external_ref=f"{self.path}#{effect.key}")
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})

    def close(self) -> None:
        """Close the file (standard streams are left open). Safe to call twice."""
        with self._lock:
            self._out.close()
