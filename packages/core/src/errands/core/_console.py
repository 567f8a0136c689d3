"""Terminal output shared by every command: tables, JSON and progress."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable, Sequence, TextIO


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """Print rows as an aligned plain-text table."""
    out = out or sys.stdout
    text_rows = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()
    out.write(line + "\n")
    for row in text_rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    if not text_rows:
        out.write("(none)\n")


def print_json(value: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(value, indent=2, default=str, sort_keys=False) + "\n")


class Progress:
    """A one-line progress counter: redrawn in place on a terminal, a few plain lines otherwise.

    Args:
        label: what is being counted.
        total: the expected count.
        out: the stream (stderr by default, so ``--json`` output stays clean).
    """

    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.out = out or sys.stderr
        self.done = 0
        self.started = time.perf_counter()
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._next_pct = 25

    def update(self, n: int = 1) -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if self._tty:
            self.out.write(f"\r  {self.label}: {self.done}/{self.total} ({pct}%)")
            self.out.flush()
        elif pct >= self._next_pct and self.done < self.total:
            self.out.write(f"  {self.label}: {self.done}/{self.total} ({pct}%)\n")
            while self._next_pct <= pct:
                self._next_pct += 25

    def close(self) -> float:
        elapsed = time.perf_counter() - self.started
        end = "\r" if self._tty else ""
        self.out.write(f"{end}  {self.label}: {self.done}/{self.total} done in {elapsed:.2f}s\n")
        self.out.flush()
        return elapsed
