"""The direct evaluator of reaction predicates and keys (``_cel_subset``) answers as cel-python does.

A property test compares the two on generated expressions and events: wherever the subset answers (a value
or an error), cel-python gives the same value or an error too. Expressions outside the subset, and values
the subset leaves to cel-python, are checked to go through cel-python.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from errands.core import Event
from errands.core._cel_subset import Undecided
from errands.core._reactor_exprs import Envelopes, _variable, compile_cel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("celpy", reason="cel-python is the `cel` extra")
compile_cel("true", "predicate")  # cel-python raises the recursion limit once, when first used: not inside a test

FIELDS = ("a", "b", "c")

scalars = st.one_of(
    st.integers(-3, 3), st.integers(min_value=2**63 - 2, max_value=2**64), st.integers(-(2**64), -(2**63) + 1),
    st.sampled_from([0.0, -1.5, 2.5, 3.0]), st.sampled_from(["", "x", "y", "é", "a'b"]), st.booleans(),
    st.none(),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)),
    max_leaves=8,
)
names = st.sampled_from(["order.placed", "order.paid", "x", ""])

literals = st.sampled_from(["0", "1", "-3", "3", "9223372036854775807", "1.5", "-1.5", "3.0", "'x'", '"y"', "''",
                            "'é'", "true", "false", "null", "[]", "[1, 2]", "['x', 'y']", "[1, 'x']", "[true]",
                            "[1.5, 3.0]", "[data.a]"])
paths = st.sampled_from(["data", "data.a", "data.b", "data.a.b", "data.c.a", "type", "subject", "stream", "id",
                         "source"])
# beyond the subset: cel-python answers alone
outside = st.sampled_from(["has(data.a)", "data.a + 1", "size(data)", "data['a']", "time", "-data.a",
                           "data.a ? 1 : 2", "1u", "1e3", "'a\\'b'", "type.startsWith('order')"])
operands = st.one_of(literals, paths, outside)


def _relations(draw: Any) -> str:
    left, right = draw(operands), draw(operands)
    op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "in"]))
    return f"{left} {op} {right}"


# comparisons of one type on both sides, the common case (the data fields hold it often)
TYPED = {
    "int": (["0", "1", "-3", "3", "[1, 2]", "[]"], st.integers(-3, 3)),
    "double": (["1.5", "-1.5", "3.0", "[1.5, 3.0]"], st.sampled_from([0.0, -1.5, 1.5, 3.0])),
    "string": (["'x'", '"y"', "''", "'é'", "['x', 'y']", "type", "stream"], st.sampled_from(["", "x", "y", "é"])),
    "bool": (["true", "false", "[true]"], st.booleans()),
}


def _typed_relations(draw: Any) -> str:
    kind = draw(st.sampled_from(sorted(TYPED)))
    pool = TYPED[kind][0] + ["data.a", "data.b", "data.c.a"]
    op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "in", "=="]))
    return f"{draw(st.sampled_from(pool))} {op} {draw(st.sampled_from(pool))}"


relations = st.one_of(st.composite(lambda draw: _relations(draw))(),
                      st.composite(lambda draw: _typed_relations(draw))(),
                      st.composite(lambda draw: _typed_relations(draw))())
typed_datas = st.sampled_from(sorted(TYPED)).flatmap(
    lambda kind: st.fixed_dictionaries({}, optional={"a": TYPED[kind][1], "b": TYPED[kind][1],
                                                     "c": st.fixed_dictionaries({}, optional={"a": TYPED[kind][1]})}))
datas = st.one_of(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3), json_values, typed_datas,
                  typed_datas)

expressions = st.recursive(
    st.one_of(relations, relations, relations, paths, literals),
    lambda inner: st.one_of(
        st.builds(lambda e: f"!({e})", inner),
        st.builds(lambda a, b: f"({a}) && ({b})", inner, inner),
        st.builds(lambda a, b: f"{a} || {b}", inner, inner),
        st.builds(lambda a, b: f"{a} && {b}", inner, inner),
    ),
    max_leaves=5,
)


def _event(data: Any, type_: str, subject: str) -> Event:
    return Event(id="orders/1", stream="orders/1", seq=1, subject=subject, type=type_, data=data,
                 time=datetime(2026, 1, 1, tzinfo=timezone.utc), position=1)


def _by_celpy(expression: Any, event: Event) -> Any:
    try:
        return expression.run({name: _variable(name, event) for name in expression.names})
    except ValueError:
        return ValueError


def _typed(value: Any) -> Any:
    """A value with its type, so that ``1 == True`` and ``1 == 1.0`` do not pass for the same answer."""
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    if isinstance(value, dict):
        return ("map", {k: _typed(v) for k, v in value.items()})
    return (type(value).__name__, value)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=expressions, data=datas, type_=names, subject=names)
def test_the_subset_answers_as_cel_python(text: str, data: Any, type_: str, subject: str) -> None:
    try:
        expression = compile_cel(text, "predicate")
    except Exception:  # not CEL at all (or names outside the envelope): nothing to compare
        return
    event = _event(data, type_, subject)
    expected = _by_celpy(expression, event)
    if expression.direct is None:
        return
    try:
        got = expression.direct(event)
    except ValueError:
        got = ValueError
    except Undecided:
        return
    assert (got is ValueError) == (expected is ValueError), (text, data, got, expected)
    if got is not ValueError:
        assert _typed(got) == _typed(expected), (text, data, got, expected)


@pytest.mark.parametrize("text", [
    "data.total >= 0 && type == 'order.placed'", "data.a.b in ['x', 'y']", "!(data.n < 3) || stream == 'x'",
    "data.flag", "data.tier != null", "data.n in [1, 2, 3]", "'k' in data",
])
def test_common_predicates_are_in_the_subset(text: str) -> None:
    assert compile_cel(text, "predicate").direct is not None


@pytest.mark.parametrize("text", ["has(data.a)", "data.a + 1 > 2", "time > timestamp('2026-01-01T00:00:00Z')",
                                  "type.startsWith('order')", "size(data.items) > 0", "data.a ? true : false"])
def test_the_rest_is_left_to_cel_python(text: str) -> None:
    expression = compile_cel(text, "predicate")
    assert expression.direct is None
    envelopes = Envelopes()
    event = _event({"a": 1, "items": [1]}, "order.placed", "s")
    try:
        value = envelopes.evaluate(expression, event)
    except ValueError:
        value = ValueError
    assert _typed(value) == _typed(_by_celpy(expression, event)) or value is ValueError


def test_values_the_subset_does_not_settle_go_to_cel_python() -> None:
    # mixed int and double, a selection on a list, an int past 64 bits: cel-python's answers
    for text, data in (("data.a < 2", {"a": 1.5}), ("data.a.b == 1", {"a": [1]}), ("data.a == 1", {"a": 2**70})):
        expression = compile_cel(text, "predicate")
        event = _event(data, "t", "s")
        envelopes = Envelopes()
        with pytest.raises(Undecided):
            expression.direct(event)  # type: ignore[misc]
        try:
            value = envelopes.evaluate(expression, event)
        except ValueError:
            value = ValueError
        assert _typed(value) == _typed(_by_celpy(expression, event))
