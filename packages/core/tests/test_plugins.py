"""Plugin discovery (entry points faked the way pluggy and pytest test theirs), kill switches, named
instances and ``errands.toml``."""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
from errands.core import (
    ConfigError,
    DispatchOutcome,
    DispatchResult,
    Effect,
    PluginError,
    Registry,
    get_registry,
    hookimpl,
    load_config,
    register_connector,
    register_sink,
    reset_registry,
)

GROUP = "errands.plugins"


# -- plugin classes ---------------------------------------------------------------------------------


class WireConnector:
    name: ClassVar[str] = "wire"

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must be an http(s) URL, got {url!r}", field="url", value=url)
        self.url = url
        self.timeout = timeout

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=effect.key)


class OtherWireConnector:
    name: ClassVar[str] = "wire"

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.FAILED)


class AuditSink:
    name: ClassVar[str] = "audit"

    def __init__(self, path: str = "-") -> None:
        self.path = path

    def publish(self, events: Any) -> None:
        return None


class MemoStore:
    name: ClassVar[str] = "memo"
    schemes: ClassVar[tuple[str, ...]] = ("memo",)


class NoNameConnector:
    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


def plugin_module(name: str, **hooks: Any) -> types.ModuleType:
    """A module object whose attributes are hook implementations returning the given lists."""
    mod = types.ModuleType(name)
    for hook, value in hooks.items():

        def impl(value: Any = value) -> Any:
            return value

        impl.__name__ = hook
        setattr(mod, hook, hookimpl(impl))
    return mod


class FakeDist:
    """Just enough of ``importlib.metadata.Distribution`` for entry-point discovery."""

    def __init__(self, name: str, version: str, entry_points: dict[str, str], group: str = GROUP) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = [md.EntryPoint(n, v, group) for n, v in entry_points.items()]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("ERRANDS_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("ERRANDS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield
    reset_registry()


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install fake distributions: ``installed(FakeDist(...), {module_name: module})``."""

    def install(dists: list[FakeDist], modules: dict[str, types.ModuleType]) -> None:
        for name, mod in modules.items():
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(md, "distributions", lambda: iter(dists))

    return install


@pytest.fixture
def two_plugins(installed: Any) -> None:
    installed(
        [
            FakeDist("acme-wire", "2.3.1", {"acme": "acme_plugin"}),
            FakeDist("audit-sinks", "0.9", {"audit": "audit_plugin"}),
            FakeDist("pytest-thing", "1.0", {"thing": "nowhere_at_all"}, group="pytest11"),
        ],
        {
            "acme_plugin": plugin_module("acme_plugin", errands_register_connectors=[WireConnector],
                                         errands_register_stores=[MemoStore]),
            "audit_plugin": plugin_module("audit_plugin", errands_register_sinks=[AuditSink]),
        },
    )


# -- discovery --------------------------------------------------------------------------------------


def test_entry_points_are_discovered_with_distribution_and_version(two_plugins: None) -> None:
    reg = Registry()
    assert sorted(reg.plugins) == ["acme", "audit", "core"]
    assert reg.plugins["acme"].to_dict() == {
        "name": "acme", "distribution": "acme-wire", "version": "2.3.1",
        "connectors": ["wire"], "sinks": [], "stores": ["memo"], "schedulers": [],
    }
    assert reg.plugins["audit"].distribution == "audit-sinks"
    assert reg.plugins["audit"].sinks == {"audit": AuditSink}
    assert reg.connectors["wire"] is WireConnector
    assert reg.stores["memo"] is MemoStore
    assert {"sqlite", "memory", "postgresql", "postgres"} <= set(reg.plugins["core"].stores)
    assert reg.plugins["core"].schedulers


def test_other_entry_point_groups_are_ignored(two_plugins: None) -> None:
    assert "thing" not in Registry().plugins


def test_disable_plugins_blocks_by_entry_point_name(two_plugins: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_DISABLE_PLUGINS", " audit , something-else")
    reg = Registry()
    assert sorted(reg.plugins) == ["acme", "core"]
    assert "audit" not in reg.sinks
    assert reg.pm.is_blocked("audit")


def test_disabled_plugin_is_never_imported(installed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    installed([FakeDist("broken", "1", {"broken": "errands_test_module_that_does_not_exist"})], {})
    with pytest.raises(PluginError):
        Registry()
    monkeypatch.setenv("ERRANDS_DISABLE_PLUGINS", "broken")
    assert "broken" not in Registry().plugins


def test_disable_autoload_loads_no_entry_point(two_plugins: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert list(reg.plugins) == ["core"]
    assert reg.connectors == {} and reg.sinks == {}


def test_disable_autoload_keeps_explicit_plugins(two_plugins: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_DISABLE_PLUGIN_AUTOLOAD", "1")
    explicit = plugin_module("mine", errands_register_connectors=[WireConnector])
    reg = Registry([("mine", explicit)])
    assert sorted(reg.plugins) == ["core", "mine"]
    assert reg.connectors["wire"] is WireConnector


def test_autoload_argument_overrides_environment(two_plugins: None) -> None:
    assert list(Registry(autoload=False).plugins) == ["core"]


def test_explicit_plugin_can_be_disabled_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRANDS_DISABLE_PLUGINS", "mine")
    reg = Registry([("mine", plugin_module("mine", errands_register_connectors=[WireConnector]))], autoload=False)
    assert "mine" not in reg.plugins and "wire" not in reg.connectors


def test_explicit_plugin_takes_precedence_over_entry_point_of_same_name(two_plugins: None) -> None:
    mine = plugin_module("mine", errands_register_sinks=[AuditSink])
    reg = Registry([("acme", mine)])
    assert "wire" not in reg.connectors
    assert reg.sinks["audit"] is AuditSink


# -- plugin errors ----------------------------------------------------------------------------------


def test_duplicate_connector_name_names_both_classes(installed: Any) -> None:
    installed(
        [FakeDist("a-dist", "1", {"first": "first_plugin"}), FakeDist("b-dist", "1", {"second": "second_plugin"})],
        {
            "first_plugin": plugin_module("first_plugin", errands_register_connectors=[WireConnector]),
            "second_plugin": plugin_module("second_plugin", errands_register_connectors=[OtherWireConnector]),
        },
    )
    with pytest.raises(PluginError) as info:
        Registry()
    message = str(info.value)
    assert "'wire'" in message
    assert f"{__name__}.WireConnector" in message
    assert f"{__name__}.OtherWireConnector" in message
    assert info.value.plugin in ("first", "second")


def test_same_class_from_two_plugins_is_not_a_conflict() -> None:
    reg = Registry(
        [("a", plugin_module("a", errands_register_connectors=[WireConnector])),
         ("b", plugin_module("b", errands_register_connectors=[WireConnector]))],
        autoload=False,
    )
    assert reg.connectors == {"wire": WireConnector}


def test_duplicate_store_scheme_is_an_error() -> None:
    class Shadow:
        name: ClassVar[str] = "shadow"
        schemes: ClassVar[tuple[str, ...]] = ("sqlite",)

    with pytest.raises(PluginError, match="'sqlite' is registered twice"):
        Registry([("shadow", plugin_module("shadow", errands_register_stores=[Shadow]))], autoload=False)


def test_misspelt_hook_is_caught_by_check_pending(installed: Any) -> None:
    installed([FakeDist("typo", "1", {"typo": "typo_plugin"})],
              {"typo_plugin": plugin_module("typo_plugin", errands_register_conectors=[WireConnector])})
    with pytest.raises(PluginError, match="errands_register_conectors") as info:
        Registry()
    assert info.value.plugin is not None


def test_misspelt_hook_in_explicit_plugin() -> None:
    with pytest.raises(PluginError, match="errands_register_sink"):
        Registry([("x", plugin_module("x", errands_register_sink=[AuditSink]))], autoload=False)


def test_plugin_that_fails_to_import_names_itself(installed: Any) -> None:
    boom = types.ModuleType("boom_plugin")

    def __getattr__(name: str) -> Any:
        raise RuntimeError("kaboom")

    installed([FakeDist("boom", "1", {"boom": "boom_plugin:attr"})], {"boom_plugin": boom})
    boom.__getattr__ = __getattr__  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"plugin 'boom'.*kaboom") as info:
        Registry()
    assert info.value.plugin == "boom"


def test_hook_registering_an_instance_is_refused() -> None:
    with pytest.raises(PluginError, match="hooks register classes") as info:
        Registry([("inst", plugin_module("inst", errands_register_sinks=[AuditSink()]))], autoload=False)
    assert info.value.plugin == "inst"


def test_class_without_name_is_refused() -> None:
    with pytest.raises(PluginError, match=r"NoNameConnector.*has no name class attribute"):
        Registry([("nn", plugin_module("nn", errands_register_connectors=[NoNameConnector]))], autoload=False)


def test_hook_that_raises_names_the_plugin() -> None:
    mod = types.ModuleType("raiser")

    @hookimpl
    def errands_register_connectors() -> list[type]:
        raise ValueError("no config")

    mod.errands_register_connectors = errands_register_connectors  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="plugin 'raiser' failed in errands_register_connectors: no config"):
        Registry([("raiser", mod)], autoload=False)


# -- named instances in code ------------------------------------------------------------------------


def test_named_instances_in_code() -> None:
    reg = Registry(autoload=False)
    wire = reg.add_connector("bank.wire", WireConnector(url="https://bank.example"))
    ach = reg.add_connector("bank.ach", WireConnector(url="https://ach.example"))
    assert reg.connector("bank.wire") is wire and reg.connector("bank.ach") is ach
    assert reg.add_sink("audit", AuditSink()) is reg.sink("audit")


def test_unknown_named_connector_lists_the_known_ones() -> None:
    reg = Registry(autoload=False)
    reg.add_connector("bank.wire", WireConnector(url="https://bank.example"))
    with pytest.raises(ConfigError, match=re.escape("unknown connector 'bank.wyre'; named connectors: bank.wire")) as info:
        reg.connector("bank.wyre")
    assert info.value.value == "bank.wyre"
    with pytest.raises(ConfigError, match="unknown sink 'nope'"):
        reg.sink("nope")


@pytest.mark.parametrize("bad", ["", " bank", "bank wire", 7])
def test_bad_instance_names_are_refused(bad: Any) -> None:
    reg = Registry(autoload=False)
    with pytest.raises(ConfigError, match="names must be non-empty strings") as info:
        reg.add_connector(bad, WireConnector(url="https://x"))
    assert info.value.value == bad
    assert reg.connector_instances == {}


def test_instance_without_dispatch_is_refused() -> None:
    reg = Registry(autoload=False)
    with pytest.raises(ConfigError, match=re.escape('connectors."bank.wire" must have a dispatch')) as info:
        reg.add_connector("bank.wire", AuditSink())
    assert info.value.field == 'connectors."bank.wire"'
    with pytest.raises(ConfigError, match=re.escape("sinks.audit must have a publish")):
        reg.add_sink("audit", WireConnector(url="https://x"))
    assert reg.connector_instances == {} and reg.sink_instances == {}


def test_a_taken_connector_name_is_refused_naming_both_instances() -> None:
    reg = Registry(autoload=False)
    first = reg.add_connector("bank.wire", WireConnector(url="https://bank.example"))
    with pytest.raises(ConfigError) as info:
        reg.add_connector("bank.wire", OtherWireConnector())
    err = info.value
    assert err.field == 'connectors."bank.wire"'
    message = str(err)
    assert 'connectors."bank.wire" is taken' in message
    assert f"{__name__}.WireConnector" in message and f"{__name__}.OtherWireConnector" in message
    assert "replace=True" in message, "the message says how to replace it on purpose"
    assert reg.connector("bank.wire") is first, "the first instance is still the one registered"


def test_a_taken_sink_name_is_refused_naming_both_instances() -> None:
    reg = Registry(autoload=False)
    first = reg.add_sink("audit", AuditSink(path="a.jsonl"))
    with pytest.raises(ConfigError, match=re.escape("sinks.audit is taken")) as info:
        reg.add_sink("audit", AuditSink(path="b.jsonl"))
    assert info.value.field == "sinks.audit"
    assert str(info.value).count(f"{__name__}.AuditSink") == 2
    assert reg.sink("audit") is first


def test_registering_the_same_object_again_is_idempotent_and_replace_is_explicit() -> None:
    reg = Registry(autoload=False)
    wire = WireConnector(url="https://bank.example")
    assert reg.add_connector("bank.wire", wire) is wire
    assert reg.add_connector("bank.wire", wire) is wire
    other = OtherWireConnector()
    assert reg.add_connector("bank.wire", other, replace=True) is other
    assert reg.connector("bank.wire") is other
    sink = AuditSink()
    assert reg.add_sink("audit", sink) is reg.add_sink("audit", sink) is sink
    newer = AuditSink()
    assert reg.add_sink("audit", newer, replace=True) is reg.sink("audit") is newer


def test_process_wide_register_connector_refuses_a_taken_name() -> None:
    reset_registry(Registry(autoload=False))
    first = register_connector("bank.wire", WireConnector(url="https://bank.example"))
    with pytest.raises(ConfigError, match="is taken"):
        register_connector("bank.wire", WireConnector(url="https://other.example"))
    assert get_registry().connector("bank.wire") is first
    register_sink("audit", AuditSink())
    with pytest.raises(ConfigError, match="is taken"):
        register_sink("audit", AuditSink())
    assert register_connector("bank.wire", OtherWireConnector(), replace=True) is get_registry().connector("bank.wire")


def test_process_wide_registry(two_plugins: None) -> None:
    reset_registry()
    reg = get_registry()
    assert get_registry() is reg
    assert "acme" in reg.plugins
    inst = register_connector("bank.wire", WireConnector(url="https://bank.example"))
    assert reg.connector("bank.wire") is inst
    reset_registry(Registry(autoload=False))
    assert get_registry() is not reg and "acme" not in get_registry().plugins


# -- errands.toml ----------------------------------------------------------------------------------


@pytest.fixture
def reg(two_plugins: None) -> Registry:
    return Registry()


GOOD = """
store = "sqlite:///app.db"

[connectors."bank.wire"]
type = "wire"
url = "https://bank.example/pay"
timeout = 3.5

[connectors.backup]
type = "wire"
url = "https://backup.example"

[sinks.audit]
type = "audit"
path = "audit.jsonl"
subjects = ["effect.**"]
batch_size = 50

[worker]
max_in_flight = 8
"""


def test_load_config_builds_named_instances(reg: Registry, tmp_path: Path) -> None:
    path = tmp_path / "errands.toml"
    path.write_text(GOOD)
    config = load_config(path, registry=reg)
    assert config.store == "sqlite:///app.db"
    assert config.path == str(path)
    wire = reg.connector("bank.wire")
    assert isinstance(wire, WireConnector) and wire.url == "https://bank.example/pay" and wire.timeout == 3.5
    assert reg.connector("backup").url == "https://backup.example"
    sink = reg.sink("audit")
    assert isinstance(sink, AuditSink) and sink.path == "audit.jsonl"
    assert config.routes == {"audit": {"subjects": ["effect.**"], "batch_size": 50}}
    assert config.worker == {"max_in_flight": 8}


def test_load_config_from_mapping(reg: Registry) -> None:
    config = load_config({"connectors": {"w": {"type": "wire", "url": "http://x"}}}, registry=reg)
    assert config.store == "sqlite:///errands.db"
    assert config.path is None
    assert reg.connector("w").url == "http://x"


def test_unknown_type_names_field_value_and_installed_types(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"bank.wire": {"type": "htp", "url": "https://x"}}}, registry=reg)
    err = info.value
    assert err.field == 'connectors."bank.wire".type'
    assert err.value == "htp"
    assert "'htp' is not a known connector type; installed: wire" in str(err)
    assert reg.connector_instances == {}


def test_missing_type(reg: Registry) -> None:
    with pytest.raises(ConfigError, match=r"sinks\.audit\.type is required \(one of: audit\)") as info:
        load_config({"sinks": {"audit": {"path": "-"}}}, registry=reg)
    assert info.value.field == "sinks.audit.type"
    assert info.value.value is None


def test_bad_kwargs_name_the_instance(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"bank.wire": {"type": "wire", "url": "https://x", "retries": 3}}}, registry=reg)
    assert info.value.field == 'connectors."bank.wire"'
    assert "retries" in str(info.value)
    assert info.value.value == {"url": "https://x", "retries": 3}


def test_bad_value_names_the_field_path_and_the_value(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"bank.wire": {"type": "wire", "url": "ftp://x"}}}, registry=reg)
    err = info.value
    assert err.field == 'connectors."bank.wire".url'
    assert err.value == "ftp://x"
    assert 'connectors."bank.wire".url' in str(err) and "'ftp://x'" in str(err)


def test_every_problem_is_reported_at_once_and_nothing_is_registered(reg: Registry, tmp_path: Path) -> None:
    path = tmp_path / "errands.toml"
    path.write_text(
        'store = "app.db"\n'
        "[connectors.ok]\ntype = \"wire\"\nurl = \"https://fine.example\"\n"
        "[connectors.\"bank.wire\"]\ntype = \"wire\"\nurl = \"ftp://x\"\n"
        "[connectors.typo]\ntype = \"wyre\"\n"
        "[sinks.audit]\npath = \"-\"\n"
        "[workers]\nn = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=reg)
    err = info.value
    message = str(err)
    assert message.startswith(f"5 problems in {path}")
    fields = [p.field for p in err.problems]
    assert sorted(fields) == sorted(
        ["workers", "store", 'connectors."bank.wire".url', "connectors.typo.type", "sinks.audit.type"]
    )
    for expected in ("'app.db'", "'ftp://x'", "'wyre'", "workers: unknown section"):
        assert expected in message
    assert reg.connector_instances == {} and reg.sink_instances == {}


def test_missing_file_and_bad_toml(reg: Registry, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, registry=reg)
    assert info.value.value == str(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[connectors\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad, registry=reg)


def test_sections_of_the_wrong_shape(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": ["wire"], "sinks": {"audit": "log"}, "worker": 3}, registry=reg)
    fields = sorted(p.field for p in info.value.problems)
    assert fields == ["connectors", "sinks.audit", "worker"]


def test_config_name_taken_in_code_is_a_problem_and_nothing_is_registered(reg: Registry) -> None:
    mine = reg.add_connector("bank.wire", OtherWireConnector())
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"bank.wire": {"type": "wire", "url": "https://bank.example"},
                                    "backup": {"type": "wire", "url": "https://backup.example"}}}, registry=reg)
    err = info.value
    assert err.field == 'connectors."bank.wire"'
    assert f"{__name__}.OtherWireConnector" in str(err) and f"{__name__}.WireConnector" in str(err)
    assert reg.connector("bank.wire") is mine
    assert "backup" not in reg.connector_instances, "a config with a problem registers nothing"


def test_loading_the_same_config_again_keeps_its_instances(reg: Registry, tmp_path: Path) -> None:
    path = tmp_path / "errands.toml"
    path.write_text(GOOD)
    first = load_config(path, registry=reg)
    again = load_config(path, registry=reg)
    assert again.connectors["bank.wire"] is first.connectors["bank.wire"] is reg.connector("bank.wire")
    assert again.sinks["audit"] is reg.sink("audit")
    assert again.routes == first.routes


def test_a_changed_table_under_a_loaded_name_is_refused_unless_replaced(reg: Registry) -> None:
    load_config({"connectors": {"w": {"type": "wire", "url": "https://one.example"}}}, registry=reg)
    first = reg.connector("w")
    with pytest.raises(ConfigError, match="is taken") as info:
        load_config({"connectors": {"w": {"type": "wire", "url": "https://two.example"}}}, registry=reg)
    assert info.value.field == "connectors.w"
    assert reg.connector("w") is first
    load_config({"connectors": {"w": {"type": "wire", "url": "https://two.example"}}}, registry=reg, replace=True)
    assert reg.connector("w") is not first and reg.connector("w").url == "https://two.example"


def test_a_taken_name_with_a_bad_table_reports_both_problems(reg: Registry) -> None:
    load_config({"connectors": {"w": {"type": "wire", "url": "https://one.example"}}}, registry=reg)
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"w": {"type": "wire", "url": "ftp://two"}}}, registry=reg)
    fields = [p.field for p in info.value.problems]
    assert fields == ["connectors.w.url", "connectors.w"]
    assert reg.connector("w").url == "https://one.example"
