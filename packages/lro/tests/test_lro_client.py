from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import pytest
from errands.core import (
    AlreadyExistsError,
    ConfigError,
    FakeClock,
    Journal,
    LeaseLostError,
    NotFoundError,
    PayloadError,
    StoreScheduler,
    TransientError,
    open_store,
)
from errands.lro import (
    Config,
    LroClient,
    Operation,
    OperationDoneError,
    ResumableHandler,
    ResumeOutcome,
    must_unmarshal_metadata,
    parse_filter,
    unmarshal_metadata,
)
from errands.lro._tokens import parse_token
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import code_pb2


@dataclass
class Progress:
    step: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Other:
    x: int


@pytest.fixture
def client(tmp_path: Any, clock: FakeClock) -> Iterator[LroClient]:
    c = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'ops.db'}"), clock=clock)
    yield c
    c.close()


# -- config ------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        Config(neuron="Bad_Name", host="ftp://x", prefix="no-slash", wait_multiplier=0.5)
    text = str(err.value)
    for fragment in ("lro.neuron", "'Bad_Name'", "lro.host", "lro.prefix", "lro.wait_multiplier"):
        assert fragment in text
    assert err.value.field == "lro.neuron"


def test_short_callback_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        Config(neuron="svc", callback_secret="short-secret")
    assert "short-secret" not in str(err.value) and "callback_secret" in str(err.value)
    assert "short-secret" not in repr(Config(neuron="svc", callback_secret="a-long-enough-secret-value"))


def test_from_env_without_cloud_variables_runs_embedded(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with LroClient.from_env("launchpad-v1", env={}) as client:
        assert client.config.host is None and client.core_store is not None
        assert client.core_store.url == "sqlite:///ops.db"
        assert type(client.scheduler).__name__ == "StoreScheduler"
        assert client.config.queue_name == "launchpad-v1-operations"
    assert (tmp_path / "ops.db").exists()


def test_from_env_alis_variables_and_defaults(tmp_path: Any) -> None:
    from errands.lro._config import config_from_env

    env = {
        "ALIS_OS_PROJECT": "acme-prod", "ALIS_PROJECT_NR": "1234", "ALIS_REGION": "europe-west1",
        "ALIS_MANAGED_SPANNER_PROJECT": "acme-data", "ALIS_MANAGED_SPANNER_INSTANCE": "main",
        "ALIS_MANAGED_SPANNER_DB": "ops",
    }
    cfg = config_from_env("launchpad-v1", None, env)
    assert cfg.host == "https://launchpad-v1-1234.europe-west1.run.app"
    assert cfg.store == "spanner://projects/acme-data/instances/main/databases/ops"
    assert cfg.queue_name == "launchpad-v1-operations"
    assert cfg.invoker_service_account == "alis-build@acme-prod.iam.gserviceaccount.com"
    assert cfg.accepted_service_accounts == ("alis-build@acme-prod.iam.gserviceaccount.com",)
    assert cfg.spanner_table == "acme_prod_launchpad_v1_Operations"
    assert cfg.audience == "https://launchpad-v1-1234.europe-west1.run.app"
    override = config_from_env("launchpad-v1", "https://api.example", env, store=f"sqlite:///{tmp_path}/x.db")
    assert override.host == "https://api.example" and override.store.startswith("sqlite:///")


def test_from_env_in_the_cloud_uses_the_cloudtasks_scheduler(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from errands.core import MissingDependencyError, get_registry

    made: list[dict[str, Any]] = []

    class FakeCloudTasks:
        name = "cloudtasks"

        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

        def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
            return key or ""

    env = {"ALIS_OS_PROJECT": "acme", "ALIS_PROJECT_NR": "7", "ALIS_REGION": "eu"}
    schedulers = get_registry().schedulers
    monkeypatch.setitem(schedulers, "cloudtasks", FakeCloudTasks)
    with LroClient.from_env("svc", env=env, store=f"sqlite:///{tmp_path}/x.db") as client:
        assert isinstance(client.scheduler, FakeCloudTasks)
    assert made == [{
        "project": "acme", "location": "eu", "queue": "svc-operations",
        "service_account": "alis-build@acme.iam.gserviceaccount.com",
        "host": "https://svc-7.eu.run.app", "prefix": "/resume-operation/", "dispatch_deadline": 1800.0,
    }]
    monkeypatch.delitem(schedulers, "cloudtasks")
    with pytest.raises(MissingDependencyError) as err:
        LroClient.from_env("svc", env=env, store=f"sqlite:///{tmp_path}/x.db")
    assert "tasks" in str(err.value)


# -- creating and reading ----------------------------------------------------------------------


def test_new_operation_validates_names_and_refuses_duplicates(client: LroClient) -> None:
    op = client.new_operation("operations/123", {"step": "start"})
    assert op.name == "operations/123" and not op.done and op.version == 1
    with pytest.raises(AlreadyExistsError):
        client.new_operation("operations/123", {"step": "again"})
    assert unmarshal_metadata(client.get_operation("operations/123"), dict) == {"step": "start"}
    for bad in ("123", "operations/", "operations/a/b", "ops/1", "operations/a b", ""):
        with pytest.raises(ConfigError) as err:
            client.new_operation(bad)
        assert err.value.field == "name"
    generated = client.new_operation()
    assert generated.name.startswith("operations/") and len(generated.name) > 20


def test_metadata_as_message_or_dict(client: LroClient) -> None:
    ts = timestamp_pb2.Timestamp(seconds=42)
    op = client.new_operation("operations/m", ts)
    assert unmarshal_metadata(op, timestamp_pb2.Timestamp) == ts
    with pytest.raises(ConfigError):
        unmarshal_metadata(op, duration_pb2.Duration)
    op.save_metadata({"phase": "two", "n": 2})
    pb = client.get_operation_pb("operations/m")
    assert pb.metadata.Is(struct_pb2.Struct.DESCRIPTOR)
    assert unmarshal_metadata(pb, dict) == {"phase": "two", "n": 2}
    assert unmarshal_metadata(pb, struct_pb2.Struct)["phase"] == "two"
    bare = client.new_operation("operations/bare")
    assert unmarshal_metadata(bare) is None
    with pytest.raises(ConfigError):
        must_unmarshal_metadata(bare, dict)
    with pytest.raises(PayloadError):
        op.set_metadata(object())


def test_private_state_is_json_for_dataclasses_dicts_and_pydantic(client: LroClient) -> None:
    op = client.new_operation("operations/s", private_state=Progress(step=1, notes=["a"]))
    assert op.decode_private_state(Progress) == Progress(step=1, notes=["a"])
    op.save_private_state({"step": 2, "notes": []})
    again = client.get_operation("operations/s")
    assert again.decode_private_state(Progress) == Progress(step=2)
    assert again.decode_private_state() == {"step": 2, "notes": []}
    assert client.store.get("operations/s").state == b'{"step":2,"notes":[]}'
    with pytest.raises(PayloadError):
        again.set_private_state({"when": object()})
    with pytest.raises(ConfigError) as err:
        again.decode_private_state(Other)  # a type that cannot hold it
    assert err.value.field == "private_state" and "Other" in str(err.value)
    import pydantic

    class Model(pydantic.BaseModel):
        step: int

    again.save_private_state(Model(step=5))
    assert client.get_operation("operations/s").decode_private_state(Model).step == 5


def test_resume_point_round_trips(client: LroClient) -> None:
    op = client.new_operation("operations/r")
    assert op.resume_point == ""
    op.save_resume_point("after-provisioning")
    assert client.get_operation("operations/r").resume_point == "after-provisioning"


def test_complete_and_fail(client: LroClient) -> None:
    ok = client.new_operation("operations/ok").complete({"agent": "a1"})
    pb = ok.operation_pb()
    assert pb.done and not pb.HasField("error") and pb.response.Is(struct_pb2.Struct.DESCRIPTOR)
    empty = client.new_operation("operations/empty").complete()
    assert empty.operation_pb().response.type_url.endswith("google.protobuf.Empty")
    bad = client.new_operation("operations/bad").fail("quota %s exceeded by %d", "cpu", 3, code=code_pb2.RESOURCE_EXHAUSTED)
    pb = client.get_operation_pb("operations/bad")
    assert pb.done and pb.error.code == code_pb2.RESOURCE_EXHAUSTED and pb.error.message == "quota cpu exceeded by 3"
    assert not pb.HasField("response") and bad.done
    default = client.new_operation("operations/unknown").fail("boom")
    assert default.operation_pb().error.code == code_pb2.UNKNOWN


def test_fail_never_sets_ok(client: LroClient) -> None:
    op = client.new_operation("operations/f")
    for code in (0, code_pb2.OK, 99, "INTERNAL", True):
        with pytest.raises(ConfigError) as err:
            op.fail("nope", code=code)
        assert err.value.field == "code"
    assert not client.get_operation_pb("operations/f").done
    import grpc

    op.fail("gone", code=grpc.StatusCode.NOT_FOUND)
    assert client.get_operation_pb("operations/f").error.code == code_pb2.NOT_FOUND


def test_a_done_operation_never_flips_back(client: LroClient) -> None:
    op = client.new_operation("operations/d")
    stale = client.get_operation("operations/d")
    op.complete({"x": 1})
    with pytest.raises(OperationDoneError):
        op.save_metadata({"late": True})
    with pytest.raises(OperationDoneError):
        op.fail("late")
    with pytest.raises(LeaseLostError):
        stale.fail("from a stale copy")
    with pytest.raises(LeaseLostError):
        stale.save_private_state({"late": True})
    pb = client.get_operation_pb("operations/d")
    assert pb.done and not pb.HasField("error") and client.store.get("operations/d").state is None


def test_stale_writer_gets_lease_lost_and_changes_nothing(client: LroClient) -> None:
    client.new_operation("operations/cas", {"v": 0})
    a = client.get_operation("operations/cas")
    b = client.get_operation("operations/cas")
    a.save_metadata({"v": "a"})
    with pytest.raises(LeaseLostError):
        b.save_metadata({"v": "b"})
    assert unmarshal_metadata(client.get_operation("operations/cas"), dict) == {"v": "a"}


def test_completion_is_journalled_once_in_the_same_transaction(client: LroClient) -> None:
    client.new_operation("operations/j").complete({"ok": 1})
    assert client.core_store is not None
    events = Journal(client.core_store).read(0, subjects=["lro.operation.done"])
    assert [(e.stream, e.data) for e in events] == [
        ("lro/svc", {"name": "operations/j", "neuron": "svc"})
    ]


# -- listing, waiting, cancelling, deleting, purging --------------------------------------------


def test_parse_filter() -> None:
    assert parse_filter("") == (None, "", None)
    assert parse_filter("done = true") == (True, "", None)
    assert parse_filter('done=false AND name = "operations/ab*"') == (False, "operations/ab", None)
    assert parse_filter('name:"operations/x"') == (None, "operations/x", None)
    assert parse_filter('name = "operations/x"') == (None, "", "operations/x")
    with pytest.raises(ConfigError) as err:
        parse_filter("status = RUNNING")
    assert err.value.field == "filter"


def test_list_operations_filters_and_pages(client: LroClient) -> None:
    for i in range(5):
        client.new_operation(f"operations/a{i}")
    for i in range(3):
        client.new_operation(f"operations/b{i}").complete()
    ops, token = client.list_operations(page_size=3)
    assert [o.name for o in ops] == ["operations/a0", "operations/a1", "operations/a2"] and token
    ops2, token2 = client.list_operations(page_size=3, page_token=token)
    ops3, token3 = client.list_operations(page_size=3, page_token=token2)
    assert [o.name for o in ops2 + ops3] == ["operations/a3", "operations/a4", "operations/b0", "operations/b1",
                                             "operations/b2"]
    assert token3 == ""
    done, _ = client.list_operations("done = true")
    assert [o.name for o in done] == ["operations/b0", "operations/b1", "operations/b2"]
    running, _ = client.list_operations('done = false AND name = "operations/a*"', page_size=2)
    assert [o.name for o in running] == ["operations/a0", "operations/a1"]
    exact, _ = client.list_operations('name = "operations/a3"')
    assert [o.name for o in exact] == ["operations/a3"]
    with pytest.raises(ConfigError):
        client.list_operations("done = true", page_size=3, page_token=token)
    with pytest.raises(ConfigError):
        client.list_operations(page_token="garbage!")
    assert client.list_operations(name="other")[0] == []


def test_wait_operation_returns_latest_state_at_timeout(client: LroClient) -> None:
    client.new_operation("operations/w", {"step": 1})
    pb = client.wait_operation("operations/w", timeout=0.2)
    assert not pb.done and pb.name == "operations/w"
    threading.Timer(0.2, lambda: client.get_operation("operations/w").complete({"ok": True})).start()
    pb = client.wait_operation("operations/w", timeout=timedelta(seconds=10))
    assert pb.done
    with pytest.raises(NotFoundError):
        client.wait_operation("operations/missing", timeout=0.1)


def test_cancel_without_a_handler_ends_cancelled_at_once(client: LroClient) -> None:
    client.new_operation("operations/c")
    client.cancel_operation("operations/c")
    pb = client.get_operation_pb("operations/c")
    assert pb.done and pb.error.code == code_pb2.CANCELLED
    client.new_operation("operations/c2").complete({"ok": 1})
    client.cancel_operation("operations/c2")
    assert not client.get_operation_pb("operations/c2").HasField("error")
    with pytest.raises(NotFoundError):
        client.cancel_operation("operations/nope")


def test_cancel_is_cooperative_for_a_running_handler(client: LroClient) -> None:
    seen: list[bool] = []

    def slow(op: Operation) -> None:
        client.cancel_operation(op.name)  # arrives while the handler runs
        seen.append(op.cancel_requested)
        op.save_metadata({"stopped": "early"})  # the handler keeps its lease

    client.add_resumable_handlers(ResumableHandler("slow", slow))
    client.new_operation("operations/coop").resume_via_tasks("slow")
    assert client.run_due() == 1
    assert seen == [True]
    pb = client.get_operation_pb("operations/coop")
    assert pb.done and pb.error.code == code_pb2.CANCELLED
    assert unmarshal_metadata(pb, dict) == {"stopped": "early"}
    assert client.run_due() == 1  # the cancellation callback finds the operation done
    assert client.run_due() == 0


def test_cancel_of_a_waiting_operation_schedules_its_end(client: LroClient, clock: FakeClock) -> None:
    calls: list[str] = []
    client.add_resumable_handlers(ResumableHandler("later", lambda op: calls.append(op.name)))
    client.new_operation("operations/later").resume_via_tasks("later", delay=timedelta(hours=1))
    client.cancel_operation("operations/later")
    assert client.run_due() == 1
    assert calls == [] and client.get_operation_pb("operations/later").error.code == code_pb2.CANCELLED
    clock.advance(3600)
    assert client.run_due() == 1 and calls == []


def test_delete_and_purge(client: LroClient, clock: FakeClock) -> None:
    client.new_operation("operations/x")
    client.delete_operation("operations/x")
    with pytest.raises(NotFoundError):
        client.delete_operation("operations/x")
    client.new_operation("operations/old").complete()
    clock.advance(timedelta(days=89).total_seconds())
    client.new_operation("operations/young")
    assert client.purge_expired() == 0
    clock.advance(timedelta(days=2).total_seconds())
    assert client.purge_expired() == 1
    assert [o.name for o in client.list_operations()[0]] == ["operations/young"]


def test_a_worker_purges_expired_operations_in_bounded_batches(tmp_path: Any, clock: FakeClock) -> None:
    from errands.core import Worker

    store = open_store(f"sqlite:///{tmp_path}/w.db", clock=clock)
    cfg = Config(neuron="svc", store=store, ttl=timedelta(hours=1), purge_batch=2, purge_every=3600)
    with LroClient(cfg) as c:
        worker = Worker(store)
        c.attach(worker)
        jobs = dict(worker._jobs)
        purge = jobs["lro.svc.purge"]
        for i in range(5):
            c.new_operation(f"operations/old{i}")
        clock.advance(3601)
        c.new_operation("operations/young")
        # A full batch lets the next pass go on at once; a short one waits purge_every.
        assert [purge(), purge(), purge(), purge()] == [2, 2, 1, 0]
        assert [o.name for o in c.list_operations()[0]] == ["operations/young"]
        assert c.purge_expired(limit=10) == 0
    store.close()


def test_alis_parity_options(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from errands.core import get_registry
    from errands.lro._config import config_from_env

    made: list[dict[str, Any]] = []

    class FakeCloudTasks:
        name = "cloudtasks"

        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

        def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
            return key or ""

    monkeypatch.setitem(get_registry().schedulers, "cloudtasks", FakeCloudTasks)
    env = {"ALIS_OS_PROJECT": "acme", "ALIS_REGION": "eu", "ALIS_RUN_HASH": "abc123"}
    with LroClient.from_env("svc", env=env, store=f"sqlite:///{tmp_path}/x.db", cloud_tasks_project="tasks-proj") as c:
        assert c.config.host == "https://svc-abc123.run.app"  # lro/v2's host from ALIS_RUN_HASH
    assert made[0]["project"] == "tasks-proj" and made[0]["host"] == "https://svc-abc123.run.app"
    assert config_from_env("svc", None, {**env, "ALIS_PROJECT_NR": "7"}).host == "https://svc-7.eu.run.app"
    with pytest.raises(ConfigError) as err:
        Config(neuron="svc", database_role="")
    assert err.value.field == "lro.database_role"
    with pytest.raises(ConfigError) as err:
        Config(neuron="svc", purge_batch=0)
    assert err.value.field == "lro.purge_batch"

    seen: list[dict[str, Any]] = []

    class Factory:
        def operation_store(self, **kwargs: Any) -> Any:
            seen.append(kwargs)
            from errands.lro import SQLOperationStore

            return SQLOperationStore(open_store("memory://"), "svc")

    LroClient(Config(neuron="svc", store=Factory(), database_role="lro_reader", project="acme")).close()
    assert seen == [{"neuron": "svc", "table": "acme_svc_Operations", "database_role": "lro_reader"}]


def test_purge_honours_a_configured_ttl(tmp_path: Any, clock: FakeClock) -> None:
    with LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path}/t.db", ttl=timedelta(hours=1)), clock=clock) as c:
        c.new_operation("operations/a")
        clock.advance(3601)
        assert c.purge_expired() == 1


# -- handlers and resuming in-process -----------------------------------------------------------


def test_duplicate_handler_path_is_an_error(client: LroClient) -> None:
    client.add_resumable_handlers(ResumableHandler("a", lambda op: None))
    with pytest.raises(ConfigError) as err:
        client.add_resumable_handlers(ResumableHandler("b", lambda op: None), ResumableHandler("a", lambda op: None))
    assert "'a'" in str(err.value)
    assert sorted(client.handlers) == ["a"]  # nothing of the failed call was registered
    with pytest.raises(ConfigError):
        ResumableHandler("/leading", lambda op: None)
    with pytest.raises(ConfigError):
        ResumableHandler("ok", "not callable")  # type: ignore[arg-type]


def test_seed_flow_in_process(client: LroClient, clock: FakeClock) -> None:
    runs: list[int] = []

    def create_agent(op: Operation) -> None:
        state = op.decode_private_state(Progress)
        assert state is not None
        meta = must_unmarshal_metadata(op, dict)
        state.step += 1
        runs.append(state.step)
        if state.step < 3:
            op.set_private_state(state).save_metadata({**meta, "step": state.step})
            op.resume_via_tasks("create-agent", delay=timedelta(seconds=5))
        else:
            op.complete({"agent": "agents/1", "steps": state.step})

    client.add_resumable_handlers(ResumableHandler("create-agent", create_agent))
    op = client.new_operation("operations/seed", {"step": 0}, private_state=Progress())
    op.resume_via_tasks("create-agent")
    assert client.run_due() == 1
    assert client.run_due() == 0  # the next resume waits 5 seconds
    clock.advance(5)
    assert client.run_due() == 1
    clock.advance(5)
    assert client.run_due() == 1
    assert runs == [1, 2, 3]
    pb = client.get_operation_pb("operations/seed")
    assert pb.done and unmarshal_metadata(pb, dict) == {"step": 2}
    response = struct_pb2.Struct()
    pb.response.Unpack(response)
    assert dict(response) == {"agent": "agents/1", "steps": 3.0}


def test_async_handlers_run_too(client: LroClient) -> None:
    async def handler(op: Operation) -> None:
        await asyncio.sleep(0)
        op.complete({"async": True})

    client.add_resumable_handlers(ResumableHandler("async", handler))
    client.new_operation("operations/as")
    assert client.resume("operations/as", "async") is ResumeOutcome.COMPLETED
    assert client.get_operation_pb("operations/as").done


def test_transient_error_retries_and_other_errors_fail_internal(client: LroClient, clock: FakeClock) -> None:
    attempts: list[int] = []

    def flaky(op: Operation) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("backend warming up", retry_after=1)
        op.complete({"after": len(attempts)})

    def broken(op: Operation) -> None:
        raise ValueError("bad input from upstream")

    client.add_resumable_handlers(ResumableHandler("flaky", flaky), ResumableHandler("broken", broken))
    client.new_operation("operations/flaky").resume_via_tasks("flaky")
    client.new_operation("operations/broken").resume_via_tasks("broken")
    with pytest.raises(TransientError):
        client.resume("operations/flaky", "flaky")
    assert not client.get_operation_pb("operations/flaky").done
    assert client.run_due() == 1  # broken settles; flaky is retried later
    pb = client.get_operation_pb("operations/broken")
    assert pb.error.code == code_pb2.INTERNAL and pb.error.message == "bad input from upstream"
    clock.advance(5)
    assert client.run_due() == 1
    assert client.get_operation_pb("operations/flaky").done and len(attempts) == 3


def test_stale_callbacks_are_ignored(client: LroClient) -> None:
    calls: list[str] = []
    client.add_resumable_handlers(ResumableHandler("h", lambda op: calls.append(op.name)))
    op = client.new_operation("operations/t")
    op.resume_via_tasks("h")
    first = client.store.get("operations/t").resume_token
    op.resume_via_tasks("h")  # supersedes the first
    assert client.resume("operations/t", "h", token=first) is ResumeOutcome.STALE
    assert calls == []
    assert client.run_due() == 2
    assert calls == ["operations/t"]
    with pytest.raises(NotFoundError):
        client.resume("operations/t", "unknown-path")
    with pytest.raises(NotFoundError):
        client.resume("operations/none", "h")


def test_resume_via_tasks_validates_its_arguments(client: LroClient) -> None:
    op = client.new_operation("operations/v")
    with pytest.raises(ConfigError):
        op.resume_via_tasks("/bad path")
    with pytest.raises(ConfigError):
        op.resume_via_tasks("ok", delay=-1)
    assert client.store.get("operations/v").version == 1


def test_two_concurrent_resumes_one_save_wins_per_version(client: LroClient) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[ResumeOutcome] = []
    errors: list[BaseException] = []

    def handler(op: Operation) -> None:
        barrier.wait(timeout=10)  # both handlers hold the same version
        try:
            op.save_metadata({"by": threading.current_thread().name})
        except LeaseLostError as exc:
            errors.append(exc)
            raise
        op.complete({"winner": threading.current_thread().name})

    client.add_resumable_handlers(ResumableHandler("race", handler))
    client.new_operation("operations/race")

    def run() -> None:
        outcomes.append(client.resume("operations/race", "race"))

    threads = [threading.Thread(target=run, name=f"resume-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted([ResumeOutcome.COMPLETED, ResumeOutcome.LOST])
    assert len(errors) == 1 and isinstance(errors[0], LeaseLostError)
    pb = client.get_operation_pb("operations/race")
    assert pb.done and not pb.HasField("error")
    winner = unmarshal_metadata(pb, dict)
    response = struct_pb2.Struct()
    pb.response.Unpack(response)
    assert winner == {"by": response["winner"]}
    # A later resume cannot reopen it.
    assert client.resume("operations/race", "race") is ResumeOutcome.ALREADY_DONE
    assert client.store.get("operations/race").version == 3


def test_batched_resumes_commit_together(tmp_path: Any, clock: FakeClock) -> None:
    cfg = Config(neuron="svc", store=f"sqlite:///{tmp_path}/b.db", resume_batch=50)
    with LroClient(cfg, clock=clock) as c:
        def handler(op: Operation) -> None:
            if op.name.endswith("7"):
                raise RuntimeError("seven fails")
            if op.name.endswith("3"):
                raise TransientError("three waits")
            op.complete({"n": op.name})

        c.add_resumable_handlers(ResumableHandler("h", handler))
        for i in range(20):
            c.new_operation(f"operations/b{i}").resume_via_tasks("h")
        assert c.run_due() == 18
        done, _ = c.list_operations("done = true", page_size=100)
        assert len(done) == 18
        assert sum(1 for pb in done if pb.error.code == code_pb2.INTERNAL) == 2
        assert not c.get_operation_pb("operations/b3").done
        assert c.scheduler.pending() == 2


def test_a_handler_changing_another_operation_of_its_batch_is_seen_by_that_operations_resume(
    tmp_path: Any, clock: FakeClock
) -> None:
    # The chunk's rows are read once up front; a row a handler writes meanwhile must not be served stale.
    cfg = Config(neuron="svc", store=f"sqlite:///{tmp_path}/x.db", resume_batch=10)
    with LroClient(cfg, clock=clock) as c:
        ran: list[str] = []

        def handler(op: Operation) -> None:
            ran.append(op.name)
            if op.name == "operations/x0":
                c.get_operation("operations/x1").complete({"by": "x0"})
                c.get_operation("operations/x2").set_private_state({"moved": True}).resume_via_tasks("h", 60)
            op.complete({"by": op.name})

        c.add_resumable_handlers(ResumableHandler("h", handler))
        for i in range(3):
            c.new_operation(f"operations/x{i}").resume_via_tasks("h")
        assert c.run_due() == 3
        assert ran == ["operations/x0"]  # x1 was already done, x2's first callback was superseded
        x1 = c.get_operation_pb("operations/x1")
        response = struct_pb2.Struct()
        x1.response.Unpack(response)
        assert response["by"] == "x0"
        assert c.get_operation("operations/x2").decode_private_state() == {"moved": True}
        assert not c.get_operation_pb("operations/x2").done
        clock.advance(60)
        assert c.run_due() == 1 and ran[-1] == "operations/x2"
        assert c.core_store is not None
        events = Journal(c.core_store).read(0, subjects=["lro.operation.done"])
        assert sorted(e.data["name"] for e in events) == ["operations/x0", "operations/x1", "operations/x2"]


def test_reads_inside_a_batch_see_the_batchs_own_writes(client: LroClient) -> None:
    with client.batch():
        op = client.new_operation("operations/rw", {"step": 0}, private_state={"n": 1})
        op.set_private_state({"n": 2}).save_metadata({"step": 1})
        again = client.get_operation("operations/rw")
        assert again.version == op.version == 2
        assert again.decode_private_state() == {"n": 2} and unmarshal_metadata(again, dict) == {"step": 1}
        client.cancel_operation("operations/rw")  # never scheduled: cancelled at once, inside the batch
        assert client.get_operation("operations/rw").done
        with pytest.raises(LeaseLostError):
            op.save_private_state({"n": 3})  # a stale copy still loses its compare-and-set
    pb = client.get_operation_pb("operations/rw")
    assert pb.done and pb.error.code == code_pb2.CANCELLED
    assert client.get_operation("operations/rw").decode_private_state() == {"n": 2}


def test_timers_of_other_topics_are_left_for_their_engine(client: LroClient) -> None:
    client.scheduler.schedule("other.topic", {"x": 1}, at=0.0, key="other")
    assert client.run_due() == 0
    fired: list[Any] = []
    assert client.scheduler.fire_due({"other.topic": lambda _t, p: fired.append(p)}) == 1
    assert fired == [{"x": 1}]


def test_attach_fires_callbacks_from_a_core_worker_beside_other_timers(client: LroClient) -> None:
    from errands.core import Worker

    assert client.core_store is not None
    client.add_resumable_handlers(ResumableHandler("h", lambda op: op.complete()))
    client.new_operation("operations/w1").resume_via_tasks("h")
    other: list[Any] = []
    worker = Worker(client.core_store, timer_handlers={"other.topic": lambda _t, p: other.append(p)})
    worker.scheduler.schedule("other.topic", {"x": 1}, at=0.0)  # another engine's timer
    client.attach(worker)
    worker.step()  # one pass fires both: neither engine parks the other's timers
    assert client.get_operation_pb("operations/w1").done and other == [{"x": 1}]


def test_attach_with_batched_resumes_adds_a_job(tmp_path: Any) -> None:
    from errands.core import Worker

    with LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path}/a.db", resume_batch=20)) as c:
        assert c.core_store is not None
        c.add_resumable_handlers(ResumableHandler("h", lambda op: op.complete()))
        for i in range(30):
            c.new_operation(f"operations/a{i}").resume_via_tasks("h")
        worker = Worker(c.core_store)
        c.attach(worker)
        assert worker.drain() >= 30
        assert len(c.list_operations("done = true")[0]) == 30


def test_fire_is_a_timer_handler_that_asks_for_retries(client: LroClient) -> None:
    client.add_resumable_handlers(ResumableHandler("t", _always_transient))
    client.new_operation("operations/f1").resume_via_tasks("t")
    token = client.store.get("operations/f1").resume_token
    payload = {"neuron": "svc", "name": "operations/f1", "path": "t", "token": token}
    with pytest.raises(TransientError):
        client.fire(client.resume_topic, payload)
    client.fire(client.resume_topic, {**payload, "name": "operations/gone"})  # dropped, not retried


def _always_transient(op: Operation) -> None:
    raise TransientError("later")


def test_shared_store_object_and_missing_scheduler(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path}/shared.db")
    c = LroClient(Config(neuron="svc", store=store))
    assert c.core_store is store
    c.close()  # does not close a store it did not open
    assert Journal(store).last_position() == 0
    store.close()

    from errands.lro import SQLOperationStore

    inner = open_store("memory://")
    # A read-only process (an Operations server) needs no scheduler; resuming without one is refused.
    reader = LroClient(Config(neuron="svc", store=_Wrapped(SQLOperationStore(inner, "svc"))))
    assert reader.scheduler is None
    op = reader.new_operation("operations/r1", {"n": 1})
    assert reader.get_operation_pb("operations/r1").name == "operations/r1"
    with pytest.raises(ConfigError) as err:
        op.resume_via_tasks("h")
    assert err.value.field == "lro.scheduler"
    assert reader.store.get("operations/r1").resume_token is None  # nothing was saved
    reader.cancel_operation("operations/r1")  # never scheduled: cancelled at once, no scheduler needed
    assert reader.get_operation_pb("operations/r1").error.code == 1
    # An operation a writer scheduled: the reader flags it; the writer's next callback ends it CANCELLED.
    timers = open_store("memory://")
    writer = LroClient(Config(neuron="svc", store=_Wrapped(SQLOperationStore(inner, "svc")),
                              scheduler=StoreScheduler(timers, queue="lro.timers.svc")))
    writer.add_resumable_handler("h", lambda op: op.complete())
    writer.new_operation("operations/r2").resume_via_tasks("h", delay=timedelta(hours=1))
    reader.cancel_operation("operations/r2")
    assert reader.store.get("operations/r2").cancel_requested and not reader.get_operation_pb("operations/r2").done
    token = parse_token(writer.store.get("operations/r2").resume_token).token
    assert writer.resume("operations/r2", "h", token) is not None
    assert writer.get_operation_pb("operations/r2").error.code == 1
    timers.close()
    with pytest.raises(ConfigError):
        LroClient(Config(neuron="svc", store=42))
    inner.close()


class _Wrapped:
    """An OperationStore that is not a core SQL store (as the Spanner one will be)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in {"create", "get", "save", "request_cancel", "delete", "list", "purge", "now"}:
            return getattr(self._inner, name)
        raise AttributeError(name)


def test_an_operation_store_with_its_own_scheduler(clock: FakeClock) -> None:
    from errands.lro import SQLOperationStore

    scheduled: list[tuple[str, Any, Any, Any]] = []

    class Recorder:
        def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
            scheduled.append((topic, payload, at, key))
            return key or ""

    inner = open_store("memory://", clock=clock)
    with LroClient(Config(neuron="svc", store=_Wrapped(SQLOperationStore(inner, "svc")), scheduler=Recorder(),
                          host="https://svc.example")) as c:
        c.new_operation("operations/1").resume_via_tasks("h", delay=timedelta(seconds=30))
        topic, payload, at, key = scheduled[0]
        token = parse_token(c.store.get("operations/1").resume_token).token
        assert topic == "lro.resume.svc" and key == f"lro-{token}"
        assert payload == {"neuron": "svc", "name": "operations/1", "path": "h", "token": token,
                           "url": f"https://svc.example/resume-operation/h?operation=operations%2F1&token={token}"}
        assert at.timestamp() == pytest.approx(clock.now() + 30)
        assert c.run_due() == 0
    inner.close()


def test_operation_pb_is_a_copy(client: LroClient) -> None:
    op = client.new_operation("operations/copy")
    pb = op.operation_pb()
    pb.done = True
    assert not op.done and isinstance(pb, operations_pb2.Operation)


@pytest.mark.services
@pytest.mark.parametrize("batch", [1, 10])
def test_seed_flow_on_postgresql(postgres_url: str, clock: FakeClock, batch: int) -> None:
    with LroClient(Config(neuron="svc", store=postgres_url, resume_batch=batch), clock=clock) as c:
        def handler(op: Operation) -> None:
            state = op.decode_private_state(Progress) or Progress()
            state.step += 1
            if state.step < 3:
                op.set_private_state(state).set_metadata({"step": state.step}).resume_via_tasks("h")
            elif op.name.endswith("3"):
                raise RuntimeError("three breaks")
            else:
                op.complete({"steps": state.step})

        c.add_resumable_handlers(ResumableHandler("h", handler))
        with c.batch():
            for i in range(12):
                c.new_operation(f"operations/pg{i}", private_state=Progress()).resume_via_tasks("h")
        while c.run_due() > 0:
            pass
        done, _ = c.list_operations("done = true")
        assert len(done) == 12
        failed = [pb.name for pb in done if pb.HasField("error")]
        assert failed == ["operations/pg3"]
        assert c.get_operation_pb("operations/pg3").error.code == code_pb2.INTERNAL
        assert unmarshal_metadata(c.get_operation_pb("operations/pg5"), dict) == {"step": 2}
        assert c.scheduler.pending() == 0
        assert c.core_store is not None
        assert len(Journal(c.core_store).read(0, subjects=["lro.operation.done"])) == 12


def test_batch_rolls_back_everything_when_the_block_raises(client: LroClient) -> None:
    with pytest.raises(RuntimeError):
        with client.batch():
            client.new_operation("operations/rb1").resume_via_tasks("h")
            client.new_operation("operations/rb2")
            raise RuntimeError("caller changed its mind")
    assert client.list_operations()[0] == [] and client.scheduler.pending() == 0


def test_a_half_written_completion_rolls_the_whole_batch_back(
    tmp_path: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from errands.lro import SQLOperationStore

    cfg = Config(neuron="svc", store=f"sqlite:///{tmp_path}/h.db", resume_batch=10, lease_for=5)
    with LroClient(cfg, clock=clock) as c:
        c.add_resumable_handlers(ResumableHandler("h", lambda op: op.complete({"ok": True})))
        for i in range(3):
            c.new_operation(f"operations/h{i}").resume_via_tasks("h")

        def broken(self: Any, tx: Any, records: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")  # a fault the real disk will not give on demand

        monkeypatch.setattr(SQLOperationStore, "_append_done", broken)
        assert c.run_due() == 0
        assert c.list_operations("done = true")[0] == []  # no row is done without its event
        with pytest.raises(TransientError):
            with c.batch():
                c.get_operation("operations/h0").complete()
        assert not c.get_operation_pb("operations/h0").done
        monkeypatch.undo()
        clock.advance(5)  # the rolled-back batch's leases lapse
        assert c.run_due() == 3
        assert len(c.list_operations("done = true")[0]) == 3
        assert c.core_store is not None
        assert len(Journal(c.core_store).read(0, subjects=["lro.operation.done"])) == 3
