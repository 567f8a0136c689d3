"""Optional Google Cloud libraries, imported at use: a missing extra raises ``MissingDependencyError``."""

from __future__ import annotations

import importlib
from types import ModuleType

from errands.core import MissingDependencyError


def require(module: str, *, package: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``MissingDependencyError`` naming the ``errands`` extra to install.

    Args:
        module: the import path (``google.cloud.pubsub_v1``).
        package: the distribution that provides it (``google-cloud-pubsub``).
        extra: the extra that installs it (``pubsub``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package, extra) from exc
