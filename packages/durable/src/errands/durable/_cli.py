"""``errands executions list|history|terminate|rerun|signal|replay``. The store is resolved as for every ``errands``
command (``errands.core.cli``): ``--store``, the config's store, ``$ERRANDS_STORE``, the default."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from errands.core import ConfigError
from errands.core.cli import add_store_options, print_json, print_table, store_url

if TYPE_CHECKING:
    from ._runner import DurableRunner


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _runner(args: argparse.Namespace) -> DurableRunner:
    from ._runner import DurableRunner  # on use: ``errands --help`` does not load the engine

    return DurableRunner(store_url(args))


def _cmd_list(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        rows = runner.list(args.status, function=args.function, limit=args.limit)
    if args.json:
        print_json([r.to_dict() for r in rows])
        return 0
    print_table(["execution", "function", "status", "created", "ended", "invocations"],
                [[r.execution_id, r.function, r.status.value, _when(r.created_at), _when(r.ended_at), r.invocations]
                 for r in rows])
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        ops = runner.history(args.execution_id)
    if args.json:
        print_json([o.to_dict() for o in ops])
        return 0
    print_table(["operation", "parent", "type", "subtype", "name", "status", "attempt", "started"],
                [[o.id, o.parent_id or "-", o.type.value, o.sub_type.value if o.sub_type else "-", o.name or "-",
                  o.status.value, o.attempt or "-", _when(o.start_timestamp)] for o in ops])
    return 0


def _cmd_terminate(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        info = runner.terminate(args.execution_id, args.reason)
    if args.json:
        print_json(info.to_dict())
    else:
        print(f"{info.execution_id}: {info.status.value}")
    return 0


def _cmd_rerun(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        new_id = runner.rerun_from(args.execution_id, args.operation, new_execution_id=args.new_id)
    if args.json:
        print_json({"execution_id": new_id, "source": args.execution_id, "from": args.operation})
    else:
        print(new_id)
    return 0


def _cmd_signal(args: argparse.Namespace) -> int:
    try:
        payload = None if args.payload is None else json.loads(args.payload)
    except ValueError as exc:
        raise ConfigError(f"--payload must be JSON: {exc}", field="payload", value=args.payload) from None
    with _runner(args) as runner:
        taken = runner.send_signal(args.execution_id, args.name, payload)
    if args.json:
        print_json({"execution_id": args.execution_id, "name": args.name, "taken": taken})
    else:
        print(f"{args.execution_id}: signal {args.name} " + ("taken by a waiting wait_for_signal" if taken else "kept"))
    return 0


def _load_function(spec: str) -> Any:
    """``module:function`` imported (the current directory importable, as ``python -m`` has it)."""
    import importlib
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--function must be module:function, got {spec!r}", field="function", value=spec)
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--function {spec!r} cannot be loaded: {exc}", field="function", value=spec) from None
    if not callable(target):
        raise ConfigError(f"--function {spec!r} is not callable", field="function", value=spec)
    return target


def _cmd_replay(args: argparse.Namespace) -> int:
    fn = _load_function(args.function)
    with _runner(args) as runner:
        found = runner.replay(args.execution_id, fn)
    if args.json:
        print_json(found.to_dict())
    elif found.divergence is None:
        print(f"{found.execution_id}: no divergence ({found.reached} of {found.operations} operations replayed, "
              f"{found.outcome})")
    else:
        d = found.divergence

        def shape(s: dict[str, Any] | None) -> str:
            return "-" if s is None else f"{s['type']}/{s['sub_type'] or '-'} {s['name']!r}"

        print(f"{found.execution_id}: diverges at operation #{d.index} ({d.operation_id})")
        print_table(["", "type/subtype name"], [["expected", shape(d.expected)], ["got", shape(d.got)]])
        print(d.message)
    return 0 if found.ok else 1


def register(group: Any) -> None:
    """Add ``executions`` and its sub-commands to the ``errands`` parser."""
    p = group.add_parser("executions", help="durable executions: list, history, terminate, rerun, signal, replay")
    sub = p.add_subparsers(dest="executions_command", metavar="ACTION")

    q = sub.add_parser("list", help="list executions, newest first")
    add_store_options(q)
    q.add_argument("--status", action="append", default=None, help="only this status (repeatable)")
    q.add_argument("--function", default=None, help="only this durable function")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=_cmd_list)

    q = sub.add_parser("history", help="the checkpointed operations of an execution")
    add_store_options(q)
    q.add_argument("execution_id")
    q.set_defaults(func=_cmd_history)

    q = sub.add_parser("terminate", help="stop an execution (and those it invoked)")
    add_store_options(q)
    q.add_argument("execution_id")
    q.add_argument("--reason", default=None)
    q.set_defaults(func=_cmd_terminate)

    q = sub.add_parser("rerun", help="start a new execution from an operation of an old one")
    add_store_options(q)
    q.add_argument("execution_id")
    q.add_argument("operation", help="operation id or name to run again from")
    q.add_argument("--new-id", default=None, help="id of the new execution")
    q.set_defaults(func=_cmd_rerun)

    q = sub.add_parser("signal", help="send a signal by name to an execution (kept until a wait takes it)")
    add_store_options(q)
    q.add_argument("execution_id")
    q.add_argument("name", help="the signal's name, as ctx.wait_for_signal(name) waits for it")
    q.add_argument("--payload", default=None, help="the signal's payload, as JSON (default: null)")
    q.set_defaults(func=_cmd_signal)

    q = sub.add_parser("replay", help="replay an execution's history against new code; exit 1 on a divergence")
    add_store_options(q)
    q.add_argument("execution_id")
    q.add_argument("--function", required=True, help="the new code, as module:function")
    q.set_defaults(func=_cmd_replay)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
