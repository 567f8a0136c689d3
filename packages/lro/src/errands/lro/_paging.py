"""Listing operations a page at a time: the ListOperations filter and the page tokens.

A page token is opaque to clients: the name the page ended after and the filter it was issued for,
base64url JSON, so that the next page reads on from there and a token is never used with another filter.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from errands.core.errors import ConfigError
from google.longrunning import operations_pb2  # type: ignore[import-untyped]

from ._operation_table import OperationStore

__all__ = ["list_operations", "parse_filter"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def parse_filter(text: str) -> tuple[bool | None, str, str | None]:
    """``(done, prefix, exact)`` of a ListOperations filter.

    Supported: clauses joined by ``AND``: ``done = true|false``, ``name = "operations/x"`` (exact),
    ``name = "operations/x*"`` or ``name:"operations/x"`` (prefix).
    """
    done: bool | None = None
    prefix = ""
    exact: str | None = None
    if not text or not text.strip():
        return done, prefix, exact
    for clause in re.split(r"\s+AND\s+", text.strip()):
        m = re.fullmatch(r"\s*done\s*=\s*(true|false)\s*", clause, flags=re.IGNORECASE)
        if m:
            done = m.group(1).lower() == "true"
            continue
        m = re.fullmatch(r'\s*name\s*(=|:)\s*"([^"*]*)(\*?)"\s*', clause)
        if m:
            if m.group(1) == ":" or m.group(3):
                prefix = m.group(2)
            else:
                exact = m.group(2)
            continue
        raise ConfigError(
            f"filter clause {clause.strip()!r} is not supported; use 'done = true|false', 'name = \"operations/x\"' "
            "or 'name = \"operations/prefix*\"', joined by AND",
            field="filter", value=text,
        )
    return done, prefix, exact


def list_operations(
    store: OperationStore, filter: str, page_size: int, page_token: str, *, name: str
) -> tuple[list[operations_pb2.Operation], str]:
    """A page of ``store``'s operations ordered by name, and the token of the next page (``""`` at the end);
    see ``LroClient.list_operations``."""
    done, prefix, exact = parse_filter(filter)
    if name:
        collection = name.rstrip("/") + "/"
        if not prefix.startswith(collection) and not collection.startswith(prefix):
            return [], ""
        prefix = max(prefix, collection, key=len)
    if exact is not None:
        prefix = max(prefix, exact, key=len)
    if not isinstance(page_size, int) or page_size < 0:
        raise ConfigError(f"page_size must be >= 0, got {page_size!r}", field="page_size", value=page_size)
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _decode_token(page_token, filter) if page_token else ""
    rows = list(store.list(done=done, prefix=prefix, after=after, limit=size + 1))
    more = len(rows) > size
    rows = rows[:size]
    out = [operations_pb2.Operation.FromString(r.operation) for r in rows if exact is None or r.name == exact]
    token = _encode_token(rows[-1].name, filter) if more and rows else ""
    return out, token


def _encode_token(after: str, filter: str) -> str:
    raw = json.dumps({"a": after, "f": filter}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, filter: str) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, was = data["a"], data["f"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigError("page_token is not one this service issued", field="page_token", value=token) from exc
    if was != filter:
        raise ConfigError(
            "page_token was issued for another filter; pass the same filter as the first page",
            field="page_token", value=token,
        )
    return str(after)
