"""Test kit for users of the http connector: ``LedgerServer``, a real local counterparty with faults.

Example:
    >>> from errands.connectors.http import HttpConnector
    >>> from errands.connectors.http.testing import LedgerServer
    >>> from errands.core import Effect
    >>> with LedgerServer() as server, HttpConnector(url=server.url("/effects")) as connector:
    ...     connector.dispatch(Effect(key="k1", connector="ledger", payload={})).outcome.value
    'CONFIRMED'
"""

from __future__ import annotations

from ._ledger import LedgerRequest, LedgerServer

__all__ = ["LedgerRequest", "LedgerServer"]
