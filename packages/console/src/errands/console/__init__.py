"""errands-console: a web console over an errands store.

Example:
    >>> from errands.console import console_app
    >>> app = console_app("sqlite:///app.db", neurons=["billing"])   # an ASGI application

``errands console --store URL`` serves it; ``Mount("/console", console_app(...))`` puts it in your app.
"""

from __future__ import annotations

from .__about__ import __version__
from ._auth import Access, check_listen
from ._views import Engines, redact
from ._web import console_app

__all__ = ["Access", "Engines", "__version__", "check_listen", "console_app", "redact"]
