"""``LocalRunner``: a ``DurableRunner`` on ``memory://`` with time skipping."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from errands.core import EffectStatus, FakeClock, Outbox

from .._runner import DurableRunner
from .._values import ExecutionInfo, Operation


class LocalRunner:
    """Run durable functions in memory; whenever nothing is due, the fake clock jumps to the next timer.

    Args:
        function: a durable function to run under ``name`` (optional when ``functions`` is given).
        name: the name ``function`` is registered under.
        functions: more name -> function registrations.
        always_replay: end every invocation after each newly completed operation and replay from the
            start, so non-deterministic code fails fast.
        clock: the fake clock (a new one by default).
        connectors: name -> connector: an ``Outbox`` on the runner's store for ``ctx.effect``, dispatched
            by ``drive`` (its retries skip time too).

    Example:
        >>> def slow(event, ctx):
        ...     ctx.wait("an hour", 3600)
        ...     return "done"
        >>> LocalRunner(slow).run().result
        'done'
    """

    def __init__(self, function: Callable[[Any, Any], Any] | None = None, *, name: str = "main",
                 functions: Mapping[str, Callable[[Any, Any], Any]] | None = None, always_replay: bool = False,
                 clock: FakeClock | None = None, connectors: Mapping[str, Any] | None = None) -> None:
        self.clock = clock or FakeClock()
        registered = dict(functions or {})
        if function is not None:
            registered[name] = function
        self.name = name
        self.runner = DurableRunner("memory://", clock=self.clock, functions=registered, always_replay=always_replay)
        self.invocations = 0
        self.outbox: Outbox | None = None
        if connectors is not None:
            self.outbox = Outbox(self.runner.store, connectors=connectors)
            self.runner.use_outbox(self.outbox)

    def run(self, input: Any = None, *, function: str | None = None, execution_id: str | None = None,
            skip_time: bool = True) -> ExecutionInfo:
        """Start an execution and drive it until it finishes or waits for a callback (``PENDING``)."""
        eid = self.runner.start(function or self.name, input, execution_id=execution_id)
        return self.drive(eid, skip_time=skip_time)

    def drive(self, execution_id: str, *, skip_time: bool = True, max_invocations: int = 100_000) -> ExecutionInfo:
        """Run due work; with ``skip_time``, jump the clock to each next timer, until ``execution_id``
        finishes or nothing more is scheduled."""
        for _ in range(max_invocations):
            self.invocations += self.runner.drain()
            if self.outbox is not None and self.outbox.drain():
                continue  # an effect moved on: its execution may be woken now
            info = self.runner.get(execution_id)
            if info.status.terminal:
                return info
            due = self._next_due()
            if due is None or not skip_time:
                return info
            if due > self.clock.now():
                self.clock.set(due)
        return self.runner.get(execution_id)

    def _next_due(self) -> float | None:
        """The next durable timer or effect retry."""
        times = [self.runner.next_due()]
        if self.outbox is not None:
            # a record's times are whole microseconds: a millisecond later, the stored due time has surely passed
            times += [r.next_attempt_at.timestamp() + 0.001 for status in (EffectStatus.PENDING, EffectStatus.UNKNOWN)
                      for r in self.outbox.list(status=status, limit=1000) if r.next_attempt_at is not None]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward."""
        self.clock.advance(seconds)

    def complete_callback(self, callback_id: str, result: Any = None) -> bool:
        return self.runner.complete_callback(callback_id, result)

    def fail_callback(self, callback_id: str, error: Any) -> bool:
        return self.runner.fail_callback(callback_id, error)

    def heartbeat_callback(self, callback_id: str) -> None:
        self.runner.heartbeat_callback(callback_id)

    def send_signal(self, execution_id: str, name: str, payload: Any = None) -> bool:
        """``DurableRunner.send_signal``; ``drive`` the execution afterwards to let it take the signal."""
        return self.runner.send_signal(execution_id, name, payload)

    def get(self, execution_id: str) -> ExecutionInfo:
        return self.runner.get(execution_id)

    def history(self, execution_id: str) -> list[Operation]:
        return self.runner.history(execution_id)

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        self.runner.close()

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
