"""One way to report every problem at once: ``ConfigError.problems`` and ``ConfigError.collect``."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from errands.core import ConfigError, PayloadError, PermanentError, Registry, hookimpl, load_config


def test_a_single_error_has_no_problems() -> None:
    err = ConfigError("url is required", field="url")
    assert err.problems == ()


def test_collect_of_one_problem_is_that_problem() -> None:
    only = ConfigError("url is required", field="url", value=None)
    assert ConfigError.collect([only], "settings") is only


def test_collect_reports_every_problem_in_one_message() -> None:
    problems = [ConfigError("url is required", field="url", value=None),
                ConfigError("timeout must be > 0, got -1", field="timeout", value=-1)]
    err = ConfigError.collect(problems, "http connector crm")
    assert str(err) == ("2 problems in http connector crm:\n"
                        "  - url is required\n"
                        "  - timeout must be > 0, got -1")
    assert (err.field, err.value) == ("url", None)
    assert err.problems == tuple(problems)


def test_collect_needs_a_problem() -> None:
    with pytest.raises(ValueError, match="at least one problem"):
        ConfigError.collect([], "settings")


def test_problems_are_kept_as_a_tuple_whatever_was_gathered() -> None:
    gathered = [ConfigError("a", field="a")]
    err = ConfigError("1 problem", problems=gathered)
    gathered.append(ConfigError("b", field="b"))
    assert [p.field for p in err.problems] == ["a"]
    err.problems = gathered
    assert isinstance(err.problems, tuple) and [p.field for p in err.problems] == ["a", "b"]


def test_collect_of_a_subclass_builds_that_subclass() -> None:
    err = PayloadError.collect([PayloadError("too big", field="payload"), PayloadError("not JSON", field="x")],
                               "effect")
    assert type(err) is PayloadError and len(err.problems) == 2


class _Picky:
    """A connector class whose own validation reports two problems at once."""

    name: ClassVar[str] = "picky"

    def __init__(self, **options: Any) -> None:
        raise ConfigError.collect([ConfigError("url is required", field="url"),
                                   ConfigError("timeout must be > 0", field="timeout", value=-1)], "picky connector")

    def dispatch(self, effect: Any) -> Any:
        raise AssertionError("never built")


class _PickyPlugin:
    @staticmethod
    @hookimpl
    def errands_register_connectors() -> list[type]:
        return [_Picky]


def test_a_table_that_reports_several_problems_has_them_under_its_path() -> None:
    reg = Registry(plugins=[("picky", _PickyPlugin)], autoload=False)
    with pytest.raises(ConfigError) as info:
        load_config({"connectors": {"crm": {"type": "picky", "timeout": -1}}}, registry=reg)
    err = info.value
    assert err.field == "connectors.crm.url"
    assert [p.field for p in err.problems] == ["connectors.crm.url", "connectors.crm.timeout"]
    assert [p.value for p in err.problems] == [None, -1]
    assert str(err).startswith("connectors.crm.url: 2 problems in picky connector:")


def test_permanent_errors_park_the_event_unless_they_stop_the_route() -> None:
    assert PermanentError("refused").stop_route is False
    err = PermanentError("the endpoint is gone")
    err.stop_route = True
    assert err.stop_route is True

    class Gone(PermanentError):
        stop_route = True

    assert Gone("410").stop_route is True
