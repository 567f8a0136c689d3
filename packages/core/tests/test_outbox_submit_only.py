"""A submit-only outbox: an API process records effects for connectors it knows by name alone (no instances, no
clients, no secrets), and the worker, which holds the instances, dispatches them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from errands.core import (
    ConfigError,
    DispatchOutcome,
    Effect,
    EffectStatus,
    FakeClock,
    Outbox,
    Semantics,
    open_store,
)
from errands.core.outbox import connector_names
from errands.core.testing import FakeConnector


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def api(url: str, clock: FakeClock) -> Any:
    """The API process's outbox: connector names only."""
    store = open_store(url, clock=clock)
    outbox = Outbox(store, connectors=["bank", "crm"])
    yield outbox
    outbox.close()
    store.close()


@pytest.fixture
def worker_store(url: str, clock: FakeClock) -> Any:
    store = open_store(url, clock=clock)
    yield store
    store.close()


def test_an_outbox_with_names_only_submits_and_a_worker_with_instances_dispatches(api: Any, worker_store: Any) -> None:
    assert api.submit_only and api.connectors == {}
    rec = api.submit(Effect(key="pay-1", connector="bank", tool="transfer", payload={"cents": 500}))
    assert rec.status is EffectStatus.PENDING
    api.submit_many([Effect(key="lead-1", connector="crm", payload={"name": "Ada"}),
                     Effect(key="pay-2", connector="bank", payload={"cents": 7}, human_gate=True)])
    assert api.approve("pay-2", by="grace").status is EffectStatus.PENDING  # decisions need no instance
    bank, crm = FakeConnector("bank"), FakeConnector("crm")
    worker = Outbox(worker_store, connectors={"bank": bank, "crm": crm})
    assert sorted(o.key for o in worker.dispatch_once()) == ["lead-1", "pay-1", "pay-2"]
    assert bank.deliveries("pay-1") == bank.deliveries("pay-2") == crm.deliveries("lead-1") == 1
    assert api.get("pay-1").status is EffectStatus.CONFIRMED
    assert [e.type for e in api.history("pay-1")] == ["effect.pending", "effect.dispatching", "effect.confirmed"]
    worker.close()


def test_a_name_not_declared_is_refused_with_the_known_names(api: Any) -> None:
    with pytest.raises(ConfigError, match="not a known connector; known: bank, crm") as err:
        api.submit(Effect(key="k", connector="mail", payload={}))
    assert (err.value.field, err.value.value) == ("effect.connector", "mail")
    assert api.list() == []


def test_a_submit_only_outbox_dispatches_nothing_and_says_so(api: Any) -> None:
    api.submit(Effect(key="k", connector="bank", payload={}))
    for step in (api.dispatch_once, api.reconcile_once, api.compensate_once, api.drain):
        with pytest.raises(ConfigError, match="submit-only") as err:
            step()
        assert err.value.field == "connectors"
    with pytest.raises(ConfigError, match="by name only"):
        api.connector("bank")
    assert api.get("k").status is EffectStatus.PENDING and api.get("k").attempts == 0


def test_capability_checks_are_left_to_the_worker(api: Any, worker_store: Any, clock: FakeClock) -> None:
    blind = FakeConnector("bank", can_observe=False, can_compensate=False)
    # The API process cannot know that "bank" can neither observe nor compensate: it admits both.
    api.submit(Effect(key="wire", connector="bank", payload={}, semantics=Semantics.NON_IDEMPOTENT))
    api.submit(Effect(key="netted", connector="bank", payload={}, semantics=Semantics.NON_IDEMPOTENT,
                      business_key="invoice-1"))
    api.submit(Effect(key="watch", connector="bank", payload={}, semantics=Semantics.OBSERVE_ONLY))
    worker = Outbox(worker_store, connectors={"bank": blind})
    outcomes = {o.key: o for o in worker.dispatch_once()}
    # No safety net: failed before any delivery. With its business_key it goes.
    assert outcomes["wire"].status is EffectStatus.FAILED and "no safety net" in (outcomes["wire"].error or "")
    assert blind.deliveries("wire") == 0
    assert outcomes["netted"].status is EffectStatus.CONFIRMED and blind.deliveries("netted") == 1
    [watched] = worker.reconcile_once()
    assert watched.key == "watch" and watched.flagged and "cannot observe" in (watched.error or "")
    assert blind.deliveries("watch") == 0
    worker.close()


def test_redrive_that_depends_on_the_connector_is_left_to_an_outbox_that_has_it(api: Any, worker_store: Any) -> None:
    bank = FakeConnector("bank", outcomes=[DispatchOutcome.FAILED])
    worker = Outbox(worker_store, connectors={"bank": bank})
    api.submit(Effect(key="k", connector="bank", payload={}))
    api.submit(Effect(key="seen", connector="bank", payload={}, semantics=Semantics.OBSERVE_ONLY, human_gate=True))
    api.reject("seen", reason="not now")
    assert worker.dispatch_once()[0].status is EffectStatus.FAILED
    assert api.redrive("k").status is EffectStatus.PENDING  # a FAILED effect is dispatched again, whatever its connector
    with pytest.raises(ConfigError, match="knows its name only"):
        api.redrive("seen")  # observed again, or dispatched? That is the connector's to say.
    assert worker.redrive("seen").status is EffectStatus.UNKNOWN
    worker.close()


def test_connectors_must_be_a_mapping_or_a_collection_of_names(worker_store: Any) -> None:
    with pytest.raises(ConfigError, match="collection of names"):
        Outbox(worker_store, connectors="bank")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty strings"):
        Outbox(worker_store, connectors=["bank", ""])


def test_connector_names_come_from_errands_toml_without_building_anything(tmp_path: Path, worker_store: Any) -> None:
    config = tmp_path / "errands.toml"
    # The types need not be installed here: nothing is built, and the secrets stay with the worker.
    config.write_text('store = "memory://"\n\n[connectors."bank.wire"]\ntype = "not-installed"\ntoken = "s3cret"\n\n'
                      '[connectors.crm]\ntype = "http"\n\n[sinks.audit]\ntype = "log"\n')
    assert connector_names(config) == ["bank.wire", "crm"]
    assert connector_names(str(config)) == ["bank.wire", "crm"]
    assert connector_names({"connectors": {"mail": {"type": "smtp"}}}) == ["mail"]
    assert connector_names({"store": "memory://"}) == []
    api = Outbox(worker_store, connectors=connector_names(config))
    assert api.submit(Effect(key="w", connector="bank.wire", payload={})).status is EffectStatus.PENDING
    api.close()


def test_connector_names_refuses_what_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        connector_names(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[connectors\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        connector_names(bad)
    with pytest.raises(ConfigError, match="table of named connectors") as err:
        connector_names({"connectors": ["bank"]})
    assert err.value.field == "connectors"
    with pytest.raises(ConfigError, match="without spaces"):
        connector_names({"connectors": {"my bank": {"type": "http"}}})
