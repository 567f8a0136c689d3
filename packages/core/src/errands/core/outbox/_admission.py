"""Admission: what makes an effect acceptable, and the row it is stored as.

Everything is checked before anything is written, so that a refused effect leaves no trace. The checks that
need a connector's capabilities run where its instance is known: at submit in an outbox that holds it, else in
the worker before the first dispatch (``safety_net_problem``).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping

from .._values import ConnectorCapabilities, Effect, EffectStatus, Semantics
from ..errors import ConfigError, EffectConflictError
from ..store import as_epoch, dumps, loads
from ._records import EffectRecord, NewEffect
from ._transitions import admitted_status, first_due

DEFAULT_PAYLOAD_LIMIT = 1024 * 1024
MAX_KEY_LENGTH = 512

#: The capabilities of a connector, by name, at admission: raises ``ConfigError`` for a name not known here;
#: None for a connector known by name only (its capabilities are checked by the worker).
Capabilities = Callable[[str], "ConnectorCapabilities | None"]


def check_str(field_name: str, value: Any, *, optional: bool = False, allow_empty: bool = False) -> None:
    """Raise the ``ConfigError`` naming ``field_name`` unless ``value`` is a (non-empty) string (or None)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or (not allow_empty and not value):
        what = "a string" if allow_empty else "a non-empty string"
        raise ConfigError(
            f"{field_name} must be {what}{' or None' if optional else ''}, got {value!r}",
            field=field_name, value=value,
        )


def _check_fields(effect: Any) -> None:
    """Raise the specific ``ConfigError`` for the first malformed field of ``effect``."""
    if not isinstance(effect, Effect):
        raise ConfigError(f"effect must be an errands.core.Effect, got {type(effect).__name__}",
                          field="effect", value=type(effect).__name__)
    check_str("effect.key", effect.key)
    if len(effect.key) > MAX_KEY_LENGTH:
        raise ConfigError(f"effect.key is {len(effect.key)} characters; the limit is {MAX_KEY_LENGTH}",
                          field="effect.key", value=effect.key[:40] + "...")
    check_str("effect.connector", effect.connector)
    check_str("effect.tool", effect.tool, allow_empty=True)
    check_str("effect.business_key", effect.business_key, optional=True)
    check_str("effect.run_id", effect.run_id, optional=True)
    try:
        Semantics(effect.semantics)
    except ValueError:
        raise ConfigError(
            f"effect.semantics must be one of {', '.join(s.value for s in Semantics)}, got {effect.semantics!r}",
            field="effect.semantics", value=effect.semantics,
        ) from None
    if not isinstance(effect.human_gate, bool):
        raise ConfigError(f"effect.human_gate must be True or False, got {effect.human_gate!r}",
                          field="effect.human_gate", value=effect.human_gate)
    if not isinstance(effect.metadata, Mapping):
        raise ConfigError(f"effect.metadata must be a mapping, got {type(effect.metadata).__name__}",
                          field="effect.metadata", value=type(effect.metadata).__name__)


def _plainly_valid(effect: Any) -> bool:
    """Whether ``effect`` has the common shape, which one cheap test accepts; anything else goes through the
    field-by-field checks, which raise the specific error (or accept, e.g. ``str`` subclasses)."""
    return (
        type(effect) is Effect and type(effect.key) is str and 0 < len(effect.key) <= MAX_KEY_LENGTH
        and type(effect.connector) is str and bool(effect.connector) and type(effect.tool) is str
        and (effect.business_key is None or (type(effect.business_key) is str and bool(effect.business_key)))
        and (effect.run_id is None or (type(effect.run_id) is str and bool(effect.run_id)))
        and type(effect.semantics) is Semantics and type(effect.human_gate) is bool
        and type(effect.metadata) is dict
    )


def safety_net_problem(effect: Effect, caps: ConnectorCapabilities, compensators: Collection[str], *,
                       human_gate: bool) -> str | None:
    """Why a ``NON_IDEMPOTENT`` effect may not go (None: it may). It needs a safety net, since a lost answer is
    never followed by a blind resend: a connector that can observe or compensate, a ``business_key``, a human
    gate, or a compensator registered for its tool or connector."""
    if effect.semantics is not Semantics.NON_IDEMPOTENT or (
        caps.can_observe or caps.can_compensate or effect.business_key or human_gate
        or (effect.tool and effect.tool in compensators) or effect.connector in compensators
    ):
        return None
    return (f"effect {effect.key!r} is NON_IDEMPOTENT but has no safety net: connector {effect.connector!r} cannot "
            "observe or compensate; give it a business_key, human_gate=True, or register a compensator for its tool")


# The semantics whose admission depends on what the connector can do.
_NEEDS_CAPABILITIES = (Semantics.NON_IDEMPOTENT, Semantics.OBSERVE_ONLY)


def _check_capabilities(effect: Effect, caps: ConnectorCapabilities, compensators: Collection[str]) -> None:
    problem = safety_net_problem(effect, caps, compensators, human_gate=effect.human_gate)
    if problem is not None:
        raise ConfigError(problem, field="effect.semantics", value=str(effect.semantics))
    if effect.semantics is Semantics.OBSERVE_ONLY and not caps.can_observe:
        raise ConfigError(
            f"effect {effect.key!r} is OBSERVE_ONLY but connector {effect.connector!r} cannot observe",
            field="effect.semantics", value=str(effect.semantics),
        )


def admit(effect: Any, now: float, *, max_attempts: int, payload_limit: int, capabilities: Capabilities | None,
          compensators: Collection[str] = (), metadata: Mapping[str, Any] | None = None) -> NewEffect:
    """Check ``effect`` and build its row, due from ``now`` (or its ``dispatch_at``). ``metadata``: what the row
    stores instead of ``effect.metadata`` (that metadata with the trace context, ``telemetry.with_trace``).

    ``capabilities`` None: an inline run, which calls no connector (its status is ``DISPATCHING``, and a
    ``NON_IDEMPOTENT`` effect is refused: an unknown outcome must be observed before any retry).

    Raises:
        ConfigError: a malformed field, a connector not known here, no safety net for ``NON_IDEMPOTENT``.
        PayloadError: the payload or metadata is not JSON, or over ``payload_limit``.
    """
    if not _plainly_valid(effect):
        _check_fields(effect)
    semantics = effect.semantics if type(effect.semantics) is Semantics else Semantics(effect.semantics)
    attempts = max_attempts if effect.max_attempts is None else effect.max_attempts
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ConfigError(f"effect.max_attempts must be an integer >= 1, got {effect.max_attempts!r}",
                          field="effect.max_attempts", value=effect.max_attempts)
    if effect.dispatch_at is None:
        not_before = now
    else:
        try:
            not_before = as_epoch(effect.dispatch_at, now)
        except ConfigError as exc:
            raise ConfigError(f"effect.dispatch_at: {exc}", field="effect.dispatch_at",
                              value=effect.dispatch_at) from None
    payload = dumps(effect.payload, field="effect.payload", limit=payload_limit)
    if metadata is None:
        metadata = effect.metadata
    stored_metadata = dumps(dict(metadata), field="effect.metadata", limit=payload_limit) if metadata else None
    if capabilities is None:
        if semantics is Semantics.NON_IDEMPOTENT:
            raise ConfigError(
                f"effect {effect.key!r} is NON_IDEMPOTENT and cannot run inline: an unknown outcome must be "
                "observed before any retry; submit it and let the worker dispatch it",
                field="effect.semantics", value=str(semantics),
            )
        status = EffectStatus.DISPATCHING
    else:
        caps = capabilities(effect.connector)
        if caps is not None and semantics in _NEEDS_CAPABILITIES:
            _check_capabilities(effect, caps, compensators)
        status = admitted_status(semantics, effect.human_gate)
    return NewEffect(
        effect.key, effect.connector, effect.tool, payload, effect.business_key, semantics.value, effect.run_id,
        stored_metadata, int(effect.human_gate), not_before, status.value, attempts, first_due(status, not_before, now),
        now, now,
    )


def check_same(row: NewEffect, other: NewEffect | EffectRecord) -> None:
    """Raise ``EffectConflictError`` unless ``other`` (a row of the same key, or its stored record) is the same
    effect: the same connector, tool and payload as JSON values."""
    payload = loads(row.payload)
    other_payload = loads(other.payload) if isinstance(other, NewEffect) else other.payload
    if (row.connector, row.tool) != (other.connector, other.tool) or payload != other_payload:
        what = "payload" if payload != other_payload else "connector/tool"
        raise EffectConflictError(
            f"effect key {row.key!r} was submitted before with a different {what}; use a new key for a new effect",
            key=row.key,
        )


def distinct(rows: Iterable[NewEffect]) -> dict[str, NewEffect]:
    """The rows of a batch by key, each key once; a key repeated with another effect is a conflict."""
    by_key: dict[str, NewEffect] = {}
    for row in rows:
        seen = by_key.get(row.key)
        if seen is None:
            by_key[row.key] = row
        else:
            check_same(row, seen)
    return by_key
