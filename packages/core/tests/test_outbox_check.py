"""``Outbox.check`` (what ``submit`` would refuse, storing nothing) and ``App.attach`` handing the app's
outbox to an engine that takes one."""

from __future__ import annotations

from typing import Any

import pytest
from errands.core import App, ConfigError, Effect, Outbox, PayloadError, Semantics, open_store
from errands.core.testing import FakeConnector


@pytest.mark.parametrize("effect, field", [
    (Effect(key="", connector="bank", payload={}), "effect.key"),
    (Effect(key="k", connector="nope", payload={}), "connector"),
    (Effect(key="k", connector="bank", payload={"x": object()}), "payload"),
    (Effect(key="k", connector="bank", payload={}, semantics=Semantics.NON_IDEMPOTENT), "semantics"),
])
def test_check_raises_what_submit_would_and_stores_nothing(effect: Effect, field: str) -> None:
    outbox = Outbox(open_store("memory://"), connectors={"bank": FakeConnector(can_observe=False,
                                                                               can_compensate=False)})
    with pytest.raises(ConfigError) as checked:
        outbox.check(effect)
    with pytest.raises(type(checked.value)) as submitted:
        outbox.submit(effect)
    assert str(checked.value) == str(submitted.value)
    assert field in str(checked.value.field) or isinstance(checked.value, PayloadError)
    assert outbox.list() == []


def test_check_passes_a_good_effect_without_storing_it() -> None:
    outbox = Outbox(open_store("memory://"), connectors=["bank"])
    outbox.check(Effect(key="k", connector="bank", payload={"cents": 1}))
    assert outbox.list() == []


class _Engine:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.outbox: Any = None
        self.attached: list[Any] = []

    def use_outbox(self, outbox: Any) -> None:
        self.outbox = outbox

    def attach(self, worker: Any) -> None:
        self.attached.append(worker)


def test_attach_gives_an_engine_on_the_app_store_the_app_outbox() -> None:
    app = App("memory://", connectors={"bank": FakeConnector()})
    engine = app.attach(_Engine(app.store))
    assert engine.outbox is app.outbox
    other = app.attach(_Engine(open_store("memory://")))  # another store: left alone
    assert other.outbox is None
    own = _Engine(app.store)
    own.outbox = "mine"
    assert app.attach(own).outbox == "mine"  # an engine with its own outbox keeps it
    app.close()
