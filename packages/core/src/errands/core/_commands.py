"""Sub-commands of the engines in errands-core. Each engine keeps its commands in its own module."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the core engines' sub-commands to the ``errands`` parser."""
    from . import _cmd_fanout, _cmd_outbox, _cmd_reactions, _cmd_tasks, _cmd_worker

    _cmd_outbox.register(sub)
    _cmd_fanout.register(sub)
    _cmd_reactions.register(sub)
    _cmd_worker.register(sub)
    _cmd_tasks.register(sub)
