"""Operation hygiene: the worker's purge of expired operations, in bounded batches, on every store.

``client.attach(worker)`` adds ``ExpiredPurge.run`` as one of the worker's jobs: at most every
``config.purge_every`` seconds it deletes up to ``config.purge_batch`` operations not saved for
``config.ttl``; while a pass finds a full batch, the next pass goes on at once. A store fault skips the pass
(the next one retries); it never stops the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from errands.core.runtime import error_text

if TYPE_CHECKING:
    from ._client import LroClient

__all__ = ["ExpiredPurge"]

log = logging.getLogger("errands.lro.hygiene")


class ExpiredPurge:
    """The purge job of one client (see the module docstring)."""

    def __init__(self, client: LroClient) -> None:
        self.client = client
        self._next = 0.0
        self._lock = threading.Lock()

    def run(self) -> int:
        """One pass: how many operations were deleted (0 when the pass is not due)."""
        config = self.client.config
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return 0
        try:
            try:
                deleted = self.client.purge_expired(limit=config.purge_batch)
            except Exception as exc:
                log.warning("purging the expired operations of %s failed; retried later: %s", self.client.neuron,
                            error_text(exc))
                self._next = now + min(60.0, config.purge_every)
                return 0
            self._next = now if deleted >= config.purge_batch else now + config.purge_every
            return deleted
        finally:
            self._lock.release()
