"""Which log-ins have ended, known to every process within a second without a database read per
request: each process reads the log-ins ended since its last read twice a second, and refuses
their access tokens, and closes the feed sockets opened with them (feed_app/feed_socket.py), as
it learns.

Only the log-ins ended within one access-token lifetime (and a margin for clocks) are kept: the
tokens of one ended before that have expired anyway, and no new ones are issued for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable

from feed_app.db import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

POLL_EVERY = 0.5  # seconds: the delay a log-out takes to reach another process, at most
# Seconds beyond the access-token lifetime during which an ended log-in is remembered: the
# expiry in a token is read on this host's clock, the end of a log-in on PostgreSQL's.
CLOCK_MARGIN = 60.0
# Seconds each read goes back before the last one: a log-in's end is stamped when its statement
# starts (now()) and seen when it commits, so one read can miss an end stamped just before it.
READ_OVERLAP = 5.0


class Revocations:
    def __init__(self, db: Database, token_ttl: float) -> None:
        self.db = db
        self.window = token_ttl + CLOCK_MARGIN
        self._ended: dict[int, float] = {}  # log-in id -> when this process last heard of it
        self._watchers: dict[int, set[Callable[[], None]]] = {}
        self._polling: asyncio.Task | None = None
        self._read_at: datetime.datetime | None = None  # PostgreSQL's clock at the last read
        self._unavailable = False  # logged once per outage, not twice a second

    def is_ended(self, login_id: int) -> bool:
        return login_id in self._ended

    def watch(self, login_id: int, on_end: Callable[[], None]) -> None:
        """Call on_end (once) when the log-in ends, soon if it has ended already (it may have
        ended between the caller's check and this call); unwatch when it no longer matters."""
        if self.is_ended(login_id):
            asyncio.get_running_loop().call_soon(on_end)
        else:
            self._watchers.setdefault(login_id, set()).add(on_end)

    def unwatch(self, login_id: int, on_end: Callable[[], None]) -> None:
        watchers = self._watchers.get(login_id)
        if watchers is not None:
            watchers.discard(on_end)
            if not watchers:
                del self._watchers[login_id]

    def ended(self, login_ids: list[int] | set[int]) -> None:
        """Log-ins known to have ended: this process ended them, or read that they had."""
        now = time.monotonic()
        for login_id in login_ids:
            self._ended[login_id] = now
            for on_end in self._watchers.pop(login_id, ()):
                on_end()

    def start(self) -> None:
        self._polling = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._polling:
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._polling

    async def _poll(self) -> None:
        while True:
            after = self._read_at and self._read_at - datetime.timedelta(seconds=READ_OVERLAP)
            try:
                login_ids, self._read_at = await self.db.ended_logins(after, self.window)
                self.ended(login_ids)
                self._unavailable = False
            except DatabaseUnavailable as exc:
                # Tokens of log-ins ended meanwhile stay good here until PostgreSQL answers.
                if not self._unavailable:
                    log.warning("cannot read ended log-ins: %s", exc)
                self._unavailable = True
            self._forget_old()
            await asyncio.sleep(POLL_EVERY)

    def _forget_old(self) -> None:
        oldest = time.monotonic() - self.window
        for login_id in [login_id for login_id, at in self._ended.items() if at < oldest]:
            del self._ended[login_id]
