"""The ``errands`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ._console import print_json, print_table
from .errors import ErrandsError


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ._plugins import get_registry

    reg = get_registry()
    infos = [p.to_dict() for p in reg.plugins.values()]
    if args.json:
        print_json(infos)
        return 0
    print_table(
        ["plugin", "distribution", "version", "connectors", "sinks", "stores", "schedulers"],
        [
            [p["name"], p["distribution"] or "-", p["version"] or "-", ",".join(p["connectors"]) or "-",
             ",".join(p["sinks"]) or "-", ",".join(p["stores"]) or "-", ",".join(p["schedulers"]) or "-"]
            for p in infos
        ],
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(store_url=args.store, as_json=args.json, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    from .__about__ import __version__
    from ._plugins import get_registry

    parser = argparse.ArgumentParser(prog="errands", description="Durable side effects and long-running work.")
    parser.add_argument("--version", action="version", version=f"errands-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list discovered plugins and what they registered")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("demo", help="run every engine end to end on an embedded SQLite store")
    p.add_argument("--store", default=None, help="store URL (default: a temporary SQLite file)")
    p.add_argument("--size", type=int, default=2000, help="how many items each part works through")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_demo)

    from . import _commands

    _commands.register(sub)
    get_registry().cli_hook(group=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ErrandsError as exc:
        sys.stderr.write(f"errands: {type(exc).__name__}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
