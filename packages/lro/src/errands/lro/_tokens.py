"""Resume tokens and what became of them, kept in the ``ResumeToken`` column.

Every ``resume_via_tasks`` gives the operation a fresh token; its callback carries it. The column holds the
token and its state, so that every store (SQL, Spanner) keeps it without a column of its own:

* ``{token}`` or ``{token}@{due}`` — scheduled (due at ``due``, epoch seconds, recorded when the task lives
  outside the store, so that it can be created again if it went missing): the next callback carrying
  ``token`` may run the handler;
* ``{token}!{expires}!{claim}`` — a callback runs the handler now and holds the resume until ``expires``
  (epoch seconds, renewed by a heartbeat while the handler runs); a duplicate delivery meanwhile is told to
  come back later, and one arriving after ``expires`` takes over (its holder died);
* ``{token}!used`` — the handler ran and ended without scheduling another resume: a replay of the
  callback (a duplicate task, a captured request) is stale and runs nothing.

Tokens are letters and digits only, so ``!`` never occurs in one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ResumeState", "claimed", "parse_token", "scheduled", "used"]

_SEP = "!"
_DUE = "@"
_USED = "used"


@dataclass(frozen=True, slots=True)
class ResumeState:
    """The state of an operation's latest resume.

    Attributes:
        token: the token of the latest ``resume_via_tasks`` (None: never scheduled).
        expires: when the running callback's hold lapses (0: nobody holds it).
        claim: who holds it.
        used: the callback ran and ended; the token is spent.
        due: when the resume is due, if recorded (0: not recorded).
    """

    token: str | None
    expires: float = 0.0
    claim: str = ""
    used: bool = False
    due: float = 0.0

    def held(self, now: float) -> bool:
        """Whether a running callback holds the resume at ``now``."""
        return self.expires > now


def parse_token(raw: str | None) -> ResumeState:
    """The state kept in a ``ResumeToken`` column value."""
    if not raw:
        return ResumeState(None)
    if _SEP not in raw:
        token, _, due = raw.partition(_DUE)
        try:
            return ResumeState(token, due=float(due) if due else 0.0)
        except ValueError:
            return ResumeState(token)
    token, _, rest = raw.partition(_SEP)
    if rest == _USED:
        return ResumeState(token, used=True)
    expires, _, claim = rest.partition(_SEP)
    try:
        return ResumeState(token, expires=float(expires), claim=claim)
    except ValueError:
        return ResumeState(token, used=True)  # unreadable: never run it again


def scheduled(token: str, due: float) -> str:
    """The column value of ``token`` scheduled for ``due``."""
    return f"{token}{_DUE}{due:.3f}"


def claimed(token: str, expires: float, claim: str) -> str:
    """The column value of ``token`` held by ``claim`` until ``expires``."""
    return f"{token}{_SEP}{expires:.3f}{_SEP}{claim}"


def used(token: str) -> str:
    """The column value of ``token`` once its callback has run."""
    return f"{token}{_SEP}{_USED}"
