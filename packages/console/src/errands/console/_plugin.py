"""The ``console`` plugin: ``errands console``."""

from __future__ import annotations

from typing import Any

from errands.core import hookimpl


@hookimpl
def errands_register_cli(group: Any) -> None:
    from ._cli import register

    register(group)


@hookimpl
def errands_console_app(app: Any, options: dict[str, Any]) -> Any:
    from ._auth import Access
    from ._views import Engines
    from ._web import console_app

    options = dict(options)
    access = options.pop("access", None)
    token = options.pop("token", None)
    users = options.pop("users", None)
    if access is None:
        access = Access(token=token, users=users) if (token or users) else Access.from_settings()
    engines = Engines(app, neurons=options.pop("neurons", ()))
    return console_app(engines, access=access, own=True, **options)
