"""``DurableRunner(max_parallelism=N)``: up to N invocations at once on one worker, each on a thread of its
own, its lease renewed by its own heartbeat (as every invocation's is). A worker claims only as many
executions as it has free slots, so that no claimed execution waits in line while its lease runs down, and
wakes its loop when a slot frees.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from errands.core import ConfigError, Lease


def check_parallelism(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"max_parallelism must be a positive integer (1: one invocation at a time, in the "
                          f"worker's thread), got {value!r}", field="max_parallelism", value=value)
    return value


class Slots:
    """Threads running the invocations of claimed executions, at most ``size`` at once.

    Args:
        size: the most invocations running at once.
        run: runs one invocation of a leased execution (never raises: ``Invocations.run``).
    """

    def __init__(self, size: int, run: Callable[[Lease], None]) -> None:
        self.size = size
        self._run = run
        self._busy = 0
        self._changed = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._wakes: list[Callable[[], None]] = []

    def on_free(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever an invocation ends (a worker's loop claims the next at once)."""
        self._wakes.append(wake)

    def free(self) -> int:
        with self._changed:
            return self.size - self._busy

    def submit(self, leases: list[Lease]) -> None:
        """Run the invocations of ``leases`` (no more than ``free()``) on the pool."""
        with self._changed:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="errands-durable-run")
            self._busy += len(leases)
            pool = self._pool
        for lease in leases:
            pool.submit(self._one, lease)

    def _one(self, lease: Lease) -> None:
        try:
            self._run(lease)
        finally:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()
            for wake in self._wakes:
                wake()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for half the running invocations to end (at least one), so that
        the next claim takes a batch rather than one execution at a time. Whether any was running."""
        with self._changed:
            if self._busy == 0:
                return False
            until = self._busy // 2 if self._busy > 1 else 0
            self._changed.wait_for(lambda: self._busy <= until, timeout)
            return True

    def close(self) -> None:
        """Wait for the invocations running, then stop the threads."""
        with self._changed:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
