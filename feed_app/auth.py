"""Passwords (salted scrypt), access tokens (JWT, HS256: the user id in `sub`, the log-in it
belongs to in `sid`) and refresh tokens (random; only their hash is stored)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import math
import os
import secrets
import time

import jwt

from feed_app.wire import MAX_ID

# scrypt with n=2**14, r=8 costs ~16 MiB and some tens of milliseconds per hash: slow for an
# attacker with a stolen table. Callers run it on limits.HashPool's threads, never on the loop.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)


def hash_password_sync(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt)
    encode = base64.b64encode
    return f"scrypt${encode(salt).decode()}${encode(digest).decode()}"


def verify_password_sync(password: str, stored: str | None) -> bool:
    if stored is None:
        # Spend the same time on an unknown user as on a wrong password: no user enumeration.
        _scrypt(password, b"\0" * 16)
        return False
    _, salt, digest = stored.split("$")
    return hmac.compare_digest(_scrypt(password, base64.b64decode(salt)), base64.b64decode(digest))


class InvalidToken(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class AccessClaims:
    user_id: int
    login_id: int  # the log-in (one per device) that ends with a log-out; 0 for none
    expires: int  # seconds since the epoch


def issue_token(user_id: int, secret: str, ttl: int, login_id: int = 0) -> str:
    """An access token. login_id 0 belongs to no log-in (tokens minted with the secret by the
    benchmarks and tests): nothing can end it before it expires."""
    now = int(time.time())
    claims = {"sub": str(user_id), "sid": str(login_id), "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret, "HS256")


def claims_from_token(token: str, secret: str) -> AccessClaims:
    """The claims of a valid, unexpired token; InvalidToken otherwise. Whether its log-in has
    ended is the caller's question (feed_app/revocations.py)."""
    claims = _verified_claims(token, secret)
    if claims.expires <= time.time():
        raise InvalidToken("token expired")
    return claims


def _positive_id(value: object, allow_zero: bool = False) -> int:
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19):
        raise InvalidToken("invalid token")
    if not (0 if allow_zero else 1) <= int(value) <= MAX_ID:
        raise InvalidToken("invalid token")
    return int(value)


@functools.lru_cache(maxsize=10_000)
def _verified_claims(token: str, secret: str) -> AccessClaims:
    """The claims of a token with a valid signature. Cached, because verifying is most of what
    an authenticated request costs and the same token comes back with every request; expiry is
    checked on every use. Invalid tokens raise, so they are never cached."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub", "sid"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token expired") from exc
    # PyJWT lets TypeError and OverflowError out of malformed (but signed) iat/nbf/exp claims.
    except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidToken("invalid token") from exc
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidToken("invalid token")
    user_id = _positive_id(claims["sub"])
    login_id = _positive_id(claims["sid"], allow_zero=True)
    return AccessClaims(user_id, login_id, int(exp))


# A refresh token is 32 random bytes, URL-safe: guessing one is hopeless, so a fast hash (not
# scrypt) is enough to keep a copy of the table from being a list of working tokens.
REFRESH_TOKEN_BYTES = 32


def new_refresh_token() -> tuple[str, bytes]:
    """(the token for the client's cookie, its hash for the database)."""
    token = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
    return token, refresh_token_hash(token)


def refresh_token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
