"""Hook specifications of the ``errands`` pluggy project.

Hooks register classes; they never run on the hot path. Each registered class has ``name: ClassVar[str]``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("errands")
hookimpl = pluggy.HookimplMarker("errands")


@hookspec
def errands_register_connectors() -> list[type]:  # type: ignore[empty-body]
    """Connector classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute (the ``type`` used in ``errands.toml``).
    """


@hookspec
def errands_register_sinks() -> list[type]:  # type: ignore[empty-body]
    """Sink classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute.
    """


@hookspec
def errands_register_stores() -> list[type]:  # type: ignore[empty-body]
    """Store classes this plugin provides.

    Returns:
        Classes with ``name`` and ``schemes`` (URL schemes they open) class attributes.
    """


@hookspec
def errands_register_schedulers() -> list[type]:  # type: ignore[empty-body]
    """Scheduler classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute.
    """


@hookspec
def errands_register_cli(group: Any) -> None:
    """Add sub-commands to the ``errands`` command line.

    Args:
        group: the ``argparse`` sub-parsers action; call ``group.add_parser(...)`` and set
            ``func=callable(args) -> int`` with ``set_defaults``.
    """


@hookspec
def errands_register_demos() -> list[type]:  # type: ignore[empty-body]
    """Parts of ``errands demo`` this plugin adds.

    Returns:
        Classes with ``name`` and ``order`` class attributes and ``run(self, ctx: DemoContext) ->
        dict[str, object]`` returning summary figures.
    """
