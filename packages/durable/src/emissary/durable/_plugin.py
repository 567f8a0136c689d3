"""The ``durable`` plugin: what emissary-durable registers with emissary-core."""

from __future__ import annotations

from emissary.core import hookimpl
