"""Passwords (salted scrypt) and login tokens (JWT, HS256, user id in `sub`)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import os
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


def issue_token(user_id: int, secret: str, ttl: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": str(user_id), "iat": now, "exp": now + ttl}, secret, "HS256")


def user_id_from_token(token: str, secret: str) -> int:
    """The user id a valid, unexpired token was issued to; InvalidToken otherwise."""
    user_id, expires = _verified_claims(token, secret)
    if expires <= time.time():
        raise InvalidToken("token expired")
    return user_id


@functools.lru_cache(maxsize=10_000)
def _verified_claims(token: str, secret: str) -> tuple[int, int]:
    """(user id, expiry) of a token with a valid signature. Cached, because verifying is most of
    what an authenticated request costs and the same token comes back with every request; expiry
    is checked on every use. Invalid tokens raise, so they are never cached."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("token expired") from exc
    # PyJWT lets TypeError and OverflowError out of malformed (but signed) iat/nbf/exp claims.
    except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidToken("invalid token") from exc
    sub, exp = claims["sub"], claims["exp"]
    if not (isinstance(sub, str) and sub.isascii() and sub.isdigit() and len(sub) <= 19):
        raise InvalidToken("invalid token")
    if not 0 < int(sub) <= MAX_ID:
        raise InvalidToken("invalid token")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidToken("invalid token")
    return int(sub), int(exp)
