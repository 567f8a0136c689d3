"""The ``durable`` plugin: what errands-durable registers with errands-core."""

from __future__ import annotations

from typing import Any

from errands.core import hookimpl


@hookimpl
def errands_register_cli(group: Any) -> None:
    from ._cli import register

    register(group)


@hookimpl
def errands_register_demos() -> list[type]:
    from ._demo import DurableDemo

    return [DurableDemo]
