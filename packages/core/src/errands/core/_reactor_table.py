"""What reactions keep in the store's key-value table, read for ``errands reactions list``: each reaction's
cursor (``reactor:<name>`` under ``CURSOR_NAMESPACE``, written by the reactor through the store) and its
definition (``<name>`` under ``DEFINITION_NAMESPACE``: pattern, predicate, key and options, as the last
process that ran it registered it). Its tasks are read through ``_tasks_table``.
"""

from __future__ import annotations

from typing import Any

from ._fanout_table import CURSOR_NAMESPACE
from .store import Tx, loads

#: The key-value namespace of reaction definitions.
DEFINITION_NAMESPACE = "reaction"

_CURSOR_PREFIX = "reactor:"


def cursors(tx: Tx) -> dict[str, int]:
    """Every reaction's cursor: name -> journal position."""
    rows = tx.query(f"SELECT key, value FROM em_kv WHERE namespace = ? AND key LIKE '{_CURSOR_PREFIX}%' ORDER BY key",
                    (CURSOR_NAMESPACE,))
    return {key[len(_CURSOR_PREFIX):]: int(loads(value)) for key, value in rows}


def definitions(tx: Tx) -> dict[str, dict[str, Any]]:
    """Every reaction's recorded definition: name -> options."""
    rows = tx.query("SELECT key, value FROM em_kv WHERE namespace = ? ORDER BY key", (DEFINITION_NAMESPACE,))
    return {key: loads(value) for key, value in rows}
