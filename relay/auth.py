"""Authentication: session tokens (JWTs) in, identities and socket tokens out.

A session token is a JWT signed by an app's identity provider (or by
``relay token``), verified with that app's key: an HS256 secret, an
RS256/ES256 public key, or the key set at a JWKS URL (keys picked by ``kid``,
fetched again when an unknown ``kid`` shows up (at most every 30 s: PyJWT's
cooldown, so a stream of made-up kids cannot make the relay hammer the
identity provider), so keys rotate without a
restart). ``sub`` is the user id; a configurable claim is the account id;
``role: root`` marks a service token that reads every database event of its
app. ``exp`` is required and must be a number. A token that names an
audience (``aud``) must name this app; one that names none is accepted only
by an app whose key no other app shares.

A verifier remembers the tokens it has accepted (:class:`VerifiedTokens`), so
a client that presents the same token again (a reconnect, another tab) costs
no second decode; expiry and the other time checks are still made at each use.

A socket token is what ``auth`` hands back: a random value bound to the one
socket it was issued on, so a token copied to another socket is worthless.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError

ROOT_ROLE = "root"
# Fetching a JWKS is a blocking HTTP request, done in a thread, at most this long.
JWKS_TIMEOUT = 5.0
JWKS_CACHE_SECONDS = 300
_JWKS_CLIENTS: dict[str, jwt.PyJWKClient] = {}
_MAX_JWKS_CLIENTS = 1000
# Tokens a verifier remembers as accepted, and the longest one it will remember
# (characters; a longer token is decoded every time): at most ~2.5 MB per verifier.
VERIFIED_ENTRIES = 1024
VERIFIED_MAX_TOKEN = 2048


class TokenRejected(Exception):
    """A session token is not valid here; the message says why (never the token)."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    account_id: str | None  # None when the token has no account claim
    is_root: bool = False
    expires_at: float | None = None  # unix seconds, from ``exp``


@dataclass(frozen=True, slots=True)
class _Accepted:
    identity: Identity
    # The time claims as PyJWT compares them (int() of the claim), None when absent.
    exp: int
    nbf: int | None
    iat: int | None


class VerifiedTokens:
    """The session tokens one verifier has accepted, each with what it decoded to.

    Exactly as strict as a decode, because:

    - an entry is made only after a full decode accepted the token, and keyed
      by the whole token text, so a hit is the same bytes, already checked;
    - what a decode checks is the token against the verifier's key and settings
      (signature, algorithm, header, issuer, audience, claim types), all fixed
      for the verifier's life (an app's new keys or settings make a new
      verifier, with no entries: ``plans.AppDirectory``), except the checks
      that depend on the time; those (``exp``, ``nbf``, ``iat``, the longest
      lifetime allowed) are made again at every use, the way PyJWT makes them,
      and a token failing one is forgotten and decoded again, to be refused
      with the reason a decode gives;
    - keys from a JWKS URL are never remembered against (a key removed from
      the set must stop working at once): only a verifier's own key is;
    - refusals are not remembered: a bad token costs a decode every time.

    Bounded: at most :data:`VERIFIED_ENTRIES` tokens of at most
    :data:`VERIFIED_MAX_TOKEN` characters; the oldest entry makes room.
    """

    __slots__ = ("_entries", "_max_ttl")

    def __init__(self, max_ttl_seconds: int | None) -> None:
        self._entries: dict[str, _Accepted] = {}
        self._max_ttl = max_ttl_seconds

    def __len__(self) -> int:
        return len(self._entries)

    def recall(self, token: str) -> Identity | None:
        """The identity of an accepted token that is still valid now, else None."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        now = time.time()
        ident = entry.identity
        assert ident.expires_at is not None
        if (
            entry.exp <= now
            or (entry.nbf is not None and entry.nbf > now)
            or (entry.iat is not None and entry.iat > now)
            or (self._max_ttl is not None and ident.expires_at - now > self._max_ttl)
        ):
            del self._entries[token]
            return None
        # A fresh object per auth, as a decode gives (sessions tells renewals apart by identity).
        return Identity(ident.user_id, ident.account_id, ident.is_root, ident.expires_at)

    def remember(self, token: str, claims: dict[str, Any], identity: Identity) -> None:
        if len(token) > VERIFIED_MAX_TOKEN:
            return
        entries = self._entries
        if token not in entries and len(entries) >= VERIFIED_ENTRIES:
            del entries[next(iter(entries))]
        nbf, iat = claims.get("nbf"), claims.get("iat")
        entries[token] = _Accepted(
            identity,
            exp=int(claims["exp"]),
            nbf=None if nbf is None else int(nbf),
            iat=None if iat is None else int(iat),
        )


class _SecretHS256(HMACAlgorithm):
    """HS256 whose one secret is checked once, when its verifier is made.

    PyJWT checks an HMAC key at every decode (not empty, not a PEM, SSH or DER
    key, not JWK text), about a quarter of the time a decode takes; the check
    depends on the key alone. Any other key is checked as PyJWT checks it, and
    a secret that fails the check fails it at every decode, as before.
    """

    def __init__(self, secret: str) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._secret = secret
        self._prepared: bytes | None
        try:
            self._prepared = super().prepare_key(secret)
        except InvalidKeyError:
            self._prepared = None

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._secret and self._prepared is not None:
            return self._prepared
        return super().prepare_key(key)


def _hs256_decoder(secret: str) -> jwt.PyJWT:
    """A PyJWT of its own for one secret (the module's shared one is left as it is)."""
    decoder = jwt.PyJWT()
    signatures = decoder._jws  # PyJWT's own JWS: PyJWT has no public accessor
    signatures.unregister_algorithm("HS256")
    signatures.register_algorithm("HS256", _SecretHS256(secret))
    return decoder


def jwks_client(url: str) -> jwt.PyJWKClient:
    """One key-set client per URL for the process, so its cache outlives app lookups."""
    client = _JWKS_CLIENTS.get(url)
    if client is None:
        if len(_JWKS_CLIENTS) >= _MAX_JWKS_CLIENTS:
            _JWKS_CLIENTS.clear()
        # The key set is cached (and fetched again for an unknown kid); keys are not
        # cached apart from it, or a key removed from the set would stay valid.
        client = jwt.PyJWKClient(
            url,
            cache_keys=False,
            cache_jwk_set=True,
            lifespan=JWKS_CACHE_SECONDS,
            timeout=int(JWKS_TIMEOUT),
        )
        _JWKS_CLIENTS[url] = client
    return client


class TokenVerifier:
    """Checks session tokens against one app's key; never logs or echoes them."""

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        account_claim: str = "account_id",
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        audience_required: bool = False,
        max_ttl_seconds: int | None = None,
    ) -> None:
        self._jwks: jwt.PyJWKClient | None = None
        self._decoder: jwt.PyJWT | None = None  # None: PyJWT's module-level decode
        if jwks_url:
            self._jwks = jwks_client(jwks_url)
            self._key: Any = None
            self._algorithms = ["RS256", "ES256"]
        elif public_key:
            self._key = load_public_key(public_key)
            self._algorithms = ["RS256", "ES256"]
        elif secret:
            self._key = secret
            self._algorithms = ["HS256"]
            self._decoder = _hs256_decoder(secret)
        else:
            raise ValueError("a JWT secret, public key or JWKS URL is required")
        self.account_claim = account_claim
        self.audience = audience
        self.issuer = issuer
        self.audience_required = audience_required
        self.max_ttl_seconds = max_ttl_seconds
        self.accepted = VerifiedTokens(max_ttl_seconds)

    def verify(self, token: str) -> Identity | None:
        """The identity in a valid token, or None for any invalid one."""
        try:
            return self.check(token)
        except TokenRejected:
            return None

    async def verify_async(self, token: str) -> Identity:
        """:meth:`check`, resolving a JWKS key in a thread; raises TokenRejected."""
        if self._jwks is None:
            return self.check(token)
        try:
            signing = await asyncio.wait_for(
                asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token), JWKS_TIMEOUT
            )
        except TimeoutError:
            raise TokenRejected("key set unreachable") from None
        except (jwt.PyJWTError, ValueError, TypeError) as err:
            raise TokenRejected(f"no key for this token ({type(err).__name__})") from None
        return self.check(token, signing.key)

    def check(self, token: str, key: Any = None) -> Identity:
        """The identity in a valid token; raises :class:`TokenRejected` saying why."""
        own_key = key is None
        if own_key:
            known = self.accepted.recall(token)
            if known is not None:
                return known
            key = self._key
        if key is None:
            raise TokenRejected("this app's keys come from a JWKS URL")
        # One decode: the audience is checked here, below, so that a token without
        # 'aud' is not decoded (and its signature checked) a second time.
        options: Any = {"require": ["sub", "exp"], "verify_aud": False}
        try:
            decode = self._decoder.decode if self._decoder is not None else jwt.decode
            claims = decode(
                token, key, algorithms=self._algorithms, issuer=self.issuer, options=options
            )
        except jwt.MissingRequiredClaimError as err:
            raise TokenRejected(f"missing claim {err.claim!r}") from None
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad signature (a token of another app?)") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as err:
            raise TokenRejected(f"malformed ({type(err).__name__})") from None
        self._check_audience(claims.get("aud"))
        identity = self._identity(claims)
        if own_key:
            self.accepted.remember(token, claims, identity)
        return identity

    def _check_audience(self, aud: Any) -> None:
        """PyJWT's audience rule, but a token naming no audience is let through
        unless this app requires one."""
        if not aud:
            if self.audience is not None and self.audience_required:
                raise TokenRejected("missing claim 'aud'")
            return
        names = [aud] if isinstance(aud, str) else aud
        if (
            self.audience is None
            or not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or self.audience not in names
        ):
            raise TokenRejected("audience (aud) does not name this app")

    def _identity(self, claims: dict[str, Any]) -> Identity:
        user = claims.get("sub")
        if not isinstance(user, str | int) or isinstance(user, bool) or user == "":
            raise TokenRejected("'sub' must be a non-empty string")
        exp = claims.get("exp")
        # PyJWT accepts numeric strings; the expiry timer needs a real number.
        # (0 < exp < 2**53 also rules out NaN, and ints too big for a float timer.)
        if not isinstance(exp, int | float) or isinstance(exp, bool) or not 0 < exp < 2**53:
            raise TokenRejected("'exp' must be a number of seconds")
        if self.max_ttl_seconds is not None and exp - time.time() > self.max_ttl_seconds:
            raise TokenRejected(f"lives longer than the allowed {self.max_ttl_seconds} s")
        account = claims.get(self.account_claim)
        return Identity(
            user_id=str(user),
            # Only scalar ids compare meaningfully with a row's account column.
            account_id=str(account)
            if isinstance(account, str | int) and not isinstance(account, bool) and account != ""
            else None,
            is_root=claims.get("role") == ROOT_ROLE,
            expires_at=float(exp),
        )


def load_public_key(value: str) -> str:
    """A PEM given inline, or the path of a file holding one."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


def mint_token(
    secret: str,
    user_id: str,
    account_id: str,
    ttl_seconds: int = 3600,
    account_claim: str = "account_id",
    root: bool = False,
    audience: str | None = None,
) -> str:
    """A session token signed with the HS256 secret (what ``relay token`` prints)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        account_claim: account_id,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if root:
        claims["role"] = ROOT_ROLE
    if audience:
        claims["aud"] = audience
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
