"""``LogSink``: journal events as CloudEvents JSON lines to a file, stdout or stderr."""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Sequence

from errands.core import ConfigError, Event

from ._lines import LineFile


class LogSink:
    """Writes each event as one line of CloudEvents 1.0 JSON.

    A batch is written with one ``write`` and flushed; with ``fsync=True`` it is also forced to disk
    before ``publish`` returns. A file left with a torn last line (the writer was killed mid-write) is
    cut back to its last whole line when opened, so the file only ever holds whole lines.

    Args:
        path: a file path (appended to), ``"-"`` or ``"stdout"`` for standard output, ``"stderr"``.
        fsync: force every batch to disk before acknowledging it.

    Example:
        >>> sink = LogSink(path="events.jsonl")
        >>> fanout = FanOut(store, routes=[Route("audit", sink, subjects=["order.**"])])
    """

    name: ClassVar[str] = "log"

    def __init__(self, path: str = "-", *, fsync: bool = False) -> None:
        self._out = LineFile("log sink", path, fsync)
        self.path = path
        self.fsync = fsync
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LogSink(path={self.path!r}, fsync={self.fsync})"

    def publish(self, events: Sequence[Event]) -> None:
        """Append ``events`` as JSON lines.

        Raises:
            TransientError: the write failed (disk full, I/O error); the batch will be retried.
        """
        if not events:
            return
        text = "".join([e.to_json() + "\n" for e in events])
        with self._lock:
            self._out.write(text)

    def close(self) -> None:
        """Close the file (standard streams are left open). Safe to call twice."""
        with self._lock:
            self._out.close()

    @classmethod
    def from_config(cls, *, name: str, options: dict[str, Any], field: str) -> LogSink:
        """Build from ``[sinks.<name>]`` options of ``errands.toml``: ``path``, ``fsync``."""
        unknown = sorted(set(options) - {"path", "fsync"})
        if unknown:
            raise ConfigError(f"{field}: unknown option {unknown[0]!r}; log sinks take path and fsync",
                              field=f"{field}.{unknown[0]}", value=options[unknown[0]])
        # A ConfigError of the constructor is put under ``field`` by the registry that called this.
        return cls(**options)
