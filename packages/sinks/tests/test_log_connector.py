"""LogConnector: JSON lines to a file or stdout, idempotent on the key, observable from the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from errands.core import (
    ConfigError,
    DispatchOutcome,
    Effect,
    EffectStatus,
    ObservationOutcome,
    Outbox,
    Registry,
    Semantics,
    TransientError,
    load_config,
    open_store,
)
from errands.core.testing import ConnectorContract
from errands.sinks import LogConnector
from errands.sinks import _plugin as sinks_plugin


class TestLogConnectorFile(ConnectorContract):
    @pytest.fixture
    def connector(self, tmp_path: Path) -> Any:
        return LogConnector(path=str(tmp_path / "dispatch.jsonl"))


class TestLogConnectorStdout(ConnectorContract):
    @pytest.fixture
    def connector(self) -> Any:
        return LogConnector(path="-")


def _effect(key: str, **kw: Any) -> Effect:
    return Effect(key=key, connector="audit", payload={"total": 10, "who": "zoë"}, tool="record", **kw)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_one_json_line_per_effect(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.jsonl"
    conn = LogConnector(path=str(path))
    outbox = Outbox(open_store("memory://"), connectors={"audit": conn})
    outbox.submit_many([_effect("a", run_id="r1"), _effect("b", business_key="invoice-7")])
    assert [o.status for o in outbox.dispatch_once()] == [EffectStatus.CONFIRMED] * 2
    lines = sorted(_lines(path), key=lambda d: d["key"])
    assert [d["key"] for d in lines] == ["a", "b"]
    assert lines[0]["payload"] == {"total": 10, "who": "zoë"} and lines[0]["run_id"] == "r1"
    assert lines[1]["business_key"] == "invoice-7" and lines[1]["tool"] == "record" and lines[1]["attempt"] == 1
    assert outbox.get("a").external_ref == f"{path}#a"


def test_dispatch_is_idempotent_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.jsonl"
    LogConnector(path=str(path)).dispatch(_effect("k1"))
    again = LogConnector(path=str(path))  # a restarted process reads the keys already written
    assert again.dispatch(_effect("k1")).outcome is DispatchOutcome.CONFIRMED
    assert len(_lines(path)) == 1


def test_observe_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.jsonl"
    conn = LogConnector(path=str(path))
    assert conn.observe(_effect("x")).outcome is ObservationOutcome.ABSENT
    conn.dispatch(_effect("x"))
    assert conn.observe(_effect("x")).outcome is ObservationOutcome.CONFIRMED
    with path.open("a") as fh:  # another writer appended the same key: a real duplicate
        fh.write(json.dumps({"key": "x"}) + "\n")
    seen = conn.observe(_effect("x"))
    assert seen.outcome is ObservationOutcome.DUPLICATE and seen.response == {"count": 2}


def test_torn_last_line_is_cut_and_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.jsonl"
    path.write_text(json.dumps({"key": "whole"}) + "\n" + '{"key": "torn", "pay', encoding="utf-8")
    conn = LogConnector(path=str(path))
    assert conn.observe(_effect("torn")).outcome is ObservationOutcome.ABSENT
    conn.dispatch(_effect("torn"))
    assert [d["key"] for d in _lines(path)] == ["whole", "torn"]


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    conn = LogConnector(path="-")
    assert not conn.capabilities.can_observe
    conn.dispatch(_effect("s1"))
    conn.dispatch(_effect("s1"))
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["key"] for line in out] == ["s1"]


def test_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    LogConnector(path="stderr").dispatch(_effect("e1"))
    assert json.loads(capsys.readouterr().err)["key"] == "e1"


def test_non_idempotent_on_stdout_has_no_safety_net() -> None:
    outbox = Outbox(open_store("memory://"), connectors={"audit": LogConnector(path="-")})
    with pytest.raises(ConfigError, match="safety net"):
        outbox.submit(_effect("n1", semantics=Semantics.NON_IDEMPOTENT))
    assert outbox.list() == []


def test_write_failure_is_transient(tmp_path: Path) -> None:
    conn = LogConnector(path=str(tmp_path / "dispatch.jsonl"))
    conn.dispatch(_effect("ok"))
    assert conn._out._fh is not None
    conn._out._fh.close()  # the file handle broke under the connector
    with pytest.raises(TransientError, match="could not write"):
        conn.dispatch(_effect("next"))
    assert conn.dispatch(_effect("next")).outcome is DispatchOutcome.CONFIRMED  # reopened


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"path": ""}, "path"), ({"path": 3}, "path"), ({"path": "/no/such/dir/x.jsonl"}, "path"),
     ({"path": "-", "fsync": "yes"}, "fsync")],
)
def test_bad_options(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        LogConnector(**kwargs)
    assert err.value.field == field


def test_registered_as_log_and_built_from_config(tmp_path: Path) -> None:
    reg = Registry([("sinks", sinks_plugin)], autoload=False)
    assert reg.connectors["log"] is LogConnector
    cfg = load_config({"store": "memory://", "connectors": {"audit": {"type": "log", "path": str(tmp_path / "d.jsonl"),
                                                                      "fsync": True}}}, registry=reg)
    conn = cfg.connectors["audit"]
    assert isinstance(conn, LogConnector) and conn.fsync
    conn.dispatch(_effect("cfg"))
    assert _lines(tmp_path / "d.jsonl")[0]["key"] == "cfg"
