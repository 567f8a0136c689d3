"""The outbox engine: durable effects with leases, retries, observe-then-retry, compensation and human gates.

Every state change of an effect or an obligation and its journal event (``effect.<status>.<connector>.<tool>`` on
the stream ``effects/<connector>``, ``obligation.<status>.<kind>`` on ``obligations/<kind>``) commit in one
transaction. Claims are batch ``UPDATE ... RETURNING`` statements that bump a fencing token; completions of a
whole batch commit once, and a completion whose token is stale changes nothing.

The package is an orchestration over pure decisions: ``_transitions`` decides (state and answer in, new state and
events out), ``_admission`` checks what is submitted, ``_effect_table`` and ``_obligation_table`` hold the only
SQL of the outbox's two tables, ``_dispatch``, ``_inline`` and ``_obligations`` run the steps, ``_queries`` the
read models, and ``Outbox`` (``_engine``) hands each call to its part.

``connector_names(errands.toml)`` reads the names of the configured connectors without building them: an
API process submits through ``Outbox(store, connectors=connector_names(path))`` and holds no connector secrets.
"""

from __future__ import annotations

from .._plugins import connector_names
from ._engine import Outbox
from ._records import EffectOutcome, EffectRecord, ObligationOutcome, ObligationRecord, ObligationStatus

__all__ = [
    "EffectOutcome",
    "EffectRecord",
    "ObligationOutcome",
    "ObligationRecord",
    "ObligationStatus",
    "Outbox",
    "connector_names",
]
