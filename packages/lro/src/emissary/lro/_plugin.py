"""The ``lro`` plugin: what emissary-lro registers with emissary-core."""

from __future__ import annotations

from emissary.core import hookimpl
