"""What crosses a wire, defined once: ids, the websocket frames, close codes and their reasons,
and the RabbitMQ routing that carries posts and follow changes between instances.

docs/ documents each of these; clients (static/index.html, bench/) and other instances of the
service (any version that shares the vhost) depend on them.
"""

from __future__ import annotations

import enum
import json
from typing import Any

MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints; 1..MAX_ID everywhere (paths, bodies, tokens)


class Close(enum.IntEnum):
    """Websocket close codes the server sends, each with the reason sent beside it."""

    GOING_AWAY = 1001  # the server shuts down; reconnect (to another instance)
    CLIENT_DATA = 1003  # the client sent a message; the feed is server-to-client
    INVALID_TEXT = 1007  # the client sent a text frame that is not UTF-8
    SERVER_ERROR = 1011  # the database failed mid-session; reconnect with since=
    TOO_SLOW = 4008  # the client fell too far behind; reconnect with since=

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS = {
    Close.GOING_AWAY: "server shutting down; reconnect with since=<last checkpoint>",
    Close.CLIENT_DATA: "the feed is server-to-client; do not send messages",
    Close.INVALID_TEXT: "text frames must be UTF-8",
    Close.SERVER_ERROR: "database unavailable; reconnect with since=<last checkpoint>",
    Close.TOO_SLOW: "too slow: reconnect with since=<last checkpoint>",
}


# --- frames: JSON text, compact, one per websocket message ------------------------------------


def _frame(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def post_frame(post: dict[str, Any]) -> bytes:
    """A post as the client receives it. Built once per post by the process that publishes it and
    carried as the AMQP body, so a session forwards it without decoding."""
    return _frame({"type": "post", "post": post})


def ready_frame(following: int) -> bytes:
    return _frame({"type": "ready", "following": following})


def checkpoint_frame(since: int) -> bytes:
    return _frame({"type": "checkpoint", "since": since})


def following_frame(following: int) -> bytes:
    return _frame({"type": "following", "following": following})


FRAME_TYPES = ("post", "ready", "checkpoint", "following")
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


def author_key(author_id: int) -> str:
    """Routing key of an author's posts."""
    return str(author_id)


def control_key(user_id: int) -> str:
    """Routing key of messages about one user's follows, bound for each of the user's sessions.
    The body is the id of the author whose follow changed; receivers read the database for what
    the change was, so two changes that arrive out of order still end in the right state."""
    return f"control.{user_id}"
