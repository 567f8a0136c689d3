"""The ``durable`` plugin: what emissary-durable registers with emissary-core."""

from __future__ import annotations

from typing import Any

from emissary.core import hookimpl


@hookimpl
def emissary_register_cli(group: Any) -> None:
    from ._cli import register

    register(group)


@hookimpl
def emissary_register_demos() -> list[type]:
    from ._demo import DurableDemo

    return [DurableDemo]
