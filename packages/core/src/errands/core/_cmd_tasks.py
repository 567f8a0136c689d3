"""``errands tasks`` sub-commands of the task engine: ``list``, ``show``, ``cancel``, ``dead``, ``redrive``,
``schedules``."""

from __future__ import annotations

import argparse
from typing import Any, Iterator

from .cli import add_command_group, add_store_command, print_json, print_table, store_url
from .errors import NotFoundError


def _when(t: Any) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _short(text: Any, width: int = 60) -> str:
    value = "" if text is None else str(text)
    return value if len(value) <= width else value[: width - 3] + "..."


class _Engine:
    """A task engine without handlers over the store the options name (the CLI runs no task)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __enter__(self) -> Any:
        from ._tasks import TaskEngine
        from .store import open_store

        self.store = open_store(store_url(self.args))
        self.engine = TaskEngine(self.store)
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.close()
        self.store.close()


_HEADERS = ["id", "type", "status", "priority", "attempts", "created", "finished", "error"]


def _rows(tasks: Any) -> Iterator[list[Any]]:
    for t in tasks:
        yield [t.id, t.type, str(t.status) + (" (cancelling)" if t.cancel_requested else ""), t.priority,
               t.attempts, _when(t.created_at), _when(t.finished_at), _short(t.error)]


def _print_tasks(args: argparse.Namespace, tasks: Any) -> None:
    if args.json:
        print_json([t.to_dict() for t in tasks])
    else:
        print_table(_HEADERS, list(_rows(tasks)))


def _cmd_list(args: argparse.Namespace) -> int:
    with _Engine(args) as engine:
        tasks = engine.recent(args.limit, status=args.status.upper() if args.status else None, type=args.type)
    _print_tasks(args, tasks)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _Engine(args) as engine:
        task = engine.get(args.id)
    if task is None:
        raise NotFoundError(f"no task {args.id!r}")
    if args.json:
        print_json(task.to_dict())
    else:
        print_table(["field", "value"], [[k, _short(v, 100) if v is not None else ""]
                                         for k, v in task.to_dict().items()])
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    out = []
    with _Engine(args) as engine:
        for task_id in args.ids:
            changed = engine.cancel(task_id)
            task = engine.get(task_id)
            out.append({"id": task.id if task else task_id, "cancelled": changed,
                        "status": str(task.status) if task else None})
    if args.json:
        print_json(out)
    else:
        for r in out:
            if not r["cancelled"]:
                print(f"task {r['id']} had ended already ({r['status']}); nothing changed")
            elif r["status"] == "CANCELLED":
                print(f"task {r['id']} cancelled")
            else:
                print(f"task {r['id']} is running: its worker asks its handler to stop; it ends CANCELLED then")
    return 0


def _cmd_dead(args: argparse.Namespace) -> int:
    with _Engine(args) as engine:
        tasks = engine.dead(args.type, args.limit)
    _print_tasks(args, tasks)
    return 0


def _cmd_redrive(args: argparse.Namespace) -> int:
    with _Engine(args) as engine:
        n = engine.redrive(args.ids or None, type=args.type)
    if args.json:
        print_json({"queued": n})
    else:
        print(f"queued {n} task(s) again with fresh retries")
    return 0


def _cmd_schedules(args: argparse.Namespace) -> int:
    with _Engine(args) as engine:
        found = engine.schedules()
    if args.json:
        print_json([s.to_dict() for s in found])
    else:
        print_table(["name", "type", "cron", "priority", "next", "last"],
                    [[s.name, s.type, s.cron, s.priority, _when(s.next_at), _when(s.last_at)] for s in found])
    return 0


def register(sub: Any) -> None:
    """Add this engine's sub-commands."""
    tasks = add_command_group(sub, "tasks", "background tasks: list, inspect, cancel, redrive")
    p = add_store_command(tasks, "list", "the newest tasks first", _cmd_list)
    p.add_argument("--status", default=None,
                   choices=["pending", "running", "succeeded", "failed", "dead", "cancelled"],
                   type=str.lower, help="only tasks of this status")
    p.add_argument("--type", default=None, help="only tasks of this type")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20)")
    p = add_store_command(tasks, "show", "one task, every field", _cmd_show)
    p.add_argument("id", help="the task id")
    p = add_store_command(tasks, "cancel", "cancel tasks: pending ones at once, running ones when they yield",
                          _cmd_cancel)
    p.add_argument("ids", nargs="+", help="task ids")
    p = add_store_command(tasks, "dead", "tasks parked in the dead-letter list, oldest first", _cmd_dead)
    p.add_argument("--type", default=None, help="only tasks of this type")
    p.add_argument("-n", "--limit", type=int, default=100)
    p = add_store_command(tasks, "redrive", "queue dead tasks (or failed ones named by id) again", _cmd_redrive)
    p.add_argument("ids", nargs="*", help="task ids (default: every dead task, of --type if given)")
    p.add_argument("--type", default=None, help="only dead tasks of this type")
    add_store_command(tasks, "schedules", "periodic tasks: cron, next and last tick", _cmd_schedules)
