"""``errands`` sub-commands of the outbox engine: ``effects`` and ``obligations``, and ``timers`` (the store's
timer queue)."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, Iterator

from .cli import add_command_group, add_store_command, config_path, print_json, print_table, store_url
from .errors import ConfigError


@contextlib.contextmanager
def _open_outbox(args: argparse.Namespace) -> Iterator[Any]:
    """The outbox a command works on, its store closed when the command is done."""
    from .outbox import Outbox
    from .store import open_store

    config = None
    path = config_path(args) if args.store is None or args.config else None
    if path:
        from ._plugins import load_config

        config = load_config(path)
    store = open_store(store_url(args, config_store=config.store if config else None))
    try:
        # Without a config the commands only read and decide; they dispatch nothing.
        yield Outbox(store, connectors=None if config else {})
    finally:
        store.close()


def _effect_row(rec: Any) -> list[Any]:
    return [rec.key, rec.connector + (f".{rec.tool}" if rec.tool else ""), rec.status.value,
            "yes" if rec.flagged else "", rec.attempts, rec.observations, rec.semantics.value,
            rec.run_id or "", (rec.error or "")[:60]]


_EFFECT_HEADERS = ["key", "connector.tool", "status", "flagged", "attempts", "observed", "semantics", "run", "error"]


def _cmd_list(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        recs = outbox.list(status=args.status, connector=args.connector, limit=args.limit,
                           flagged=True if args.flagged else None, run_id=args.run)
        if args.json:
            print_json([r.to_dict() for r in recs])
        else:
            print_table(_EFFECT_HEADERS, [_effect_row(r) for r in recs])
            stats = outbox.stats()
            counts = ", ".join(f"{k.lower()} {v}" for k, v in stats["effects"].items() if v)
            print(f"\n{counts or 'no effects'}; flagged {stats['flagged']}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
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
    return 0


def _json_option(option: str, text: str | None) -> Any:
    """The JSON value of ``option`` (None when it is not given)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{option} must be JSON, got {text!r} ({exc}); quote a string: {option} '\"text\"'",
                          field=option, value=text) from None


def _print_effect(args: argparse.Namespace, rec: Any) -> None:
    if args.json:
        print_json(rec.to_dict())
    else:
        print(f"{rec.key}: {rec.status.value}")


def _decide(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        if args.action == "approve":
            rec = outbox.approve(args.key, payload=_json_option("--payload", args.payload), by=args.by)
        elif args.action == "reject":
            rec = outbox.reject(args.key, reason=args.reason, by=args.by)
        else:
            rec = outbox.redrive(args.key)
        _print_effect(args, rec)
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    response = _json_option("--response", args.response)
    with _open_outbox(args) as outbox:
        rec = outbox.resolve(args.key, args.status, response=response, error=args.error,
                             external_ref=args.external_ref, compensate_kind=args.compensate_kind, by=args.by)
        _print_effect(args, rec)
        if args.status.upper() == "DUPLICATE" and not args.json:
            owed = outbox.obligations(effect_key=rec.key)
            print_table(["id", "kind", "status"], [[o.id, o.kind, o.status.value] for o in owed])
    return 0


def _cmd_resolve_obligation(args: argparse.Namespace) -> int:
    result = _json_option("--result", args.result)
    with _open_outbox(args) as outbox:
        rec = outbox.resolve_obligation(args.id, args.status, result=result, by=args.by)
        if args.json:
            print_json(rec.to_dict())
        else:
            print(f"{rec.id} ({rec.effect_key}, {rec.kind}): {rec.status.value}")
    return 0


def _cmd_timers_due(args: argparse.Namespace) -> int:
    from ._journal import StoreScheduler
    from .store import open_store

    store = open_store(store_url(args))
    try:
        timers = StoreScheduler(store, queue=args.queue).due(args.limit)
    finally:
        store.close()
    if args.json:
        print_json([t.to_dict() for t in timers])
    else:
        print_table(["key", "topic", "due", "attempts", "payload"], [
            [t.key, t.topic, t.due_at.isoformat(timespec="seconds"), t.attempts, json.dumps(t.payload)[:60]]
            for t in timers
        ])
    return 0


def _cmd_obligations(args: argparse.Namespace) -> int:
    with _open_outbox(args) as outbox:
        recs = outbox.obligations(status=args.status, effect_key=args.effect, run_id=args.run, limit=args.limit)
        if args.json:
            print_json([o.to_dict() for o in recs])
        else:
            print_table(["id", "effect", "kind", "status", "attempts", "run", "compensator", "error"], [
                [o.id, o.effect_key, o.kind, o.status.value, o.attempts, o.run_id or "", o.compensator or "",
                 (o.error or "")[:60]]
                for o in recs
            ])
    return 0


def register(sub: Any) -> None:
    """Add this engine's sub-commands."""
    effects = add_command_group(sub, "effects", "list, inspect, approve, reject, redrive and resolve effects",
                                metavar="ACTION")

    p = add_store_command(effects, "list", "effects, oldest first", _cmd_list)
    p.add_argument("--status", default=None, help="AWAITING_APPROVAL, PENDING, DISPATCHING, CONFIRMED, FAILED, "
                                                  "UNKNOWN or CANCELLED (FAILED is the dead-letter view)")
    p.add_argument("--connector", default=None)
    p.add_argument("--run", default=None, help="only effects of this run id")
    p.add_argument("--flagged", action="store_true", help="only effects flagged for a human")
    p.add_argument("--limit", type=int, default=100)

    p = add_store_command(effects, "show", "one effect, its journal history and obligations", _cmd_show)
    p.add_argument("key")

    for action, text in (("approve", "let a human-gated effect go"),
                         ("reject", "refuse a human-gated effect (it becomes CANCELLED)"),
                         ("redrive", "queue a FAILED, CANCELLED or flagged effect again")):
        p = add_store_command(effects, action, text, _decide, action=action, by=None, reason=None,
                              payload=None)
        p.add_argument("key")
        if action != "redrive":
            p.add_argument("--by", default=None, help="who decided (recorded in the journal)")
        if action == "reject":
            p.add_argument("--reason", default=None)
        if action == "approve":
            p.add_argument("--payload", default=None,
                           help="JSON the connector finds in effect.metadata['errands.approval']")

    p = add_store_command(effects, "resolve", "settle an effect's outcome by hand, without dispatching it",
                          _cmd_resolve)
    p.add_argument("key")
    p.add_argument("status", metavar="STATUS",
                   help="CONFIRMED (it happened), FAILED, ABSENT (dispatch it again) or DUPLICATE (confirmed, and "
                        "a compensation of --compensate-kind owed)")
    p.add_argument("--response", default=None, help="what the counterparty answered, as JSON")
    p.add_argument("--error", default=None, help="why it failed (FAILED)")
    p.add_argument("--external-ref", default=None, help="the counterparty's reference")
    p.add_argument("--compensate-kind", default=None, help="the compensation a DUPLICATE owes (e.g. refund)")
    p.add_argument("--by", default=None, help="who resolved it (recorded in the journal)")

    obligations = add_command_group(sub, "obligations", "compensations owed", metavar="ACTION")
    p = add_store_command(obligations, "list", "obligations, oldest first", _cmd_obligations)
    p.add_argument("--status", default=None, help="REGISTERED, PENDING, COMPENSATING, COMPENSATED or STUCK")
    p.add_argument("--effect", default=None, help="only obligations of this effect key")
    p.add_argument("--run", default=None, help="only obligations of this run id")
    p.add_argument("--limit", type=int, default=100)

    p = add_store_command(obligations, "resolve", "settle a compensation owed by hand", _cmd_resolve_obligation)
    p.add_argument("id", type=int)
    p.add_argument("status", metavar="STATUS", help="COMPENSATED (done) or STUCK (stop trying)")
    p.add_argument("--result", default=None, help="what the compensation came to, as JSON")
    p.add_argument("--by", default=None, help="who resolved it (recorded in the journal)")

    timers = add_command_group(sub, "timers", "the store's timers", metavar="ACTION")
    p = add_store_command(timers, "due", "timers due now that no worker holds, earliest first", _cmd_timers_due)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--queue", default="em.timers", help="the timer queue (default: em.timers, the worker's)")
