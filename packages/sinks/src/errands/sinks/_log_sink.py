"""``LogSink``: journal events as CloudEvents JSON lines to a file, stdout or stderr."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import IO, Any, ClassVar, Sequence

from errands.core import ConfigError, Event, TransientError

log = logging.getLogger("errands.sinks.log")

_STREAMS = {"-": "stdout", "stdout": "stdout", "stderr": "stderr"}


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
        if not isinstance(path, str) or not path:
            raise ConfigError(f"log sink path must be a file path, '-' or 'stderr', got {path!r}",
                              field="path", value=path)
        if not isinstance(fsync, bool):
            raise ConfigError(f"log sink fsync must be true or false, got {fsync!r}", field="fsync", value=fsync)
        if path not in _STREAMS:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"log sink path {path!r}: directory {parent!r} does not exist; create it first",
                                  field="path", value=path)
        self.path = path
        self.fsync = fsync
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LogSink(path={self.path!r}, fsync={self.fsync})"

    def _open(self) -> IO[str]:
        if self._fh is not None:
            return self._fh
        stream = _STREAMS.get(self.path)
        if stream is not None:
            self._fh = getattr(sys, stream)
        else:
            _cut_torn_tail(self.path)
            self._fh = open(self.path, "a", encoding="utf-8", newline="\n")
        assert self._fh is not None
        return self._fh

    def publish(self, events: Sequence[Event]) -> None:
        """Append ``events`` as JSON lines.

        Raises:
            TransientError: the write failed (disk full, I/O error); the batch will be retried.
        """
        if not events:
            return
        text = "".join([e.to_json() + "\n" for e in events])
        with self._lock:
            try:
                fh = self._open()
                fh.write(text)
                fh.flush()
                if self.fsync and self.path not in _STREAMS:
                    os.fsync(fh.fileno())
            except OSError as exc:
                self._drop()
                raise TransientError(f"log sink could not write {self.path!r}: {exc}") from exc

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None and self.path not in _STREAMS:
            try:
                fh.close()
            except OSError:
                log.warning("log sink %s: close failed after a write error", self.path, exc_info=True)

    def close(self) -> None:
        """Close the file (standard streams are left open). Safe to call twice."""
        with self._lock:
            if self._fh is not None and self.path not in _STREAMS:
                self._fh.close()
            self._fh = None

    @classmethod
    def from_config(cls, *, name: str, options: dict[str, Any], field: str) -> LogSink:
        """Build from ``[sinks.<name>]`` options of ``errands.toml``: ``path``, ``fsync``."""
        unknown = sorted(set(options) - {"path", "fsync"})
        if unknown:
            raise ConfigError(f"{field}: unknown option {unknown[0]!r}; log sinks take path and fsync",
                              field=f"{field}.{unknown[0]}", value=options[unknown[0]])
        try:
            return cls(**options)
        except ConfigError as exc:
            raise ConfigError(f"{field}.{exc.field}: {exc}", field=f"{field}.{exc.field}", value=exc.value) from exc


def _cut_torn_tail(path: str) -> None:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        # Walk back to the last newline; everything after it is a half-written line.
        pos = size
        chunk = 65536
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            data = fh.read(pos - start)
            i = data.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        fh.truncate(keep)
    log.warning("log sink %s: cut a torn last line (%d bytes) left by an interrupted write", path, size - keep)
