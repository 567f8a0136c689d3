"""The public surface of errands.connectors.http, pinned."""

from __future__ import annotations

from pathlib import Path

import errands.connectors.http as http
import errands.connectors.http.testing as http_testing
from errands.core import Connector, capabilities_of


def test_public_names() -> None:
    assert http.__all__ == [
        "NEVER_SENT",
        "AsyncHttpConnector",
        "GoogleIdToken",
        "HttpConnector",
        "TokenError",
        "__version__",
        "is_secret_header",
        "parse_retry_after",
        "redact_headers",
    ]
    assert http_testing.__all__ == ["LedgerRequest", "LedgerServer"]
    for name in http.__all__:
        assert getattr(http, name) is not None


def test_is_a_connector_with_declared_capabilities() -> None:
    c = http.HttpConnector(url="https://b.example/pay", observe_url="https://b.example/lookup")
    assert isinstance(c, Connector)
    assert http.HttpConnector.name == "http"
    caps = capabilities_of(c)
    assert caps.can_observe is True
    assert caps.can_compensate is False
    c.close()


def test_pep420_namespace_has_no_init() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "errands"
    assert not (src / "__init__.py").exists()
    assert not (src / "connectors" / "__init__.py").exists()
    assert (src / "connectors" / "http" / "py.typed").exists()
