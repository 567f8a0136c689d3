"""The ``http connector`` part of ``errands demo``, registered through the plugin hook."""

from __future__ import annotations

from pathlib import Path

from errands.connectors.http import _plugin
from errands.connectors.http._demo import HttpDemo
from errands.core import Registry
from errands.core._demo import DemoContext


def test_demo_part_is_registered() -> None:
    reg = Registry(plugins=[("http", _plugin)], autoload=False)
    parts = [cls for impl in reg.pm.hook.errands_register_demos.get_hookimpls() for cls in impl.function()]
    assert HttpDemo in parts


def test_demo_part_confirms_every_effect_once(tmp_path: Path) -> None:
    ctx = DemoContext(store_url=f"sqlite:///{tmp_path / 'demo.db'}", workdir=str(tmp_path), size=200, quiet=True)
    figures = HttpDemo().run(ctx)
    assert figures["effects confirmed"] == 200
    assert figures["keys performed twice"] == 0
    assert figures["answered 500 (injected)"] > 0
    assert figures["requests sent"] > 200


def test_demo_part_counts_only_its_own_effects_on_a_shared_store(tmp_path: Path) -> None:
    # `errands demo` runs every part on one store: effects confirmed by an earlier part must not end this
    # part's wait before its own effects are delivered.
    from errands.core import Effect, Outbox, open_store
    from errands.core.testing import FakeConnector

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    store = open_store(url)
    earlier = Outbox(store, {"earlier": FakeConnector()})
    earlier.submit_many([Effect(key=f"earlier-{i}", connector="earlier", payload={}) for i in range(300)])
    earlier.drain()
    earlier.close()
    store.close()
    ctx = DemoContext(store_url=url, workdir=str(tmp_path), size=100, quiet=True)
    figures = HttpDemo().run(ctx)
    assert figures["effects confirmed"] == 100
    assert figures["requests sent"] >= 100
