"""The console as an ASGI application (Starlette): server-rendered pages, and the same data as JSON under
``/api/``. Every request is authenticated (``Access``); every action is a POST with the CSRF token, asked
for on a confirmation page first, done through ``Engines.act`` and recorded in the journal."""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, quote, urlencode

from errands.core.errors import ConfigError, ErrandsError, NotFoundError
from errands.core.store import SQLStore
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ._auth import CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER, Access, csrf_ok, new_csrf_token
from ._views import OBLIGATION_RESOLUTIONS, RESOLUTIONS, Engines, Page

Endpoint = Callable[[Request], Awaitable[Response]]

#: The confirmation each action asks for, and the fields its form has.
ACTIONS: dict[tuple[str, str], tuple[str, list[str]]] = {
    ("effect", "approve"): ("Approve effect {target}: it will be dispatched (with the payload, if given, in its "
                            "metadata under errands.approval).", ["payload"]),
    ("effect", "reject"): ("Reject effect {target}: it is cancelled and never dispatched.", ["reason"]),
    ("effect", "redrive"): ("Queue effect {target} again with fresh attempts.", []),
    ("effect", "resolve"): ("Resolve effect {target} by hand, from what you found at the counterparty: CONFIRMED "
                            "(it happened), FAILED (it failed for good: say why), ABSENT (it never arrived: "
                            "dispatch it again) or DUPLICATE (it happened more than once: name the compensation "
                            "owed).", ["status", "error", "external_ref", "compensate_kind", "response"]),
    ("obligation", "redrive"): ("Make obligation {target} due again with fresh attempts.", []),
    ("obligation", "resolve"): ("Resolve obligation {target} by hand: COMPENSATED (done, or found done) or STUCK "
                                "(stop trying).", ["status", "result"]),
    ("route", "redrive"): ("Queue the parked events of route {target} for delivery.", ["event_id"]),
    ("task", "redrive"): ("Queue task {target} again with fresh retries.", []),
    ("task", "cancel"): ("Cancel task {target}: a pending one ends now, a running one is asked to stop.", []),
    ("operation", "cancel"): ("Ask operation {target} to cancel.", []),
    ("execution", "terminate"): ("Terminate execution {target} (and the executions it invoked).", ["reason"]),
    ("execution", "suspend"): ("Suspend execution {target}: nothing runs until it is resumed.", []),
    ("execution", "resume"): ("Resume execution {target}.", []),
    ("execution", "rerun"): ("Start a new execution from execution {target}'s checkpoints before an operation.",
                             ["operation"]),
    ("execution", "signal"): ("Send a signal to execution {target}.", ["signal", "payload"]),
}

#: The fields chosen from a list, per action, and the fields that take JSON.
CHOICES: dict[tuple[str, str, str], list[str]] = {
    ("effect", "resolve", "status"): RESOLUTIONS, ("obligation", "resolve", "status"): OBLIGATION_RESOLUTIONS}
JSON_FIELDS = ("payload", "response", "result")

#: Where each kind's page is, to go back to after an action.
_PAGES = {"effect": "effects/{t}", "obligation": "obligations", "route": "routes", "task": "tasks/{t}",
          "operation": "operations/{t}", "execution": "executions/{t}"}


def _env() -> Environment:
    env = Environment(loader=PackageLoader("errands.console", "templates"), autoescape=select_autoescape(),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
    env.filters["q"] = lambda v: quote(str(v), safe="")
    env.filters["short"] = lambda v, n=80: v if v is None or len(str(v)) <= n else str(v)[:n - 1] + "…"
    env.filters["when"] = lambda v: "" if not v else str(v).replace("T", " ").replace("+00:00", "")
    return env


class Console:
    """The console over ``engines``, guarded by ``access``."""

    def __init__(self, engines: Engines, access: Access, *, refresh: int = 5) -> None:
        self.engines = engines
        self.access = access
        self.refresh = refresh
        self.templates = _env()

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _challenge(self) -> Response:
        scheme = 'Basic realm="errands console"' if self.access.users else 'Bearer realm="errands console"'
        return JSONResponse({"error": "unauthorized", "detail": "send Authorization: Bearer <token> or basic "
                             "credentials"}, status_code=401, headers={"WWW-Authenticate": scheme})

    def guard(self, fn: Callable[[Request, str], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            request.state.csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
            operator = self.access.operator(request.headers.get("authorization"))
            if operator is None:
                return self._challenge()
            if request.method == "POST":
                bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
                api = request.url.path.startswith(_base(request) + "/api/")
                if not (api and bearer and not self.access.open):
                    form = await _form(request)
                    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
                    if not csrf_ok(request.cookies.get(CSRF_COOKIE), sent):
                        return JSONResponse({"error": "csrf", "detail": "the form's CSRF token is missing or stale; "
                                             "reload the page"}, status_code=403)
            try:
                response = await fn(request, operator)
            except NotFoundError as exc:
                response = self._error(request, 404, str(exc))
            except (ErrandsError, ValueError) as exc:
                response = self._error(request, 400, f"{type(exc).__name__}: {exc}")
            response.headers.setdefault("Cache-Control", "no-store")
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "same-origin")
            if CSRF_COOKIE not in request.cookies:
                response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict",
                                    path=_base(request) or "/")
            return response

        return endpoint

    def _error(self, request: Request, status: int, detail: str) -> Response:
        if _is_api(request):
            return JSONResponse({"error": "not found" if status == 404 else "bad request", "detail": detail},
                                status_code=status)
        return self.render(request, "error.html", {"status": status, "detail": detail}, status=status)

    def render(self, request: Request, template: str, context: Mapping[str, Any], *, status: int = 200) -> Response:
        refresh = request.query_params.get("refresh")
        args = {k: v for k, v in request.query_params.items() if k not in ("refresh", "done")}
        values: dict[str, Any] = {
            "base": _base(request), "csrf": request.state.csrf, "path": request.url.path, "args": args,
            "refresh": int(refresh) if refresh and refresh.isdigit() else None, "refresh_every": self.refresh,
            "done": request.query_params.get("done"), "operator": getattr(request.state, "operator", None),
            "neurons": self.engines.neurons}
        html = self.templates.get_template(template).render({**values, **context})
        return HTMLResponse(html, status_code=status)

    def page(self, template: str, read: Callable[[Request], Any]) -> tuple[Endpoint, Endpoint]:
        """An HTML page and its JSON twin from one read."""
        async def html(request: Request, operator: str) -> Response:
            request.state.operator = operator
            data = await run_in_threadpool(read, request)
            return self.render(request, template, {"o": data} if template == "overview.html" else data)

        async def api(request: Request, operator: str) -> Response:
            return JSONResponse(json.loads(json.dumps(await run_in_threadpool(read, request), default=str)))

        return self.guard(html), self.guard(api)

    # -- actions -----------------------------------------------------------------------------------------------
    def _confirmation(self, request: Request, kind: str, action: str, target: str, defaults: Mapping[str, str],
                      *, error: str | None = None, status: int = 200) -> Response:
        text, fields = ACTIONS[(kind, action)]
        return self.render(request, "confirm.html", {
            "kind": kind, "action": action, "target": target, "question": text.format(target=target),
            "fields": fields, "choices": {f: CHOICES[(kind, action, f)] for f in fields if (kind, action, f) in CHOICES},
            "json_fields": JSON_FIELDS, "back": _PAGES[kind].format(t=quote(target, safe="/:")),
            "defaults": dict(defaults), "error": error}, status=status)

    async def confirm(self, request: Request, operator: str) -> Response:
        request.state.operator = operator
        kind, action, target = _action_of(request)
        return self._confirmation(request, kind, action, target, request.query_params)

    async def perform(self, request: Request, operator: str) -> Response:
        kind, action, target = _action_of(request)
        form = {k: v for k, v in (await _form(request)).items() if k != CSRF_FIELD}
        try:
            message = await run_in_threadpool(self.engines.act, kind, action, target, operator, form)
        except (ErrandsError, ValueError) as exc:
            if _is_api(request):
                raise
            # The form again, as filled in, with the engine's reason it refused: nothing was changed.
            request.state.operator = operator
            return self._confirmation(request, kind, action, target, form, error=f"{type(exc).__name__}: {exc}",
                                      status=404 if isinstance(exc, NotFoundError) else 400)
        if _is_api(request):
            return JSONResponse({"ok": True, "message": message, "by": operator})
        back = _PAGES[kind].format(t=quote(target, safe="/:"))
        return RedirectResponse(f"{_base(request)}/{back}?{urlencode({'done': message})}", status_code=303)

    # -- the application ---------------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        e = self.engines

        def page_of(request: Request) -> Page:
            p = request.query_params
            return Page(int(p.get("page") or 1), int(p.get("size") or 50))

        def arg(request: Request, name: str) -> str | None:
            return request.query_params.get(name) or None

        def flagged(request: Request) -> bool | None:
            value = arg(request, "flagged")
            return None if value is None else value in ("1", "true", "yes")

        pages: list[tuple[str, str, Callable[[Request], Any]]] = [
            ("/", "overview.html", lambda r: e.overview()),
            ("/effects", "effects.html", lambda r: e.effects_view(
                status=arg(r, "status"), connector=arg(r, "connector"), flagged=flagged(r), run_id=arg(r, "run_id"),
                q=arg(r, "q"), page=page_of(r))),
            ("/effects/{key:path}", "effect.html", lambda r: e.effect_view(r.path_params["key"])),
            ("/obligations", "obligations.html", lambda r: e.obligations_view(
                status=arg(r, "status"), run_id=arg(r, "run_id"), page=page_of(r))),
            ("/routes", "routes.html", lambda r: e.routes_view(route=arg(r, "route"), page=page_of(r))),
            ("/tasks", "tasks.html", lambda r: e.tasks_view(status=arg(r, "status"), type=arg(r, "type"),
                                                            page=page_of(r))),
            ("/tasks/{id}", "task.html", lambda r: e.task_view(r.path_params["id"])),
            ("/operations", "operations.html", lambda r: e.operations_view(
                neuron=arg(r, "neuron"), done=arg(r, "done"), page_token=arg(r, "page_token") or "",
                size=int(arg(r, "size") or 50))),
            ("/operations/{neuron}:{name:path}", "operation.html",
             lambda r: e.operation_view(r.path_params["neuron"], r.path_params["name"])),
            ("/executions", "executions.html", lambda r: e.executions_view(
                status=arg(r, "status"), function=arg(r, "function"), page=page_of(r))),
            ("/executions/{id}", "execution.html", lambda r: e.execution_view(r.path_params["id"])),
        ]
        out = []
        act = "/act/{kind}/{action}/{target:path}"
        out.append(Route(act, self.guard(self.confirm), methods=["GET"]))
        out.append(Route(act, self.guard(self.perform), methods=["POST"]))
        out.append(Route("/api" + act, self.guard(self.perform), methods=["POST"]))
        for path, template, read in pages:
            html, api = self.page(template, read)
            out.append(Route("/api" + (path if path != "/" else "/overview"), api, methods=["GET"]))
            out.append(Route(path, html, methods=["GET"]))
        return out


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(_base(request) + "/api/")


def _action_of(request: Request) -> tuple[str, str, str]:
    kind, action, target = (request.path_params[k] for k in ("kind", "action", "target"))
    if (kind, action) not in ACTIONS:
        raise NotFoundError(f"no action {action!r} on {kind}")
    return kind, action, target


async def _form(request: Request) -> dict[str, str]:
    """The posted form (urlencoded) or JSON object, read once per request."""
    cached = getattr(request.state, "form", None)
    if cached is not None:
        return dict(cached)
    body = await request.body()
    form: dict[str, str] = {}
    if request.headers.get("content-type", "").startswith("application/json") and body:
        value = json.loads(body)
        if not isinstance(value, dict):
            raise ConfigError("the JSON body of an action must be an object", field="body")
        form = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
    elif body:
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
    request.state.form = form
    return dict(form)


def console_app(store: str | SQLStore | Engines, *, access: Access | None = None, neurons: Iterable[str] = (),
                refresh: int = 5, own: bool = False) -> Starlette:
    """The console as an ASGI application; mount it at any prefix (``Mount("/console", console_app(...))``).

    Args:
        store: a store URL, an open store, or ``Engines`` already opened over one.
        access: the credentials it accepts (default: from ``$ERRANDS_CONSOLE_TOKEN`` and friends; open when
            none are set, so put it behind your own authentication or set one).
        neurons: the lro services whose operations it lists.
        refresh: seconds between reloads of a page with live refresh on.
        own: close ``Engines`` given as ``store`` when the application shuts down (those it opens itself it
            always closes).
    """
    engines = store if isinstance(store, Engines) else Engines(store, neurons=neurons)
    console = Console(engines, access if access is not None else Access.from_settings(), refresh=refresh)
    owned = own or engines is not store

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned:
                engines.close()

    app = Starlette(routes=console.routes(), lifespan=lifespan)
    app.state.console = console
    return app
