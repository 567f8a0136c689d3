"""The public surface of errands.connectors.gcp, its plugin registrations and import without extras."""

from __future__ import annotations

import subprocess
import sys

import errands.connectors.gcp as gcp
from errands.core import get_registry


def test_public_api_is_pinned() -> None:
    assert gcp.__all__ == [
        "CloudTasksConnector",
        "CloudTasksScheduler",
        "PubSubConnector",
        "PubSubSink",
        "SpannerOperationStore",
        "SpannerStore",
        "__version__",
        "operations_ddl",
        "operations_descriptor_set",
        "task_id_for",
    ]
    assert gcp.__all__ == sorted(gcp.__all__)
    for name in gcp.__all__:
        assert getattr(gcp, name) is not None


def test_plugin_registers_its_classes() -> None:
    registry = get_registry()
    assert registry.connectors["pubsub"] is gcp.PubSubConnector
    assert registry.connectors["cloudtasks"] is gcp.CloudTasksConnector
    assert registry.sinks["pubsub"] is gcp.PubSubSink
    assert registry.schedulers["cloudtasks"] is gcp.CloudTasksScheduler
    assert registry.stores["spanner"] is gcp.SpannerStore


def test_import_needs_no_extra() -> None:
    # Block every Google Cloud library: importing (and building parts) must still work.
    code = (
        "import sys\n"
        "for m in ('google.cloud.pubsub_v1', 'google.cloud.tasks_v2', 'google.cloud.spanner'):\n"
        "    sys.modules[m] = None\n"
        "import errands.connectors.gcp as g\n"
        "g.PubSubSink('p', 'topic'); g.CloudTasksConnector('p', 'l', 'q', 'https://x.example')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_task_ids_are_stable_hashes() -> None:
    assert gcp.task_id_for("order-42") == gcp.task_id_for("order-42")
    assert gcp.task_id_for("order-42") != gcp.task_id_for("order-43")
    assert len(gcp.task_id_for("x" * 5000)) == 64
    assert gcp.task_id_for("a/b c", prefix="e-").startswith("e-")
