"""``Config`` for an ``LroClient`` and the alis environment variables of ``LroClient.from_env``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

from errands.core import DEFAULT_LEASE_FOR, ConfigError

__all__ = ["ENV_VARS", "GOOGLE_CERTS_URL", "Config", "config_from_env"]

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")

ENV_VARS = (
    "ALIS_OS_PROJECT",
    "ALIS_PROJECT_NR",
    "ALIS_REGION",
    "ALIS_MANAGED_SPANNER_PROJECT",
    "ALIS_MANAGED_SPANNER_INSTANCE",
    "ALIS_MANAGED_SPANNER_DB",
    "ALIS_RUN_HASH",
)

_NEURON = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_PREFIX = re.compile(r"^/([A-Za-z0-9._~-]+/)*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How an ``LroClient`` stores, schedules and authenticates.

    Args:
        neuron: the service name (``launchpad-v1``); names the queue and the table.
        store: a store URL (``sqlite:///ops.db``, ``memory://``, ``postgresql://...``, a plugin scheme such
            as ``spanner://...``), an open core store, or an ``OperationStore``.
        host: the public base URL of this service (``https://svc.example``). Callbacks go to
            ``{host}{prefix}{path}``; the OIDC audience defaults to it. None: the local scheduler resumes
            operations in-process, without HTTP.
        prefix: the path under which ``asgi_app``/``wsgi_app`` serve callbacks.
        scheduler: a core ``Scheduler``; None: core's ``StoreScheduler`` on the store.
        project: the Google Cloud project (``ALIS_OS_PROJECT``).
        project_number: the project number (``ALIS_PROJECT_NR``).
        region: the Cloud Run / Cloud Tasks region (``ALIS_REGION``).
        queue: the Cloud Tasks queue; default ``{neuron}-operations``.
        cloud_tasks_project: the project of the Cloud Tasks queue when it is not ``project`` (alis
            ``CloudTasksProject``).
        database_role: the Spanner fine-grained access control role of the store's sessions (alis
            ``DatabaseRole``); passed to a store URL's operation store.
        service_account: the account Cloud Tasks signs OIDC tokens as; default
            ``alis-build@{project}.iam.gserviceaccount.com`` when ``project`` is set.
        allow_unauthenticated: accept callbacks without credentials. Off by default.
        oidc_audience: the audience OIDC tokens must carry; default ``host``. None with no host: OIDC off.
        oidc_service_accounts: accepted token ``email`` claims (verified); default ``(service_account,)``
            (the alis ``alis-build@{project}...`` when only ``project`` is set). With none, OIDC tokens are
            refused, and a callback app for a remote scheduler refuses to start.
        oidc_certs_url: where Google's signing certificates are fetched.
        callback_secret: the HMAC key of the local scheduler's callbacks; default a random key kept in the
            store (so every process on the store shares it).
        ttl: how long an operation is kept after its last save (``purge_expired``).
        purge_every: seconds between the purges of expired operations a worker runs (``client.attach``).
        purge_batch: most operations one purge pass deletes.
        wait_initial: first poll interval of ``wait_operation``, seconds.
        wait_maximum: longest poll interval, seconds.
        wait_multiplier: growth of the poll interval.
        wait_default_timeout: ``wait_operation`` timeout when the caller gives none, seconds.
        lease_for: seconds a running callback holds its resume (and a fired local timer its timer) before
            another worker may take it over; renewed by a heartbeat while the handler runs.
        retry_delay: seconds before a failed local callback is retried.
        dispatch_deadline: seconds Cloud Tasks waits for a callback's answer before it delivers it again
            (``from_env``'s Cloud Tasks scheduler; 15 s to 30 min).
        http_timeout: seconds the local scheduler waits for a callback's HTTP response.
        resume_batch: with in-process resumes, run up to this many due handlers in one transaction (their
            saves and the timer acknowledgements commit together); 1 gives every handler its own.
    """

    neuron: str
    store: Any = "sqlite:///ops.db"
    host: str | None = None
    prefix: str = "/resume-operation/"
    scheduler: Any = None
    project: str | None = None
    project_number: str | None = None
    region: str | None = None
    spanner_project: str | None = None
    spanner_instance: str | None = None
    spanner_database: str | None = None
    queue: str | None = None
    cloud_tasks_project: str | None = None
    database_role: str | None = None
    service_account: str | None = None
    allow_unauthenticated: bool = False
    oidc_audience: str | None = None
    oidc_service_accounts: tuple[str, ...] | None = None
    oidc_certs_url: str = GOOGLE_CERTS_URL
    oidc_issuers: tuple[str, ...] = GOOGLE_ISSUERS
    callback_secret: str | None = field(default=None, repr=False)
    ttl: timedelta = timedelta(days=90)
    purge_every: float = 3600.0
    purge_batch: int = 1000
    wait_initial: float = 0.05
    wait_maximum: float = 1.0
    wait_multiplier: float = 1.5
    wait_default_timeout: float = 60.0
    lease_for: float = DEFAULT_LEASE_FOR
    retry_delay: float = 5.0
    dispatch_deadline: float = 1800.0
    http_timeout: float = 30.0
    resume_batch: int = 1

    def __post_init__(self) -> None:
        problems: list[tuple[str, Any, str]] = []
        if not isinstance(self.neuron, str) or not _NEURON.match(self.neuron):
            problems.append(("neuron", self.neuron, "lower-case letters, digits and '-', starting with a letter"))
        if self.host is not None and (
            not isinstance(self.host, str) or not re.match(r"^https?://[^/\s]+$", self.host.rstrip("/"))
        ):
            problems.append(("host", self.host, "an http(s) base URL such as 'https://svc.example'"))
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            problems.append(("prefix", self.prefix, "a path starting and ending with '/', e.g. '/resume-operation/'"))
        if self.ttl <= timedelta(0):
            problems.append(("ttl", self.ttl, "a positive timedelta"))
        for name in ("wait_initial", "wait_maximum", "wait_default_timeout", "lease_for", "http_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                problems.append((name, value, "a positive number of seconds"))
        if (isinstance(self.dispatch_deadline, bool) or not isinstance(self.dispatch_deadline, (int, float))
                or not 15 <= self.dispatch_deadline <= 1800):
            problems.append(("dispatch_deadline", self.dispatch_deadline, "seconds from 15 to 1800 (Cloud Tasks' range)"))
        if not isinstance(self.wait_multiplier, (int, float)) or self.wait_multiplier < 1:
            problems.append(("wait_multiplier", self.wait_multiplier, "a number >= 1"))
        if isinstance(self.purge_every, bool) or not isinstance(self.purge_every, (int, float)) or self.purge_every <= 0:
            problems.append(("purge_every", self.purge_every, "a positive number of seconds"))
        if isinstance(self.purge_batch, bool) or not isinstance(self.purge_batch, int) or not 1 <= self.purge_batch <= 10_000:
            problems.append(("purge_batch", self.purge_batch, "an integer from 1 to 10000"))
        for name in ("cloud_tasks_project", "database_role"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or "/" in value):
                problems.append((name, value, "a non-empty name without '/'"))
        if not isinstance(self.resume_batch, int) or self.resume_batch < 1:
            problems.append(("resume_batch", self.resume_batch, "an integer >= 1"))
        if self.callback_secret is not None and (not isinstance(self.callback_secret, str) or len(self.callback_secret) < 16):
            problems.append(("callback_secret", "<redacted>", "a string of at least 16 characters"))
        if problems:
            text = "; ".join(f"lro.{f} must be {fix}, got {v!r}" for f, v, fix in problems)
            raise ConfigError(text, field=f"lro.{problems[0][0]}", value=problems[0][1])

    @property
    def base_url(self) -> str | None:
        """``host`` without a trailing slash."""
        return self.host.rstrip("/") if self.host else None

    @property
    def queue_name(self) -> str:
        """The Cloud Tasks queue: ``queue`` or ``{neuron}-operations``."""
        return self.queue or f"{self.neuron}-operations"

    @property
    def tasks_project(self) -> str | None:
        """The project of the Cloud Tasks queue: ``cloud_tasks_project`` or ``project``."""
        return self.cloud_tasks_project or self.project

    @property
    def invoker_service_account(self) -> str | None:
        """``service_account`` or ``alis-build@{project}.iam.gserviceaccount.com``."""
        if self.service_account:
            return self.service_account
        return f"alis-build@{self.project}.iam.gserviceaccount.com" if self.project else None

    @property
    def spanner_table(self) -> str:
        """The Spanner table of this neuron: ``{project}_{neuron}_Operations``, hyphens as underscores."""
        project = self.project or self.spanner_project or "local"
        return f"{project}_{self.neuron}_Operations".replace("-", "_")

    @property
    def audience(self) -> str | None:
        return self.oidc_audience or self.base_url

    @property
    def accepted_service_accounts(self) -> tuple[str, ...]:
        if self.oidc_service_accounts is not None:
            return tuple(self.oidc_service_accounts)
        account = self.invoker_service_account
        return (account,) if account else ()


def config_from_env(neuron: str, host: str | None, env: Mapping[str, str], **overrides: Any) -> Config:
    """The alis configuration: see the table in the package README.

    * ``host`` defaults to ``https://{neuron}-{ALIS_PROJECT_NR}.{ALIS_REGION}.run.app`` when both are set,
      else to lro/v2's ``https://{neuron}-{ALIS_RUN_HASH}.run.app`` when ``ALIS_RUN_HASH`` is.
    * The store is ``spanner://projects/{p}/instances/{i}/databases/{d}`` when the three
      ``ALIS_MANAGED_SPANNER_*`` variables are set, else the embedded ``sqlite:///ops.db``.
    """
    project = env.get("ALIS_OS_PROJECT") or None
    number = env.get("ALIS_PROJECT_NR") or None
    region = env.get("ALIS_REGION") or None
    sp, si, sd = (env.get(k) or None for k in ENV_VARS[3:6])
    run_hash = env.get("ALIS_RUN_HASH") or None
    values: dict[str, Any] = {
        "neuron": neuron, "project": project, "project_number": number, "region": region,
        "spanner_project": sp, "spanner_instance": si, "spanner_database": sd,
    }
    if host is None and number and region:
        host = f"https://{neuron}-{number}.{region}.run.app"
    elif host is None and run_hash:
        host = f"https://{neuron}-{run_hash}.run.app"
    values["host"] = host
    if sp and si and sd:
        values["store"] = f"spanner://projects/{sp}/instances/{si}/databases/{sd}"
    values.update(overrides)
    return Config(**values)
