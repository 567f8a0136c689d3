"""Cloud Tasks: ``CloudTasksConnector`` turns effects into HTTP tasks; ``CloudTasksScheduler`` turns timers
(lro's ``resume_via_tasks``, durable timers) into HTTP tasks.

A task's id is a hash of the effect key (or timer key), so Cloud Tasks itself refuses a second task for the
same key with ``ALREADY_EXISTS`` for as long as it remembers the name (about an hour after the task ran, up
to nine days for queues made from queue.yaml). Vendor errors are mapped here, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Mapping
from urllib.parse import urlencode, urlsplit

from errands.core import (
    ConfigError,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Observation,
    ObservationOutcome,
    PayloadError,
    PermanentError,
    Semantics,
    TransientError,
    telemetry,
)

from ._imports import require

__all__ = ["CloudTasksConnector", "CloudTasksScheduler", "task_id_for"]

EMULATOR_ENV = "CLOUD_TASKS_EMULATOR_HOST"
_METHODS = ("POST", "PUT", "GET", "PATCH", "DELETE")
# Cloud Tasks waits this long for an HTTP target's answer (15 s to 30 min); its default is 10 minutes.
MAX_DISPATCH_DEADLINE = 1800.0
MIN_DISPATCH_DEADLINE = 15.0


def _check_deadline(value: object) -> timedelta | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            or not MIN_DISPATCH_DEADLINE <= seconds <= MAX_DISPATCH_DEADLINE):
        raise ConfigError(
            f"dispatch_deadline must be {MIN_DISPATCH_DEADLINE:.0f} to {MAX_DISPATCH_DEADLINE:.0f} seconds "
            f"(Cloud Tasks' range for HTTP targets), got {value!r}",
            field="dispatch_deadline", value=value,
        )
    return timedelta(seconds=float(seconds))


def task_id_for(key: str, prefix: str = "") -> str:
    """The Cloud Tasks task id of ``key``: ``prefix`` + the SHA-256 of the key in hex.

    Hashing spreads ids evenly (sequential ids slow Cloud Tasks down) and keeps any key within the id
    alphabet ``[A-Za-z0-9_-]``.
    """
    return prefix + hashlib.sha256(key.encode()).hexdigest()


def _tasks() -> Any:
    return require("google.cloud.tasks_v2", package="google-cloud-tasks", extra="tasks")


def _exceptions() -> Any:
    return require("google.api_core.exceptions", package="google-api-core", extra="tasks")


def _check_method(method: object) -> str:
    if method not in _METHODS:
        raise ConfigError(f"method must be one of {', '.join(_METHODS)}, got {method!r}", field="method",
                          value=method)
    return str(method)


def _check(field: str, value: object, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise ConfigError(f"{field} must be {what} without '/', got {value!r}", field=field, value=value)
    return value


def _check_url(field: str, value: object) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{field} must be an http(s) URL such as 'https://svc.example/hook', got {value!r}",
                          field=field, value=value)
    return str(value)


def _as_datetime(value: datetime | float) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigError(f"schedule time must be timezone-aware, got {value!r}", field="at", value=value)
        return value.astimezone(timezone.utc)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"schedule time must be an aware datetime or epoch seconds, got {value!r}",
                          field="at", value=value)
    return datetime.fromtimestamp(float(value), timezone.utc)


class _TasksQueue:
    """A lazily built ``CloudTasksClient`` bound to one queue."""

    def __init__(self, project: str, location: str, queue: str, client: Any, emulator_host: str | None,
                 timeout: float, service_account: str | None, audience: str | None,
                 headers: Mapping[str, str] | None) -> None:
        self.project = _check("project", project)
        self.location = _check("location", location, "a Cloud Tasks location such as 'europe-west1'")
        self.queue = _check("queue", queue)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}",
                              field="timeout", value=timeout)
        self.timeout = float(timeout)
        if service_account is not None and (not isinstance(service_account, str) or "@" not in service_account):
            raise ConfigError(
                f"service_account must be a service account email such as "
                f"'invoker@my-project.iam.gserviceaccount.com', got {service_account!r}",
                field="service_account", value=service_account,
            )
        self.service_account = service_account
        if audience is not None:
            _check_url("audience", audience)
        self.audience = audience
        self.headers = dict(headers or {})
        for name, value in self.headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ConfigError(f"headers[{name!r}] must map a string to a string", field=f"headers.{name}",
                                  value="<redacted>")
        self._client = client
        self._emulator_host = emulator_host
        self._lock = threading.Lock()

    @property
    def queue_path(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/queues/{self.queue}"

    def task_path(self, task_id: str) -> str:
        return f"{self.queue_path}/tasks/{task_id}"

    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    tasks = _tasks()
                    host = self._emulator_host or os.environ.get(EMULATOR_ENV)
                    if host:
                        import grpc
                        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

                        channel = grpc.insecure_channel(host)
                        self._client = tasks.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
                    else:
                        self._client = tasks.CloudTasksClient()
        return self._client

    def http_request(self, method: str, url: str, body: bytes, headers: Mapping[str, str], *,
                     audience: str | None = None) -> Any:
        tasks = _tasks()
        request = tasks.HttpRequest(
            http_method=getattr(tasks.HttpMethod, method), url=url, headers={**self.headers, **headers},
            body=body,
        )
        if self.service_account:
            token = tasks.OidcToken(service_account_email=self.service_account)
            if audience or self.audience:
                token.audience = audience or self.audience
            request.oidc_token = token
        return request

    def create(self, task_id: str, request: Any, at: datetime | None, deadline: timedelta | None = None) -> Any:
        """Create the task. Returns the task; raises the vendor error.

        Calls are made once (``retry=None``) within ``timeout``: the engine that called retries with its own
        backoff, and a task name makes every retry safe.
        """
        tasks = _tasks()
        task = tasks.Task(name=self.task_path(task_id), http_request=request)
        if at is not None:
            task.schedule_time = at
        if deadline is not None:
            task.dispatch_deadline = deadline
        return self.client().create_task(parent=self.queue_path, task=task, timeout=self.timeout, retry=None)

    def close(self) -> None:
        client, self._client = self._client, None
        transport = getattr(client, "transport", None)
        if transport is not None:
            transport.close()


def _kind(exc: Exception) -> str:
    """``"exists"``, ``"missing"``, ``"unknown"`` (maybe done, retry) or ``"failed"`` (will not pass).

    Raises:
        ImportError: ``exc`` itself, when it is one (a missing extra): that is no answer of Cloud Tasks.
    """
    if isinstance(exc, ImportError):
        raise exc
    ex = _exceptions()
    if isinstance(exc, ex.AlreadyExists):
        return "exists"
    if isinstance(exc, ex.NotFound):
        return "missing"
    if isinstance(exc, (ex.InvalidArgument, ex.PermissionDenied, ex.Unauthenticated, ex.FailedPrecondition,
                        ex.OutOfRange, ex.MethodNotImplemented)):
        return "failed"
    return "unknown"


class _OnQueue:
    """What the connector and the scheduler share: the queue they create tasks in."""

    _queue: _TasksQueue

    @property
    def queue_path(self) -> str:
        return self._queue.queue_path

    def close(self) -> None:
        """Close the client's channel."""
        self._queue.close()


class CloudTasksConnector(_OnQueue):
    """Delivers each effect as one Cloud Tasks HTTP task; Cloud Tasks then calls ``url`` until it succeeds.

    The task id is ``task_id_for(effect.key)``: a second dispatch of the same effect gets ``ALREADY_EXISTS``,
    which means the task was created before, so it is ``CONFIRMED``. The request body is the payload as
    JSON, with the headers ``Idempotency-Key`` (the effect key), ``Errands-Business-Key``,
    ``Errands-Run-Id`` and ``Errands-Connector``. ``effect.dispatch_at`` becomes the task's
    ``schedule_time``. With ``service_account`` Cloud Tasks adds a Google OIDC token for it (audience
    ``audience`` or, by default, the URL). ``observe`` asks ``get_task``.

    Args:
        project: the Google Cloud project id.
        location: the queue's location (``europe-west1``).
        queue: the queue id.
        url: the endpoint every task calls.
        service_account: the email Cloud Tasks signs OIDC tokens as.
        audience: the OIDC audience; default the URL.
        method: the HTTP method of the task.
        headers: extra request headers (never logged).
        timeout: seconds for each Cloud Tasks API call; longer → ``UNKNOWN``.
        client: a ready ``CloudTasksClient``.
        emulator_host: ``host:port`` of an emulator (default ``$CLOUD_TASKS_EMULATOR_HOST``).
        task_id_prefix: prepended to every task id.
        dispatch_deadline: how long Cloud Tasks waits for ``url`` to answer before it retries (seconds or a
            timedelta, 15 s to 30 min); None: Cloud Tasks' default of 10 minutes.

    Example:
        >>> wire = CloudTasksConnector("my-project", "europe-west1", "payments", "https://bank.example/wire")
        >>> outbox = Outbox(store, connectors={"bank.wire": wire})  # doctest: +SKIP
    """

    name: ClassVar[str] = "cloudtasks"
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(
        can_observe=True, can_compensate=False, default_semantics=Semantics.IDEMPOTENT
    )

    def __init__(
        self,
        project: str,
        location: str,
        queue: str,
        url: str,
        service_account: str | None = None,
        *,
        audience: str | None = None,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        client: Any = None,
        emulator_host: str | None = None,
        task_id_prefix: str = "",
        dispatch_deadline: float | timedelta | None = None,
    ) -> None:
        self.url = _check_url("url", url)
        self.dispatch_deadline = _check_deadline(dispatch_deadline)
        self.method = _check_method(method)
        if not isinstance(task_id_prefix, str) or any(not (c.isalnum() or c in "-_") for c in task_id_prefix):
            raise ConfigError(f"task_id_prefix may hold only letters, digits, '-' and '_', got {task_id_prefix!r}",
                              field="task_id_prefix", value=task_id_prefix)
        self.task_id_prefix = task_id_prefix
        self._queue = _TasksQueue(project, location, queue, client, emulator_host, timeout, service_account,
                                  audience, headers)

    def task_name(self, effect: Effect) -> str:
        """The full task name ``effect`` is delivered as."""
        return self._queue.task_path(task_id_for(effect.key, self.task_id_prefix))

    def dispatch(self, effect: Effect) -> DispatchResult:
        """Create the task of ``effect``.

        Returns:
            ``CONFIRMED`` (``external_ref`` = the task name) when the task was created now or before
            (``ALREADY_EXISTS``); ``UNKNOWN`` on a timeout or a retryable error; ``FAILED`` when Cloud Tasks
            refuses (no such queue, permission denied, invalid task).
        """
        try:
            body = json.dumps(effect.payload, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"effect {effect.key!r}: payload is not JSON-serialisable: {exc}",
                               field="payload") from exc
        headers = {"Content-Type": "application/json", "Idempotency-Key": effect.key,
                   "Errands-Connector": effect.connector}
        if effect.business_key:
            headers["Errands-Business-Key"] = effect.business_key
        if effect.run_id:
            headers["Errands-Run-Id"] = effect.run_id
        telemetry.inject(headers)
        at = _as_datetime(effect.dispatch_at) if effect.dispatch_at is not None else None
        name = self.task_name(effect)
        try:
            request = self._queue.http_request(self.method, self.url, body, headers)
            task = self._queue.create(task_id_for(effect.key, self.task_id_prefix), request, at,
                                      self.dispatch_deadline)
        except Exception as exc:
            kind = _kind(exc)
            error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            if kind == "exists":
                return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=name,
                                      response={"task": name, "already_existed": True})
            if kind in ("failed", "missing"):
                return DispatchResult(outcome=DispatchOutcome.FAILED, external_ref=name, error=error)
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, external_ref=name, error=error)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=task.name,
                              response={"task": task.name, "already_existed": False})

    def observe(self, effect: Effect) -> Observation:
        """Whether the task of ``effect`` is in the queue.

        Returns:
            ``CONFIRMED`` when Cloud Tasks holds the task; ``ABSENT`` when it does not (never created, or
            already run and removed: a re-dispatch is then refused by name with ``ALREADY_EXISTS`` while
            Cloud Tasks remembers it); ``UNKNOWN`` when Cloud Tasks could not be asked.
        """
        name = self.task_name(effect)
        try:
            task = self._queue.client().get_task(name=name, timeout=self._queue.timeout, retry=None)
        except Exception as exc:
            if _kind(exc) == "missing":
                return Observation(outcome=ObservationOutcome.ABSENT, external_ref=name)
            return Observation(outcome=ObservationOutcome.UNKNOWN, external_ref=name,
                               response={"error": f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"})
        return Observation(outcome=ObservationOutcome.CONFIRMED, external_ref=task.name,
                           response={"task": task.name, "dispatch_count": int(task.dispatch_count)})


class CloudTasksScheduler(_OnQueue):
    """Core's ``Scheduler`` on Cloud Tasks: each timer is an HTTP task that calls a service back at ``at``.

    Where a timer's task goes:

    * a payload mapping with a ``"url"`` (lro's ``resume_via_tasks`` gives
      ``{host}{prefix}{path}?operation={name}&token=…``): that URL, with an empty body — the alis shape
      ``PUT {host}{prefix}{path}?operation={name}``;
    * otherwise ``{host}{prefix}{topic}``: with ``payload_as="query"`` a flat payload mapping becomes the
      query string, with ``payload_as="json"`` the payload is the JSON body.

    The task id is ``task_id_for(key)``, so scheduling the same key again changes nothing, and
    ``cancel(key)`` deletes the task. With ``service_account`` Cloud Tasks adds a Google OIDC token whose
    audience is ``audience``, by default the target's origin (``https://svc.example``), which is what lro's
    callback check expects. Each task carries ``dispatch_deadline`` (30 minutes, the most Cloud Tasks allows,
    by default), so a callback whose handler runs long is not delivered again while it still runs.

    Args:
        project: the Google Cloud project id.
        location: the queue's location.
        queue: the queue id (lro: ``{neuron}-operations``).
        host: the base URL for timers whose payload has no ``"url"``.
        prefix: the path those callbacks are served under.
        method: the HTTP method of the callbacks (``PUT``, as lro's callback app expects).
        payload_as: ``"query"`` or ``"json"``.
        service_account: the email Cloud Tasks signs OIDC tokens as.
        audience: the OIDC audience; default the target URL's origin.
        headers: extra request headers (never logged).
        timeout: seconds for each Cloud Tasks API call.
        client: a ready ``CloudTasksClient``.
        emulator_host: ``host:port`` of an emulator (default ``$CLOUD_TASKS_EMULATOR_HOST``).
        dispatch_deadline: how long Cloud Tasks waits for a callback's answer before it delivers it again
            (seconds or a timedelta, 15 s to 30 min; None: Cloud Tasks' default of 10 minutes).

    Example:
        >>> scheduler = CloudTasksScheduler("my-project", "europe-west1", "svc-operations",
        ...                                 service_account="alis-build@my-project.iam.gserviceaccount.com")
        >>> client = LroClient(Config(neuron="svc", host="https://svc.example", scheduler=scheduler))  # doctest: +SKIP
    """

    name: ClassVar[str] = "cloudtasks"

    def __init__(
        self,
        project: str,
        location: str,
        queue: str,
        host: str | None = None,
        prefix: str = "/",
        *,
        method: str = "PUT",
        payload_as: str = "query",
        service_account: str | None = None,
        audience: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        client: Any = None,
        emulator_host: str | None = None,
        dispatch_deadline: float | timedelta | None = MAX_DISPATCH_DEADLINE,
    ) -> None:
        self.host = _check_url("host", host).rstrip("/") if host is not None else None
        self.dispatch_deadline = _check_deadline(dispatch_deadline)
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError(f"prefix must be a path starting with '/', got {prefix!r}", field="prefix",
                              value=prefix)
        self.prefix = prefix
        self.method = _check_method(method)
        if payload_as not in ("query", "json"):
            raise ConfigError(f"payload_as must be 'query' or 'json', got {payload_as!r}", field="payload_as",
                              value=payload_as)
        self.payload_as = payload_as
        self._queue = _TasksQueue(project, location, queue, client, emulator_host, timeout, service_account,
                                  audience, headers)

    def url_for(self, topic: str, payload: Any) -> str:
        """The callback URL of a timer.

        Raises:
            ConfigError: the payload has no ``"url"`` and the scheduler no ``host``.
            PayloadError: a query payload that is not a flat mapping.
        """
        if isinstance(payload, Mapping) and "url" in payload:
            return _check_url("payload.url", payload["url"])
        if self.host is None:
            raise ConfigError(
                f"timer {topic!r} has no 'url' in its payload and the scheduler no host; pass "
                f"CloudTasksScheduler(..., host='https://svc.example')", field="host", value=None,
            )
        path = topic.lstrip("/") if self.prefix.endswith("/") else topic
        url = f"{self.host}{self.prefix}{path}"
        if self.payload_as == "query" and payload:
            url += "?" + urlencode(self._query(payload))
        return url

    @staticmethod
    def _query(payload: Any) -> dict[str, str]:
        if not isinstance(payload, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
            for k, v in payload.items()
        ):
            raise PayloadError(
                f"with payload_as='query' the payload must be a flat mapping of strings or numbers, got "
                f"{payload!r}; use payload_as='json' for other payloads", field="payload",
            )
        return {k: str(v) for k, v in payload.items()}

    def schedule(self, topic: str, payload: Any, at: datetime | float, key: str | None = None) -> str:
        """Create the callback task of a timer.

        Args:
            topic: the path under ``prefix`` to call, unless the payload carries a ``"url"``.
            payload: a mapping with ``"url"``; else the query parameters (``payload_as="query"``) or the
                JSON body (``payload_as="json"``).
            at: when, as an aware datetime or epoch seconds.
            key: makes scheduling idempotent; default a fresh id.

        Returns:
            The timer key; scheduling an existing key again changes nothing.

        Raises:
            TransientError: Cloud Tasks could not be reached or timed out; try again (same key is safe).
            PermanentError: Cloud Tasks refused (no such queue, permission denied).
        """
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"topic must be a non-empty string, got {topic!r}", field="topic", value=topic)
        key = key or uuid.uuid4().hex
        when = _as_datetime(at)
        url = self.url_for(topic, payload)
        headers = telemetry.inject({"Errands-Timer-Key": key})
        body = b""
        if self.payload_as == "json":
            try:
                body = json.dumps(payload, separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:
                raise PayloadError(f"timer payload is not JSON-serialisable: {exc}", field="payload") from exc
            headers["Content-Type"] = "application/json"
        audience = self._queue.audience
        if audience is None and self._queue.service_account:
            parts = urlsplit(url)
            audience = f"{parts.scheme}://{parts.netloc}"
        try:
            request = self._queue.http_request(self.method, url, body, headers, audience=audience)
            self._queue.create(task_id_for(key), request, when, self.dispatch_deadline)
        except Exception as exc:
            kind = _kind(exc)
            if kind == "exists":
                return key
            message = (f"scheduling {topic!r} on {self.queue_path} failed: {type(exc).__name__}: "
                       f"{getattr(exc, 'message', exc)}")
            if kind in ("failed", "missing"):
                raise PermanentError(message) from exc
            raise TransientError(message) from exc
        return key

    def cancel(self, key: str) -> bool:
        """Delete the timer's task; whether it was still pending."""
        try:
            self._queue.client().delete_task(name=self._queue.task_path(task_id_for(key)),
                                             timeout=self._queue.timeout, retry=None)
        except Exception as exc:
            if _kind(exc) == "missing":
                return False
            raise TransientError(f"cancelling timer on {self.queue_path} failed: {type(exc).__name__}") from exc
        return True
