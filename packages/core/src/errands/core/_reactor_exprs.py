"""What a reaction asks of an event, as pure functions: its ``predicate`` (a CEL expression) and its ``key``
(a dotted path into the event, a CEL expression, or a function of it).

CEL expressions are compiled once, when the reaction is registered, with ``cel-python`` (the ``cel``
extra). They see the event's CloudEvents envelope as variables: ``type``, ``subject``, ``source``, ``id``,
``time`` (a timestamp), ``data``, and errands' ``stream``. A dotted path (``data.customer``, ``stream``)
is read straight from the event, without CEL. An expression in the common subset of ``_cel_subset``
(comparisons, ``in``, ``!``, ``&&``, ``||``, field selection, literals) is evaluated straight over the event's
values too, with cel-python's answers; cel-python evaluates the rest. ``Envelopes`` converts an event for CEL
once and keeps it, and each expression's value, for the other reactions reading the same event.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Union

from ._cel_subset import Undecided, compile_subset
from ._values import Event
from .errors import ConfigError, MissingDependencyError
from .store import dumps

log = logging.getLogger("errands.reactor")

#: What ``key=`` accepts: a path into the event (``"stream"``, ``"subject"``, ``"type"``, ``"source"``,
#: ``"id"``, ``"data"`` or ``"data.<field>[.<field>...]"``), a CEL expression over the envelope, or a function
#: of the event returning its key.
EntityKey = Union[str, Callable[[Event], Any]]

#: The variables a CEL expression sees.
CEL_VARIABLES = ("type", "subject", "source", "id", "time", "data", "stream")
_PATH_HEADS = ("stream", "subject", "type", "source", "id")
_PATH = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Streams that carry many entities each, and the data field that names the entity on them.
_SHARED_STREAMS = (("effects/", "key"), ("obligations/", "id"), ("lro/", "name"))
MISSING: Any = object()


def is_path(text: str) -> bool:
    """Whether ``text`` is a dotted path read without CEL."""
    return text in _PATH_HEADS or _PATH.match(text) is not None


def _text(value: Any, event: Event) -> str:
    if value is MISSING or value is None:
        return f"event:{event.id}"  # an event we cannot place stays on its own: never merged, never ordered
    return value if isinstance(value, str) else dumps(value, field="key")


def default_entity(event: Event) -> str:
    """The entity of ``event`` when a reaction names no key: the effect key on ``effects/...`` streams, the
    obligation id on ``obligations/...``, the operation name on ``lro/...``, otherwise the stream."""
    for prefix, name in _SHARED_STREAMS:
        if event.stream.startswith(prefix):
            value = event.data.get(name, MISSING) if isinstance(event.data, dict) else MISSING
            return f"{event.stream}|{_text(value, event)}"
    return event.stream


def _path_getter(path: str) -> Callable[[Event], str]:
    head, _, rest = path.partition(".")
    names = rest.split(".") if rest else []

    def entity(event: Event) -> str:
        value: Any = getattr(event, head)
        for name in names:
            value = value.get(name, MISSING) if isinstance(value, dict) else MISSING
            if value is MISSING:
                break
        return _text(value, event)

    return entity


# -- CEL -------------------------------------------------------------------------------------------

def _celpy() -> Any:
    try:
        import celpy
    except ImportError as exc:
        raise MissingDependencyError("cel-python", "cel") from exc
    return celpy


@dataclass(frozen=True)
class Expression:
    """A compiled CEL expression; ``field`` is the option it came from (``predicate``, ``key``), ``names`` the
    variables it reads."""

    text: str
    field: str
    program: Any
    names: tuple[str, ...] = ()
    #: The expression evaluated over the event's own values, when it is in ``_cel_subset``'s subset.
    direct: Callable[[Event], Any] | None = None

    def run(self, variables: dict[str, Any]) -> Any:
        """The expression's value over ``variables`` (CEL values), as plain Python; raises ``ValueError``
        when it cannot be evaluated (a missing field, a type mismatch)."""
        celpy = _celpy()
        try:
            with _EVALUATING:
                value = self.program.evaluate(variables)
        except celpy.CELEvalError as exc:
            raise ValueError(f"{self.field} {self.text!r}: {exc.args[0] if exc.args else exc}") from None
        return to_python(value, celpy.celtypes.BoolType)


# celpy's compiled runner hands each evaluation its variables through a global of its module: one at a time.
_EVALUATING = threading.Lock()
_ENVIRONMENT: Any = None


def _quiet_eval_errors(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Internal error")


def compile_cel(text: Any, field: str) -> Expression:
    """Compile ``text`` as CEL, once. Raises ``ConfigError`` naming ``field`` and the expression when it is
    not valid CEL, and ``MissingDependencyError`` when ``cel-python`` is not installed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{field} must be a CEL expression such as 'data.amount > 100', got {text!r}",
                          field=field, value=text)
    celpy = _celpy()
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        # The compiled runner transpiles the expression to Python once: several times faster per event.
        _ENVIRONMENT = celpy.Environment(runner_class=celpy.CompiledRunner)
        # celpy logs an error for every evaluation that fails (a missing field on one event): that is an
        # expression being false there (see ``Matcher.matches``), not an error of the application's.
        logging.getLogger("celpy.Transpiler").addFilter(_quiet_eval_errors)
    try:
        program = _ENVIRONMENT.program(_ENVIRONMENT.compile(text))
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{field} {text!r} is not a valid CEL expression: {detail}", field=field,
                          value=text) from None
    unknown = sorted(_free_names(program.ast) - set(CEL_VARIABLES))
    if unknown:
        raise ConfigError(
            f"{field} {text!r} uses unknown name(s) {', '.join(unknown)}: a CEL expression sees "
            f"{', '.join(CEL_VARIABLES)} (such as 'data.{unknown[0]}')", field=field, value=text)
    return Expression(text=text, field=field, program=program,
                      names=tuple(n for n in CEL_VARIABLES if n in _free_names(program.ast)),
                      direct=compile_subset(program.ast))


_MACROS = ("all", "exists", "exists_one", "map", "filter")


def _free_names(ast: Any) -> set[str]:
    """The identifiers an expression reads, less those its comprehension macros bind (``x`` in
    ``data.items.exists(x, x > 1)``)."""
    names: set[str] = set()
    bound: set[str] = set()
    for node in ast.iter_subtrees():
        if node.data == "ident":
            names.add(str(node.children[0]))
        elif node.data == "member_dot_arg" and len(node.children) >= 3 and str(node.children[1]) in _MACROS:
            args = node.children[2]
            first = args.children[0] if getattr(args, "children", None) else None
            for sub in first.iter_subtrees() if first is not None else ():
                if sub.data == "ident":
                    bound.add(str(sub.children[0]))
    return names - bound


def to_python(value: Any, bool_type: type = bool) -> Any:
    """A CEL value as plain Python (celpy's types subclass Python's, its ``bool_type`` ``int``; maps and lists
    are converted deeply)."""
    if isinstance(value, (bool, bool_type)):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {to_python(k, bool_type): to_python(v, bool_type) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v, bool_type) for v in value]
    return value if value is None else str(value)


class Envelopes:
    """The CEL variables of recent events, each converted once when an expression first reads it, and the
    value of each expression on each of them: reactions reading the same event share both (two reactions with
    the same predicate evaluate it once per event)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._cache: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()

    def evaluate(self, expression: Expression, event: Event) -> Any:
        """``expression`` on ``event`` (``Expression.run``), evaluated once per event."""
        entry = self._cache.get(event.id)
        if entry is None:
            entry = self._cache[event.id] = ({}, {})
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        variables, values = entry
        if expression.text in values:
            value = values[expression.text]
        else:
            value = values[expression.text] = _value(expression, event, variables)
        if isinstance(value, ValueError):
            raise value
        return value


def _value(expression: Expression, event: Event, variables: dict[str, Any]) -> Any:
    """``expression`` on ``event``, or the ``ValueError`` saying why it has none: read straight from the event
    when the expression is in the direct subset and its values settle it, else by cel-python over the event's
    CEL variables (converted once, kept in ``variables`` for the next expression)."""
    if expression.direct is not None:
        try:
            return expression.direct(event)
        except ValueError as exc:
            return ValueError(f"{expression.field} {expression.text!r}: {exc}")
        except Undecided:
            pass
    for name in expression.names:
        if name not in variables:
            variables[name] = _variable(name, event)
    try:
        return expression.run({name: variables[name] for name in expression.names})
    except ValueError as exc:
        return exc


def _variable(name: str, event: Event) -> Any:
    celpy = _celpy()
    if name == "data":
        return celpy.json_to_cel(event.data)
    if name == "time":
        return celpy.celtypes.TimestampType(event.time)
    return celpy.celtypes.StringType(getattr(event, name))


# -- what a reaction keeps ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Matcher:
    """A reaction's predicate and key, compiled: ``matches(event)`` and ``key(event)``."""

    predicate: Expression | None
    key_of: Callable[[Event, Envelopes], str]

    def matches(self, event: Event, envelopes: Envelopes) -> bool:
        """Whether the reaction takes ``event``: its predicate is true. A predicate that cannot be evaluated
        on an event (a missing field, another type) or is not a boolean there does not take it."""
        if self.predicate is None:
            return True
        try:
            value = envelopes.evaluate(self.predicate, event)
        except ValueError as exc:
            log.debug("event %s skipped: %s", event.id, exc)
            return False
        if not isinstance(value, bool):
            log.debug("event %s skipped: predicate %r gave %r, not a boolean", event.id, self.predicate.text, value)
            return False
        return value

    def key(self, event: Event, envelopes: Envelopes) -> str:
        return self.key_of(event, envelopes)


def key_function(key: EntityKey | None) -> Callable[[Event, Envelopes], str]:
    """``key(event, envelopes)`` for a reaction's ``key=`` (compiled now when it is CEL)."""
    if key is None:
        return lambda event, _envelopes: default_entity(event)
    if callable(key):
        fn = key
        return lambda event, _envelopes: _text(fn(event), event)
    if isinstance(key, str) and is_path(key):
        getter = _path_getter(key)
        return lambda event, _envelopes: getter(event)
    if not isinstance(key, str):
        raise ConfigError(f"key must be a dotted path such as 'data.customer', a CEL expression or a function of "
                          f"the event; got {key!r}", field="key", value=key)
    expression = compile_cel(key, "key")

    def evaluated(event: Event, envelopes: Envelopes) -> str:
        try:
            value = envelopes.evaluate(expression, event)
        except ValueError as exc:
            log.debug("event %s has no key: %s", event.id, exc)
            value = MISSING
        return _text(value, event)

    return evaluated


def matcher(predicate: str | None, key: EntityKey | None) -> Matcher:
    """Compile a reaction's ``predicate`` and ``key``. Raises ``ConfigError`` (every problem, each naming its
    field) or ``MissingDependencyError`` (CEL without the ``cel`` extra)."""
    problems: list[ConfigError] = []
    compiled = key_fn = None
    if predicate is not None:
        try:
            compiled = compile_cel(predicate, "predicate")
        except ConfigError as exc:
            problems.append(exc)
    try:
        key_fn = key_function(key)
    except ConfigError as exc:
        problems.append(exc)
    if problems:
        raise ConfigError.collect(problems, "reaction")
    assert key_fn is not None
    return Matcher(predicate=compiled, key_of=key_fn)


def describe_key(key: EntityKey | None) -> str | None:
    """How ``key`` reads in listings."""
    if key is None or isinstance(key, str):
        return key
    return f"{getattr(key, '__module__', '')}.{getattr(key, '__qualname__', repr(key))}"
