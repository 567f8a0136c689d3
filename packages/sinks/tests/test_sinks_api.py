from __future__ import annotations

import emissary.sinks


def test_public_names_are_pinned() -> None:
    assert emissary.sinks.__all__ == [
        "LogConnector",
        "LogSink",
        "WebhookGoneError",
        "WebhookSink",
        "WebhookVerificationError",
        "__version__",
        "sign_webhook",
        "verify_webhook",
    ]
    for name in emissary.sinks.__all__:
        assert getattr(emissary.sinks, name) is not None


def test_plugin_registers_the_sinks() -> None:
    from emissary.core import Registry

    registry = Registry()
    assert registry.sinks["log"] is emissary.sinks.LogSink
    assert registry.sinks["webhook"] is emissary.sinks.WebhookSink
