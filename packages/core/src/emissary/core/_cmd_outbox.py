"""``emissary`` sub-commands of the outbox engine."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this engine's sub-commands."""
