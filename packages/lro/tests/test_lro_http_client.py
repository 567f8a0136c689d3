"""errands-lro's one HTTP client: every answer is a response, no answer is ``TransientError``, and one
mapping of statuses to errors with ``Retry-After`` read by core's ``parse_retry_after``."""

from __future__ import annotations

from typing import Any

import pytest
from errands.core import NotFoundError, PermanentError, TransientError
from errands.core.testing._services import free_port
from errands.lro._http_client import Response, raise_for_status, request


def test_every_answer_is_a_response_with_lower_case_headers(httpserver: Any) -> None:
    httpserver.expect_request("/ok", method="PUT").respond_with_data("fine", headers={"X-Thing": "1"})
    httpserver.expect_request("/busy").respond_with_data("later", status=503, headers={"Retry-After": "7"})
    ok = request("PUT", httpserver.url_for("/ok"), body=b"", headers={"content-length": "0"}, timeout=5)
    assert (ok.status, ok.data, ok.headers["x-thing"]) == (200, b"fine", "1")
    busy = request("GET", httpserver.url_for("/busy"), timeout=5)
    assert (busy.status, busy.data, busy.retry_after) == (503, b"later", 7.0)


def test_no_answer_is_a_transient_error_without_the_query() -> None:
    with pytest.raises(TransientError) as err:
        request("PUT", f"http://127.0.0.1:{free_port()}/cb?token=secret", timeout=2)
    assert "secret" not in str(err.value) and "/cb" in str(err.value)


@pytest.mark.parametrize(("status", "error"), [
    (404, NotFoundError), (500, TransientError), (503, TransientError), (429, TransientError),
    (408, TransientError), (400, PermanentError), (401, PermanentError), (409, PermanentError),
])
def test_one_mapping_of_statuses_to_errors(status: int, error: type[Exception]) -> None:
    with pytest.raises(error) as err:
        raise_for_status(Response(status, {}, b""), "callback x")
    assert str(status) in str(err.value) and "callback x" in str(err.value)


def test_success_passes_and_retry_after_reaches_the_transient_error() -> None:
    ok = Response(204, {}, b"")
    assert raise_for_status(ok, "x") is ok
    with pytest.raises(TransientError) as err:
        raise_for_status(Response(503, {"retry-after": "120"}, b""), "x")
    assert err.value.retry_after == 120.0
    with pytest.raises(TransientError) as err:
        raise_for_status(Response(429, {"retry-after": "inf"}, b""), "x")
    assert err.value.retry_after is None  # unreadable: the caller's own delay applies
    assert Response(503, {"retry-after": "99999999"}, b"").retry_after == 3600.0  # capped
