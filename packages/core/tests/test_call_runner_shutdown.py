"""``CallRunner.close`` shuts its event loop down as ``asyncio.run`` does: async generators left suspended on
it (an async client's connection pool held open by one) are closed on the loop before it closes."""

from __future__ import annotations

from typing import AsyncGenerator

from errands.core.runtime import CallRunner


def test_async_generators_suspended_on_the_loop_are_closed_with_the_runner() -> None:
    closed: list[str] = []

    async def hold() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            closed.append("closed")

    held = hold()

    async def start() -> None:
        await held.__anext__()

    runner = CallRunner(1)
    runner.run(start())
    assert closed == []
    runner.close()
    assert closed == ["closed"]
