"""A direct evaluator for the common subset of CEL that reaction predicates and keys use, beside ``cel-python``.

``cel-python`` costs tens of microseconds an evaluation, most of it in converting the event to CEL values and
walking its tree. The subset here is read straight from the event's Python values: literals (ints, doubles,
plain strings, ``true``, ``false``, ``null``, lists of them), the envelope's variables but ``time``, field
selection (``data.customer.tier``), the six comparisons, ``in``, ``!``, ``&&`` and ``||``.

Its answers are cel-python's, or none: ``compile_subset`` returns None for an expression outside the subset,
and the function it returns raises ``Undecided`` for values whose meaning it does not settle (mixed numeric
types, a comparison of lists or maps, a selection on something other than a map, an int beyond 64 bits...):
the caller evaluates those with cel-python. CEL errors keep their algebra: a missing field is an error value
that ``false && error`` and ``true || error`` absorb and everything else passes on (``ValueError`` at the top,
as cel-python's ``CELEvalError``). ``tests/test_cel_subset.py`` compares the two on generated expressions and
events.
"""

from __future__ import annotations

import re
from typing import Any, Callable

#: The variables the subset reads (``time`` is a timestamp: cel-python's).
VARIABLES = ("type", "subject", "source", "id", "data", "stream")


class Undecided(Exception):
    """The subset does not settle this evaluation: ask cel-python."""


class _Error:
    """CEL's error value (a missing field): absorbed by ``&&`` and ``||``, passed on by everything else."""

    __slots__ = ()


ERROR: Any = _Error()
_INT64 = 1 << 63

#: What an evaluator reads the variables from: the event (``event.data``, ``event.type``...).
Env = Any
Fn = Callable[[Env], Any]

_STRING = re.compile(r"""^(?:'[^'\\\n\r]*'|"[^"\\\n\r]*")$""")
_INT = re.compile(r"^-?[0-9]+$")
_FLOAT = re.compile(r"^-?[0-9]+\.[0-9]+$")


def _kind(value: Any) -> type | None:
    """The CEL type of a plain value the subset compares (bool, int, float, str), or None."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise Undecided
        return int
    if isinstance(value, (float, str)):
        return type(value)
    return None


def _compare(op: str, left: Any, right: Any) -> Any:
    if left is ERROR or right is ERROR:
        return ERROR
    kind = _kind(left)
    if kind is None or kind is not _kind(right):
        raise Undecided
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if kind is bool:
        raise Undecided
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    return left >= right


def _contains(item: Any, container: Any) -> Any:
    if item is ERROR or container is ERROR:
        return ERROR
    kind = _kind(item)
    if kind is None:
        raise Undecided
    if isinstance(container, list):
        if any(_kind(x) is not kind for x in container):
            raise Undecided
        return item in container
    if isinstance(container, dict) and kind is str:
        return item in container
    raise Undecided


def _logic(left: Fn, right: Fn, absorbing: bool) -> Fn:
    """``&&`` (``absorbing`` False) or ``||`` (True). Both sides are evaluated, whatever the first gives, so
    that a value the subset cannot settle on either side goes to cel-python (which fails on some of them where
    CEL would absorb an error)."""

    def run(env: Env) -> Any:
        a, b = left(env), right(env)
        for value in (a, b):
            if value is not True and value is not False and value is not ERROR:
                raise Undecided
        if a is absorbing or b is absorbing:
            return absorbing
        return ERROR if a is ERROR or b is ERROR else not absorbing

    return run


def _on(operand: Fn, accepted: type, apply: Callable[[Any], Any]) -> Fn:
    """``apply`` to the value of ``operand`` when it is an ``accepted`` (``!`` on a bool, a selection on a map);
    an error passes on, any other value is cel-python's."""

    def run(env: Env) -> Any:
        value = operand(env)
        if value is ERROR:
            return ERROR
        if not isinstance(value, accepted):
            raise Undecided
        return apply(value)

    return run


def _fits(value: Any) -> bool:
    """Whether cel-python can take ``value`` (decoded JSON) as CEL: no int beyond 64 bits anywhere in it."""
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    if isinstance(value, dict):
        return all(_fits(v) for v in value.values())
    if isinstance(value, list):
        return all(_fits(v) for v in value)
    return True


def _variable(name: str) -> Fn:
    def run(env: Env) -> Any:
        value = getattr(env, name)
        if name != "data" and not isinstance(value, str):
            raise Undecided
        return value

    return run


def _constant(value: Any) -> Fn:
    return lambda env: value


def _literal(text: str) -> Fn:
    if _STRING.match(text):
        return _constant(text[1:-1])
    if _INT.match(text) and -_INT64 <= int(text) < _INT64:
        return _constant(int(text))
    if _FLOAT.match(text):
        return _constant(float(text))
    if text in ("true", "false"):
        return _constant(text == "true")
    if text == "null":
        return _constant(None)
    raise _Outside


def _list(items: list[Fn]) -> Fn:
    def run(env: Env) -> Any:
        values = [item(env) for item in items]
        if any(v is ERROR for v in values):
            raise Undecided
        return values

    return run


class _Outside(Exception):
    """The expression is not in the subset."""


_COMPARISONS = {"relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">=",
                "relation_eq": "==", "relation_ne": "!="}


def _children(node: Any) -> list[Any]:
    return list(getattr(node, "children", ()))


def _build(node: Any) -> Fn:
    """The evaluator of one node of cel-python's parse tree (a ``lark.Tree``)."""
    kind = getattr(node, "data", None)
    kids = _children(node)
    if kind in ("expr", "addition", "multiplication", "primary") and len(kids) == 1:
        return _build(kids[0])
    if kind == "conditionalor":
        return _build(kids[0]) if len(kids) == 1 else _logic(_build(kids[0]), _build(kids[1]), True)
    if kind == "conditionaland":
        return _build(kids[0]) if len(kids) == 1 else _logic(_build(kids[0]), _build(kids[1]), False)
    if kind == "relation":
        if len(kids) == 1:
            return _build(kids[0])
        # ``a < b`` is relation(relation_lt(relation a), addition b)
        op = getattr(kids[0], "data", None)
        operands = _children(kids[0])
        if len(kids) != 2 or len(operands) != 1:
            raise _Outside
        left, right = _build(operands[0]), _build(kids[1])
        if op in _COMPARISONS:
            symbol = _COMPARISONS[op]
            return lambda env: _compare(symbol, left(env), right(env))
        if op == "relation_in":
            return lambda env: _contains(left(env), right(env))
        raise _Outside
    if kind == "unary":
        if len(kids) == 1:
            return _build(kids[0])
        if len(kids) == 2 and getattr(kids[0], "data", None) == "unary_not":
            return _on(_build(kids[1]), bool, lambda value: not value)
        raise _Outside
    if kind == "member" and len(kids) == 1:
        return _build(kids[0])
    if kind == "member_dot" and len(kids) == 2 and not hasattr(kids[1], "data"):
        name = str(kids[1])
        return _on(_build(kids[0]), dict, lambda value: value.get(name, ERROR))
    if kind == "paren_expr" and len(kids) == 1:
        return _build(kids[0])
    if kind == "ident" and len(kids) == 1:
        name = str(kids[0])
        if name not in VARIABLES:
            raise _Outside
        return _variable(name)
    if kind == "literal" and len(kids) == 1:
        return _literal(str(kids[0]))
    if kind == "list_lit":
        if not kids:
            return _constant([])
        if len(kids) == 1 and getattr(kids[0], "data", None) == "exprlist":
            return _list([_build(k) for k in _children(kids[0])])
    raise _Outside


def compile_subset(ast: Any) -> Callable[[Env], Any] | None:
    """An evaluator of ``ast`` (cel-python's parse tree of an expression) over an event's plain values (its
    attributes ``VARIABLES``: ``data`` as decoded JSON, the others strings), or None when the expression is
    outside the subset. The evaluator returns the expression's value (a bool, int, float, string or None),
    raises ``ValueError`` when CEL's answer is an error, and ``Undecided`` when cel-python must answer."""
    try:
        fn = _build(ast)
    except _Outside:
        return None
    reads_data = any(n.data == "ident" and str(n.children[0]) == "data" for n in ast.iter_subtrees())

    def evaluate(env: Env) -> Any:
        if reads_data and not _fits(env.data):
            raise Undecided  # cel-python cannot convert it (before evaluating anything): its answer
        value = fn(env)
        if value is ERROR:
            raise ValueError("no such key")
        if value is not None and _kind(value) is None:
            raise Undecided  # a list or a map: cel-python's conversion
        return value

    return evaluate
