"""Test kit for durable functions: ``LocalRunner`` runs executions in memory with a fake clock that skips
ahead to the next timer, so a one-hour wait takes no time."""

from __future__ import annotations

from ._aws import AWSLocalRunner, LambdaEndpoint, aws_runner_available, normalise_history
from ._local import LocalRunner

__all__ = ["AWSLocalRunner", "LambdaEndpoint", "LocalRunner", "aws_runner_available", "normalise_history"]
