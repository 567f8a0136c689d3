from __future__ import annotations

import errands.sinks


def test_public_names_are_pinned() -> None:
    assert errands.sinks.__all__ == [
        "LogConnector",
        "LogSink",
        "WebhookGoneError",
        "WebhookSink",
        "WebhookVerificationError",
        "__version__",
        "sign_webhook",
        "verify_webhook",
    ]
    for name in errands.sinks.__all__:
        assert getattr(errands.sinks, name) is not None


def test_plugin_registers_the_sinks() -> None:
    from errands.core import Registry

    registry = Registry()
    assert registry.sinks["log"] is errands.sinks.LogSink
    assert registry.sinks["webhook"] is errands.sinks.WebhookSink
