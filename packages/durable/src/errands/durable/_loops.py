"""The event loops async durable code runs on: each thread that runs it has a private loop of its own, kept
for the thread's later invocations and closed when the thread ends.

An invocation's coroutine runs on the loop of the thread that runs the invocation, so the parts of its
operations between pauses (the checkpoint writes, short store writes) run inline, with no thread hop; one
that blocks holds up only this invocation's own operations, never another invocation's or a caller's loop.
A thread that runs a loop already (a caller's) hands the coroutine to a helper thread's loop instead.

Sync user code called from async code (a sync step, check or child-context function) runs inline when no
other task is alive on the loop (nothing else could run meanwhile), else on the loop's bounded pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from asyncio import events
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Coroutine, Generator, TypeVar

T = TypeVar("T")

#: Threads of a private loop's pool, for sync user code that cannot run inline: how many sync steps
#: gathered in one invocation run at once.
CALL_THREADS = 32


class _Tasks:
    """The task factory of a private loop, counting the tasks alive on it."""

    def __init__(self) -> None:
        self.alive = 0

    def __call__(self, loop: asyncio.AbstractEventLoop,
                 coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any], **kw: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kw)
        self.alive += 1
        task.add_done_callback(self._gone)
        return task

    def _gone(self, _task: asyncio.Task[Any]) -> None:
        self.alive -= 1


class _OwnLoop:
    """A thread's private event loop, closed with the thread: the thread's storage holds the only reference
    (nothing the loop holds refers back), so it goes as soon as the thread ends, before the loop's sockets."""

    def __init__(self) -> None:
        self.tasks = _Tasks()
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="errands-durable-call"))
        self.loop.set_task_factory(self.tasks)

    def __del__(self) -> None:
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


class _Local(threading.local):
    own: _OwnLoop | None = None


_local = _Local()


def run_here(aw: Awaitable[T]) -> T:
    """Wait for ``aw`` on this thread's private loop (made on first use); from a thread that runs a loop
    already, on a helper thread's."""
    own = _local.own
    if events._get_running_loop() is not None or (own is not None and own.loop.is_running()):
        return _on_helper_thread(aw)
    if own is None:
        own = _local.own = _OwnLoop()
    return own.loop.run_until_complete(aw)


def _on_helper_thread(aw: Awaitable[T]) -> T:
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, run_here(aw)))
        except BaseException as exc:  # handed back to the waiting thread
            outcome.append((False, exc))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="errands-durable-loop",
                              daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


def alone() -> bool:
    """Whether the running loop is this thread's private one with no task alive on it but the current one."""
    own = _local.own
    return own is not None and own.tasks.alive <= 1 and own.loop is events._get_running_loop()


def run_inline(context: contextvars.Context, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in ``context``, in this thread, as on a thread without a loop (``asyncio.run`` works in
    it): the loop does nothing else meanwhile."""
    loop = events._get_running_loop()
    events._set_running_loop(None)
    try:
        return context.run(fn, *args)
    finally:
        events._set_running_loop(loop)
