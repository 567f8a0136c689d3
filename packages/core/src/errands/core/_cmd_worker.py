"""``errands worker``: run every engine until stopped, from an ``errands.App`` (``--app module:app``) or
from ``errands.toml`` (its connectors and sinks)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import telemetry
from .errors import ConfigError

_WORKER_KEYS = {"max_in_flight": int, "poll_interval": float, "lease_for": float, "batch_size": int,
                "max_attempts": int, "max_observations": int, "payload_limit": int}
_WORKER_OPTIONS = ("max_in_flight", "poll_interval")


def _options(config_worker: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The ``[worker]`` table of the config, checked, with the command line's flags over it."""
    options: dict[str, Any] = {}
    for key, value in config_worker.items():
        kind = _WORKER_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"worker.{key}: unknown option; known: {', '.join(sorted(_WORKER_KEYS))}",
                              field=f"worker.{key}", value=value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"worker.{key} must be a number, got {value!r}", field=f"worker.{key}", value=value)
        options[key] = kind(value)
    for key in _WORKER_KEYS:
        cli_value = getattr(args, key, None)
        if cli_value is not None:
            options[key] = cli_value
    return options


def _app_of(args: argparse.Namespace) -> Any:
    from ._app import App, load_app

    if args.app:
        app = load_app(args.app)
        options = _options({}, args)
        app.max_in_flight = options.pop("max_in_flight", app.max_in_flight)
        app.poll_interval = options.pop("poll_interval", app.poll_interval)
        app.outbox_options.update(options)
        return app
    from .cli import read_config_table

    raw = read_config_table(args.config)  # read once: the app names and builds its parts from this table
    options = _options(dict(raw.get("worker", {}) or {}), args)
    return App(args.store, config=raw, max_in_flight=options.pop("max_in_flight", 16),
               poll_interval=options.pop("poll_interval", 0.2), outbox_options=options)


def _cmd_worker(args: argparse.Namespace) -> int:
    telemetry.configure_logging(logging.INFO if args.verbose else logging.WARNING, sys.stderr)
    app = _app_of(args)
    try:
        worker = app.worker()
        if args.drain:
            try:
                done = worker.drain()
            finally:
                worker.close()
            print(f"drained: {done} items")
        else:
            outbox = worker.outbox
            sys.stderr.write(f"errands worker on {app.store.redacted_url}: {len(outbox.connectors)} connectors, "
                             f"{len(worker.fanout.routes) if worker.fanout else 0} sinks; SIGTERM or Ctrl-C stops "
                             "it cleanly\n")
            worker.run()  # closes the engines and its call runner when it stops
            sys.stderr.write("errands worker stopped\n")
    finally:
        app.close()
    return 0


def register(sub: Any) -> None:
    """Add ``errands worker``."""
    p = sub.add_parser("worker", help="dispatch, reconcile, compensate, fan out, run tasks and fire timers "
                                      "until stopped")
    p.add_argument("--app", default=None, metavar="MODULE:APP",
                   help="an errands.App to run (package.module:app); without it, the config's connectors and sinks")
    p.add_argument("--config", default="errands.toml", help="the errands.toml (default: ./errands.toml)")
    p.add_argument("--store", default=None, help="override the config's store URL")
    p.add_argument("--max-in-flight", dest="max_in_flight", type=int, default=None)
    p.add_argument("--poll-interval", dest="poll_interval", type=float, default=None)
    p.add_argument("--lease-for", dest="lease_for", type=float, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--drain", action="store_true", help="work until nothing is due, then exit")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_cmd_worker)
