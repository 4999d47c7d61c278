"""A stop asked for by a termination signal (preemption).

While it stands, callbacks skip work that would delay the checkpoint (a forgetting measurement), so the
Trainer saves within seconds of the step in flight; the flag is process-wide because the signal handler and
the callbacks that must react to it do not know one another.
"""

from __future__ import annotations

_requested: str | None = None


def request(reason: str) -> None:
    """Record the first stop request (e.g. ``"SIGTERM"``)."""
    global _requested
    _requested = _requested or reason


def requested() -> str | None:
    """The reason of the pending stop request, or None."""
    return _requested


def clear() -> None:
    global _requested
    _requested = None
