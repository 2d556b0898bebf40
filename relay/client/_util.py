"""Small pure helpers of the client: backoff delays, a token's expiry, error kinds."""

from __future__ import annotations

import base64
import random
import time

import orjson

# Texts of the relay's error frames that the client acts on (section 1 of
# DESIGN.md and the README's tables); matched by prefix or substring, the way
# a person reading them would.
SESSION_EXPIRED = "session expired"
INVALID_TOKEN = "invalid token"
RELOAD = "reload the data"
DELAYED = "database unreachable: events on this channel are delayed"
TRY_AGAIN = ("try again shortly", "join again shortly")
# `reason` of the notices about a whole repository.
TRUNCATED, DROPPED, PRUNED = "truncated", "dropped", "pruned"


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Between half and all of the exponential bound, at random: a crowd of clients
    cut off at once does not come back at once, and none retries in a tight loop."""
    bound: float = min(cap, base * (2 ** min(attempt, 30)))
    return random.uniform(bound / 2, bound)


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the relay verifies)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def refresh_delay(expires_at: float, margin: float, now: float | None = None) -> float:
    """Seconds from now until a session expiring at ``expires_at`` should be renewed:
    ``margin`` seconds before, or a quarter of the time left when that is shorter
    (short-lived tokens renew at three quarters of their life)."""
    left = expires_at - (time.time() if now is None else now)
    return max(0.0, left - min(margin, left / 4))


def is_retryable(text: str) -> bool:
    return any(t in text for t in TRY_AGAIN)
