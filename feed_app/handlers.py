"""HTTP handlers: JSON in and out, every error as {"error": "..."}, plus the feed websocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import tornado.iostream
import tornado.web
import tornado.websocket

from feed_app import auth
from feed_app.db import DatabaseUnavailable
from feed_app.sessions import CLOSE_CLIENT_DATA, FeedSession

if TYPE_CHECKING:
    from feed_app.app import Service

log = logging.getLogger(__name__)

MAX_ID = 2**63 - 1  # PostgreSQL bigint
MAX_POST_LENGTH = 1000
MAX_NAME_LENGTH = 64
PASSWORD_LENGTH = (8, 128)
MAX_FEED_LIMIT = 100


class ApiError(tornado.web.HTTPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.message = message


def _digits(value: str | None) -> bool:
    # At most 19 digits before int(): int() refuses (ValueError) past 4300 digits.
    return value is not None and value.isascii() and value.isdigit() and len(value) <= 19


def parse_id(value: str | None, what: str) -> int:
    """A positive bigint from a path or query string; 400 for anything else."""
    if not _digits(value) or not 0 < int(value) <= MAX_ID:
        raise ApiError(400, f"{what} must be a positive integer below 2^63")
    return int(value)


def int_argument(handler: tornado.web.RequestHandler, name: str, default: int, high: int) -> int:
    """A query argument from 0 to high; 400 for anything else."""
    value = handler.get_query_argument(name, str(default))
    if not (_digits(value) and int(value) <= high):
        raise ApiError(400, f"{name} must be an integer from 0 to {high}")
    return int(value)


def _storable(text: str) -> bool:
    """PostgreSQL text holds no NUL, and UTF-8 has no lone surrogates (JSON can carry both)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, service: Service) -> None:
        self.service = service

    @property
    def db(self):
        return self.service.db

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def json_body(self, fields: dict[str, type]) -> dict[str, Any]:
        """The request's JSON object, with each named field present and of its type."""
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "request body must be valid JSON") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        for name, kind in fields.items():
            value = body.get(name)
            # bool is an int in Python, but true is not a user id.
            if value is None or not isinstance(value, kind) or isinstance(value, bool):
                raise ApiError(400, f"field '{name}' is required and must be {kind.__name__}")
            if kind is str and not _storable(value):
                raise ApiError(400, f"field '{name}' contains characters that cannot be stored")
        return body

    def caller_id(self) -> int:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing 'Authorization: Bearer <token>' header")
        try:
            return auth.user_id_from_token(token.strip(), self.service.settings.jwt_secret)
        except auth.InvalidToken as exc:
            raise ApiError(401, str(exc)) from exc

    async def require_user(self, user_id: int) -> None:
        if await self.db.get_user(user_id) is None:
            raise ApiError(404, f"user {user_id} not found")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
        elif isinstance(exc, DatabaseUnavailable):
            self.set_status(503)
            message = "database unavailable, try again shortly"
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            message = self._reason
        else:
            message = "internal server error"
        self.finish({"error": message})

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, DatabaseUnavailable):
            log.warning(
                "%s %s: database unavailable: %s", self.request.method, self.request.path, value
            )
        else:
            super().log_exception(typ, value, tb)


class RegisterHandler(BaseHandler):
    async def post(self) -> None:
        body = self.json_body({"name": str, "password": str})
        name, password = body["name"].strip(), body["password"]
        if not 0 < len(name) <= MAX_NAME_LENGTH:
            raise ApiError(400, f"name must be 1 to {MAX_NAME_LENGTH} characters")
        if not PASSWORD_LENGTH[0] <= len(password) <= PASSWORD_LENGTH[1]:
            raise ApiError(400, "password must be {} to {} characters".format(*PASSWORD_LENGTH))
        user_id = await self.db.create_user(name, await auth.hash_password(password))
        self.set_status(201)
        self.finish({"user_id": user_id})


class LoginHandler(BaseHandler):
    async def post(self) -> None:
        body = self.json_body({"id": int, "password": str})
        user_id = body["id"]
        if not 0 < user_id <= MAX_ID:
            raise ApiError(400, "id must be a positive integer below 2^63")
        stored = await self.db.get_password_hash(user_id)
        if not await auth.verify_password(body["password"], stored):
            raise ApiError(401, "wrong user id or password")
        settings = self.service.settings
        self.finish({"token": auth.issue_token(user_id, settings.jwt_secret, settings.token_ttl)})


class UserHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        user = await self.db.get_user(parse_id(user_id, "user id"))
        if user is None:
            raise ApiError(404, f"user {user_id} not found")
        self.finish({"id": user[0], "name": user[1]})


class FollowHandler(BaseHandler):
    def initialize(self, service: Service, follow: bool) -> None:
        super().initialize(service)
        self.follow = follow

    async def put(self, author_id: str) -> None:
        caller = self.caller_id()
        author = parse_id(author_id, "user id")
        if author == caller:
            raise ApiError(400, "you cannot follow or unfollow yourself")
        await self.require_user(author)
        await (self.db.follow if self.follow else self.db.unfollow)(caller, author)
        await self.service.relay.publish_follow_change(caller, author)
        self.finish({"user_id": caller, "author_id": author, "following": self.follow})


class CreatePostHandler(BaseHandler):
    async def post(self) -> None:
        author = self.caller_id()
        text = self.json_body({"text": str})["text"]
        if not text.strip():
            raise ApiError(400, "text must not be empty")
        if len(text) > MAX_POST_LENGTH:
            raise ApiError(400, f"text must be at most {MAX_POST_LENGTH} characters")
        relay = self.service.relay
        post = await self.db.insert_post(author, text, relay.lease)
        relay.publish(post)
        self.set_status(201)
        self.finish(post.to_json())


class PostHandler(BaseHandler):
    async def get(self, post_id: str) -> None:
        post = await self.db.get_post(parse_id(post_id, "post id"))
        if post is None:
            raise ApiError(404, f"post {post_id} not found")
        self.finish(post.to_json())


class FeedPageHandler(BaseHandler):
    async def get(self) -> None:
        caller = self.caller_id()
        offset = int_argument(self, "offset", 0, 10_000)
        limit = int_argument(self, "limit", 20, MAX_FEED_LIMIT)
        if limit == 0:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_FEED_LIMIT}")
        posts = await self.db.feed_page(caller, offset, limit)
        self.finish({"posts": [post.to_json() for post in posts]})


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        self.finish({"status": "ok"})


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        problems = []
        try:
            await self.db.ping()
        except DatabaseUnavailable:
            problems.append("database unavailable")
        if not self.service.broker.is_open:
            problems.append("broker unavailable")
        if problems:
            self.set_status(503)
            self.finish({"error": "; ".join(problems)})
        else:
            self.finish({"status": "ready"})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        extra = {"feed_open_sessions": len(self.service.sessions)}
        with contextlib.suppress(DatabaseUnavailable):
            extra["feed_outbox_backlog"] = await self.db.outbox_backlog()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.service.metrics.render(extra))


class FeedSocketHandler(tornado.websocket.WebSocketHandler):
    """GET /post/feed/<user_id>?token=...[&since=<post id>]: the live feed of one user.

    Everything is checked before the upgrade, so a refused client gets an HTTP status and a JSON
    error rather than a socket that opens and closes at once.
    """

    def initialize(self, service: Service) -> None:
        self.service = service
        self.session: FeedSession | None = None
        self.since: int | None = None

    async def get(self, user_id: str) -> None:
        try:
            await self._authorize(user_id)
        except ApiError as exc:
            return self._refuse(exc.status_code, exc.message)
        except DatabaseUnavailable:
            return self._refuse(503, "database unavailable, try again shortly")
        await super().get(user_id)

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish({"error": message})

    async def _authorize(self, user_id_text: str) -> None:
        user_id = parse_id(user_id_text, "user id")
        token = self.get_query_argument("token", "")
        if not token:
            raise ApiError(401, "missing token query parameter")
        try:
            token_user = auth.user_id_from_token(token, self.service.settings.jwt_secret)
        except auth.InvalidToken as exc:
            raise ApiError(401, str(exc)) from exc
        if token_user != user_id:
            raise ApiError(403, "token belongs to another user")
        if await self.service.db.get_user(user_id) is None:
            raise ApiError(404, f"user {user_id} not found")
        if self.get_query_argument("since", None) is not None:
            self.since = int_argument(self, "since", 0, MAX_ID)
        self.user_id = user_id

    def open(self, user_id: str) -> None:
        self.session = self.service.open_session(self.user_id, self)
        if self.session:
            self.session.start(self.since)

    def write_text_frame(self, data: bytes) -> asyncio.Future:
        """write_message() for a post that is already a UTF-8 JSON text frame.

        write_message() wraps every write in a coroutine and a Task only to rename an exception;
        at thousands of deliveries a second that Task cost more than the write. This calls the
        frame writer underneath it (tornado is pinned) and returns the stream's own future.
        """
        if self.ws_connection is None or self.ws_connection.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        try:
            return self.ws_connection._write_frame(True, 0x1, data)
        except tornado.iostream.StreamClosedError as exc:
            raise tornado.websocket.WebSocketClosedError() from exc

    def on_message(self, message: str | bytes) -> None:
        self.close(CLOSE_CLIENT_DATA, "the feed is server-to-client; do not send messages")

    def on_close(self) -> None:
        if self.session:
            self.session.close()


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
