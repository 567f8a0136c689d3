"""``errands`` sub-commands of the outbox engine: ``effects``, ``obligations`` and ``worker``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .cli import add_store_options, config_path, print_json, print_table, store_url
from .errors import ConfigError


def _add_store_options(p: argparse.ArgumentParser) -> None:
    add_store_options(p, json=False)


def _open_outbox(args: argparse.Namespace) -> Any:
    from .outbox import Outbox
    from .store import open_store

    config = None
    path = config_path(args) if args.store is None or args.config else None
    if path:
        from ._plugins import load_config

        config = load_config(path)
    store = open_store(store_url(args, config_store=config.store if config else None))
    # Without a config the commands only read and decide; they dispatch nothing.
    return Outbox(store, connectors=None if config else {})


def _effect_row(rec: Any) -> list[Any]:
    return [rec.key, rec.connector + (f".{rec.tool}" if rec.tool else ""), rec.status.value,
            "yes" if rec.flagged else "", rec.attempts, rec.observations, rec.semantics.value,
            rec.run_id or "", (rec.error or "")[:60]]


_EFFECT_HEADERS = ["key", "connector.tool", "status", "flagged", "attempts", "observed", "semantics", "run", "error"]


def _cmd_list(args: argparse.Namespace) -> int:
    outbox = _open_outbox(args)
    try:
        recs = outbox.list(status=args.status, connector=args.connector, limit=args.limit,
                           flagged=True if args.flagged else None, run_id=args.run)
        if args.json:
            print_json([r.to_dict() for r in recs])
        else:
            print_table(_EFFECT_HEADERS, [_effect_row(r) for r in recs])
            stats = outbox.stats()
            counts = ", ".join(f"{k.lower()} {v}" for k, v in stats["effects"].items() if v)
            print(f"\n{counts or 'no effects'}; flagged {stats['flagged']}")
    finally:
        outbox.store.close()
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    outbox = _open_outbox(args)
    try:
        rec = outbox.get(args.key)
        history = outbox.history(args.key)
        obligations = outbox.obligations(effect_key=args.key)
        if args.json:
            out = rec.to_dict()
            out["history"] = [e.to_cloudevent() for e in history]
            out["obligations"] = [o.to_dict() for o in obligations]
            print_json(out)
            return 0
        for name, value in rec.to_dict().items():
            print(f"{name:>16}: {value}")
        print("\nhistory:")
        print_table(["time", "subject", "details"], [
            [e.time.isoformat(timespec="milliseconds"), e.subject,
             ", ".join(f"{k}={v}" for k, v in (e.data or {}).items() if k not in ("key", "connector", "tool"))]
            for e in history
        ])
        if obligations:
            print("\nobligations:")
            print_table(["id", "kind", "status", "attempts", "error"],
                        [[o.id, o.kind, o.status.value, o.attempts, o.error or ""] for o in obligations])
    finally:
        outbox.store.close()
    return 0


def _decide(args: argparse.Namespace) -> int:
    outbox = _open_outbox(args)
    try:
        if args.action == "approve":
            rec = outbox.approve(args.key, by=args.by)
        elif args.action == "reject":
            rec = outbox.reject(args.key, reason=args.reason, by=args.by)
        else:
            rec = outbox.redrive(args.key)
        if args.json:
            print_json(rec.to_dict())
        else:
            print(f"{rec.key}: {rec.status.value}")
    finally:
        outbox.store.close()
    return 0


def _cmd_obligations(args: argparse.Namespace) -> int:
    outbox = _open_outbox(args)
    try:
        recs = outbox.obligations(status=args.status, effect_key=args.effect, run_id=args.run, limit=args.limit)
        if args.json:
            print_json([o.to_dict() for o in recs])
        else:
            print_table(["id", "effect", "kind", "status", "attempts", "run", "compensator", "error"], [
                [o.id, o.effect_key, o.kind, o.status.value, o.attempts, o.run_id or "", o.compensator or "",
                 (o.error or "")[:60]]
                for o in recs
            ])
    finally:
        outbox.store.close()
    return 0


_WORKER_KEYS = {"max_in_flight": int, "poll_interval": float, "lease_for": float, "batch_size": int,
                "max_attempts": int, "max_observations": int, "payload_limit": int}


def _cmd_worker(args: argparse.Namespace) -> int:
    from ._plugins import load_config
    from ._worker import Worker
    from .outbox import Outbox
    from .store._stores import open_store

    config = load_config(args.config)
    options: dict[str, Any] = {}
    for key, value in config.worker.items():
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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    store = open_store(args.store or config.store)
    max_in_flight = options.pop("max_in_flight", 16)
    poll_interval = options.pop("poll_interval", 0.2)
    outbox = Outbox(store, max_in_flight=max_in_flight, **options)
    fanout = None
    if config.sinks:
        from ._fanout import FanOut

        fanout = FanOut.from_config(store, config)
    worker = Worker(store, outbox=outbox, fanout=fanout, poll_interval=poll_interval, max_in_flight=max_in_flight)
    try:
        if args.drain:
            try:
                done = worker.drain()
            finally:
                for part in (outbox, fanout):
                    close = getattr(part, "close", None)
                    if callable(close):
                        close()
                worker.runner.close()
            print(f"drained: {done} items")
        else:
            sys.stderr.write(f"errands worker on {store.redacted_url}: {len(outbox.connectors)} connectors, "
                             f"{len(config.sinks)} sinks; SIGTERM or Ctrl-C stops it cleanly\n")
            worker.run()  # closes the engines and its call runner when it stops
            sys.stderr.write("errands worker stopped\n")
    finally:
        store.close()
    return 0


def register(sub: Any) -> None:
    """Add this engine's sub-commands."""
    effects = sub.add_parser("effects", help="list, inspect, approve, reject and redrive effects")
    esub = effects.add_subparsers(dest="effects_command", metavar="ACTION", required=True)

    p = esub.add_parser("list", help="effects, oldest first")
    _add_store_options(p)
    p.add_argument("--status", default=None, help="AWAITING_APPROVAL, PENDING, DISPATCHING, CONFIRMED, FAILED, "
                                                  "UNKNOWN or CANCELLED (FAILED is the dead-letter view)")
    p.add_argument("--connector", default=None)
    p.add_argument("--run", default=None, help="only effects of this run id")
    p.add_argument("--flagged", action="store_true", help="only effects flagged for a human")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_list)

    p = esub.add_parser("show", help="one effect, its journal history and obligations")
    _add_store_options(p)
    p.add_argument("key")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_show)

    for action, text in (("approve", "let a human-gated effect go"),
                         ("reject", "refuse a human-gated effect (it becomes CANCELLED)"),
                         ("redrive", "queue a FAILED, CANCELLED or flagged effect again")):
        p = esub.add_parser(action, help=text)
        _add_store_options(p)
        p.add_argument("key")
        if action != "redrive":
            p.add_argument("--by", default=None, help="who decided (recorded in the journal)")
        if action == "reject":
            p.add_argument("--reason", default=None)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=_decide, action=action, by=None, reason=None)

    obligations = sub.add_parser("obligations", help="compensations owed")
    osub = obligations.add_subparsers(dest="obligations_command", metavar="ACTION", required=True)
    p = osub.add_parser("list", help="obligations, oldest first")
    _add_store_options(p)
    p.add_argument("--status", default=None, help="REGISTERED, PENDING, COMPENSATING, COMPENSATED or STUCK")
    p.add_argument("--effect", default=None, help="only obligations of this effect key")
    p.add_argument("--run", default=None, help="only obligations of this run id")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_obligations)

    p = sub.add_parser("worker", help="dispatch, reconcile, compensate, fan out and fire timers until stopped")
    p.add_argument("--config", default="errands.toml", help="the errands.toml (default: ./errands.toml)")
    p.add_argument("--store", default=None, help="override the config's store URL")
    p.add_argument("--max-in-flight", dest="max_in_flight", type=int, default=None)
    p.add_argument("--poll-interval", dest="poll_interval", type=float, default=None)
    p.add_argument("--lease-for", dest="lease_for", type=float, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--drain", action="store_true", help="work until nothing is due, then exit")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_cmd_worker)
