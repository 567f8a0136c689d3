"""Sub-commands of the engines in emissary-core (effects, obligations, events, dead, worker)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the core engines' sub-commands to the ``emissary`` parser."""
