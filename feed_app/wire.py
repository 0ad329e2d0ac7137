"""What crosses a wire, defined once: ids, websocket close codes and their reasons.

The README documents each of these; clients (static/index.html, bench/) depend on them.
"""

from __future__ import annotations

import enum

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
