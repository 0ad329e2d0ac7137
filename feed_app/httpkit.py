"""What every HTTP handler of the service shares: errors as JSON bodies ({"error": "..."}, built
once here for the handlers and for the edge), the cap on request bodies, and the parsing of ids
and integer arguments from paths and query strings."""

from __future__ import annotations

import logging
from typing import Any

import tornado.escape
import tornado.web

from feed_app.db import DatabaseUnavailable, UnknownUser
from feed_app.wire import MAX_ID, Close

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # request bodies here are a few hundred bytes of JSON
BODY_TOO_LARGE = f"request body over {MAX_BODY} bytes"
LOGIN_ENDED = Close.LOGGED_OUT.reason  # a valid token of an ended log-in: 401, or 4003 on a socket


def error_body(message: str) -> bytes:
    """The body of every error the service answers with."""
    return tornado.escape.utf8(tornado.escape.json_encode({"error": message}))


class ApiError(tornado.web.HTTPError):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message)
        self.message = message
        self.headers = headers or {}  # sent with the error (send_error clears earlier ones)


def _storable(text: str) -> bool:
    """PostgreSQL text holds no NUL, and UTF-8 has no lone surrogates (JSON can carry both)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def check_field(name: str, value: Any, kind: type) -> None:
    """400 unless a field of a JSON body is present and of its type (a string one storable)."""
    # bool is an int in Python, but true is not a user id.
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise ApiError(400, f"field '{name}' is required and must be {kind.__name__}")
    if kind is str and not _storable(value):
        raise ApiError(400, f"field '{name}' contains characters that cannot be stored")


def _digits(value: str | None) -> bool:
    # At most 19 digits before int(): int() refuses (ValueError) past 4300 digits.
    return value is not None and value.isascii() and value.isdigit() and len(value) <= 19


def parse_id(value: str | None, what: str) -> int:
    """A positive bigint from a path or query string; 400 for anything else."""
    if not _digits(value):
        raise ApiError(400, f"{what} must be a positive integer below 2^63")
    return check_id(int(value), what)


def check_id(value: int, what: str) -> int:
    """A positive bigint from a JSON body (an int already); 400 for anything else."""
    if not 0 < value <= MAX_ID:
        raise ApiError(400, f"{what} must be a positive integer below 2^63")
    return value


def int_argument(
    handler: tornado.web.RequestHandler, name: str, default: int, high: int, low: int = 0
) -> int:
    """A query argument from low to high; 400 for anything else."""
    value = handler.get_query_argument(name, str(default))
    if not (_digits(value) and low <= int(value) <= high):
        raise ApiError(400, f"{name} must be an integer from {low} to {high}")
    return int(value)


def limit_argument(handler: tornado.web.RequestHandler, default: int, high: int) -> int:
    """The `limit` query argument, from 1 to high; 400 for anything else."""
    return int_argument(handler, "limit", default, high, low=1)


def error_message(status_code: int, exc: BaseException | None, reason: str) -> str:
    """The text of the {"error"} body for an exception a handler raised (or Tornado did)."""
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, DatabaseUnavailable):
        return "database unavailable, try again shortly"
    if isinstance(exc, UnknownUser):
        return "the user of this token does not exist"
    if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
        return exc.log_message % exc.args  # Tornado's own words: "Invalid unicode in q: ..."
    if status_code < 500:
        return reason  # Tornado's own refusals: 405, ...
    return "internal server error"


def error_status(status_code: int, exc: BaseException | None) -> int:
    if isinstance(exc, DatabaseUnavailable):
        return 503
    if isinstance(exc, UnknownUser):
        return 401
    return status_code


def refusal(exc: BaseException) -> tuple[int, str, int | None]:
    """(status, error, Retry-After seconds or None) for an error a handler raised, where the
    answer is not an HTTP response: a post message on the feed socket."""
    status = exc.status_code if isinstance(exc, tornado.web.HTTPError) else 500
    status = error_status(status, exc)
    retry_after = exc.headers.get("Retry-After") if isinstance(exc, ApiError) else None
    return status, error_message(status, exc, ""), int(retry_after) if retry_after else None


class JsonErrors(tornado.web.RequestHandler):
    """Every error a handler sends, Tornado's own included, is {"error": "..."}; every answer to
    a request that came over HTTPS carries Strict-Transport-Security (the application's
    `hsts_max_age` setting; 0 sends none)."""

    def set_default_headers(self) -> None:
        # No page of this service is meant to be framed (clickjacking of Follow, Delete, Log
        # out), and no answer is to be read as another type than it says.
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        # Only over HTTPS: RFC 6797 has browsers ignore it over plain HTTP, where a network
        # attacker could have added it. request.protocol is the client's (edge.client_protocol).
        max_age = self.settings.get("hsts_max_age", 0)
        if max_age and self.request.protocol == "https":
            self.set_header("Strict-Transport-Security", f"max-age={max_age}")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_status(error_status(status_code, exc))
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if isinstance(exc, ApiError):
            for name, value in exc.headers.items():
                self.set_header(name, value)
        if status_code == 405:  # RFC 9110: a 405 lists the methods that are allowed
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.finish(error_body(error_message(status_code, exc, self._reason)))

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements (Tornado answers the others with 405)."""
        base = tornado.web.RequestHandler
        return [
            method
            for method in cls.SUPPORTED_METHODS
            if getattr(cls, method.lower()) is not getattr(base, method.lower())
        ]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, DatabaseUnavailable | UnknownUser):
            log.warning("%s %s: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)
