"""``errands console``: serve the console over a store (``errands.core.cli`` resolves which)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from errands.core.cli import add_store_options, config_path, read_config_table, store_url


def _cmd_console(args: argparse.Namespace) -> int:
    import uvicorn

    from ._auth import Access, check_listen
    from ._web import console_app

    path = config_path(args)
    table: dict[str, Any] = read_config_table(path) if path else {}
    settings = dict(table.get("console") or {})
    access = Access.from_settings(settings)
    host = args.host or settings.get("host") or "127.0.0.1"
    port = args.port or int(settings.get("port") or 8080)
    check_listen(host, access)
    neurons = list(args.neuron or settings.get("neurons") or [])
    store = store_url(args, config_store=table.get("store") if isinstance(table.get("store"), str) else None)
    app = console_app(store, access=access, neurons=neurons)
    sys.stderr.write(f"errands console on http://{host}:{port}/ ({'open: loopback only' if access.open else 'auth on'})\n")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def register(group: Any) -> None:
    """Add ``errands console`` to the ``errands`` parser."""
    p = group.add_parser("console", help="serve the web console: effects, routes, tasks, operations, executions")
    add_store_options(p, json=False)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; another needs credentials)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--neuron", action="append", default=None, help="an lro service whose operations to list (repeatable)")
    p.set_defaults(func=_cmd_console)
