"""Per-socket limits: message rate and error budget.

Each socket gets one :class:`SocketLimits`. Its rate limit is a token bucket
(``rate`` frames a second, bursts of up to ``burst``); every frame a client
sends, well-formed or not, takes a token. Refused frames and malformed ones
spend the error budget; a socket that spends it all within the window is
abusive and is closed with code 4000. (The session's expiry is kept by
:mod:`relay.sessions`, one timer for the whole process.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.protocol import RelayError

if TYPE_CHECKING:
    from relay.auth import Identity

# Defaults for Settings.error_budget and Settings.error_window_seconds: more
# errors than ERROR_BUDGET within ERROR_WINDOW seconds close a socket (4000).
ERROR_BUDGET = 100
ERROR_WINDOW = 10.0


class RateLimited(RelayError):
    def __init__(self, rate: float) -> None:
        super().__init__(
            f"rate limit: at most {rate:g} messages per second; this frame was dropped, slow down"
        )


class RateLimit:
    """A token bucket: ``rate`` tokens a second, holding at most ``burst``."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    def take(self, now: float) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class SocketLimits:
    """Everything the relay meters on one socket.

    Its error budget: at most ``error_limit`` errors within any ``error_window``
    seconds. One per socket, so nothing is allocated until it is needed (the
    error times at the first error, the paused channels at a session's expiry).
    """

    __slots__ = (
        "_errors",
        "armed",
        "error_limit",
        "error_window",
        "expiring",
        "paused_at",
        "rate",
        "suspended",
    )

    def __init__(
        self,
        rate: RateLimit | None,
        *,
        error_limit: int = ERROR_BUDGET,
        error_window: float = ERROR_WINDOW,
    ) -> None:
        self.rate = rate
        self.error_limit = error_limit
        self.error_window = error_window
        self._errors: deque[float] | None = None  # made by the first error
        # Channels left when the session expired, restored by the next auth.
        self.suspended: Sequence[str] = ()
        # Where each paused db- channel's stream stopped, and its filter, to resume from.
        self.paused_at: dict[str, Any] | None = None
        # The task suspending them, so an auth arriving meanwhile waits for it.
        self.expiring: asyncio.Task[None] | None = None
        # The identity whose expiry is armed (relay.sessions.Expiry), if any.
        self.armed: Identity | None = None

    def check_rate(self) -> None:
        """Raise :class:`RateLimited` when this frame is over the socket's rate."""
        if self.rate is not None and not self.rate.take(time.monotonic()):
            raise RateLimited(self.rate.rate)

    def spend_error(self, now: float) -> bool:
        """Record one error; True when this one goes over the budget."""
        if self._errors is None:
            self._errors = deque()
        times = self._errors
        times.append(now)
        while times and now - times[0] >= self.error_window:
            times.popleft()
        return len(times) > self.error_limit


def socket_limits(
    rate: float | None, burst_seconds: float, error_budget: int, error_window: float
) -> SocketLimits:
    """Limits for a new socket; a rate of None or 0 means unmetered."""
    bucket = RateLimit(rate, rate * burst_seconds) if rate else None
    return SocketLimits(bucket, error_limit=error_budget, error_window=error_window)
