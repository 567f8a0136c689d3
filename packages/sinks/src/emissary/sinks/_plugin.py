"""The ``sinks`` plugin: what emissary-sinks registers with emissary-core."""

from __future__ import annotations

from emissary.core import hookimpl
