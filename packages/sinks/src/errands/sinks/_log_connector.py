"""``LogConnector``: effects delivered as JSON lines to a file, stdout or stderr."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import weakref
from collections import Counter
from typing import IO, ClassVar

from errands.core import (
    ConfigError,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Observation,
    ObservationOutcome,
    Semantics,
    TransientError,
)

_STREAMS = {"-": "stdout", "stdout": "stdout", "stderr": "stderr"}


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
        if not isinstance(path, str) or not path:
            raise ConfigError(f"log connector path must be a file path, '-' or 'stderr', got {path!r}",
                              field="path", value=path)
        if not isinstance(fsync, bool):
            raise ConfigError(f"log connector fsync must be true or false, got {fsync!r}", field="fsync", value=fsync)
        self.stream = _STREAMS.get(path)
        if self.stream is None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(
                    f"log connector path {path!r}: directory {parent!r} does not exist; create it first",
                    field="path", value=path,
                )
        self.path = path
        self.fsync = fsync
        self.capabilities = ConnectorCapabilities(
            can_observe=self.stream is None, can_compensate=False, default_semantics=Semantics.IDEMPOTENT)
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
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

    def _open(self) -> IO[str]:
        if self._fh is None:
            if self.stream is not None:
                self._fh = getattr(sys, self.stream)
            else:
                _cut_torn_tail(self.path)
                self._fh = open(self.path, "a", encoding="utf-8", newline="\n")
                # A connector dropped without close() still closes its file.
                weakref.finalize(self, self._fh.close)
        assert self._fh is not None
        return self._fh

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
            try:
                fh = self._open()
                fh.write(line + "\n")
                fh.flush()
                if self.fsync and self.stream is None:
                    os.fsync(fh.fileno())
            except (OSError, ValueError) as exc:  # ValueError: the file handle was closed under us
                if self.stream is None and self._fh is not None:
                    self._fh.close()
                    self._fh = None
                raise TransientError(f"log connector could not write to {self.path!r}: {exc}") from exc
            seen[effect.key] += 1
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"{self.path}#{effect.key}")

    def observe(self, effect: Effect) -> Observation:
        """Whether the file holds the effect: ``ABSENT``, ``CONFIRMED`` or ``DUPLICATE`` (on stdout/stderr:
        ``UNKNOWN``)."""
        if self.stream is not None:
            return Observation(outcome=ObservationOutcome.UNKNOWN)
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
            self._seen = None
            n = self._keys()[effect.key]
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED, external_ref=f"{self.path}#{effect.key}")
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})

    def close(self) -> None:
        with self._lock:
            if self._fh is not None and self.stream is None:
                self._fh.close()
            self._fh = None


def _cut_torn_tail(path: str) -> None:
    """Cut a file back to its last whole line (a killed writer may leave half a line)."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            pos = size - 1
            while pos > 0:
                step = min(4096, pos)
                fh.seek(pos - step)
                chunk = fh.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    fh.truncate(pos - step + nl + 1)
                    return
                pos -= step
            fh.truncate(0)
    except FileNotFoundError:
        return
