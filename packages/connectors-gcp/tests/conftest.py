from __future__ import annotations

from errands.connectors.gcp.testing import (  # noqa: F401
    pubsub_emulator,
    spanner_database,
    spanner_emulator,
    tasks_emulator,
)
