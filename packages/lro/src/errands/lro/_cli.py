"""``errands operations list|get|wait|cancel``: the operations of one neuron, as tables or JSON.

The store is resolved as by every ``errands`` command (``errands.core.cli``): ``--store``, the config's
``store``, ``$ERRANDS_STORE``, then ``sqlite:///errands.db``. ``LroClient``'s own default store is
``sqlite:///ops.db``: pass ``--store sqlite:///ops.db`` to read it."""

from __future__ import annotations

import argparse
from typing import Any

from errands.core.cli import DEFAULT_STORE, add_store_options, print_json, print_table, store_url
from google.longrunning import operations_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format

from ._client import LroClient
from ._config import Config

_STORE_NOTE = (
    f"The store is --store, the config's store, $ERRANDS_STORE, or {DEFAULT_STORE}, as for every errands "
    "command. LroClient's own default store is sqlite:///ops.db: pass --store sqlite:///ops.db to read it."
)


def operation_dict(pb: operations_pb2.Operation) -> dict[str, Any]:
    """A JSON-ready view of an operation (Struct payloads unpacked, other messages by type URL)."""
    out: dict[str, Any] = json_format.MessageToDict(pb, preserving_proto_field_name=True)
    out.setdefault("done", False)
    return out


def _status(pb: operations_pb2.Operation) -> str:
    if not pb.done:
        return "RUNNING"
    if pb.HasField("error"):
        from google.rpc import code_pb2  # type: ignore[import-untyped]

        return f"FAILED({code_pb2.Code.Name(pb.error.code)})"
    return "SUCCEEDED"


def _client(args: argparse.Namespace) -> LroClient:
    return LroClient(Config(neuron=args.neuron, store=store_url(args)))


def _rows(ops: list[operations_pb2.Operation]) -> list[list[Any]]:
    return [[pb.name, _status(pb), pb.metadata.type_url.rsplit("/", 1)[-1] or "-", pb.error.message or "-"] for pb in ops]


def _cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ops, token = client.list_operations(args.filter, args.limit, args.page_token)
    if args.json:
        print_json({"operations": [operation_dict(pb) for pb in ops], "next_page_token": token})
        return 0
    print_table(["name", "status", "metadata", "error"], _rows(ops))
    if token:
        print(f"\nnext page: --page-token {token}")
    return 0


def _show(args: argparse.Namespace, pb: operations_pb2.Operation) -> int:
    if args.json:
        print_json(operation_dict(pb))
    else:
        print_table(["name", "status", "metadata", "error"], _rows([pb]))
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show(args, client.get_operation_pb(args.name))


def _cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        pb = client.wait_operation(args.name, args.timeout)
    _show(args, pb)
    return 0 if pb.done else 3


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.cancel_operation(args.name)
        return _show(args, client.get_operation_pb(args.name))


def register(group: Any) -> None:
    """Add ``operations`` to the ``errands`` command line."""
    parser = group.add_parser("operations", help="list, show, wait for and cancel long-running operations",
                              epilog=_STORE_NOTE)
    sub = parser.add_subparsers(dest="operations_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.epilog = _STORE_NOTE
        add_store_options(p)
        p.add_argument("--neuron", required=True, help="the service whose operations to read")

    p = sub.add_parser("list", help="list operations")
    common(p)
    p.add_argument("--filter", default="", help='e.g. "done = false" or \'name = "operations/abc*"\'')
    p.add_argument("--limit", type=int, default=100, help="page size")
    p.add_argument("--page-token", default="", help="the token a previous page printed")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("get", help="show one operation")
    common(p)
    p.add_argument("name", help="operations/{id}")
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("wait", help="wait until an operation is done (exit status 3 at timeout)")
    common(p)
    p.add_argument("name", help="operations/{id}")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds")
    p.set_defaults(func=_cmd_wait)

    p = sub.add_parser("cancel", help="request cancellation (cooperative)")
    common(p)
    p.add_argument("name", help="operations/{id}")
    p.set_defaults(func=_cmd_cancel)
