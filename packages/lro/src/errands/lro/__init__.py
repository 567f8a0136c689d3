"""errands-lro: ``google.longrunning`` operations resumed by callbacks (go.alis.build/lro/v2 in Python).

Example:
    >>> from errands.lro import Config, LroClient
    >>> client = LroClient(Config(neuron="svc", store="memory://"))
    >>> op = client.new_operation("operations/1", {"step": "start"})
    >>> client.get_operation_pb("operations/1").done
    False
"""

from __future__ import annotations

from .__about__ import __version__
from ._client import LroClient
from ._config import Config
from ._operation import Operation, must_unmarshal_metadata, unmarshal_metadata
from ._operation_table import OperationDoneError, OperationRecord, OperationStore, SQLOperationStore
from ._paging import parse_filter
from ._resume import ResumableHandler
from ._transitions import ResumeOutcome

__all__ = [
    "Config",
    "LroClient",
    "Operation",
    "OperationDoneError",
    "OperationRecord",
    "OperationStore",
    "ResumableHandler",
    "ResumeOutcome",
    "SQLOperationStore",
    "__version__",
    "must_unmarshal_metadata",
    "parse_filter",
    "unmarshal_metadata",
]
