"""The feed websocket handler: GET /post/feed/<user_id>[?since=<post id>], with the token in the
subprotocols (`Sec-WebSocket-Protocol: feed, bearer.<token>`) or in the query (`?token=`).

The socket lives as long as its access token: it is closed with 4001 when the token expires,
unless the client sent the next one in-band before (wire.token_message), and with 4003 as soon as
this process learns that the token's log-in has ended. The one other message a client may send
is a post of its own (wire.post_message), answered on the socket (feed_app/posting.py).

Everything is checked before the upgrade, Tornado's own handshake checks and the limits on open
sockets included, so a refused client gets an HTTP status and a JSON error rather than a socket
that opens and closes at once, or an HTML page, and never gets a queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

import tornado.iostream
import tornado.websocket

from feed_app import auth
from feed_app.db import DatabaseUnavailable, UnknownUser
from feed_app.httpkit import (
    LOGIN_ENDED,
    ApiError,
    JsonErrors,
    int_argument,
    parse_id,
    refusal,
)
from feed_app.posting import create_post
from feed_app.sessions import FeedSession, FeedSocket
from feed_app.wire import (
    MAX_ID,
    Close,
    PostMessage,
    TokenMessage,
    client_message,
    posted_frame,
    refused_frame,
    websocket_text_frame,
)

if TYPE_CHECKING:
    from feed_app.config import Settings
    from feed_app.db import Database
    from feed_app.group_commit import GroupCommit
    from feed_app.limits import Limits
    from feed_app.revocations import Revocations

log = logging.getLogger(__name__)

WEBSOCKET_VERSIONS = ("7", "8", "13")  # what Tornado speaks
# A browser can send subprotocols but no Authorization header: `new WebSocket(url, ["feed",
# "bearer." + token])` keeps the token out of URLs, which proxies and browser history keep. The
# server selects "feed", never the token, so the token is not echoed back.
FEED_PROTOCOL = "feed"
BEARER_PREFIX = "bearer."
# Post messages of one socket being stored at once; past it the socket is not read until one is
# answered. The author's post rate (limits.py) bounds them over time, this at one moment.
MAX_POSTS_IN_FLIGHT = 16


class Service(Protocol):
    """What the feed socket uses of the process's service (app.Service, which wires it)."""

    settings: Settings
    db: Database
    limits: Limits
    posts: GroupCommit
    revocations: Revocations

    def open_session(self, user_id: int, socket: FeedSocket) -> FeedSession | None: ...


class StrictUtf8Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado drops the TCP connection on a text frame that is not UTF-8; RFC 6455 asks for a
    close with 1007, which tells the client what it did wrong. (Compression is never negotiated
    here, so frames arrive as sent.)"""

    def _handle_message(self, opcode: int, data: bytes) -> asyncio.Future | None:
        if opcode == 0x1 and not self.client_terminated:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(Close.INVALID_TEXT, Close.INVALID_TEXT.reason)
                return None
        return super()._handle_message(opcode, data)


class FeedSocketHandler(JsonErrors, tornado.websocket.WebSocketHandler):
    def initialize(self, service: Service) -> None:
        self.service = service
        self.session: FeedSession | None = None
        self.since: int | None = None
        self.client_gone = False  # on_close ran: before the upgrade, it can run during get()
        self.claims: auth.AccessClaims | None = None  # of the token the socket lives by
        self._expiry: asyncio.TimerHandle | None = None
        self._posting: set[asyncio.Task] = set()  # post messages not answered yet

    async def get(self, user_id: str) -> None:
        self._check_handshake()
        await self._authorize(user_id)
        if self.client_gone:
            # The client hung up while we checked; Tornado has already called on_close and will
            # not call it again, so a session opened now would never be closed.
            return
        # The slot is held until the socket closes: super().get() returns only then.
        async with self.service.limits.sockets.slot(self.user_id):
            await super().get(user_id)

    def _check_handshake(self) -> None:
        """What WebSocketHandler.get checks, answered in JSON instead of text or HTML."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            raise ApiError(400, "this is a websocket endpoint: send 'Upgrade: websocket'")
        connection = {part.strip().lower() for part in headers.get("Connection", "").split(",")}
        if "upgrade" not in connection:
            raise ApiError(400, "this is a websocket endpoint: send 'Connection: Upgrade'")
        origin = headers.get("Origin", headers.get("Sec-Websocket-Origin"))
        if origin is not None and not self.check_origin(origin):
            raise ApiError(403, "cross-origin websockets are not allowed")
        if headers.get("Sec-WebSocket-Version") not in WEBSOCKET_VERSIONS:
            self.set_header("Sec-WebSocket-Version", ", ".join(WEBSOCKET_VERSIONS))
            raise ApiError(426, "unsupported Sec-WebSocket-Version; this server speaks 13")
        if not headers.get("Sec-WebSocket-Key"):
            raise ApiError(400, "missing Sec-WebSocket-Key header")

    async def _authorize(self, user_id_text: str) -> None:
        user_id = parse_id(user_id_text, "user id")
        token = self._token()
        try:
            claims = auth.claims_from_token(token, self.service.settings.jwt_secret)
        except auth.InvalidToken as exc:
            raise ApiError(401, str(exc)) from exc
        if self.service.revocations.is_ended(claims.login_id):
            raise ApiError(401, LOGIN_ENDED)
        if claims.user_id != user_id:
            raise ApiError(403, "token belongs to another user")
        if await self.service.db.get_user(user_id) is None:
            raise ApiError(404, f"user {user_id} not found")
        if self.get_query_argument("since", None) is not None:
            self.since = int_argument(self, "since", 0, MAX_ID)
            # A checkpoint from beyond this database (a client of one since restored or made
            # anew) would hide every change below it: such a socket starts afresh instead.
            if self.since > await self.service.db.newest_change():
                self.since = None
        self.user_id = user_id
        self.claims = claims

    def _offered_protocols(self) -> list[str]:
        header = self.request.headers.get("Sec-WebSocket-Protocol", "")
        return [name.strip() for name in header.split(",") if name.strip()]

    def _token(self) -> str:
        offered = self._offered_protocols()
        bearer = [name[len(BEARER_PREFIX) :] for name in offered if name.startswith(BEARER_PREFIX)]
        if bearer:
            if FEED_PROTOCOL not in offered:
                raise ApiError(400, "offer the 'feed' subprotocol beside 'bearer.<token>'")
            return bearer[0]
        token = self.get_query_argument("token", "")
        if not token:
            raise ApiError(401, "missing token: subprotocols 'feed, bearer.<token>' or ?token=")
        return token

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return FEED_PROTOCOL if FEED_PROTOCOL in subprotocols else None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        return protocol and StrictUtf8Protocol(self, False, protocol.params)

    def open(self, user_id: str) -> None:
        if self.client_gone:
            return
        self.session = self.service.open_session(self.user_id, self)
        if self.session:
            # Frames go out as they are written. With Nagle's algorithm a frame waits while an
            # earlier one is unacknowledged, and a client that sends nothing acknowledges late
            # (delayed ACK: 40 ms on Linux, 200 ms on Windows): an answer and the post after it,
            # or two posts a moment apart, would reach the client that much apart.
            self.set_nodelay(True)
            self._live_by(self.claims)
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

    def write_prebuilt(self, frame: bytes) -> asyncio.Future | None:
        """Write a whole websocket frame built beforehand (wire.websocket_text_frame), as it is:
        None once the kernel has taken it all, else the pending write (see send_or_buffer)."""
        connection = self.ws_connection
        # is_closing() without its stream.closed(): send_or_buffer checks that once.
        if connection is None or connection.client_terminated or connection.server_terminated:
            raise tornado.websocket.WebSocketClosedError()
        try:
            return send_or_buffer(connection.stream, frame)
        except tornado.iostream.StreamClosedError as exc:
            raise tornado.websocket.WebSocketClosedError() from exc

    def get_compression_options(self) -> dict | None:
        """No permessage-deflate: write_prebuilt's frames go out as built, uncompressed."""
        return None

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        match client_message(message):
            case TokenMessage(token):
                self._renew(token)
            case PostMessage() as post:
                return self._post(post)
            case _:
                self._end(Close.CLIENT_DATA)
        return None

    def _renew(self, token: str) -> None:
        try:
            claims = auth.claims_from_token(token, self.service.settings.jwt_secret)
        except auth.InvalidToken:
            self._end(Close.TOKEN_EXPIRED)
            return
        if claims.user_id != self.user_id:
            self._end(Close.TOKEN_EXPIRED)
        elif self.service.revocations.is_ended(claims.login_id):
            self._end(Close.LOGGED_OUT)
        else:
            self._live_by(claims)

    def _post(self, message: PostMessage) -> Awaitable[None] | None:
        """Create a post as this socket's user, then answer on the socket. The socket's token is
        live (it is closed when the token expires or its log-in ends), so it authorizes the post
        as an Authorization header would; its expiry and log-out are checked here too, as they
        are for every HTTP request, not only when their timer or notice comes.

        With MAX_POSTS_IN_FLIGHT posts of this socket waiting, this returns what Tornado waits
        for before it reads the socket's next message: a client that sends faster than its
        posts are stored (or refused, slowly, past its rate) is held back by TCP."""
        if self.session is None or self.session.closed or self.claims is None:
            return None  # the server is closing the socket: what the client sends is ignored
        if self.claims.expires <= time.time():
            self._end(Close.TOKEN_EXPIRED)
            return None
        if self.service.revocations.is_ended(self.claims.login_id):
            self._end(Close.LOGGED_OUT)
            return None
        task = asyncio.ensure_future(self._create(message))
        self._posting.add(task)
        task.add_done_callback(self._post_done)
        if len(self._posting) < MAX_POSTS_IN_FLIGHT:
            return None
        # A copy: the coroutine starts a turn later, when the set may have emptied.
        return asyncio.wait(set(self._posting), return_when=asyncio.FIRST_COMPLETED)

    def _post_done(self, task: asyncio.Task) -> None:
        self._posting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("post message of user %d", self.user_id, exc_info=task.exception())

    async def _create(self, message: PostMessage) -> None:
        try:
            post = await create_post(self.service, self.user_id, message.text)
        except (ApiError, DatabaseUnavailable, UnknownUser) as exc:
            self._answer(refused_frame(message.ref, *refusal(exc)))
        except Exception as exc:  # what an HTTP request gets a 500 for
            log.exception("post message of user %d", self.user_id)
            self._answer(refused_frame(message.ref, *refusal(exc)))
        else:
            self._answer(posted_frame(message.ref, post.to_json()))

    def _answer(self, frame: bytes) -> None:
        """Answers go out as the session's frames do, within its bound on unsent bytes; once
        the socket is gone they go nowhere (a post stored by then stays stored)."""
        if self.session is not None:
            self.session.answer(websocket_text_frame(frame))

    def _live_by(self, claims: auth.AccessClaims) -> None:
        """Live until this token expires or its log-in ends, instead of by the last one's."""
        self._forget_token()
        self.claims = claims
        self.service.revocations.watch(claims.login_id, self._logged_out)
        delay = claims.expires - time.time()
        self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _forget_token(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.claims is not None:
            self.service.revocations.unwatch(self.claims.login_id, self._logged_out)

    def _token_expired(self) -> None:
        self._end(Close.TOKEN_EXPIRED)

    def _logged_out(self) -> None:
        self._end(Close.LOGGED_OUT)

    def _end(self, code: Close) -> None:
        """Close with this code; the session stops writing at once."""
        self._forget_token()
        if self.session is not None:
            self.session.close(code)
        else:
            self.close(code, code.reason)

    def on_close(self) -> None:
        self.client_gone = True
        self._forget_token()
        session, self.session = self.session, None
        if session:
            session.close()


def send_or_buffer(stream: tornado.iostream.IOStream, data: bytes) -> asyncio.Future | None:
    """Write to a stream: straight to the kernel when nothing waits in the stream's buffer, and
    None once it took every byte; else through IOStream.write(), and its future.

    write() allocates a Future with a callback for every call and resolves it through the event
    loop even when the kernel took everything at once: in process mode, where one post is one
    `send` per follower's socket, that costs about as much as the `send`. With the buffer empty
    nothing can be queued ahead, so a direct `send` keeps the order. What the kernel does not
    take, and any error, goes to write(), which buffers the rest, waits for the socket to drain,
    and closes the stream on an error, as it always does.

    Relies on tornado's IOStream internals (the version is pinned in requirements.txt):
    `_write_buffer` holds what was written and not yet sent, and `socket` is the plain socket. A
    TLS stream (SSLIOStream) always goes through write(), which encrypts."""
    if stream._write_buffer or type(stream) is not tornado.iostream.IOStream or stream.closed():
        return stream.write(data)
    try:
        sent = stream.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return stream.write(data)  # it meets the error again and closes the stream
    if sent == len(data):
        return None
    return stream.write(memoryview(data)[sent:])
