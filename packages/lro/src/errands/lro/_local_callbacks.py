"""The local scheduler's callbacks: this neuron's timers (``lro.timers.{neuron}``), fired by core's
``StoreScheduler``.

Claiming, renewing, completing and giving back the timers is the scheduler's (``fire_due``): lro only says
what firing one means. Without a host, the handler runs in-process, fenced by its timer's lease (renewed by
the scheduler's heartbeat) rather than a hold on the operation, which saves a commit; with
``resume_batch``, up to that many handlers run in one transaction of the operation store, which also
acknowledges their timers. With a host, the callback is an HTTP ``PUT`` carrying the HMAC header.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from errands.core import StoreScheduler, telemetry
from errands.core.errors import LeaseLostError, NotFoundError, PermanentError, TransientError
from errands.core.runtime import is_infrastructure_error
from errands.core.store import Tx

from ._auth import SIGNATURE_HEADER, sign
from ._http_client import raise_for_status, request
from ._operation_table import BatchAborted, OperationRecord, SQLOperationStore
from ._resume import resume

if TYPE_CHECKING:
    from ._client import LroClient

log = logging.getLogger("errands.lro")

__all__ = ["LocalCallbacks"]


class LocalCallbacks:
    """The callbacks of one client's local timers, and the key that signs them."""

    def __init__(self, client: LroClient) -> None:
        self.client = client
        self._secret = client.config.callback_secret
        self._secret_lock = threading.Lock()

    def secret(self) -> str | None:
        """The HMAC key of local callbacks: ``config.callback_secret``, or one kept in the store (so every
        process on the store shares it)."""
        core = self.client.core_store
        if self._secret is not None or core is None:
            return self._secret
        with self._secret_lock:
            if self._secret is None:
                got = core.kv_get("lro", "callback-secret")
                if got is None:
                    try:
                        core.kv_put("lro", "callback-secret", secrets.token_hex(32), expected_version=0)
                    except LeaseLostError:
                        pass  # another process created it first
                    got = core.kv_get("lro", "callback-secret")
                assert got is not None
                self._secret = str(got[0])
        return self._secret

    def run_due(self, limit: int = 100) -> int:
        """Fire this neuron's due callbacks through the scheduler; how many were acknowledged. A store fault
        ends the pass (what it fired is settled or lapses, and fires again as stale or done)."""
        client = self.client
        scheduler = client.scheduler
        if not isinstance(scheduler, StoreScheduler):
            return 0
        topic = client.resume_topic
        store = client.store
        try:
            if client.config.base_url is not None:
                return scheduler.fire_due({topic: self._post}, limit)
            step = client.config.resume_batch
            if step > 1 and isinstance(store, SQLOperationStore) and store.store is scheduler.store:
                groups = _Groups(self, store)
                return scheduler.fire_due({topic: groups.fire}, limit, group=step, transaction=groups.transaction)
            return scheduler.fire_due({topic: self._fire_fenced}, limit)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("firing callbacks met a store fault (%s); trying again at the next pass", type(exc).__name__)
            return 0

    def fire(self, topic: str, payload: Mapping[str, Any]) -> None:
        """A timer handler for schedulers other than this client's own (see ``LroClient.fire``): the
        handler's run is fenced by a hold on the resume, for this side cannot know the timer's lease.

        Raises:
            TransientError: the callback should fire again later.
        """
        try:
            if self.client.config.base_url is not None:
                self._post(topic, payload)
            else:
                self.fire_payload(payload, hold=True)
        except TransientError:
            raise
        except Exception as exc:
            raise TransientError(f"callback for {payload.get('name')!r} will be retried: {exc}") from exc

    def attach(self, worker: Any) -> None:
        """See ``LroClient.attach``."""
        client = self.client
        mine, theirs = client.scheduler, getattr(worker, "scheduler", None)
        if (isinstance(mine, StoreScheduler) and isinstance(theirs, StoreScheduler) and mine.store is theirs.store
                and mine.queue == theirs.queue):
            worker.on_timer(client.resume_topic, self.fire)
        else:
            worker.add_job(f"lro.{client.neuron}.run_due", self.run_due)
        worker.add_job(f"lro.{client.neuron}.purge", client._purge.run)

    def _fire_fenced(self, _topic: str, payload: Mapping[str, Any]) -> None:
        self.fire_payload(payload, hold=False)  # the timer's lease, renewed by the scheduler, fences the run

    def fire_payload(self, p: Mapping[str, Any], record: OperationRecord | None = None, *, hold: bool) -> None:
        """Run the callback ``p`` describes in-process. A callback whose operation or handler does not exist
        is dropped; any other error propagates to the scheduler, which fires the callback again."""
        try:
            resume(self.client, p["name"], p["path"], p.get("token"), record, hold=hold, parent=telemetry.stored(p))
        except NotFoundError as exc:
            log.warning("callback lro-%s dropped: %s", p.get("token"), exc)

    def _post(self, _topic: str, p: Mapping[str, Any]) -> None:
        """Call the callback ``p`` describes over HTTP with the HMAC header. A 404 drops it; any other
        answer but a success fires it again later (a refused signature may be a secret being rolled out).

        Raises:
            TransientError: the callback should fire again later.
        """
        config = self.client.config
        url = self.client.callback_url(p["name"], p["path"], p.get("token"))
        assert url is not None and config.base_url is not None
        headers = {"content-length": "0", **(telemetry.stored(p) or {})}
        secret = self.secret()
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(secret, "PUT", url[len(config.base_url):])
        what = f"callback lro-{p.get('token')}"
        try:
            raise_for_status(request("PUT", url, body=b"", headers=headers, timeout=config.http_timeout), what)
        except NotFoundError:
            log.warning("%s answered 404; dropped", what)
        except PermanentError as exc:
            raise TransientError(str(exc)) from exc


class _Groups:
    """The in-process callbacks of one ``run_due`` pass, fired in groups of ``resume_batch``: each group in
    one batch of the operation store (its rows read in one query up front; rows a handler writes meanwhile
    are served from the batch), which the scheduler also acknowledges the group's timers in."""

    def __init__(self, callbacks: LocalCallbacks, store: SQLOperationStore) -> None:
        self.callbacks = callbacks
        self.store = store
        self.read: dict[str, OperationRecord] = {}

    @contextlib.contextmanager
    def transaction(self, payloads: Sequence[Any]) -> Iterator[Tx]:
        try:
            with self.store.batch() as tx:
                self.read = self.store.get_many([str(p.get("name")) for p in payloads])
                yield tx
        except BatchAborted as aborted:
            raise TransientError(f"a batch of {len(payloads)} callbacks was rolled back: {aborted}") from aborted
        finally:
            self.read = {}

    def fire(self, _topic: str, payload: Mapping[str, Any]) -> None:
        name = str(payload.get("name"))
        record = self.store.written().get(name) or self.read.get(name)
        self.callbacks.fire_payload(payload, record, hold=False)  # the batch's transaction fences the run
