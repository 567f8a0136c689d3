"""``errands`` sub-commands of the fan-out engine: ``events tail``, ``dead list|redrive``, ``routes``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .cli import add_command_group, add_store_command, print_json, print_table, store_url


def _open(args: argparse.Namespace) -> Any:
    from .store import open_store

    return open_store(store_url(args))


def _tail_events(store: Any, limit: int, subjects: list[str] | None, stream: str | None) -> list[Any]:
    """The last ``limit`` matching events, oldest first."""
    head = store.last_position()
    out: list[Any] = []
    window = max(limit, 1000)
    upper = head
    while upper > 0 and len(out) < limit:
        lower = max(0, upper - window)
        chunk = store.read_events(lower, upper - lower, subjects, stream=stream)
        chunk = [e for e in chunk if e.position <= upper]
        out = chunk + out
        upper = lower
    return out[-limit:] if limit else []


def _event_row(e: Any) -> list[Any]:
    data = json.dumps(e.data, ensure_ascii=False, separators=(",", ":"))
    return [e.position, e.id, e.subject, e.type, e.time.strftime("%Y-%m-%d %H:%M:%S"),
            data if len(data) <= 60 else data[:57] + "..."]


_EVENT_HEADERS = ["position", "id", "subject", "type", "time", "data"]


def _cmd_events_tail(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        subjects = args.subject or None
        events = _tail_events(store, args.limit, subjects, args.stream)
        if args.follow:
            after = events[-1].position if events else store.last_position()
            for e in events:
                _emit(e, args.json)
            while True:
                found, last = store.scan_events(after, 500, subjects, stream=args.stream)
                for e in found:
                    _emit(e, args.json)
                after = last
                sys.stdout.flush()
                if not found:
                    time.sleep(args.interval)
        if args.json:
            print_json([e.to_cloudevent() | {"position": e.position} for e in events])
        else:
            print_table(_EVENT_HEADERS, [_event_row(e) for e in events])
    finally:
        store.close()
    return 0


def _emit(e: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(e.to_cloudevent() | {"position": e.position}, ensure_ascii=False))
    else:
        print("  ".join(str(c) for c in _event_row(e)))


def _cmd_dead_list(args: argparse.Namespace) -> int:
    from ._fanout import list_dead

    store = _open(args)
    try:
        dead = list_dead(store, args.route, args.limit)
        if args.json:
            print_json([{"route": d.route, "event": d.event.to_cloudevent(), "error": d.error,
                         "attempts": d.attempts, "parked_at": d.parked_at.isoformat(), "redrive": d.redrive}
                        for d in dead])
        else:
            print_table(["route", "event", "subject", "attempts", "parked", "redrive", "error"], [
                [d.route, d.event.id, d.event.subject, d.attempts, d.parked_at.strftime("%Y-%m-%d %H:%M:%S"),
                 "queued" if d.redrive else "", d.error[:70]] for d in dead])
    finally:
        store.close()
    return 0


def _cmd_dead_redrive(args: argparse.Namespace) -> int:
    from ._fanout import mark_redrive

    store = _open(args)
    try:
        n = mark_redrive(store, args.route, args.event_ids or None)
    finally:
        store.close()
    if args.json:
        print_json({"route": args.route, "queued": n})
    else:
        print(f"queued {n} parked event(s) of route {args.route!r}; the worker running it delivers them next pass")
    return 0


def _cmd_routes_list(args: argparse.Namespace) -> int:
    from . import _fanout_table as table
    from ._fanout import route_states

    store = _open(args)
    try:
        head = store.last_position()
        states = route_states(store)
        with store.read() as tx:
            cursors = table.cursors(tx)
            dead = table.parked_counts(tx)
        out = []
        for name, cursor in cursors:
            state, reason = states.get(name, ("RUNNING", None))
            out.append({"route": name, "cursor": cursor, "behind": max(0, head - cursor), "state": state,
                        "reason": reason, "dead": dead.get(name, 0)})
    finally:
        store.close()
    if args.json:
        print_json(out)
    else:
        print_table(["route", "cursor", "behind", "state", "dead", "reason"],
                    [[r["route"], r["cursor"], r["behind"], r["state"], r["dead"], r["reason"] or ""] for r in out])
    return 0


def _cmd_routes_resume(args: argparse.Namespace) -> int:
    from ._fanout import resume_route

    store = _open(args)
    try:
        was = resume_route(store, args.route)
    finally:
        store.close()
    if args.json:
        print_json({"route": args.route, "resumed": was})
    else:
        print(f"route {args.route!r} " + ("resumed" if was else "was not stopped"))
    return 0


def register(sub: Any) -> None:
    """Add this engine's sub-commands."""
    events = add_command_group(sub, "events", "read the journal")
    p = add_store_command(events, "tail", "print the latest events (and follow new ones with -f)", _cmd_events_tail)
    p.add_argument("-n", "--limit", type=int, default=20, help="how many recent events (default 20)")
    p.add_argument("--subject", action="append", help="subject pattern, e.g. 'order.**' (repeatable)")
    p.add_argument("--stream", default=None, help="only this stream")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until interrupted")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls when following")

    dead = add_command_group(sub, "dead", "events a route parked because its sink refused them")
    p = add_store_command(dead, "list", "list parked events", _cmd_dead_list)
    p.add_argument("--route", default=None, help="only this route")
    p.add_argument("--limit", type=int, default=100)
    p = add_store_command(dead, "redrive", "queue parked events for delivery by the worker", _cmd_dead_redrive)
    p.add_argument("route", help="the route")
    p.add_argument("event_ids", nargs="*", help="event ids (default: every parked event of the route)")

    routes = add_command_group(sub, "routes", "fan-out routes: cursors, lag, state")
    add_store_command(routes, "list", "each route's cursor, how far behind it is, its state", _cmd_routes_list)
    p = add_store_command(routes, "resume", "let a stopped route deliver again", _cmd_routes_resume)
    p.add_argument("route")
