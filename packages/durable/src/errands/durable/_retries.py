"""Step retry strategies: ``(error, attempts_made) -> RetryDecision``."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from ._values import Duration


class JitterStrategy(str, Enum):
    """How much randomness goes into a retry delay."""

    NONE = "NONE"
    FULL = "FULL"
    HALF = "HALF"

    def compute_jitter(self, delay: float) -> float:
        if self is JitterStrategy.FULL:
            return random.random() * delay - delay / 2
        if self is JitterStrategy.HALF:
            return random.random() * delay / 2 - delay / 4
        return 0.0


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry (after ``delay``) or give up."""

    should_retry: bool
    delay: Duration = field(default_factory=Duration)

    @property
    def delay_seconds(self) -> float:
        return self.delay.to_seconds()

    @classmethod
    def retry(cls, delay: Duration | float) -> RetryDecision:
        return cls(True, delay if isinstance(delay, Duration) else Duration(seconds=float(delay)))

    @classmethod
    def no_retry(cls) -> RetryDecision:
        return cls(False)


@dataclass(frozen=True, slots=True)
class RetryStrategyConfig:
    """Exponential backoff: ``initial_delay * backoff_rate ** (attempt - 1)`` capped at ``max_delay``,
    plus jitter, for errors matching ``retryable_errors`` (message patterns) or ``retryable_error_types``
    (everything when neither is given), up to ``max_attempts`` attempts in all."""

    max_attempts: int = 3
    initial_delay: Duration = field(default_factory=lambda: Duration(seconds=5))
    max_delay: Duration = field(default_factory=lambda: Duration(minutes=5))
    backoff_rate: float = 2.0
    jitter_strategy: JitterStrategy = JitterStrategy.FULL
    retryable_errors: list[str | re.Pattern[str]] | None = None
    retryable_error_types: list[type[Exception]] | None = None


RetryStrategy = Callable[[Exception, int], RetryDecision]


def create_retry_strategy(config: RetryStrategyConfig | None = None) -> RetryStrategy:
    """A retry strategy from ``config``.

    Example:
        >>> strategy = create_retry_strategy(RetryStrategyConfig(max_attempts=2))
        >>> strategy(ValueError("x"), 2).should_retry
        False
    """
    config = config or RetryStrategyConfig()
    default_all = config.retryable_errors is None and config.retryable_error_types is None
    patterns = list(config.retryable_errors or [])
    types = tuple(config.retryable_error_types or ())

    def strategy(error: Exception, attempts_made: int) -> RetryDecision:
        if attempts_made >= config.max_attempts:
            return RetryDecision.no_retry()
        if not default_all:
            text = str(error)
            by_message = any(p.search(text) if isinstance(p, re.Pattern) else p in text for p in patterns)
            if not by_message and not isinstance(error, types):
                return RetryDecision.no_retry()
        base = min(config.initial_delay.to_seconds() * config.backoff_rate ** max(attempts_made - 1, 0),
                   config.max_delay.to_seconds())
        if base <= 0:
            return RetryDecision.retry(0.0)
        delay = max(1, math.ceil(base + config.jitter_strategy.compute_jitter(base)))
        return RetryDecision.retry(float(delay))

    return strategy


class RetryPresets:
    """Ready-made strategies, as in the AWS SDK."""

    @staticmethod
    def none() -> RetryStrategy:
        """No retries: one attempt."""
        return create_retry_strategy(RetryStrategyConfig(max_attempts=1))

    @staticmethod
    def default() -> RetryStrategy:
        """Six attempts, 5 s doubling to 1 min, full jitter (used when a step names none)."""
        return create_retry_strategy(RetryStrategyConfig(
            max_attempts=6, initial_delay=Duration(seconds=5), max_delay=Duration(minutes=1)))

    @staticmethod
    def transient() -> RetryStrategy:
        """Three attempts with half jitter."""
        return create_retry_strategy(RetryStrategyConfig(max_attempts=3, jitter_strategy=JitterStrategy.HALF))

    @staticmethod
    def resource_availability() -> RetryStrategy:
        """Five attempts, 5 s doubling to 5 min."""
        return create_retry_strategy(RetryStrategyConfig(max_attempts=5))

    @staticmethod
    def critical() -> RetryStrategy:
        """Ten attempts, 1 s growing 1.5x to 1 min, no jitter."""
        return create_retry_strategy(RetryStrategyConfig(
            max_attempts=10, initial_delay=Duration(seconds=1), max_delay=Duration(minutes=1),
            backoff_rate=1.5, jitter_strategy=JitterStrategy.NONE))

    @staticmethod
    def immediate(max_attempts: int = 3) -> RetryStrategy:
        """Retry at once, in the same invocation, up to ``max_attempts`` attempts."""
        return create_retry_strategy(RetryStrategyConfig(
            max_attempts=max_attempts, initial_delay=Duration(), jitter_strategy=JitterStrategy.NONE))
