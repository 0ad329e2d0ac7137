"""HTTP handlers: JSON in and out, every error as {"error": "..."} (feed_app/httpkit.py)."""

from __future__ import annotations

import contextlib
import decimal
import json
import pathlib
import re
from typing import TYPE_CHECKING, Any, Protocol

import tornado.web

from feed_app import auth
from feed_app.db import DatabaseUnavailable, NotYourPost, PostNotFound
from feed_app.httpkit import (
    BODY_TOO_LARGE,
    LOGIN_ENDED,
    MAX_BODY,
    ApiError,
    JsonErrors,
    check_field,
    check_id,
    error_body,
    int_argument,
    limit_argument,
    parse_id,
)
from feed_app.posting import check_text, create_post
from feed_app.wire import MAX_ID

if TYPE_CHECKING:
    from feed_app.broker import Broker
    from feed_app.config import Settings
    from feed_app.db import Database, Post
    from feed_app.fanout import Fanout
    from feed_app.group_commit import GroupCommit
    from feed_app.limits import Limits
    from feed_app.metrics import Exporter
    from feed_app.path_check import PathCheck
    from feed_app.relay import OutboxRelay
    from feed_app.revocations import Revocations

MAX_NAME_LENGTH = 64
# Control characters, and the marks that turn text right to left, with which a name can be made
# to read as another one on the page ("U+202E"). openapi.json's name pattern says the same.
NAME_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
PASSWORD_LENGTH = (8, 128)
MAX_FEED_LIMIT = 100
# A page at an offset costs one index scan per followed author, each offset + limit deep, so the
# offset stays small; deeper pages are reached with before=<oldest id shown> (keyset paging).
MAX_FEED_OFFSET = 100
MAX_SEARCH_LIMIT = 50


class Service(Protocol):
    """What the handlers use of the process's service (app.Service, which wires the handlers)."""

    settings: Settings
    db: Database
    limits: Limits
    relay: OutboxRelay
    posts: GroupCommit
    fanout: Fanout
    broker: Broker
    path_check: PathCheck
    exporter: Exporter
    revocations: Revocations


def _whole_number(value: decimal.Decimal) -> int | decimal.Decimal:
    """JSON has one kind of number: 5.0 and 5e0 are the integer 5 as much as 5 is (JSON Schema
    agrees). Numbers with a point or exponent are parsed as Decimal, so this is exact."""
    whole = value.is_finite() and abs(value) <= MAX_ID and value == value.to_integral_value()
    return int(value) if whole else value


class StaticPage(JsonErrors, tornado.web.StaticFileHandler):
    """The browser client; other methods than GET and HEAD get a JSON 405 too."""


class BaseHandler(JsonErrors):
    def initialize(self, service: Service) -> None:
        self.service = service

    @property
    def db(self):
        return self.service.db

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def prepare(self) -> None:
        # A declared Content-Length over the cap is refused before the body is read (app.py);
        # a chunked body is only known once read.
        if len(self.request.body) > MAX_BODY:
            raise ApiError(413, BODY_TOO_LARGE)

    def json_body(self, fields: dict[str, type]) -> dict[str, Any]:
        """The request's JSON object, with each named field present and of its type."""
        try:
            body = json.loads(self.request.body or b"", parse_float=decimal.Decimal)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "request body must be valid JSON") from exc
        except RecursionError as exc:
            raise ApiError(400, "request body is nested too deeply") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        for name, kind in fields.items():
            value = body.get(name)
            if kind is int and isinstance(value, decimal.Decimal):
                value = body[name] = _whole_number(value)
            check_field(name, value, kind)
        return body

    def caller_id(self) -> int:
        return self.caller().user_id

    def caller(self) -> auth.AccessClaims:
        """The claims of the request's access token: valid, unexpired, of a log-in that has not
        ended (known without a database read: feed_app/revocations.py); 401 otherwise."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing 'Authorization: Bearer <token>' header")
        try:
            claims = auth.claims_from_token(token.strip(), self.service.settings.jwt_secret)
        except auth.InvalidToken as exc:
            raise ApiError(401, str(exc)) from exc
        if self.service.revocations.is_ended(claims.login_id):
            raise ApiError(401, LOGIN_ENDED)
        return claims

    async def require_user(self, user_id: int) -> None:
        if await self.db.get_user(user_id) is None:
            raise ApiError(404, f"user {user_id} not found")


class RegisterHandler(BaseHandler):
    async def post(self) -> None:
        body = self.json_body({"name": str, "password": str})
        name, password = body["name"].strip(), body["password"]
        if not name or len(body["name"]) > MAX_NAME_LENGTH:
            raise ApiError(400, f"name must be 1 to {MAX_NAME_LENGTH} characters")
        if NAME_FORBIDDEN.search(name):
            raise ApiError(400, "name must not hold control or text-direction characters")
        if not PASSWORD_LENGTH[0] <= len(password) <= PASSWORD_LENGTH[1]:
            raise ApiError(400, "password must be {} to {} characters".format(*PASSWORD_LENGTH))
        limits = self.service.limits
        await limits.registration(self.request.remote_ip)
        password_hash = await limits.hashing.run(auth.hash_password_sync, password)
        user_id = await self.db.create_user(name, password_hash)
        self.set_status(201)
        self.finish({"user_id": user_id})


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
        await self.service.limits.follow_change(caller)
        await self.require_user(author)
        relay = self.service.relay
        if self.follow:
            most = self.service.limits.follow_max
            change = await self.db.follow(caller, author, most, relay.lease)
            if change is None:
                message = f"you follow {most} authors, the most allowed; unfollow one first"
                raise ApiError(409, message)
        else:
            change = await self.db.unfollow(caller, author, relay.lease)
        await relay.announce_follow_change(change, caller, author)
        self.finish({"user_id": caller, "author_id": author, "following": self.follow})


class CreatePostHandler(BaseHandler):
    async def post(self) -> None:
        author = self.caller_id()
        post = await create_post(self.service, author, self.json_body({}).get("text"))
        self.set_status(201)
        self.finish(post.to_json())


class ChangePostHandler(BaseHandler):
    """What an edit and a delete share: only the author changes a post, a change counts against
    the author's post rate (it costs a publish to every follower, as a post does), and it goes
    out through the outbox as a post does."""

    async def change(self, author: int, post_id: int, text: str | None) -> Post:
        await self.service.limits.post(author)
        relay = self.service.relay
        try:
            post, changed = await self.db.change_post(post_id, author, text, relay.lease)
        except PostNotFound as exc:
            raise ApiError(404, f"post {post_id} not found") from exc
        except NotYourPost as exc:
            raise ApiError(403, f"post {post_id} is not yours") from exc
        if changed:
            relay.publish(post)
        return post


class UpdatePostHandler(ChangePostHandler):
    async def put(self) -> None:
        author = self.caller_id()
        body = self.json_body({"id": int})
        post_id = check_id(body["id"], "id")
        text = check_text(body.get("text"))
        post = await self.change(author, post_id, text)
        self.finish(post.to_json())


class DeletePostHandler(ChangePostHandler):
    async def put(self, post_id: str) -> None:
        author = self.caller_id()
        post = await self.change(author, parse_id(post_id, "post id"), None)
        self.finish({"id": post.id, "deleted": True, "version": post.version})


class PostHandler(BaseHandler):
    async def get(self, post_id: str) -> None:
        post = await self.db.get_post(parse_id(post_id, "post id"))
        if post is None:
            raise ApiError(404, f"post {post_id} not found")
        self.finish(post.to_json())


class FeedPageHandler(BaseHandler):
    """A page of the caller's feed (followed authors and the caller), newest first. The next,
    older page is before=<the last id of this one>."""

    async def get(self) -> None:
        caller = self.caller_id()
        before = self.get_query_argument("before", None)
        before = MAX_ID if before is None else parse_id(before, "before")
        offset = int_argument(self, "offset", 0, MAX_FEED_OFFSET)
        limit = limit_argument(self, 20, MAX_FEED_LIMIT)
        posts = await self.db.feed_page(caller, before, offset, limit)
        self.finish({"posts": [post.to_json() for post in posts]})


class UserSearchHandler(BaseHandler):
    """People whose name starts with q (ignoring case), by name."""

    async def get(self) -> None:
        prefix = self.get_query_argument("q", "")
        if not 0 < len(prefix) <= MAX_NAME_LENGTH:
            raise ApiError(400, f"q must be 1 to {MAX_NAME_LENGTH} characters of a name")
        limit = limit_argument(self, 10, MAX_SEARCH_LIMIT)
        users = await self.db.search_users(prefix, limit)
        self.finish({"users": [{"id": user_id, "name": name} for user_id, name in users]})


class FollowingListHandler(BaseHandler):
    """Whom the caller follows, with names, by name."""

    async def get(self) -> None:
        users = await self.db.followed_users(self.caller_id())
        self.finish({"following": [{"id": user_id, "name": name} for user_id, name in users]})


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
        if not self.service.fanout.is_ready:
            problems.append("broker unavailable")
        if problems:
            self.set_status(503)
            self.finish(error_body("; ".join(problems)))
        else:
            # Which RabbitMQ node this instance uses (host:port), for operators and the tests.
            self.finish(
                {
                    "status": "ready",
                    "broker": self.service.broker.endpoint,
                    **self.service.path_check.report(),
                }
            )


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        backlog = None
        with contextlib.suppress(DatabaseUnavailable):
            backlog = await self.db.outbox_backlog()
        self.set_header("Content-Type", self.service.exporter.CONTENT_TYPE)
        self.finish(self.service.exporter.render(backlog))


class OpenApiHandler(BaseHandler):
    """The API's contract, checked in beside the code (tests keep the two in step)."""

    DOCUMENT = (pathlib.Path(__file__).resolve().parent / "openapi.json").read_bytes()

    def get(self) -> None:
        self.finish(self.DOCUMENT)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, f"no such endpoint: {self.request.method} {self.request.path}")
