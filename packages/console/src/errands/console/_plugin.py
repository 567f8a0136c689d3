"""The ``console`` plugin: ``errands console``."""

from __future__ import annotations

from typing import Any

from errands.core import hookimpl


@hookimpl
def errands_register_cli(group: Any) -> None:
    from ._cli import register

    register(group)
