"""PostgreSQL ``LISTEN``: a worker's own connection that hears the ``NOTIFY`` of submitting transactions
(``Tx.notify``) and hands each channel to a callback, on a thread of its own.

The connection is opened again (with a growing pause) whenever it drops; after each (re)connection the
callback is called once with None, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

from ._sql import NOTIFY_PREFIX

log = logging.getLogger("errands.store")

#: Seconds between checks of ``close()`` while no notification comes.
_TICK = 0.5


class Listener:
    """Listens on ``channels`` (``errands_<channel>``) until ``close()``; ``connected`` says whether it does now."""

    def __init__(self, connect: Callable[[], Any], channels: Sequence[str], on_notify: Callable[[str | None], None],
                 *, name: str = "errands-listen") -> None:
        self._connect = connect
        self._channels = list(channels)
        self._on_notify = on_notify
        self._closed = threading.Event()
        self._conn: Any = None
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause = 0.1
        while not self._closed.is_set():
            try:
                conn = self._connect()
                self._conn = conn
                try:
                    for channel in self._channels:
                        conn.execute(f'LISTEN "{NOTIFY_PREFIX}{channel}"')
                    self.connected.set()
                    pause = 0.1
                    self._on_notify(None)
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=_TICK):
                            self._on_notify(note.channel[len(NOTIFY_PREFIX):])
                finally:
                    self.connected.clear()
                    self._conn = None
                    try:
                        conn.close()
                    except Exception:  # closing a broken connection: nothing to report
                        pass
            except Exception as exc:
                if self._closed.is_set():
                    return
                log.warning("store: listening for notifications failed (%s: %s); polling until it reconnects "
                            "in %.1fs", type(exc).__name__, exc, pause)
                self._closed.wait(pause)
                pause = min(pause * 2, 5.0)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=_TICK * 4)
