"""``errands`` sub-commands of reactions: ``reactions list``."""

from __future__ import annotations

import argparse
from typing import Any

from .cli import add_command_group, add_store_command, print_json, print_table, store_url


def reaction_rows(store: Any) -> list[dict[str, Any]]:
    """Each reaction the store knows (by its cursor or its recorded definition): how far behind the journal it
    is, its tasks by status and its options as last registered."""
    from . import _reactor_table as table
    from . import _tasks_table as tasks_table

    head = store.last_position()
    with store.read() as tx:
        cursors = table.cursors(tx)
        definitions = table.definitions(tx)
        counts = tasks_table.counts(tx, "reaction:")
    out = []
    for name in sorted(set(cursors) | set(definitions)):
        options = definitions.get(name, {})
        tasks = counts.get(f"reaction:{name}", {})
        cursor = cursors.get(name)
        out.append({
            "name": name, "subject_pattern": options.get("subject_pattern"), "predicate": options.get("predicate"),
            "key": options.get("key"), "cursor": cursor, "behind": None if cursor is None else max(0, head - cursor),
            "pending": tasks.get("PENDING", 0), "running": tasks.get("RUNNING", 0),
            "succeeded": tasks.get("SUCCEEDED", 0), "failed": tasks.get("FAILED", 0), "dead": tasks.get("DEAD", 0),
            "options": {k: v for k, v in options.items() if k not in ("name", "subject_pattern", "predicate", "key")},
        })
    return out


def _cmd_reactions_list(args: argparse.Namespace) -> int:
    from .store import open_store

    store = open_store(store_url(args))
    try:
        rows = reaction_rows(store)
    finally:
        store.close()
    if args.json:
        print_json(rows)
    else:
        print_table(["reaction", "subjects", "predicate", "key", "behind", "pending", "running", "done", "dead"],
                    [[r["name"], r["subject_pattern"] or "", r["predicate"] or "", r["key"] or "",
                      "" if r["behind"] is None else r["behind"], r["pending"], r["running"],
                      r["succeeded"] + r["failed"], r["dead"]] for r in rows])
    return 0


def register(sub: Any) -> None:
    """Add the reactions' sub-commands."""
    reactions = add_command_group(sub, "reactions", "reactions: subjects, predicate, key, lag and tasks")
    add_store_command(reactions, "list", "each reaction: its pattern, predicate and key, how far behind it is, "
                      "its tasks by status", _cmd_reactions_list)
