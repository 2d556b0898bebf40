"""Per-socket limits: message rate, error budget and the session's expiry timer.

Each socket gets one :class:`SocketLimits`. Its rate limit is a token bucket
(``rate`` frames a second, bursts of up to ``burst``); every frame a client
sends, well-formed or not, takes a token. Refused frames and malformed ones
spend the error budget; a socket that spends it all within the window is
abusive and is closed with code 4000. The session timer is one
``loop.call_at`` per socket, re-armed by every successful ``auth``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from relay.protocol import RelayError

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


class ErrorBudget:
    """At most ``limit`` errors within any ``window`` seconds."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] | None = None  # made by the first error

    def spend(self, now: float) -> bool:
        """Record one error; True when this one goes over the budget."""
        if self._times is None:
            self._times = deque()
        times = self._times
        times.append(now)
        while times and now - times[0] >= self.window:
            times.popleft()
        return len(times) > self.limit


class SocketLimits:
    """Everything the relay meters on one socket."""

    __slots__ = ("_timer", "budget", "expiring", "paused_at", "rate", "suspended")

    def __init__(self, rate: RateLimit | None, budget: ErrorBudget) -> None:
        self.rate = rate
        self.budget = budget
        # Channels left when the session expired, restored by the next auth.
        self.suspended: list[str] = []
        # Where each paused db- channel's stream stopped, and its filter, to resume from.
        self.paused_at: dict[str, Any] = {}
        # The task suspending them, so an auth arriving meanwhile waits for it.
        self.expiring: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def check_rate(self) -> None:
        """Raise :class:`RateLimited` when this frame is over the socket's rate."""
        if self.rate is not None and not self.rate.take(time.monotonic()):
            raise RateLimited(self.rate.rate)

    def arm_expiry(
        self, expires_at: float | None, on_expiry: Callable[..., None], *args: Any
    ) -> None:
        """Call ``on_expiry(*args)`` once when the wall-clock time ``expires_at`` passes."""
        self.disarm()
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        self._timer = loop.call_at(loop.time() + delay, on_expiry, *args)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def socket_limits(
    rate: float | None, burst_seconds: float, error_budget: int, error_window: float
) -> SocketLimits:
    """Limits for a new socket; a rate of None or 0 means unmetered."""
    bucket = RateLimit(rate, rate * burst_seconds) if rate else None
    return SocketLimits(bucket, ErrorBudget(error_budget, error_window))
