"""What every ``errands`` sub-command shares, for core's commands and for the commands engine packages
add through ``errands_register_commands``: one store resolution, and one way to print tables and JSON.

Engines add their commands as groups of actions (``errands routes list``): ``add_command_group`` for the
group, ``add_store_command`` for each action that opens the store.

The store a command opens is, in this order: ``--store URL``; the ``store`` of the config named by
``--config`` (or of ``./errands.toml`` when it exists); ``$ERRANDS_STORE``; ``sqlite:///errands.db``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from ._console import Progress, print_json, print_table
from .errors import ConfigError

__all__ = ["DEFAULT_STORE", "Progress", "add_command_group", "add_store_command", "add_store_options", "config_path",
           "print_json", "print_table", "read_config_table", "resolve_store_url", "store_url"]

DEFAULT_STORE = "sqlite:///errands.db"


def add_store_options(parser: argparse.ArgumentParser, *, json: bool = True) -> None:
    """``--store``, ``--config`` (and ``--json``) with the one precedence this module states."""
    parser.add_argument("--store", default=None,
                        help=f"store URL (default: the config's store, $ERRANDS_STORE, or {DEFAULT_STORE})")
    parser.add_argument("--config", default=None,
                        help="an errands.toml: its store, connectors and names (default: ./errands.toml if present)")
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON")


def add_command_group(sub: Any, name: str, help: str, *, metavar: str = "COMMAND") -> Any:
    """A command whose sub-commands are its actions (``errands dead list``); one of them is required. Returns
    the set of sub-parsers to add the actions to (its choice lands in ``args.<name>_command``)."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", metavar=metavar, required=True)


def add_store_command(sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int],
                      **defaults: Any) -> argparse.ArgumentParser:
    """An action that opens the store: its parser, with ``--store``, ``--config`` and ``--json``, running
    ``func(args)`` (with ``defaults`` set on ``args``). Add the action's own arguments to the parser returned."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    add_store_options(parser)
    parser.set_defaults(func=func, **defaults)
    return parser


def config_path(args: argparse.Namespace) -> str | None:
    """The config a command reads: ``--config``, else ``./errands.toml`` when it exists."""
    path = getattr(args, "config", None)
    if path is None and os.path.exists("errands.toml"):
        path = "errands.toml"
    return path


def read_config_table(path: str) -> dict[str, Any]:
    """The parsed TOML of ``path``, without building any connector (for commands that only read)."""
    from ._plugins import read_config

    try:
        return read_config(path)[0]
    except OSError as exc:  # a missing file or bad TOML is a ConfigError already
        raise ConfigError(f"config {path!r} could not be read: {exc}", field="config", value=path) from exc


def resolve_store_url(explicit: str | None, config_store: str | None) -> str:
    """The one precedence of a store URL: the one given, the config's ``store``, ``$ERRANDS_STORE``, then
    ``DEFAULT_STORE``."""
    return explicit or config_store or os.environ.get("ERRANDS_STORE") or DEFAULT_STORE


def store_url(args: argparse.Namespace, *, config_store: str | None = None) -> str:
    """The store URL of a command: ``--store``, the config's ``store`` (``config_store`` when the caller
    has loaded the config already), ``$ERRANDS_STORE``, then ``DEFAULT_STORE``."""
    url = getattr(args, "store", None)
    if url:
        return str(url)
    if config_store is None:
        path = config_path(args)
        if path:
            value = read_config_table(path).get("store")
            config_store = value if isinstance(value, str) else None
    return resolve_store_url(None, config_store)
