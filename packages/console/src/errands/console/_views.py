"""What the console reads and does, through the engines' public APIs only (no SQL here).

``Engines`` opens one of each engine over one store; its ``*_view`` methods return JSON-ready mappings
(what ``/api/`` answers and the pages render) and its actions change state through the engine and record
an event ``console.action`` in the journal, stream ``console``, with the operator who asked.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from errands.core import App, EffectStatus, FanOut, Journal, TaskEngine, TaskStatus
from errands.core.errors import ConfigError, NotFoundError
from errands.core.store import SQLStore
from errands.durable import DurableRunner, ExecutionStatus
from errands.lro import Config, LroClient

#: Keys whose values are never shown, at any depth of a payload, metadata, input or result.
SECRET_KEYS = re.compile(r"secret|token|passw|authorization|api[_-]?key|credential|private|cookie", re.IGNORECASE)
REDACTED = "••••••"

EFFECT_STATUSES = [s.value for s in EffectStatus]
TASK_STATUSES = [s.value for s in TaskStatus]
EXECUTION_STATUSES = [s.value for s in ExecutionStatus]
#: What ``Outbox.resolve`` settles an effect as, and ``Outbox.resolve_obligation`` an obligation.
RESOLUTIONS = ["CONFIRMED", "FAILED", "ABSENT", "DUPLICATE"]
OBLIGATION_RESOLUTIONS = ["COMPENSATED", "STUCK"]
#: The obligation statuses ``Outbox.resolve_obligation`` takes (and a ``COMPENSATING`` one whose lease lapsed).
RESOLVABLE_OBLIGATIONS = ("REGISTERED", "PENDING", "STUCK")
#: A count past this is shown as ``{CAP}+`` (the engines list at most this many at a time).
CAP = 1000


def redact(value: Any) -> Any:
    """``value`` with every secret-looking key's value replaced."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEYS.search(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="seconds")
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc).isoformat(timespec="seconds")
    return str(value)


def json_field(form: Mapping[str, str], name: str) -> Any:
    """The JSON value of form field ``name`` (``None`` when absent or blank).

    Raises:
        ConfigError: the field is not JSON.
    """
    text = (form.get(name) or "").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON: {exc}", field=name) from None


def _text(form: Mapping[str, str], name: str) -> str | None:
    return (form.get(name) or "").strip() or None


def _json_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def obligation_actions(o: Any) -> list[str]:
    """What an operator can do to obligation ``o``."""
    status = o.status.value
    return (["redrive"] if status == "STUCK" else []) + (["resolve"] if status in RESOLVABLE_OBLIGATIONS else [])


def _obligation_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NotFoundError(f"no obligation {text!r}") from None


class Page:
    """One page of a list: ``page`` (from 1) of ``size`` items, and whether another follows."""

    def __init__(self, page: int = 1, size: int = 50) -> None:
        self.page = max(1, int(page))
        self.size = min(max(1, int(size)), 500)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    def cut(self, items: list[Any]) -> tuple[list[Any], bool]:
        """The page's items out of the first ``offset + size + 1`` items."""
        return items[self.offset:self.offset + self.size], len(items) > self.offset + self.size

    def to_dict(self, more: bool) -> dict[str, Any]:
        return {"page": self.page, "size": self.size, "next": self.page + 1 if more else None,
                "previous": self.page - 1 if self.page > 1 else None}


def _effect(r: Any) -> dict[str, Any]:
    return {
        "key": r.key, "connector": r.connector, "tool": r.tool, "status": r.status.value,
        "semantics": r.semantics.value, "attempts": r.attempts, "max_attempts": r.max_attempts,
        "observations": r.observations, "business_key": r.business_key, "run_id": r.run_id,
        "human_gate": r.human_gate, "flagged": r.flagged, "error": r.error, "external_ref": r.external_ref,
        "payload": redact(r.payload), "metadata": redact(dict(r.metadata)), "response": redact(r.response),
        "next_attempt_at": iso(r.next_attempt_at), "lease_owner": r.lease_owner,
        "created_at": iso(r.created_at), "updated_at": iso(r.updated_at),
    }


def _obligation(o: Any) -> dict[str, Any]:
    return {"id": o.id, "effect_key": o.effect_key, "kind": o.kind, "status": o.status.value,
            "attempts": o.attempts, "max_attempts": o.max_attempts, "run_id": o.run_id,
            "compensator": o.compensator, "error": o.error, "payload": redact(o.payload),
            "response": redact(o.response), "next_attempt_at": iso(o.next_attempt_at),
            "created_at": iso(o.created_at), "updated_at": iso(o.updated_at)}


def _event(e: Any) -> dict[str, Any]:
    return {"position": e.position, "id": e.id, "stream": e.stream, "type": e.type, "subject": e.subject,
            "time": iso(e.time), "data": redact(e.data)}


def _task(t: Any) -> dict[str, Any]:
    return {"id": t.id, "type": t.type, "status": t.status.value, "attempts": t.attempts, "error": t.error,
            "params": redact(t.params), "result": redact(t.result), "created_at": iso(t.created_at),
            "updated_at": iso(t.updated_at), "started_at": iso(t.started_at), "finished_at": iso(t.finished_at),
            "available_at": iso(t.available_at)}


def _route(s: Any) -> dict[str, Any]:
    return {"name": s.name, "cursor": s.cursor, "behind": s.behind, "state": str(s.state.value),
            "reason": s.reason, "dead": s.dead}


def _dead(d: Any) -> dict[str, Any]:
    return {"route": d.route, "event_id": d.event.id, "subject": d.event.subject, "type": d.event.type,
            "position": d.event.position, "error": d.error, "attempts": d.attempts, "parked_at": iso(d.parked_at),
            "redrive": d.redrive, "data": redact(d.event.data)}


def _execution(x: Any) -> dict[str, Any]:
    return {"execution_id": x.execution_id, "function": x.function, "status": x.status.value,
            "input": redact(x.input), "result": redact(x.result),
            "error": x.error.to_dict() if x.error else None, "parent_id": x.parent_id,
            "created_at": iso(x.created_at), "updated_at": iso(x.updated_at), "ended_at": iso(x.ended_at),
            "invocations": x.invocations}


def _step(o: Any) -> dict[str, Any]:
    return {"id": o.id, "parent_id": o.parent_id, "type": o.type.value, "sub_type": o.sub_type.value if o.sub_type
            else None, "name": o.name, "status": o.status.value, "attempt": o.attempt,
            "start": o.start_timestamp, "end": o.end_timestamp, "started_at": iso(o.start_timestamp),
            "ended_at": iso(o.end_timestamp), "result": redact(_json_text(o.result)),
            "error": o.error.to_dict() if o.error else None, "callback_id": o.callback_id,
            "child_execution_id": o.child_execution_id}


def _operation(pb: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    def unpack(any_pb: Any) -> Any:
        if not any_pb.type_url:
            return None
        try:
            return redact(MessageToDict(any_pb))
        except Exception:  # a message type this process does not know: show what it is, not its bytes
            return {"@type": any_pb.type_url, "bytes": len(any_pb.value)}

    status = "RUNNING"
    if pb.done:
        status = "FAILED" if pb.HasField("error") else "SUCCEEDED"
    return {"name": pb.name, "done": pb.done, "status": status,
            "metadata_type": pb.metadata.type_url.rsplit("/", 1)[-1] or None, "metadata": unpack(pb.metadata),
            "response": unpack(pb.response) if pb.HasField("response") else None,
            "error": {"code": pb.error.code, "message": pb.error.message} if pb.HasField("error") else None}


def _tree(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operations as a tree (``children`` under each), in start order, each with its ``depth``."""
    by_id = {s["id"]: dict(s, children=[]) for s in steps}
    roots: list[dict[str, Any]] = []
    for s in by_id.values():
        parent = by_id.get(s["parent_id"]) if s["parent_id"] else None
        (parent["children"] if parent is not None else roots).append(s)

    def flat(nodes: list[dict[str, Any]], depth: int) -> Iterable[dict[str, Any]]:
        for n in nodes:
            yield dict(n, depth=depth, children=[c["id"] for c in n["children"]])
            yield from flat(n["children"], depth + 1)

    return list(flat(roots, 0))


def _timeline(steps: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Each operation's bar: ``left`` and ``width`` in percent of the span from the first start to the last
    end (an operation not ended runs to now)."""
    starts = [s["start"] for s in steps if s["start"] is not None]
    if not starts:
        return []
    first = min(starts)
    last = max([s["end"] or now for s in steps if s["start"] is not None] + [first])
    span = max(last - first, 1e-6)
    out = []
    for s in steps:
        if s["start"] is None:
            continue
        end = s["end"] or now
        out.append({"id": s["id"], "name": s["name"] or s["id"], "type": s["type"], "status": s["status"],
                    "left": round(100 * (s["start"] - first) / span, 2),
                    "width": max(round(100 * (end - s["start"]) / span, 2), 0.5),
                    "seconds": round(end - s["start"], 3)})
    return out


def _count(items: list[Any]) -> int | str:
    return f"{CAP}+" if len(items) >= CAP else len(items)


class Engines:
    """One of each engine over one store, for reading and for operators' actions.

    Args:
        store: a store URL, an open store, or an ``errands.App`` (its store and outbox are used; closing the
            engines leaves it open).
        neurons: the lro services whose operations the console lists (``LroClient`` is per neuron).
    """

    def __init__(self, store: str | SQLStore | App, *, neurons: Iterable[str] = ()) -> None:
        self._owns_app = not isinstance(store, App)
        self.app = store if isinstance(store, App) else App(store)
        self.store: SQLStore = self.app.store
        self.outbox = self.app.outbox
        self.tasks = TaskEngine(self.store)
        self.durable = DurableRunner(self.store)
        self.journal = Journal(self.store)
        self.neurons = list(dict.fromkeys(neurons))
        self._lro: dict[str, LroClient] = {}
        self._lock = threading.Lock()

    def lro(self, neuron: str) -> LroClient:
        if neuron not in self.neurons:
            raise NotFoundError(f"the console does not read neuron {neuron!r}; start it with --neuron {neuron}")
        with self._lock:
            if neuron not in self._lro:
                self._lro[neuron] = LroClient(Config(neuron=neuron, store=self.store))
            return self._lro[neuron]

    def close(self) -> None:
        for client in self._lro.values():
            client.close()
        self.durable.close()
        self.tasks.close(wait=False)
        if self._owns_app:
            self.app.close()

    # -- reading -----------------------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        stats = self.outbox.stats()
        routes = [_route(s) for s in FanOut.stored_status(self.store)]
        tasks = {s: _count(self.tasks.recent(CAP, status=s)) for s in TASK_STATUSES}
        executions = {s: _count(self.durable.list(s, limit=CAP)) for s in EXECUTION_STATUSES}
        pending = self.outbox.list(EffectStatus.PENDING, limit=1)
        gated = self.outbox.list(EffectStatus.AWAITING_APPROVAL, limit=5)
        flagged = self.outbox.list(flagged=True, limit=5)
        stuck = self.outbox.obligations("STUCK", limit=5)
        failures = [dict(_effect(r), kind="effect") for r in self.outbox.list(EffectStatus.FAILED, limit=CAP)[-5:]]
        failures += [dict(_task(t), kind="task") for t in self.tasks.recent(5, status=TaskStatus.FAILED)]
        failures += [dict(_execution(x), kind="execution") for x in self.durable.list("FAILED", limit=5)]
        operations: dict[str, Any] = {}
        for neuron in self.neurons:
            ops, _ = self.lro(neuron).list_operations(page_size=1000)
            done = sum(1 for pb in ops if pb.done)
            operations[neuron] = {"running": len(ops) - done, "done": done}
        return {
            "effects": stats["effects"], "flagged": stats["flagged"], "due": stats["due"],
            "obligations": stats["obligations"], "routes": routes,
            "dead_events": sum(r["dead"] for r in routes), "tasks": tasks,
            "dead_tasks": _count(self.tasks.dead(limit=CAP)), "executions": executions, "operations": operations,
            "oldest_due": _effect(pending[0]) if pending else None,
            "awaiting_approval": [_effect(r) for r in gated], "flagged_effects": [_effect(r) for r in flagged],
            "stuck_obligations": [_obligation(o) for o in stuck], "recent_failures": failures,
        }

    def effects_view(self, *, status: str | None = None, connector: str | None = None, flagged: bool | None = None,
                     run_id: str | None = None, q: str | None = None, page: Page | None = None) -> dict[str, Any]:
        page = page or Page()
        if status and status not in EFFECT_STATUSES:
            raise ConfigError(f"no effect status {status!r}; one of {', '.join(EFFECT_STATUSES)}", field="status")
        rows = self.outbox.list(status or None, connector or None, page.offset + page.size + 1 if not q else 100_000,
                                flagged=flagged, run_id=run_id or None)
        if q:
            rows = [r for r in rows if q in r.key or q in (r.business_key or "")]
        items, more = page.cut(rows)
        return {"items": [_effect(r) for r in items], "page": page.to_dict(more),
                "filters": {"status": status, "connector": connector, "flagged": flagged, "run_id": run_id, "q": q},
                "statuses": EFFECT_STATUSES}

    def effect_view(self, key: str) -> dict[str, Any]:
        record = self.outbox.get(key)
        history = self.outbox.history(key)
        attempts = [_event(e) for e in history if e.type.startswith("effect.") and
                    any(w in e.type for w in ("dispatch", "confirm", "fail", "retry", "observ", "unknown"))]
        return {"effect": _effect(record), "history": [_event(e) for e in history], "attempts": attempts,
                "obligations": [_obligation(o) for o in self.outbox.obligations(effect_key=key)],
                "actions": self.effect_actions(record)}

    def effect_actions(self, record: Any) -> list[str]:
        status = record.status
        out = []
        if status is EffectStatus.AWAITING_APPROVAL:
            out += ["approve", "reject"]
        if status in (EffectStatus.FAILED, EffectStatus.CANCELLED) or (status is EffectStatus.UNKNOWN
                                                                         and record.flagged):
            out.append("redrive")
        if record.flagged or status is EffectStatus.UNKNOWN:
            out.append("resolve")
        return out

    def obligations_view(self, *, status: str | None = None, run_id: str | None = None,
                         page: Page | None = None) -> dict[str, Any]:
        page = page or Page()
        rows = self.outbox.obligations(status or None, run_id=run_id or None, limit=page.offset + page.size + 1)
        items, more = page.cut(rows)
        return {"items": [dict(_obligation(o), actions=obligation_actions(o)) for o in items],
                "page": page.to_dict(more), "filters": {"status": status, "run_id": run_id}}

    def routes_view(self, *, route: str | None = None, page: Page | None = None) -> dict[str, Any]:
        page = page or Page()
        fanout = FanOut(self.store)
        try:
            dead = fanout.dead(route or None, limit=page.offset + page.size + 1)
        finally:
            fanout.close()
        items, more = page.cut(dead)
        return {"routes": [_route(s) for s in FanOut.stored_status(self.store)], "dead": [_dead(d) for d in items],
                "page": page.to_dict(more), "filters": {"route": route}}

    def tasks_view(self, *, status: str | None = None, type: str | None = None,
                   page: Page | None = None) -> dict[str, Any]:
        page = page or Page()
        if status and status not in TASK_STATUSES:
            raise ConfigError(f"no task status {status!r}; one of {', '.join(TASK_STATUSES)}", field="status")
        rows = self.tasks.recent(page.offset + page.size + 1, status=status or None, type=type or None)
        items, more = page.cut(rows)
        return {"items": [_task(t) for t in items], "page": page.to_dict(more),
                "dead": [_task(t) for t in self.tasks.dead(type or None, limit=100)],
                "filters": {"status": status, "type": type}, "statuses": TASK_STATUSES}

    def task_view(self, id: str) -> dict[str, Any]:
        task = self.tasks.get(id)
        if task is None:
            raise NotFoundError(f"no task {id!r}")
        actions = []
        if task.status.value in ("DEAD", "FAILED"):
            actions.append("redrive")
        if task.status.value in ("PENDING", "RUNNING") and callable(getattr(self.tasks, "cancel", None)):
            actions.append("cancel")
        return {"task": _task(task), "actions": actions}

    def operations_view(self, *, neuron: str | None = None, done: str | None = None, page_token: str = "",
                        size: int = 50) -> dict[str, Any]:
        neuron = neuron or (self.neurons[0] if self.neurons else None)
        if neuron is None:
            return {"items": [], "neuron": None, "neurons": [], "next_page_token": "", "filters": {"done": done}}
        flt = {"true": "done = true", "false": "done = false"}.get(done or "", "")
        ops, token = self.lro(neuron).list_operations(flt, size, page_token)
        return {"items": [_operation(pb) for pb in ops], "neuron": neuron, "neurons": self.neurons,
                "next_page_token": token, "filters": {"done": done}}

    def operation_view(self, neuron: str, name: str) -> dict[str, Any]:
        client = self.lro(neuron)
        op = client.get_operation(name)
        return {"operation": dict(_operation(op.operation_pb()), version=op.version, resume_point=op.resume_point,
                                  cancel_requested=op.cancel_requested), "neuron": neuron}

    def executions_view(self, *, status: str | None = None, function: str | None = None,
                        page: Page | None = None) -> dict[str, Any]:
        page = page or Page()
        if status and status not in EXECUTION_STATUSES:
            raise ConfigError(f"no execution status {status!r}; one of {', '.join(EXECUTION_STATUSES)}",
                              field="status")
        rows = self.durable.list(status or None, function=function or None, limit=page.size + 1, offset=page.offset)
        return {"items": [_execution(x) for x in rows[:page.size]], "page": page.to_dict(len(rows) > page.size),
                "filters": {"status": status, "function": function}, "statuses": EXECUTION_STATUSES}

    def execution_view(self, execution_id: str) -> dict[str, Any]:
        info = self.durable.get(execution_id)
        steps = [_step(o) for o in self.durable.history(execution_id)]
        children = self.durable.list(parent_id=execution_id, limit=100)
        return {"execution": _execution(info), "tree": _tree(steps),
                "timeline": _timeline(steps, self.store.clock.now()), "children": [_execution(x) for x in children],
                "actions": self.execution_actions(info)}

    def execution_actions(self, info: Any) -> list[str]:
        status = info.status
        out = []
        if not status.terminal:
            out.append("terminate")
            out.append("resume" if status is ExecutionStatus.SUSPENDED else "suspend")
            if callable(getattr(self.durable, "send_signal", None)):
                out.append("signal")
        out.append("rerun")
        return out

    # -- acting ------------------------------------------------------------------------------------------------
    def _record(self, action: str, target: str, by: str, detail: Mapping[str, Any] | None = None) -> None:
        self.journal.append("console", "console.action", {"action": action, "target": target, "by": by,
                                                          **redact(dict(detail or {}))},
                            subject=f"console.{action}")

    def act(self, kind: str, action: str, target: str, by: str, form: Mapping[str, str]) -> str:
        """Do ``action`` on ``target`` (an effect key, an obligation id, ...) for operator ``by``; returns what
        happened, in a sentence. Raises the engine's error when the action does not apply."""
        handler = getattr(self, f"_{kind}_{action}", None)
        if handler is None:
            raise NotFoundError(f"no action {action!r} on {kind}")
        message: str = handler(target, by, form)
        self._record(f"{kind}.{action}", target, by, {k: v for k, v in form.items() if v and k in
                                                      ("reason", "operation", "signal", "status", "error",
                                                       "external_ref", "compensate_kind")})
        return message

    def _effect_approve(self, key: str, by: str, form: Mapping[str, str]) -> str:
        return f"effect {key}: {self.outbox.approve(key, payload=json_field(form, 'payload'), by=by).status.value}"

    def _effect_reject(self, key: str, by: str, form: Mapping[str, str]) -> str:
        return f"effect {key}: {self.outbox.reject(key, reason=_text(form, 'reason'), by=by).status.value}"

    def _effect_redrive(self, key: str, by: str, form: Mapping[str, str]) -> str:
        return f"effect {key}: {self.outbox.redrive(key).status.value}"

    def _effect_resolve(self, key: str, by: str, form: Mapping[str, str]) -> str:
        status = _text(form, "status")
        if status is None:
            raise ConfigError(f"choose the status to resolve it as: one of {', '.join(RESOLUTIONS)}", field="status")
        record = self.outbox.resolve(key, status, response=json_field(form, "response"), error=_text(form, "error"),
                                     external_ref=_text(form, "external_ref"),
                                     compensate_kind=_text(form, "compensate_kind"), by=by)
        return f"effect {key}: resolved {status.upper()}, now {record.status.value}"

    def _obligation_redrive(self, id: str, by: str, form: Mapping[str, str]) -> str:
        return f"obligation {id}: {self.outbox.redrive_obligation(_obligation_id(id)).status.value}"

    def _obligation_resolve(self, id: str, by: str, form: Mapping[str, str]) -> str:
        status = _text(form, "status")
        if status is None:
            raise ConfigError(f"choose the status to resolve it as: one of {', '.join(OBLIGATION_RESOLUTIONS)}",
                              field="status")
        record = self.outbox.resolve_obligation(_obligation_id(id), status, result=json_field(form, "result"), by=by)
        return f"obligation {id}: {record.status.value}"

    def _route_redrive(self, route: str, by: str, form: Mapping[str, str]) -> str:
        ids = [i for i in (form.get("event_id") or "").split(",") if i] or None
        fanout = FanOut(self.store)
        try:
            n = fanout.redrive(route, ids)
        finally:
            fanout.close()
        return f"route {route}: {n} parked event(s) queued for delivery"

    def _task_redrive(self, id: str, by: str, form: Mapping[str, str]) -> str:
        return f"task {id}: {self.tasks.redrive([id])} queued again"

    def _task_cancel(self, id: str, by: str, form: Mapping[str, str]) -> str:
        cancel = getattr(self.tasks, "cancel", None)
        if not callable(cancel):
            raise NotFoundError("this errands-core has no TaskEngine.cancel")
        return f"task {id}: " + ("cancelled (a running one stops at its next check)" if cancel(id)
                                 else "had ended already; nothing changed")

    def _operation_cancel(self, target: str, by: str, form: Mapping[str, str]) -> str:
        neuron, _, name = target.partition(":")
        self.lro(neuron).cancel_operation(name)
        return f"operation {name}: cancellation requested"

    def _execution_terminate(self, id: str, by: str, form: Mapping[str, str]) -> str:
        reason = form.get("reason") or f"terminated by {by} from the console"
        return f"execution {id}: {self.durable.terminate(id, reason).status.value}"

    def _execution_suspend(self, id: str, by: str, form: Mapping[str, str]) -> str:
        return f"execution {id}: {self.durable.suspend(id).status.value}"

    def _execution_resume(self, id: str, by: str, form: Mapping[str, str]) -> str:
        return f"execution {id}: {self.durable.resume(id).status.value}"

    def _execution_rerun(self, id: str, by: str, form: Mapping[str, str]) -> str:
        operation = form.get("operation")
        if not operation:
            raise ConfigError("name the operation to run again from", field="operation")
        return f"execution {id}: rerun as {self.durable.rerun_from(id, operation)}"

    def _execution_signal(self, id: str, by: str, form: Mapping[str, str]) -> str:
        send = getattr(self.durable, "send_signal", None)
        if not callable(send):
            raise NotFoundError("this errands-durable has no DurableRunner.send_signal")
        payload = json_field(form, "payload")
        if not form.get("signal"):
            raise ConfigError("name the signal to send", field="signal")
        taken = send(id, form["signal"], payload)
        return f"execution {id}: signal {form['signal']!r} " + ("taken by a waiting step" if taken
                                                                   else "kept until a step waits for it")
