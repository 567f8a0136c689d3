"""One background event loop per engine, so that engines running in threads can call async sinks and
handlers (an ``httpx.AsyncClient`` stays bound to the loop it was first used on)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Awaitable, Callable


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


class AsyncBridge:
    """Runs awaitables on a private event loop thread, started on first use."""

    def __init__(self, name: str = "errands-async") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, aw: Awaitable[Any]) -> Any:
        """Wait for ``aw`` on the bridge's loop and return its result (or raise its exception)."""
        return asyncio.run_coroutine_threadsafe(_await(aw), self._ensure()).result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)``; if it returns an awaitable, wait for it on the bridge's loop."""
        result = fn(*args)
        if inspect.isawaitable(result):
            return self.run(result)
        return result

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()
