"""Session tokens in isolation: ``relay.auth.TokenVerifier``, ``mint_token`` and ``parse_ttl``.

Covers HS256 tokens (valid, expired, tampered, wrong secret), the ``alg: none``
trick, RS256 and ES256 public keys given inline or as a file path, the
algorithm-confusion attack (an HS256 token signed with the public key's text),
a missing or empty ``sub``, a custom account claim, ``role: root``, and the
socket-token helpers.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.auth import (
    Identity,
    TokenRejected,
    TokenVerifier,
    mint_token,
    new_socket_token,
    parse_ttl,
    same_token,
)

SECRET = "unit-test-secret-" + "s" * 32


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def hs256_by_hand(header: object, payload: object, key: bytes) -> str:
    """Sign a JWT with HMAC-SHA256 without PyJWT (which refuses PEM text as an HMAC key)."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}".encode()
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(signing_input)
    return signing_input.decode() + "." + b64url(mac.finalize())


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


def claims(**extra: object) -> dict:
    now = int(time.time())
    return {"sub": "alice", "account_id": "acme", "iat": now, "exp": now + 600, **extra}


# --- HS256 --------------------------------------------------------------------------


def test_minted_token_verifies_to_its_identity(verifier):
    before = time.time()
    ident = verifier.verify(mint_token(SECRET, "alice", "acme", ttl_seconds=600))
    assert isinstance(ident, Identity)
    assert ident.user_id == "alice"
    assert ident.account_id == "acme"
    assert ident.is_root is False
    assert ident.expires_at is not None
    assert before + 590 <= ident.expires_at <= time.time() + 601


def test_minted_token_is_hs256_with_sub_account_iat_exp():
    token = mint_token(SECRET, "u1", "a1", ttl_seconds=60)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["sub"] == "u1" and payload["account_id"] == "a1"
    assert payload["exp"] - payload["iat"] == 60
    assert "role" not in payload


def test_token_without_exp_is_refused(verifier):
    """A session that never ends cannot be paused or cut: exp is required."""
    no_exp = claims()
    del no_exp["exp"]
    token = jwt.encode(no_exp, SECRET, algorithm="HS256")
    with pytest.raises(TokenRejected, match="exp"):
        verifier.check(token)


@pytest.mark.parametrize(
    "exp", [str(int(time.time()) + 600), 10**400, True, [1], {"n": 1}, float("nan")]
)
def test_malformed_exp_is_invalid_not_a_crash(verifier, exp):
    """A numeric string would pass PyJWT but never arm the expiry timer; 10**400 overflowed."""
    body = b64url_json(claims(exp=0)).encode()
    if isinstance(exp, int) and not isinstance(exp, bool) and exp > 2**64:
        body = b64url(('{"sub":"alice","exp":' + str(exp) + "}").encode()).encode()
    elif isinstance(exp, float):
        body = b64url(b'{"sub":"alice","exp":NaN}').encode()
    else:
        body = b64url_json(claims(exp=exp)).encode()
    token = hs256_by_hand({"alg": "HS256", "typ": "JWT"}, {}, SECRET.encode())
    head = token.split(".")[0]
    signing_input = head.encode() + b"." + body
    mac = hmac.HMAC(SECRET.encode(), hashes.SHA256())
    mac.update(signing_input)
    forged = signing_input.decode() + "." + b64url(mac.finalize())
    assert verifier.verify(forged) is None


def test_max_lifetime(verifier):
    bounded = TokenVerifier(secret=SECRET, max_ttl_seconds=3600)
    assert bounded.verify(mint_token(SECRET, "alice", "acme", ttl_seconds=3000)) is not None
    with pytest.raises(TokenRejected, match="longer"):
        bounded.check(mint_token(SECRET, "alice", "acme", ttl_seconds=7200))


def test_audience_and_issuer():
    """A token naming an audience must name this one; one naming none passes unless required."""
    plain = TokenVerifier(secret=SECRET, audience="shop", issuer="https://idp.example")
    iss = {"iss": "https://idp.example"}
    assert plain.verify(jwt.encode(claims(aud="shop", **iss), SECRET)) is not None
    assert plain.verify(jwt.encode(claims(**iss), SECRET)) is not None
    with pytest.raises(TokenRejected, match="audience"):
        plain.check(jwt.encode(claims(aud="blog", **iss), SECRET))
    with pytest.raises(TokenRejected):
        plain.check(jwt.encode(claims(aud="shop", iss="https://other.example"), SECRET))
    with pytest.raises(TokenRejected):
        plain.check(jwt.encode(claims(aud="shop"), SECRET))  # no iss at all
    strict = TokenVerifier(secret=SECRET, audience="shop", audience_required=True)
    assert strict.verify(jwt.encode(claims(aud=["blog", "shop"]), SECRET)) is not None
    with pytest.raises(TokenRejected, match="aud"):
        strict.check(jwt.encode(claims(), SECRET))


def test_expired_token_is_refused(verifier):
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 120, exp=now - 60), SECRET, algorithm="HS256")
    assert verifier.verify(token) is None


def test_tampered_payload_is_refused(verifier):
    token = mint_token(SECRET, "alice", "acme")
    header, payload, signature = token.split(".")
    forged_claims = json.loads(b64url_decode(payload))
    forged_claims["sub"] = "mallory"
    forged = f"{header}.{b64url_json(forged_claims)}.{signature}"
    assert verifier.verify(forged) is None
    # The untouched token still passes, so the refusal is about the tampering.
    assert verifier.verify(token) is not None


def test_tampered_signature_is_refused(verifier):
    token = mint_token(SECRET, "alice", "acme")
    head, _, sig = token.rpartition(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert verifier.verify(f"{head}.{flipped}") is None


def test_wrong_secret_is_refused(verifier):
    token = mint_token("another-secret-" + "y" * 32, "alice", "acme")
    assert verifier.verify(token) is None


def test_alg_none_token_is_refused(verifier):
    token = b64url_json({"alg": "none", "typ": "JWT"}) + "." + b64url_json(claims()) + "."
    assert verifier.verify(token) is None


def test_alg_none_token_is_refused_by_public_key_verifier(rsa_keys):
    verifier = TokenVerifier(public_key=rsa_keys[1])
    token = b64url_json({"alg": "none"}) + "." + b64url_json(claims()) + "."
    assert verifier.verify(token) is None


@pytest.mark.parametrize(
    "garbage", ["", "x", "a.b.c", "....", "not a token at all", "\x00\x01", "é.é.é"]
)
def test_garbage_is_refused_without_raising(verifier, garbage):
    assert verifier.verify(garbage) is None


def test_missing_sub_is_refused(verifier):
    payload = claims()
    del payload["sub"]
    assert verifier.verify(jwt.encode(payload, SECRET, algorithm="HS256")) is None


def test_empty_sub_is_refused(verifier):
    assert verifier.verify(jwt.encode(claims(sub=""), SECRET, algorithm="HS256")) is None


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ({"alg": "HS256"}, [1, 2]),
        ({"alg": "HS256"}, {"sub": 5}),
        ({"alg": "HS256"}, {"sub": "a", "exp": "tomorrow"}),
        ({"alg": "HS256"}, {"sub": "a", "nbf": 9_999_999_999}),
        ({"alg": "HS256", "crit": ["x-unknown"]}, {"sub": "a"}),
    ],
)
def test_correctly_signed_but_malformed_claims_are_refused(verifier, header, payload):
    token = hs256_by_hand(header, payload, SECRET.encode())
    assert verifier.verify(token) is None


def test_hand_signed_token_with_good_claims_is_accepted(verifier):
    # Proves hs256_by_hand makes valid signatures, so the refusals above are about the claims.
    ident = verifier.verify(hs256_by_hand({"alg": "HS256"}, claims(), SECRET.encode()))
    assert ident is not None and ident.user_id == "alice"


def test_missing_account_gives_none_account(verifier):
    payload = claims()
    del payload["account_id"]
    ident = verifier.verify(jwt.encode(payload, SECRET, algorithm="HS256"))
    assert ident is not None and ident.user_id == "alice" and ident.account_id is None


def test_empty_account_gives_none_account(verifier):
    ident = verifier.verify(mint_token(SECRET, "alice", ""))
    assert ident is not None and ident.account_id is None


def test_numeric_account_claim_becomes_text(verifier):
    ident = verifier.verify(jwt.encode(claims(account_id=42), SECRET, algorithm="HS256"))
    assert ident is not None and ident.account_id == "42"


def test_custom_account_claim_name():
    verifier = TokenVerifier(secret=SECRET, account_claim="org")
    token = mint_token(SECRET, "alice", "org-7", account_claim="org")
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["org"] == "org-7"
    ident = verifier.verify(token)
    assert ident is not None and ident.account_id == "org-7"
    # The default claim name is not read when another one is configured.
    other = verifier.verify(mint_token(SECRET, "alice", "acme"))
    assert other is not None and other.account_id is None


def test_role_root_gives_is_root(verifier):
    ident = verifier.verify(mint_token(SECRET, "svc", "acme", root=True))
    assert ident is not None and ident.is_root is True
    assert (
        jwt.decode(mint_token(SECRET, "svc", "acme", root=True), SECRET, algorithms=["HS256"])[
            "role"
        ]
        == "root"
    )


@pytest.mark.parametrize("role", ["admin", "ROOT", "user", ""])
def test_other_roles_are_not_root(verifier, role):
    ident = verifier.verify(jwt.encode(claims(role=role), SECRET, algorithm="HS256"))
    assert ident is not None and ident.is_root is False


def test_verifier_needs_a_key():
    with pytest.raises(ValueError, match="secret, public key or JWKS URL"):
        TokenVerifier()


# --- RS256 / ES256 public keys ----------------------------------------------------------


@pytest.mark.parametrize(("keys", "alg"), [("rsa_keys", "RS256"), ("ec_keys", "ES256")])
def test_public_key_inline_accepts_signed_token(request, keys, alg):
    private, public = request.getfixturevalue(keys)
    verifier = TokenVerifier(public_key=public)
    ident = verifier.verify(jwt.encode(claims(), private, algorithm=alg))
    assert ident is not None and ident.user_id == "alice" and ident.account_id == "acme"


@pytest.mark.parametrize(("keys", "alg"), [("rsa_keys", "RS256"), ("ec_keys", "ES256")])
def test_public_key_file_path_accepts_signed_token(request, tmp_path: Path, keys, alg):
    private, public = request.getfixturevalue(keys)
    path = tmp_path / "key.pem"
    path.write_text(public)
    verifier = TokenVerifier(public_key=str(path))
    ident = verifier.verify(jwt.encode(claims(), private, algorithm=alg))
    assert ident is not None and ident.user_id == "alice"


def test_token_signed_by_another_private_key_is_refused(rsa_keys):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = TokenVerifier(public_key=rsa_keys[1])
    assert verifier.verify(jwt.encode(claims(), other, algorithm="RS256")) is None


def test_expired_rs256_token_is_refused(rsa_keys):
    now = int(time.time())
    verifier = TokenVerifier(public_key=rsa_keys[1])
    token = jwt.encode(claims(iat=now - 120, exp=now - 60), rsa_keys[0], algorithm="RS256")
    assert verifier.verify(token) is None


@pytest.mark.parametrize("keys", ["rsa_keys", "ec_keys"])
def test_algorithm_confusion_hs256_with_public_key_text_is_refused(request, keys):
    _, public = request.getfixturevalue(keys)
    verifier = TokenVerifier(public_key=public)
    forged = hs256_by_hand({"alg": "HS256", "typ": "JWT"}, claims(), public.encode())
    # The forgery is a correct HMAC over the public key text...
    head, _, sig = forged.rpartition(".")
    mac = hmac.HMAC(public.encode(), hashes.SHA256())
    mac.update(head.encode())
    assert b64url(mac.finalize()) == sig
    # ...and still refused: a public-key verifier never accepts HS256.
    assert verifier.verify(forged) is None


def test_hs256_token_refused_by_public_key_verifier_even_with_a_plain_secret(rsa_keys):
    verifier = TokenVerifier(public_key=rsa_keys[1])
    assert verifier.verify(mint_token(SECRET, "alice", "acme")) is None


def test_rs256_token_refused_by_secret_verifier(verifier, rsa_keys):
    assert verifier.verify(jwt.encode(claims(), rsa_keys[0], algorithm="RS256")) is None


def test_public_key_takes_precedence_over_secret(rsa_keys):
    verifier = TokenVerifier(secret=SECRET, public_key=rsa_keys[1])
    assert verifier.verify(mint_token(SECRET, "alice", "acme")) is None
    assert verifier.verify(jwt.encode(claims(), rsa_keys[0], algorithm="RS256")) is not None


# --- socket tokens and ttl -----------------------------------------------------------------


def test_socket_tokens_are_random_and_compared_exactly():
    a, b = new_socket_token(), new_socket_token()
    assert a != b and len(a) >= 24
    assert same_token(a, a)
    assert not same_token(a, b)
    assert not same_token(a, a[:-1])
    assert not same_token(None, a)
    assert not same_token(a, None)
    assert not same_token("", "")
    assert not same_token(None, None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), (" 2H ", 7200), ("0", 0)],
)
def test_parse_ttl(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1w", "abc", "1.5h"])
def test_parse_ttl_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_ttl(text)


@pytest.mark.parametrize("claim", [{"x": 1}, ["1"], 1.5, ""])
def test_non_scalar_account_claim_gives_no_account(verifier, claim):
    token = jwt.encode(
        {"sub": "u", "account_id": claim, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    identity = verifier.verify(token)
    assert identity is not None and identity.account_id is None


async def test_default_app_checks_configured_issuer_and_audience(relay, client):
    """RELAY_JWT_ISSUER / RELAY_JWT_AUDIENCE: the default app's tokens must carry both."""
    r = await relay(jwt_issuer="https://idp.example/", jwt_audience="chat-api")
    now = int(time.time())
    good = {"sub": "alice", "exp": now + 60, "iss": "https://idp.example/", "aud": "chat-api"}
    c = await client(r)
    await c.auth(jwt.encode(good, r.secret, algorithm="HS256"))
    for wrong in ({"aud": "other"}, {"iss": "https://evil.example/"}, {"aud": None}):
        claims_ = {k: v for k, v in {**good, **wrong}.items() if v is not None}
        await c.send(type="auth", data=jwt.encode(claims_, r.secret, algorithm="HS256"))
        assert (await c.expect("error"))["data"] == "invalid token"


# --- tokens a verifier remembers as accepted (VerifiedTokens) --------------------------


def test_a_remembered_token_gives_an_equal_fresh_identity(verifier):
    token = mint_token(SECRET, "alice", "acme")
    first = verifier.check(token)
    assert len(verifier.accepted) == 1
    again = verifier.check(token)
    assert again == first and again is not first


def test_a_remembered_token_is_refused_once_it_expires(verifier):
    exp = int(time.time()) + 1
    token = jwt.encode(claims(exp=exp), SECRET, algorithm="HS256")
    assert verifier.check(token).expires_at == exp
    while time.time() < exp:  # PyJWT: expired once exp <= now
        time.sleep(0.05)
    with pytest.raises(TokenRejected, match="expired"):
        verifier.check(token)
    assert len(verifier.accepted) == 0


def test_a_token_differing_only_in_unused_signature_bits_is_still_refused(verifier):
    """Keyed by the whole token text: a non-canonical spelling of an accepted
    token's signature (the same bytes once decoded) gets a decode of its own."""
    token = mint_token(SECRET, "alice", "acme")
    verifier.check(token)
    head, _, sig = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    variant = f"{head}.{sig[:-1]}{alphabet[last ^ 1]}"  # 32 bytes: the last 2 bits are unused
    assert b64url_decode(variant.rpartition(".")[2]) == b64url_decode(sig)
    with pytest.raises(TokenRejected):
        verifier.check(variant)


def test_refusals_are_not_remembered(verifier):
    with pytest.raises(TokenRejected):
        verifier.check(mint_token("another-secret-" + "y" * 32, "alice", "acme"))
    assert len(verifier.accepted) == 0


def test_a_verifier_with_another_secret_does_not_share_what_was_accepted(verifier):
    """An app's new secret makes a new verifier (plans.AppDirectory): old tokens fail there."""
    token = mint_token(SECRET, "alice", "acme")
    verifier.check(token)
    rotated = TokenVerifier(secret="rotated-secret-" + "z" * 32)
    with pytest.raises(TokenRejected, match="signature"):
        rotated.check(token)


def test_tokens_checked_with_a_given_key_are_not_remembered(rsa_keys):
    """The JWKS path passes the key it found for the token: a key removed from the
    set must stop working, so nothing checked that way is remembered."""
    private, public = rsa_keys
    verifier = TokenVerifier(public_key=public)
    token = jwt.encode(claims(), private, algorithm="RS256")
    verifier.check(token, public)
    assert len(verifier.accepted) == 0
    verifier.check(token)  # the verifier's own key
    assert len(verifier.accepted) == 1


def test_what_is_remembered_is_bounded(verifier):
    from relay.auth import VERIFIED_ENTRIES, VERIFIED_MAX_TOKEN

    first = mint_token(SECRET, "user-0", "acme")
    verifier.check(first)
    for n in range(1, VERIFIED_ENTRIES + 10):
        verifier.check(mint_token(SECRET, f"user-{n}", "acme"))
    assert len(verifier.accepted) == VERIFIED_ENTRIES
    assert verifier.accepted.recall(first) is None  # the oldest made room
    long_token = jwt.encode(claims(pad="x" * VERIFIED_MAX_TOKEN), SECRET, algorithm="HS256")
    fresh = TokenVerifier(secret=SECRET)
    assert fresh.check(long_token).user_id == "alice"
    assert len(fresh.accepted) == 0


# --- the HS256 secret, checked once per verifier ---------------------------------------


def test_a_public_key_text_as_secret_is_refused_at_every_decode(rsa_keys):
    """PyJWT refuses a PEM key as an HMAC secret; checking the secret once must not
    turn that refusal into an acceptance, at the first decode or any later one."""
    public = rsa_keys[1]
    verifier = TokenVerifier(secret=public)
    forged = hs256_by_hand({"alg": "HS256", "typ": "JWT"}, claims(), public.encode())
    for _ in range(2):
        with pytest.raises(TokenRejected, match="InvalidKeyError"):
            verifier.check(forged)


def test_checking_a_secret_once_leaves_other_keys_and_pyjwt_alone(rsa_keys):
    from jwt.exceptions import InvalidKeyError

    from relay.auth import _SecretHS256

    public = rsa_keys[1]
    once = _SecretHS256(SECRET)
    assert once.prepare_key(SECRET) == SECRET.encode()
    with pytest.raises(InvalidKeyError):
        once.prepare_key(public)  # any other key: PyJWT's check
    TokenVerifier(secret=SECRET)
    forged = hs256_by_hand({"alg": "HS256", "typ": "JWT"}, claims(), public.encode())
    with pytest.raises(jwt.InvalidKeyError):  # the module's own decoder is unchanged
        jwt.decode(forged, public, algorithms=["HS256"])
