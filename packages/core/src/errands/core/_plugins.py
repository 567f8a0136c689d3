"""Plugin discovery (entry-point group ``errands.plugins``) and named instances."""

from __future__ import annotations

import copy
import importlib.metadata as md
import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

import pluggy

from . import _hookspecs
from ._protocols import Connector, Scheduler, Sink
from .errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "errands.plugins"

C = TypeVar("C", bound=Connector)
S = TypeVar("S", bound=Sink)
T = TypeVar("T")


@dataclass
class PluginInfo:
    """One loaded plugin and what it registered."""

    name: str
    distribution: str | None
    version: str | None
    connectors: dict[str, type[Connector]] = field(default_factory=dict)
    sinks: dict[str, type[Sink]] = field(default_factory=dict)
    # Store classes are of more than one kind (see ``errands_register_stores``): plain classes.
    stores: dict[str, type] = field(default_factory=dict)
    schedulers: dict[str, type[Scheduler]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "connectors": sorted(self.connectors),
            "sinks": sorted(self.sinks),
            "stores": sorted(self.stores),
            "schedulers": sorted(self.schedulers),
        }


class _BuiltinPlugin:
    """The stores and scheduler that ship inside errands-core."""

    @staticmethod
    @_hookspecs.hookimpl
    def errands_register_stores() -> list[type]:
        from .store._stores import BUILTIN_STORES

        return list(BUILTIN_STORES)

    @staticmethod
    @_hookspecs.hookimpl
    def errands_register_schedulers() -> list[type[Scheduler]]:
        from ._journal import StoreScheduler

        return [StoreScheduler]


def _env_list(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


class Registry:
    """Discovered plugin classes and the named connector and sink instances built from them.

    Args:
        plugins: plugin objects (modules or instances with hook implementations) to register
            explicitly, under their ``__name__``/``name`` or as ``(name, plugin)`` pairs.
        autoload: load the ``errands.plugins`` entry points (``ERRANDS_DISABLE_PLUGIN_AUTOLOAD=1``
            turns it off).
    """

    def __init__(self, plugins: Iterable[Any] = (), *, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager("errands")
        self.pm.add_hookspecs(_hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.connectors: dict[str, type[Connector]] = {}
        self.sinks: dict[str, type[Sink]] = {}
        self.stores: dict[str, type] = {}
        self.schedulers: dict[str, type[Scheduler]] = {}
        self.connector_instances: dict[str, Connector] = {}
        self.sink_instances: dict[str, Sink] = {}
        # The errands.toml table each config-built instance came from: loading that same table again
        # keeps the instance instead of refusing its name as taken.
        self._config_tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.cli_hook = self.pm.hook.errands_register_cli
        if autoload is None:
            autoload = os.environ.get("ERRANDS_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")
        disabled = _env_list("ERRANDS_DISABLE_PLUGINS")
        dist_of: dict[str, tuple[str | None, str | None]] = {}
        self.pm.register(_BuiltinPlugin, name="core")
        from .__about__ import __version__

        dist_of["core"] = ("errands-core", __version__)
        for item in plugins:
            name, plugin = item if isinstance(item, tuple) else (_plugin_name(item), item)
            if name in disabled:
                continue
            self.pm.register(plugin, name=name)
            dist_of[name] = (None, None)
        if autoload:
            for ep, dist in _entry_points():
                if ep.name in disabled:
                    self.pm.set_blocked(ep.name)
                    continue
                if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}", plugin=ep.name
                    ) from exc
                self.pm.register(plugin, name=ep.name)
                dist_of[ep.name] = (dist.metadata["Name"], dist.version)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc), plugin=exc.plugin) from exc
        for name in dist_of:
            distribution, version = dist_of[name]
            self.plugins[name] = PluginInfo(name, distribution, version)
        self._collect("connectors", self.connectors)
        self._collect("sinks", self.sinks)
        self._collect("stores", self.stores)
        self._collect("schedulers", self.schedulers)

    def _collect(self, kind: str, table: dict[str, Any]) -> None:
        """Fill ``table`` (and each plugin's ``PluginInfo``) from the ``errands_register_<kind>`` hook."""
        hook = getattr(self.pm.hook, f"errands_register_{kind}")
        owner: dict[str, str] = {}
        for impl in reversed(hook.get_hookimpls()):
            plugin_name = impl.plugin_name
            try:
                classes = impl.function() or []
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin_name!r} failed in errands_register_{kind}: {exc}", plugin=plugin_name
                ) from exc
            info = self.plugins.setdefault(plugin_name, PluginInfo(plugin_name, None, None))
            for cls in classes:
                if not inspect.isclass(cls):
                    raise PluginError(
                        f"plugin {plugin_name!r} registered {cls!r} as one of its {kind}; hooks register classes",
                        plugin=plugin_name,
                    )
                names = list(getattr(cls, "schemes", ())) if kind == "stores" else [getattr(cls, "name", None)]
                for key in names:
                    if not isinstance(key, str) or not key:
                        raise PluginError(
                            f"{cls.__module__}.{cls.__qualname__} from plugin {plugin_name!r} has no "
                            f"{'schemes' if kind == 'stores' else 'name'} class attribute",
                            plugin=plugin_name,
                        )
                    if key in table and table[key] is not cls:
                        other = table[key]
                        raise PluginError(
                            f"{kind[:-1]} name {key!r} is registered twice: "
                            f"{other.__module__}.{other.__qualname__} (plugin {owner[key]!r}) and "
                            f"{cls.__module__}.{cls.__qualname__} (plugin {plugin_name!r})",
                            plugin=plugin_name,
                        )
                    table[key] = cls
                    owner[key] = plugin_name
                    getattr(info, kind)[key] = cls

    # -- named instances ---------------------------------------------------------------------
    def add_connector(self, name: str, instance: C, *, replace: bool = False) -> C:
        """Register a connector instance under ``name`` (``"bank.wire"``).

        Args:
            name: the instance name effects refer to.
            instance: an object with ``dispatch(effect)``.
            replace: put ``instance`` in the place of one already registered under ``name``.

        Returns:
            ``instance``.

        Raises:
            ConfigError: a bad name, an object without ``dispatch``, or ``name`` taken by another instance
                (registering the very same object again is a no-op).
        """
        self._add("connectors", name, instance, "dispatch(effect)", replace)
        return instance

    def add_sink(self, name: str, instance: S, *, replace: bool = False) -> S:
        """Register a sink instance (an object with ``publish(events)``) under ``name``, the name routes
        refer to; otherwise as :meth:`add_connector`."""
        self._add("sinks", name, instance, "publish(events)", replace)
        return instance

    def _add(self, kind: str, name: str, instance: object, method: str, replace: bool) -> None:
        _check_instance_name(kind, name)
        if not callable(getattr(instance, method.split("(")[0], None)):
            raise ConfigError(
                f"{kind}.{_q(name)} must have a {method} method, got {type(instance).__name__}",
                field=f"{kind}.{_q(name)}", value=type(instance).__name__,
            )
        self._put(kind, name, instance, replace)

    def _instances(self, kind: str) -> dict[str, Any]:
        return self.connector_instances if kind == "connectors" else self.sink_instances

    def _put(self, kind: str, name: str, instance: object, replace: bool) -> None:
        table = self._instances(kind)
        current = table.get(name)
        if current is not None and current is not instance and not replace:
            raise _name_taken(kind, name, current, _type_path(type(instance)))
        table[name] = instance
        if current is not instance:
            self._config_tables.pop((kind, name), None)

    def build(self, kind: str, name: str, options: Mapping[str, Any]) -> Any:
        """Build a named instance from config ``options`` (which hold ``type``).

        Raises:
            ConfigError: no or an unknown ``type``, or options the class refuses; the class's own problems
                are reported under the table's field path (``connectors."bank.wire".url``).
        """
        path = f"{kind}.{_q(name)}"
        table: dict[str, type] = getattr(self, kind)
        type_name = options.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{path}.type is required (one of: {', '.join(sorted(table)) or 'none installed'})",
                              field=f"{path}.type", value=type_name)
        cls = table.get(type_name)
        if cls is None:
            raise ConfigError(
                f"{path}.type {type_name!r} is not a known {kind[:-1]} type; installed: "
                f"{', '.join(sorted(table)) or 'none'} (is its plugin installed or disabled?)",
                field=f"{path}.type", value=type_name,
            )
        kwargs = {k: v for k, v in options.items() if k != "type"}
        factory: Callable[..., Any] = getattr(cls, "from_config", None) or cls
        try:
            if getattr(cls, "from_config", None) is not None:
                return factory(name=name, options=kwargs, field=path)
            return factory(**kwargs)
        except ConfigError as exc:
            if exc.field and not exc.field.startswith(path):
                raise _under(path, exc) from exc
            raise
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}", field=path, value=kwargs) from exc

    def connector(self, name: str) -> Connector:
        """The connector instance registered under ``name``; a ``ConfigError`` names those that are."""
        return _named("connector", self.connector_instances, name)

    def sink(self, name: str) -> Sink:
        """The sink instance registered under ``name``; a ``ConfigError`` names those that are."""
        return _named("sink", self.sink_instances, name)


def _named(what: str, table: Mapping[str, T], name: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; named {what}s: {', '.join(sorted(table)) or 'none'}",
                          field=what, value=name) from None


def _q(name: str) -> str:
    return f'"{name}"' if "." in name or " " in name else name


def _under(path: str, exc: ConfigError) -> ConfigError:
    """``exc`` (and each problem it collects) with its field put under the table at ``path``."""
    if not exc.field or exc.field.startswith(path):
        return exc
    return ConfigError(f"{path}.{exc.field}: {exc}", field=f"{path}.{exc.field}", value=exc.value,
                       problems=[_under(path, p) for p in exc.problems])


def _discard(instance: object) -> None:
    close = getattr(instance, "close", None)
    if callable(close) and not inspect.iscoroutinefunction(close):
        close()


def _type_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _name_taken(kind: str, name: str, current: object, newcomer: str) -> ConfigError:
    # A second instance under a taken name used to replace the first in silence: effects and routes
    # that named it would have gone to the newcomer.
    path = f"{kind}.{_q(name)}"
    return ConfigError(
        f"{path} is taken: a {_type_path(type(current))} is registered under that name, so a "
        f"{newcomer} cannot be; choose another name, or replace it on purpose "
        f"(add_{kind[:-1]}(name, instance, replace=True); load_config(..., replace=True))",
        field=path, value=newcomer,
    )


def _check_instance_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name):
        raise ConfigError(f"{kind} names must be non-empty strings without spaces, got {name!r}",
                          field=kind, value=name)


def _plugin_name(plugin: Any) -> str:
    return str(getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__)


def _entry_points() -> list[tuple[md.EntryPoint, md.Distribution]]:
    """The ``errands.plugins`` entry points, the first of each name, each with the distribution that
    declares it (read from the distribution itself: an entry point need not know its ``dist``)."""
    seen: set[str] = set()
    out = []
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP and ep.name not in seen:
                seen.add(ep.name)
                out.append((ep, dist))
    return out


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or forget) the process-wide registry: tests and scripts that change plugins."""
    global _registry
    with _registry_lock:
        _registry = registry


def register_connector(name: str, instance: C, *, replace: bool = False) -> C:
    """Register a named connector instance in the process-wide registry (see :meth:`Registry.add_connector`)."""
    return get_registry().add_connector(name, instance, replace=replace)


def register_sink(name: str, instance: S, *, replace: bool = False) -> S:
    """Register a named sink instance in the process-wide registry (see :meth:`Registry.add_sink`)."""
    return get_registry().add_sink(name, instance, replace=replace)


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    # tomli, the backport Python 3.10 installs, is typed; where it is not installed mypy cannot find it.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]


@dataclass
class ErrandsConfig:
    """A loaded ``errands.toml``."""

    store: str
    connectors: dict[str, Connector]
    sinks: dict[str, Sink]
    routes: dict[str, dict[str, Any]]
    worker: dict[str, Any]
    raw: dict[str, Any]
    path: str | None = None


ROUTE_KEYS = ("subjects", "batch_size", "max_in_flight")


def read_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``errands.toml`` parsed (from its path, or a mapping parsed already), and its path."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh), path
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist", field="config", value=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}", field="config", value=path) from exc


def connector_names(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[str]:
    """The names of the connectors ``errands.toml`` configures (its ``[connectors.<name>]`` tables, in order),
    without building any: what a submit-only ``Outbox(store, connectors=names)`` needs, in a process that holds no
    connector clients or secrets.

    Raises:
        ConfigError: the file is missing or not TOML, ``connectors`` is not a table, or a name is malformed.
    """
    raw, _path = read_config(source)
    section = raw.get("connectors", {})
    if not isinstance(section, Mapping):
        raise ConfigError("connectors must be a table of named connectors", field="connectors", value=section)
    for name in section:
        _check_instance_name("connectors", name)
    return list(section)


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], *, registry: Registry | None = None,
                replace: bool = False) -> ErrandsConfig:
    """Load ``errands.toml`` (a path or an already parsed mapping) and build its named instances,
    registering them in ``registry`` (the process-wide one by default).

    Loading the same tables again (each CLI command of one process reads ``errands.toml``) keeps the
    instances built the first time. A name already taken by another instance (registered in code, or
    built from a different table) is a problem, unless ``replace=True`` rebuilds and replaces them.

    Raises:
        ConfigError: naming the field path and the bad value; every problem is reported at once, and
            nothing is registered.
    """
    raw, path = read_config(source)
    reg = registry or get_registry()
    problems: list[ConfigError] = []
    known_top = {"store", "connectors", "sinks", "worker", "lro", "durable"}
    for key in raw:
        if key not in known_top:
            problems.append(ConfigError(f"{key}: unknown section; expected one of {', '.join(sorted(known_top))}",
                                        field=key, value=raw[key]))
    store = raw.get("store", "sqlite:///errands.db")
    if not isinstance(store, str) or "://" not in store:
        problems.append(ConfigError(f"store must be a store URL such as 'sqlite:///app.db', got {store!r}",
                                    field="store", value=store))
    connectors: dict[str, Any] = {}
    sinks: dict[str, Any] = {}
    routes: dict[str, dict[str, Any]] = {}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, out in (("connectors", connectors), ("sinks", sinks)):
        section = raw.get(kind, {})
        if not isinstance(section, Mapping):
            problems.append(ConfigError(f"{kind} must be a table of named {kind}", field=kind, value=section))
            continue
        for name, options in section.items():
            path_ = f"{kind}.{_q(name)}"
            if not isinstance(options, Mapping):
                problems.append(ConfigError(f"{path_} must be a table with a type", field=path_, value=options))
                continue
            opts = dict(options)
            if kind == "sinks":
                routes[name] = {k: opts.pop(k) for k in ROUTE_KEYS if k in opts}
            current = reg._instances(kind).get(name)
            if current is not None and not replace and reg._config_tables.get((kind, name)) == opts:
                out[name] = current  # the same table loaded again: the same instance
                continue
            try:
                built = reg.build(kind, name, opts)
            except ConfigError as exc:
                problems.append(exc)
                built = None
            if current is not None and not replace:
                type_name = opts.get("type")
                cls = getattr(reg, kind).get(type_name) if isinstance(type_name, str) else None
                problems.append(_name_taken(kind, name, current, _type_path(cls) if cls else repr(type_name)))
                if built is not None:
                    _discard(built)  # built only to report its own problems too
            elif built is not None:
                out[name] = built
                tables[(kind, name)] = copy.deepcopy(opts)
    worker = raw.get("worker", {})
    if not isinstance(worker, Mapping):
        problems.append(ConfigError("worker must be a table", field="worker", value=worker))
        worker = {}
    if problems:
        raise ConfigError.collect(problems, path or "config")
    for kind, built in (("connectors", connectors), ("sinks", sinks)):
        for name, inst in built.items():
            if kind == "connectors":
                reg.add_connector(name, inst, replace=replace)
            else:
                reg.add_sink(name, inst, replace=replace)
            if (kind, name) in tables:
                reg._config_tables[(kind, name)] = tables[(kind, name)]
    return ErrandsConfig(store=store, connectors=connectors, sinks=sinks, routes=routes,
                          worker=dict(worker), raw=raw, path=path)
