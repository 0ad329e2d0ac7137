"""What crosses a wire, defined once: ids, the websocket frames, close codes and their reasons,
the RabbitMQ routing that carries posts' changes and follow changes between instances, and the
names of the queues the service declares (each made here, and read back by the same module).

docs/ documents each of these; clients (static/index.html, bench/) and other instances of the
service (any version that shares the vhost) depend on them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import secrets
import socket
import struct
from typing import Any

MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints; 1..MAX_ID everywhere (paths, bodies, tokens)


class Close(enum.IntEnum):
    """Websocket close codes the server sends, each with the reason sent beside it."""

    GOING_AWAY = 1001  # the server shuts down; reconnect (to another instance)
    CLIENT_DATA = 1003  # the client sent a message other than a token or a post
    INVALID_TEXT = 1007  # the client sent a text frame that is not UTF-8
    SERVER_ERROR = 1011  # the database failed mid-session; reconnect with since=
    TOKEN_EXPIRED = 4001  # the access token expired (or the one sent in-band was no good)
    LOGGED_OUT = 4003  # the log-in the token belongs to ended: log-out, password change, reuse
    TOO_SLOW = 4008  # the client fell too far behind; reconnect with since=

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS = {
    Close.GOING_AWAY: "server shutting down; reconnect with since=<last checkpoint>",
    Close.CLIENT_DATA: "send nothing but token and post messages",
    Close.INVALID_TEXT: "text frames must be UTF-8",
    Close.SERVER_ERROR: "database unavailable; reconnect with since=<last checkpoint>",
    Close.TOKEN_EXPIRED: (
        "token expired or invalid: reconnect with a fresh one and since=<last checkpoint>"
    ),
    Close.LOGGED_OUT: "logged out: this log-in has ended",
    Close.TOO_SLOW: "too slow: reconnect with since=<last checkpoint>",
}


# --- what a client may send on the feed socket: its next access token, and its own posts ------

TOKEN_MESSAGE = "token"
POST_MESSAGE = "post"
MAX_REF = 2**53 - 1  # a post message's ref: any integer a browser holds exactly


@dataclasses.dataclass(frozen=True)
class TokenMessage:
    token: str


@dataclasses.dataclass(frozen=True)
class PostMessage:
    """A new post by the socket's user. `text` is as sent, checked as POST /post/create checks
    it; `ref` is the client's, echoed in the answer (posted_frame or refused_frame)."""

    ref: int
    text: Any


def token_message(token: str) -> str:
    """{"type": "token", "token": "<access token>"}: the socket lives on until the new expiry."""
    return json.dumps({"type": TOKEN_MESSAGE, "token": token})


def post_message(ref: int, text: str) -> str:
    """{"type": "post", "ref": <client's number>, "text": "..."}: publish a post."""
    return json.dumps({"type": POST_MESSAGE, "ref": ref, "text": text})


def client_message(message: str | bytes) -> TokenMessage | PostMessage | None:
    """What a client sent on its feed socket; None for anything but a token or a post message
    (a post message without a ref that can be answered included)."""
    try:
        body = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if kind == TOKEN_MESSAGE:
        token = body.get("token")
        return TokenMessage(token) if isinstance(token, str) and token else None
    if kind == POST_MESSAGE:
        ref = body.get("ref")
        if type(ref) is int and 0 <= ref <= MAX_REF:  # not bool, not 1.0
            return PostMessage(ref, body.get("text"))
    return None


# --- the refresh token's cookie: sent only to the refresh path ---------------------------------

REFRESH_PATH = "/token/refresh"
REFRESH_COOKIE = "feed_refresh"


# --- frames: JSON text, compact, one per websocket message ------------------------------------


def _frame(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def post_frame(post: dict[str, Any]) -> bytes:
    """A post as the client receives it, new or edited (then its edited_at is set). Built once
    per change by the process that publishes it and carried as the AMQP body, so a session
    forwards it without decoding. A client keeps, per post id, the frame of the highest version:
    two changes of one post may arrive in either order."""
    return _frame({"type": "post", "post": post})


def deleted_frame(post_id: int, version: int) -> bytes:
    """A post was deleted: the client drops it, and keeps it dropped whatever lower version
    of it arrives later."""
    return _frame({"type": "deleted", "id": post_id, "version": version})


def posted_frame(ref: int, post: dict[str, Any]) -> bytes:
    """The answer to a post message: the post as stored (the body of POST /post/create's 201).
    The post itself comes on the socket too, as a post frame, like every post of the user."""
    return _frame({"type": "posted", "ref": ref, "post": post})


def refused_frame(ref: int, status: int, error: str, retry_after: int | None = None) -> bytes:
    """The answer to a post message that stored nothing: the status and error POST /post/create
    would answer with (400, 429 with retry_after in seconds, 503)."""
    answer: dict[str, Any] = {"type": "refused", "ref": ref, "status": status, "error": error}
    if retry_after is not None:
        answer["retry_after"] = retry_after
    return _frame(answer)


def ready_frame(following: int) -> bytes:
    return _frame({"type": "ready", "following": following})


def checkpoint_frame(since: int) -> bytes:
    return _frame({"type": "checkpoint", "since": since})


def following_frame(following: int) -> bytes:
    return _frame({"type": "following", "following": following})


def websocket_text_frame(payload: bytes) -> bytes:
    """A final, unmasked, uncompressed text frame (RFC 6455 5.2) around a frame above, as a server
    sends it: built once per post, the same bytes go to every socket that shows the post."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


ANSWER_FRAME_TYPES = ("posted", "refused")  # the answer to a client's post message
FRAME_TYPES = ("post", "deleted", "ready", "checkpoint", "following", *ANSWER_FRAME_TYPES)
CHANGE_FRAME_TYPES = ("post", "deleted")  # what the broker carries: one change of one post
_PREFIXES = [(kind, f'{{"type":"{kind}"') for kind in FRAME_TYPES]


def frame_type(frame: str | bytes) -> str | None:
    """The type of a frame this module built, read from its prefix without parsing it all (the
    load test reads hundreds of thousands of frames a second)."""
    head = frame[:24].decode(errors="replace") if isinstance(frame, bytes) else frame[:24]
    for kind, prefix in _PREFIXES:
        if head.startswith(prefix):
            return kind
    return None


# --- between instances: RabbitMQ's amq.direct -------------------------------------------------

EXCHANGE = "amq.direct"
FOLLOW_CHANGE = "follow-change"  # message type: the user's follow of one author changed
# Every process binds a queue of its own to this key and publishes its heartbeats to it: hearing
# a peer's beats is the proof that posts published through the peer's node reach this process.
HEARTBEAT_KEY = "feed.heartbeat"
CONTROL_PREFIX = "control."


def author_key(author_id: int) -> str:
    """Routing key of an author's posts."""
    return str(author_id)


def author_of(key: str) -> int:
    """The author of an author_key; ValueError for a key that is not one."""
    return int(key)


def control_key(user_id: int) -> str:
    """Routing key of messages about one user's follows, bound for each of the user's sessions.
    The body is the id of the author whose follow changed; receivers read the database for what
    the change was, so two changes that arrive out of order still end in the right state."""
    return f"{CONTROL_PREFIX}{user_id}"


def user_of_control_key(key: str) -> int:
    """The user of a control_key; ValueError for a key that is not one."""
    return int(key.removeprefix(CONTROL_PREFIX))


def heartbeat_body(process: str, beat: int) -> bytes:
    """A heartbeat: which process sent it, and its number (1, 2, ...: a gap means one was lost)."""
    return f"{process} {beat}".encode()


def parse_heartbeat(body: bytes) -> tuple[str, int]:
    """(process, beat) of a heartbeat body; ValueError for anything else."""
    process, beat = body.decode().split(" ")
    return process, int(beat)


# --- queue names: exclusive queues, each named anew on every connection (the fan-outs say why) ----
# Tools that count the service's queues on a shared broker (bench/procstats.py) tell them apart
# with the patterns below.

_SESSION_TOKEN, _PROCESS_TOKEN, _OVERFLOW_TOKEN = 8, 4, 6  # random bytes; twice as many hex digits


def session_queue(user_id: int) -> str:
    """A feed socket's queue in session mode."""
    return f"{user_id}.{secrets.token_hex(_SESSION_TOKEN)}"


def process_id() -> str:
    """A name for one run of one process (host.pid.random): unique among every process that
    ever shares the broker or the database, and readable in a log."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(_PROCESS_TOKEN)}"


def process_queue() -> str:
    """This process's queue in process mode."""
    return f"feed.process.{process_id()}"


def overflow_queue() -> str:
    """Where the broker dead-letters what overflowed this connection's bounded queues."""
    return f"feed.overflow.{secrets.token_hex(_OVERFLOW_TOKEN)}"


def heartbeat_queue(process: str) -> str:
    """A process's heartbeat queue (feed_app/broker/heartbeat.py)."""
    return f"feed.heartbeat.{process}.{secrets.token_hex(_PROCESS_TOKEN)}"


# Group 1: the user id of a session queue, the process id of a process queue.
SESSION_QUEUE = re.compile(rf"^(\d+)\.[0-9a-f]{{{2 * _SESSION_TOKEN}}}$")
PROCESS_QUEUE = re.compile(rf"^feed\.process\..+\.(\d+)\.[0-9a-f]{{{2 * _PROCESS_TOKEN}}}$")
