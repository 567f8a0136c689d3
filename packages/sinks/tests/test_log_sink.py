from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from errands.core import ConfigError, FanOut, Journal, MemoryStore, NewEvent, Registry, Route, load_config
from errands.core.testing import SinkContract
from errands.sinks import LogSink


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class TestLogSinkContract(SinkContract):
    @pytest.fixture
    def sink(self, tmp_path: Path) -> Any:
        s = LogSink(path=str(tmp_path / "events.jsonl"))
        yield s
        s.close()

    def delivered(self, sink: LogSink) -> list[dict[str, Any]]:
        return read_lines(Path(sink.path))


class TestLogSinkFsyncContract(TestLogSinkContract):
    @pytest.fixture
    def sink(self, tmp_path: Path) -> Any:
        s = LogSink(path=str(tmp_path / "events.jsonl"), fsync=True)
        yield s
        s.close()


def test_writes_cloudevents_lines_to_stdout_and_stderr(capsys: Any) -> None:
    store = MemoryStore()
    events = Journal(store).append_many([NewEvent("s", "a.b", {"x": 1}), NewEvent("s", "a.c", [1, 2])])
    LogSink(path="-").publish(events[:1])
    LogSink(path="stderr").publish(events[1:])
    out, err = capsys.readouterr()
    assert json.loads(out) == events[0].to_cloudevent()
    assert json.loads(err)["id"] == "s/2" and json.loads(err)["data"] == [1, 2]


def test_appends_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    store = MemoryStore()
    events = Journal(store).append_many([NewEvent("s", "t", i) for i in range(4)])
    sink = LogSink(path=str(path))
    sink.publish(events[:2])
    sink.close()
    sink.close()
    again = LogSink(path=str(path))
    again.publish(events[2:])
    again.close()
    assert [line["data"] for line in read_lines(path)] == [0, 1, 2, 3]


def test_a_torn_last_line_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "torn.jsonl"
    store = MemoryStore()
    events = Journal(store).append_many([NewEvent("s", "t", i) for i in range(3)])
    whole = events[0].to_json() + "\n"
    path.write_text(whole + events[1].to_json()[:17], encoding="utf-8")
    sink = LogSink(path=str(path))
    sink.publish(events[1:])
    sink.close()
    assert [line["id"] for line in read_lines(path)] == ["s/1", "s/2", "s/3"]


def test_bad_options_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        LogSink(path=str(tmp_path / "missing" / "x.jsonl"))
    assert info.value.field == "path"
    with pytest.raises(ConfigError, match="fsync must be true or false"):
        LogSink(path="-", fsync="yes")  # type: ignore[arg-type]


def test_built_from_errands_toml(tmp_path: Path) -> None:
    registry = Registry()
    path = tmp_path / "audit.jsonl"
    config = load_config({"store": "memory://", "sinks": {"audit": {"type": "log", "path": str(path),
                          "subjects": ["order.**"], "batch_size": 50}}}, registry=registry)
    sink = config.sinks["audit"]
    assert isinstance(sink, LogSink) and sink.path == str(path)
    store = MemoryStore()
    Journal(store).append("orders/1", "order.placed", {"n": 1})
    Journal(store).append("pay/1", "payment.done", {"n": 1})
    fanout = FanOut.from_config(store, config)
    assert fanout.drain() == 1
    fanout.close()
    assert [line["type"] for line in read_lines(path)] == ["order.placed"]
    with pytest.raises(ConfigError) as info:
        load_config({"sinks": {"audit": {"type": "log", "path": str(path), "colour": "red"}}}, registry=registry)
    assert info.value.field == "sinks.audit.colour"


def test_poison_free_relay_through_fanout(tmp_path: Path) -> None:
    store = MemoryStore()
    Journal(store).append_many([NewEvent(f"s/{i % 3}", "t", {"i": i}) for i in range(1000)])
    sink = LogSink(path=str(tmp_path / "r.jsonl"))
    fanout = FanOut(store, [Route("r", sink, batch_size=64)])
    assert fanout.drain() == 1000
    fanout.close()
    assert len({line["id"] for line in read_lines(tmp_path / "r.jsonl")}) == 1000
