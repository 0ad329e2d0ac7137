"""Clients for the cluster tests, all going through the balancer: feed sessions that resume the way
the page does, an author posting steadily, and the bookkeeping that turns a fault into a row of
the fault table (time to heal, posts lost, posts duplicated)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import secrets

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketError, websocket_connect

from tests.faults import wait_for
from tests.support import Api, User

BACKOFF_FIRST, BACKOFF_CAP = 0.1, 2.0  # seconds (the page: 0.5 to 30; shorter keeps tests short)
NO_RECONNECT = {1003, 1009}  # the client's own mistake: retrying would not help
POST_INTERVAL = 0.03  # seconds between two posts of the steady author
AFTERWARDS = 20  # posts made after a fault healed, before the sessions are checked


@dataclasses.dataclass
class Connection:
    served_by: str  # the instance, from HAProxy's X-Served-By
    opened: float
    close_code: int | None = None  # None while open, and for a connection cut without a close
    closed: float | None = None


class ResumingFeed:
    """One feed session as the page keeps it: opened through the balancer; after any close,
    opened again (after a short backoff with jitter) with since=<last checkpoint>; every post id
    shown once. A post id that one socket sends twice is a duplicate (the server's fault); one
    sent again on a new socket after a resume is expected, and dropped as the page drops it."""

    def __init__(self, api: Api, user: User, since: int) -> None:
        self.api = api
        self.user = user
        self.checkpoint = since
        self.shown: list[int] = []
        self.first_shown: dict[int, float] = {}  # post id -> loop time it was shown
        self.duplicates: list[int] = []
        self.resent = 0
        self.connections: list[Connection] = []
        self.refused = 0  # connection attempts that failed before the upgrade
        self.live = False  # the current socket has had its `ready`
        self.error: str | None = None
        self._stopping = False
        self._ws = None
        self._task: asyncio.Task | None = None

    @property
    def served_by(self) -> str | None:
        """The instance the current socket is on."""
        open_now = [c for c in self.connections if c.closed is None]
        return open_now[-1].served_by if open_now else None

    async def start(self, timeout: float = 10) -> None:
        self._task = asyncio.ensure_future(self._run())
        await wait_for(lambda: self.live or self.error, timeout, "the feed opens")
        assert self.error is None, self.error

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            self._ws.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)

    def ended(self) -> str:
        """'' while the session's task runs, else how it ended (a failing test says why)."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return ""
        return f" ended: {self._task.exception()!r}"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_FIRST
        while not self._stopping:
            path = f"/post/feed/{self.user.id}?token={self.user.token}&since={self.checkpoint}"
            try:
                self._ws = await websocket_connect(self.api.ws_request(path, connect_timeout=5))
            except (OSError, HTTPClientError, StreamClosedError, WebSocketError):
                self.refused += 1
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(BACKOFF_CAP, backoff * 2)
                continue
            connection = Connection(self._ws.headers.get("X-Served-By", "?"), loop.time())
            self.connections.append(connection)
            if await self._read(self._ws, connection):
                backoff = BACKOFF_FIRST
            connection.close_code, connection.closed = self._ws.close_code, loop.time()
            self.live = False
            if connection.close_code in NO_RECONNECT:
                self.error = f"closed with {connection.close_code}"
                return
            if not self._stopping:
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(BACKOFF_CAP, backoff * 2)

    async def _read(self, ws, connection: Connection) -> bool:
        """Read one socket until it closes; True if it got as far as `ready`."""
        loop = asyncio.get_running_loop()
        on_this_socket: set[int] = set()
        while (text := await ws.read_message()) is not None:
            message = json.loads(text)
            kind = message["type"]
            if kind == "post":
                post_id = message["post"]["id"]
                if post_id in on_this_socket:
                    self.duplicates.append(post_id)
                on_this_socket.add(post_id)
                if post_id in self.first_shown:
                    self.resent += 1
                else:
                    self.shown.append(post_id)
                    self.first_shown[post_id] = loop.time()
            elif kind == "ready":
                self.live = True
            elif kind == "checkpoint":
                self.checkpoint = message["since"]
        return self.live


class SteadyAuthor:
    """One author posting through the balancer every POST_INTERVAL, whatever fails: a refused or
    failed request is counted and the next one follows. Which posts were committed is read from
    PostgreSQL at the end, not inferred from the answers (an answer lost in a fault may still be
    a committed post)."""

    def __init__(self, api: Api, author: User) -> None:
        self.api = api
        self.author = author
        self.sent: list[tuple[float, int, str]] = []  # (when the request went, post id, instance)
        self.failed = 0
        self.last_failure = ""
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not self._stopping.is_set():
            n += 1
            sent = loop.time()
            body = json.dumps({"text": f"steady {n}"}).encode()
            request = HTTPRequest(
                f"{self.api.base_url}/post/create",
                "POST",
                headers={"Authorization": f"Bearer {self.author.token}"},
                body=body,
                request_timeout=10,
                ca_certs=self.api.ca_certs,
            )
            try:
                # Even with raise_error=False, a timeout or a cut connection raises (as 599).
                response = await AsyncHTTPClient().fetch(request, raise_error=False)
            except (OSError, StreamClosedError, HTTPClientError) as exc:
                self.failed += 1
                self.last_failure = repr(exc)
            else:
                if response.code == 201:
                    post_id = json.loads(response.body)["id"]
                    self.sent.append((sent, post_id, response.headers.get("X-Served-By", "?")))
                else:
                    self.failed += 1
                    self.last_failure = f"{response.code} {response.body[:200]!r}"
            await asyncio.sleep(POST_INTERVAL)

    def state(self) -> str:
        """'running', or how the posting task ended (a test that fails says why)."""
        if self._task is None or not self._task.done():
            return "running"
        if self._task.cancelled():
            return "cancelled"
        return f"ended: {self._task.exception()!r}"

    def ids_sent_after(self, moment: float) -> set[int]:
        return {post_id for sent, post_id, _ in self.sent if sent >= moment}


@dataclasses.dataclass
class Outcome:
    lost: int
    duplicated: int
    detail: str


class Scene:
    """One fault's setting: an author posting steadily and sessions of three followers, spread
    over every instance, everything through the balancer."""

    def __init__(self, api: Api, db_dsn: str) -> None:
        self.api = api
        self.db_dsn = db_dsn
        self.feeds: list[ResumingFeed] = []
        self.author: User | None = None
        self.readers: list[User] = []
        self.since = 0
        self.poster: SteadyAuthor | None = None

    async def open(self, instances: list[str], per_instance: int = 2) -> None:
        tag = secrets.token_hex(3)
        self.author = await self.api.new_user(f"author {tag}")
        self.readers = [await self.api.new_user(f"reader {tag}") for _ in range(3)]
        for reader in self.readers:
            await self.api.follow(reader, self.author)
        self.since = (await self.api.post(self.author, "before the sessions"))["id"]
        await self.add_feeds(len(instances) * per_instance)
        spread = self.spread()
        assert set(instances) <= spread.keys(), f"sessions not on every instance: {spread}"
        self.poster = SteadyAuthor(self.api, self.author)
        self.poster.start()
        loop = asyncio.get_running_loop()
        await self.time_to_heal(loop.time(), 10)  # every session is live before the fault

    async def add_feeds(self, count: int) -> list[ResumingFeed]:
        new = []
        for _ in range(count):
            feed = ResumingFeed(self.api, self.readers[len(self.feeds) % 3], self.since)
            await feed.start()
            self.feeds.append(feed)
            new.append(feed)
        return new

    def spread(self) -> dict[str, int]:
        """Instance -> how many of the sessions are on it now."""
        counts: dict[str, int] = {}
        for feed in self.feeds:
            if feed.served_by:
                counts[feed.served_by] = counts.get(feed.served_by, 0) + 1
        return counts

    async def time_to_heal(self, began: float, timeout: float = 20) -> float:
        """Wait until every session shows a post sent from now on (the fault, which began at
        `began`, is over for it); then return the longest time a session went without a new post
        since the fault began: how long it took until every session was live again."""
        loop = asyncio.get_running_loop()
        now = loop.time()

        def healed() -> bool:
            sent = self.poster.ids_sent_after(now)
            return all(not sent.isdisjoint(feed.first_shown) for feed in self.feeds)

        await wait_for(healed, timeout, f"every session shows a post sent after the fault: {self}")
        return max(self._longest_pause(feed, began) for feed in self.feeds)

    @staticmethod
    def _longest_pause(feed: ResumingFeed, began: float) -> float:
        """The longest time from `began` or from a post newly shown to the next one."""
        times = [began, *sorted(t for t in feed.first_shown.values() if t >= began)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def finish(self, timeout: float = 20) -> Outcome:
        """Let the author post AFTERWARDS more times, stop posting, post a marker and wait until
        every session shows it (whatever was on its way has arrived by then), close the sessions,
        and compare each session's posts with what PostgreSQL holds: every post of the author
        after `since`, exactly once."""
        now = asyncio.get_running_loop().time()
        await wait_for(
            lambda: len(self.poster.ids_sent_after(now)) >= AFTERWARDS, timeout, "more posts"
        )
        await self.poster.stop()
        marker = (await self.api.post(self.author, "marker"))["id"]
        await wait_for(
            lambda: all(marker in feed.first_shown for feed in self.feeds),
            timeout,
            f"every session shows the marker {marker}: {self}",
        )
        for feed in self.feeds:
            await feed.stop()
        committed = set(await _committed_posts(self.db_dsn, self.author.id, self.since))
        lost = duplicated = 0
        problems = []
        for n, feed in enumerate(self.feeds):
            missing = committed - set(feed.shown)
            unexpected = set(feed.shown) - committed
            lost += len(missing)
            duplicated += len(feed.duplicates)
            if missing or unexpected or feed.duplicates:
                problems.append(
                    f"session {n}: missing {sorted(missing)}, unexpected {sorted(unexpected)}, "
                    f"sent twice on one socket {feed.duplicates}"
                )
        reconnects = sum(len(feed.connections) - 1 for feed in self.feeds)
        resent = sum(feed.resent for feed in self.feeds)
        detail = (
            f"{len(self.feeds)} sessions, {len(committed)} posts, {reconnects} reconnects, "
            f"{resent} posts resent after a resume (dropped), {self.poster.failed} failed POSTs"
        )
        if problems:
            detail += "; " + "; ".join(problems)
        return Outcome(lost, duplicated, detail)

    async def close(self) -> None:
        """Stop whatever still runs (a test that failed half-way)."""
        if self.poster is not None:
            await self.poster.stop()
        for feed in self.feeds:
            await feed.stop()

    def __str__(self) -> str:
        poster = self.poster
        posts = (
            f"{len(poster.sent)} posts, {poster.failed} failed (last: {poster.last_failure}), "
            f"poster {poster.state()}; "
            if poster
            else ""
        )
        return posts + ", ".join(
            f"[{feed.served_by} live={feed.live} shown={len(feed.shown)} "
            f"connections={len(feed.connections)} refused={feed.refused}{feed.ended()}]"
            for feed in self.feeds
        )


def _query_ids(dsn: str, sql: str, params: tuple) -> list[int]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


async def _committed_posts(dsn: str, author_id: int, since: int) -> list[int]:
    sql = "SELECT id FROM posts WHERE author_id = %s AND id > %s"
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _query_ids, dsn, sql, (author_id, since))
