"""Where the log connector and the log sink write: lines appended to a file, or to stdout or stderr.

A file only ever holds whole lines: one left with a torn last line (its writer was killed mid-write) is cut
back to its last whole line when it is opened.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import IO

from errands.core import ConfigError, TransientError

log = logging.getLogger("errands.sinks.log")

_STREAMS = {"-": "stdout", "stdout": "stdout", "stderr": "stderr"}


class LineFile:
    """A file appended to (``path``), or standard output (``"-"``, ``"stdout"``) or error (``"stderr"``).

    Not thread-safe: its owner serialises ``write``, ``flush`` and ``close``.

    Args:
        what: the owner, for messages (``"log sink"``).
        path: the file path, or the name of a standard stream.
        fsync: force each write to disk before it returns (files only).

    Raises:
        ConfigError: a ``path`` that is no string, or whose directory does not exist, or an ``fsync`` that
            is not a bool.
    """

    def __init__(self, what: str, path: str, fsync: bool) -> None:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{what} path must be a file path, '-' or 'stderr', got {path!r}",
                              field="path", value=path)
        if not isinstance(fsync, bool):
            raise ConfigError(f"{what} fsync must be true or false, got {fsync!r}", field="fsync", value=fsync)
        self.stream = _STREAMS.get(path)
        if self.stream is None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"{what} path {path!r}: directory {parent!r} does not exist; create it first",
                                  field="path", value=path)
        self.what = what
        self.path = path
        self.fsync = fsync
        self._fh: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._fh is None:
            if self.stream is not None:
                self._fh = getattr(sys, self.stream)
            else:
                _cut_torn_tail(self.what, self.path)
                self._fh = fh = open(self.path, "a", encoding="utf-8", newline="\n")
                # An owner dropped without close() still closes its file.
                weakref.finalize(self, fh.close)
        assert self._fh is not None
        return self._fh

    def write(self, text: str) -> None:
        """Append ``text`` (whole lines) and flush it (and, with ``fsync``, force it to disk).

        Raises:
            TransientError: the write failed (disk full, I/O error, a handle closed under it); the file is
                closed and opened again by the next write.
        """
        try:
            fh = self._open()
            fh.write(text)
            fh.flush()
            if self.fsync and self.stream is None:
                os.fsync(fh.fileno())
        except (OSError, ValueError) as exc:  # ValueError: the file handle was closed under us
            self._drop()
            raise TransientError(f"{self.what} could not write to {self.path!r}: {exc}") from exc

    def flush(self) -> None:
        """Flush what was written, so that reading the file sees it."""
        if self._fh is not None:
            self._fh.flush()

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None and self.stream is None:
            try:
                fh.close()
            except OSError:
                log.warning("%s %s: close failed after a write error", self.what, self.path, exc_info=True)

    def close(self) -> None:
        """Close the file (a standard stream is left open). Safe to call twice."""
        fh, self._fh = self._fh, None
        if fh is not None and self.stream is None:
            fh.close()


def _cut_torn_tail(what: str, path: str) -> None:
    """Cut ``path`` back to its last whole line (a killed writer may leave half a line)."""
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
    log.warning("%s %s: cut a torn last line (%d bytes) left by an interrupted write", what, path, size - keep)
