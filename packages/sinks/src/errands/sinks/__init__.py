"""errands-sinks."""

from __future__ import annotations

from .__about__ import __version__
from ._log_connector import LogConnector
from ._log_sink import LogSink
from ._webhook import (
    WebhookGoneError,
    WebhookSink,
    WebhookVerificationError,
    sign_webhook,
    verify_webhook,
)

__all__ = [
    "LogConnector",
    "LogSink",
    "WebhookGoneError",
    "WebhookSink",
    "WebhookVerificationError",
    "__version__",
    "sign_webhook",
    "verify_webhook",
]
