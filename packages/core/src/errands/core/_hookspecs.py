"""Hook specifications of the ``errands`` pluggy project.

Hooks register classes; they never run on the hot path. Each registered class has ``name: ClassVar[str]``.

The functions below are specifications only: pluggy reads their names and signatures and calls each
plugin's implementation, never these bodies (hence ``raise NotImplementedError``).
"""

from __future__ import annotations

import argparse
from typing import Any

import pluggy

from ._protocols import Connector, Scheduler, Sink

hookspec = pluggy.HookspecMarker("errands")
hookimpl = pluggy.HookimplMarker("errands")


@hookspec
def errands_register_connectors() -> list[type[Connector]]:
    """Connector classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute (the ``type`` used in ``errands.toml``).
    """
    raise NotImplementedError


@hookspec
def errands_register_sinks() -> list[type[Sink]]:
    """Sink classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute.
    """
    raise NotImplementedError


@hookspec
def errands_register_stores() -> list[type]:
    """Store classes this plugin provides.

    They are of more than one kind (a store of the shared tables, a store of lro operations), so no one
    protocol describes them: ``open_store`` builds the class a URL's scheme names as ``cls(url, clock=...,
    **options)``.

    Returns:
        Classes with ``name`` and ``schemes`` (URL schemes they open) class attributes.
    """
    raise NotImplementedError


@hookspec
def errands_register_schedulers() -> list[type[Scheduler]]:
    """Scheduler classes this plugin provides.

    Returns:
        Classes with a ``name`` class attribute.
    """
    raise NotImplementedError


@hookspec
def errands_register_cli(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add sub-commands to the ``errands`` command line.

    Args:
        group: the ``argparse`` sub-parsers action; call ``group.add_parser(...)`` and set
            ``func=callable(args) -> int`` with ``set_defaults``.
    """


@hookspec
def errands_register_demos() -> list[type]:
    """Parts of ``errands demo`` this plugin adds.

    Returns:
        Classes with ``name`` and ``order`` class attributes and ``run(self, ctx: DemoContext) ->
        dict[str, object]`` returning summary figures.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def errands_console_app(app: Any, options: dict[str, Any]) -> Any:
    """The web console over ``app`` (an ``errands.App``), an ASGI application to mount at a prefix; what
    ``App.console(**options)`` returns. errands-console implements it.

    Args:
        app: the ``errands.App`` whose store the console reads.
        options: the keyword arguments given to ``App.console``.
    """
