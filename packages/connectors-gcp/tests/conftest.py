from __future__ import annotations

from emissary.connectors.gcp.testing import (  # noqa: F401
    pubsub_emulator,
    spanner_database,
    spanner_emulator,
    tasks_emulator,
)
