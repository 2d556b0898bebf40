"""Authentication: session tokens (JWTs) in, identities and socket tokens out.

A session token is a JWT signed by the app's identity provider (or by
``relay token``), verified with an HS256 secret or an RS256/ES256 public key.
``sub`` is the user id; a configurable claim is the account id; ``role: root``
marks a service token that may read every database event.

A socket token is what ``auth`` hands back: a random value bound to the one
socket it was issued on, so a token copied to another socket is worthless.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

ROOT_ROLE = "root"


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    account_id: str | None  # None when the token has no account claim
    is_root: bool = False
    expires_at: float | None = None  # unix seconds, from ``exp``


class TokenVerifier:
    """Checks session tokens against one key; never logs or echoes them."""

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        account_claim: str = "account_id",
    ) -> None:
        if public_key:
            self._key: Any = _load_public_key(public_key)
            self._algorithms = ["RS256", "ES256"]
        elif secret:
            self._key = secret
            self._algorithms = ["HS256"]
        else:
            raise ValueError("a JWT secret or public key is required")
        self.account_claim = account_claim

    def verify(self, token: str) -> Identity | None:
        """The identity in a valid token, or None for any invalid one."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["sub"], "verify_aud": False},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        user = claims.get("sub")
        account = claims.get(self.account_claim)
        if user is None or user == "":
            return None
        exp = claims.get("exp")
        return Identity(
            user_id=str(user),
            # Only scalar ids compare meaningfully with a row's account column.
            account_id=str(account) if isinstance(account, str | int) and account != "" else None,
            is_root=claims.get("role") == ROOT_ROLE,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )


def _load_public_key(value: str) -> str:
    """A PEM given inline, or the path of a file holding one."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


def mint_token(
    secret: str,
    user_id: str,
    account_id: str,
    ttl_seconds: int | None = 3600,
    account_claim: str = "account_id",
    root: bool = False,
) -> str:
    """A session token signed with the HS256 secret (what ``relay token`` prints)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, account_claim: account_id, "iat": now}
    if ttl_seconds:
        claims["exp"] = now + ttl_seconds
    if root:
        claims["role"] = ROOT_ROLE
    return jwt.encode(claims, secret, algorithm="HS256")


def new_socket_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def parse_ttl(text: str) -> int:
    """'90', '90s', '15m', '1h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)
