"""A feed session: one open websocket, its subscription, and the bookkeeping that makes it exact.

What the feed carries are changes of posts: a new post, an edit, a delete. Each change has a
version drawn from the one sequence post ids come from (sql/006_post_changes.sql), so below
"post" in "live posts", "the horizon", "the floor" and "sent" means a change, counted by version.

The session is subscribed (feed_app/fanout.py: bound, whatever the mode) before anything is read
from PostgreSQL, and live posts are held back while the read is sent. A post committed before the
read is in the read; one committed after it was published after the subscription, so it arrives
live. The read also returns its horizon (every committed post with an id up to it is in the
read: feed_app/horizon.py) and the session drops live posts at or below the horizon and any id it
has already sent, so the hand-over has neither a gap nor a duplicate.

The same sync runs again whenever live posts may have been missed (the broker connection dropped,
the process queue overflowed): subscribe, then read everything after the horizon. So a broker
restart costs a client nothing but time.

A client that reconnects resumes with since=<the last checkpoint>, not the highest id it showed:
posts can arrive out of id order (a post whose publish failed comes later, from the outbox), so
"everything up to the highest id shown" is not known to be shown. The checkpoint is the floor,
below which everything is settled; the client keeps, per post id, the highest version it got.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tornado.websocket import WebSocketClosedError

from feed_app import wire
from feed_app.config import Settings
from feed_app.db import Database, DatabaseUnavailable, Post
from feed_app.fanout import BrokerUnavailable, Delivery, Fanout
from feed_app.metrics import Metrics
from feed_app.wire import Close

log = logging.getLogger(__name__)

RESUME_PAGE = 500
CHECKPOINT_EVERY = 256  # deliveries; the floor rises with them once the seen-window is full


class FeedSocket(Protocol):
    def write_text_frame(self, data: bytes) -> asyncio.Future: ...
    def write_prebuilt(self, frame: bytes) -> asyncio.Future | None: ...
    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class SeenPosts:
    """Which changes (versions) the session has sent, so none is sent twice, in bounded memory.

    `floor` means "everything up to here is settled": at or below it a post was either sent or
    deliberately left out (older than the history window). Above it, ids are remembered one by
    one. Past `capacity` ids, the oldest one raises the floor instead, once it has been
    remembered for `keep_for` seconds: a post that comes late (its publish failed; the outbox
    sends it within the lease) still finds the ids after it remembered, not a floor above it.
    Past `hard_capacity` the floor rises regardless, so memory stays bounded even for a feed that
    receives hundreds of posts a second (its size: BENCHMARKS.md, "Soak and garbage collection").
    """

    def __init__(
        self, capacity: int = 1024, hard_capacity: int = 16384, keep_for: float = 30.0
    ) -> None:
        self.capacity, self.hard_capacity, self.keep_for = capacity, hard_capacity, keep_for
        self.floor = 0
        self._ids: set[int] = set()
        self._order: collections.deque[int] = collections.deque()
        self._seen_at: collections.deque[float] = collections.deque()  # beside _order

    def add(self, version: int, *, even_below_floor: bool = False) -> bool:
        """True the first time a change's version is seen, False for a duplicate. Versions at or
        below the floor count as seen, unless even_below_floor (the old posts of a newly
        followed author)."""
        if (version <= self.floor and not even_below_floor) or version in self._ids:
            return False
        now = time.monotonic()
        self._ids.add(version)
        self._order.append(version)
        self._seen_at.append(now)
        if len(self._order) > self.capacity:
            self._forget_oldest(now)
        return True

    def _forget_oldest(self, now: float) -> None:
        while len(self._order) > self.capacity and (
            len(self._order) > self.hard_capacity or now - self._seen_at[0] >= self.keep_for
        ):
            oldest = self._order.popleft()
            self._seen_at.popleft()
            self._ids.discard(oldest)
            self.floor = max(self.floor, oldest)

    def raise_floor(self, horizon: int) -> None:
        if horizon <= self.floor:
            return
        self.floor = horizon
        kept = [(i, t) for i, t in zip(self._order, self._seen_at, strict=True) if i > horizon]
        self._order = collections.deque(i for i, _ in kept)
        self._seen_at = collections.deque(t for _, t in kept)
        self._ids = set(self._order)


class SessionPhase(enum.Enum):
    """Where a session is in its life; it says whether live posts are held or written."""

    STARTING = enum.auto()  # the first sync has not sent its ready frame: live posts are held
    SYNCING = enum.auto()  # ready, but a sync reads what may have been missed: posts are held
    LIVE = enum.auto()  # live posts are written as they come
    CLOSED = enum.auto()  # nothing more is written; the fan-out has forgotten the session


# The phases each phase may move to. A closed session stays closed: a task whose cancellation
# was lost (see FeedSession._check_open) may still try to move it on, and that is ignored.
_NEXT_PHASES = {
    SessionPhase.STARTING: {SessionPhase.SYNCING, SessionPhase.CLOSED},
    SessionPhase.SYNCING: {SessionPhase.LIVE, SessionPhase.CLOSED},
    SessionPhase.LIVE: {SessionPhase.SYNCING, SessionPhase.CLOSED},
    SessionPhase.CLOSED: set(),
}


class FeedSession:
    def __init__(
        self,
        user_id: int,
        socket: FeedSocket,
        *,
        db: Database,
        fanout: Fanout,
        metrics: Metrics,
        settings: Settings,
        on_closed: Callable[[FeedSession], None],
    ) -> None:
        self.user_id = user_id
        self.socket = socket
        self.db = db
        self.fanout = fanout
        self.metrics = metrics
        self.settings = settings
        self.on_closed = on_closed
        self.following: set[int] = set()  # the feed shows their posts and the user's own
        # Ids stay remembered while the outbox may still republish a post before them.
        self.seen = SeenPosts(keep_for=3 * settings.outbox_lease)
        self.phase = SessionPhase.STARTING
        # What the next sync reads: the history (newest posts) until one read set the floor,
        # else everything after the floor. Not a phase: a history read without a horizon
        # leaves it pending even once the session is live.
        self._history_pending = True
        # Live posts wait here while the phase holds them (STARTING, SYNCING), each with the
        # future that tells the fan-out when it has been written (or dropped).
        self._held: list[tuple[Delivery, asyncio.Future]] = []
        self._lock = asyncio.Lock()  # one sync or follow change at a time
        self._sync_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # follow changes and checkpoints in flight
        self._floor_authors: set[int] = set()  # whom the user followed when the floor was set
        self._checkpoint = 0  # the floor last sent to the client as a resume point
        self._deliveries_since_checkpoint = 0
        self._unsent_frames = 0  # written to the socket, not yet flushed to the kernel
        self._unsent_bytes = 0

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The first sync has read and sent what the client lacked, and its ready frame is due."""
        return self.phase in (SessionPhase.SYNCING, SessionPhase.LIVE)

    @property
    def closed(self) -> bool:
        return self.phase is SessionPhase.CLOSED

    def _enter(self, phase: SessionPhase) -> None:
        if self.phase is SessionPhase.CLOSED:
            return
        if phase not in _NEXT_PHASES[self.phase]:
            raise RuntimeError(f"session phase {self.phase.name} cannot become {phase.name}")
        self.phase = phase

    def start(self, since: int | None) -> None:
        if since is not None:
            self.seen.raise_floor(since)
            self._history_pending = False  # resume: everything after `since` instead
        self._resync()

    def close(self, code: Close | None = None) -> None:
        """End the session: the fan-out forgets it, however it ended. With a code, the socket is
        closed with it; without, the socket is closed already.

        Everything that refers back to the session (its tasks, the held posts, the fan-out's
        index) is let go here, so that reference counting frees it at once: with the collector
        tuned for throughput (run.py), cycles would wait minutes for a full collection."""
        if self.closed:
            return
        self._enter(SessionPhase.CLOSED)
        self.fanout.detach(self)
        tasks = [self._sync_task, *self._tasks] if self._sync_task else list(self._tasks)
        self._sync_task, self._tasks = None, set()
        for task in tasks:
            task.cancel()
        held, self._held = self._held, []
        for _delivery, done in held:
            done.set_result(None)  # unwritten: session mode acks it, so others' acks can go
        if code is not None:
            self.socket.close(code, code.reason)
        self.on_closed(self)

    # --- what the fan-out calls ----------------------------------------------------------------

    def on_fanout_lost(self) -> None:
        # Live posts may be missed from here on; hold what comes until the next sync caught up.
        if self.phase is SessionPhase.LIVE:
            self._enter(SessionPhase.SYNCING)

    def on_fanout_ready(self) -> None:
        self._resync()

    def on_overflow(self) -> None:
        log.info("session of user %d fell behind; closing it", self.user_id)
        self.metrics.slow_client_closes += 1
        self.close(Close.TOO_SLOW)

    def answer(self, frame: bytes) -> None:
        """Write the answer to a message of the client's own (a post), a whole websocket frame,
        within the bound the feed's frames keep on what waits unsent."""
        try:
            written = self.socket.write_prebuilt(frame)
        except WebSocketClosedError:
            return  # the handler's on_close ends the session
        if written is not None and not written.done():
            self._count_unsent(written, 1, len(frame))

    def on_follow_change(self, author_id: int) -> None:
        if not self.closed:
            self._spawn(self._change_follow(author_id))

    def on_post(self, delivery: Delivery) -> asyncio.Future | None:
        if self.phase is SessionPhase.LIVE:  # first: the one check of nearly every delivery
            return self._deliver(delivery)
        if self.closed:
            return None
        if len(self._held) >= self.settings.session_queue_max:
            self.on_overflow()
            return None
        done = asyncio.get_running_loop().create_future()
        self._held.append((delivery, done))
        return done

    def on_posts(self, deliveries: list[Delivery]) -> None:
        if self.phase is not SessionPhase.LIVE:
            for delivery in deliveries:
                self.on_post(delivery)
            return
        shown = [delivery for delivery in deliveries if self._shows(delivery)]
        if shown:
            # One send for the lot: the frames follow each other in the stream as separate
            # writes would, and a socket costs one syscall per read from the broker, not one per
            # post.
            self._write(b"".join(delivery.websocket_frame for delivery in shown), shown)

    # --- sync: subscribe first, then read, then release live posts -----------------------------

    def _resync(self) -> None:
        if self.closed:
            return
        if self._sync_task and not self._sync_task.done():
            self._sync_task.cancel()
        self._sync_task = asyncio.ensure_future(self._sync())

    async def _sync(self) -> None:
        try:
            async with self._lock:
                self.on_fanout_lost()
                following = set(await self.db.following(self.user_id))
                try:
                    await self._subscribe(following)
                except BrokerUnavailable:
                    # PostgreSQL has the history even while the broker is away. The fan-out
                    # calls on_fanout_ready when it is back, and that sync reads on from the
                    # horizon, so nothing falls in between.
                    if self._history_pending:
                        self.following = following
                        await self._send_history()
                    raise
                if self._history_pending:
                    await self._send_history()
                else:
                    await self._send_posts_after_floor(self._authors())
                self._floor_authors = set(self.following)
                if not self.ready:
                    self._enter(SessionPhase.SYNCING)
                    await self._send(wire.ready_frame(len(self.following)))
                await self._send_checkpoint()
                self._release_held()
        except BrokerUnavailable as exc:
            log.info("session of user %d waits for the broker: %s", self.user_id, exc)
        except WebSocketClosedError:
            pass  # the handler's on_close ends the session
        except DatabaseUnavailable as exc:
            log.warning("session of user %d: database unavailable: %s", self.user_id, exc)
            self.close(Close.SERVER_ERROR)

    def _check_open(self) -> None:
        """close() cancels the session's tasks, but a cancellation can be lost: asyncio.wait_for
        (inside aiopg, Python 3.11) swallows one that lands as its query completes. A task that
        carries on after close must not subscribe the session again."""
        if self.closed:
            raise asyncio.CancelledError()

    def _authors(self) -> list[int]:
        """Whose posts the feed shows: the followed authors' and the user's own, which other
        tabs and devices of the user show as they are made."""
        return sorted(self.following | {self.user_id})

    async def _subscribe(self, following: set[int]) -> None:
        while True:
            self._check_open()
            await self.fanout.attach(self, following | {self.user_id})
            # Only now is the control key surely bound: a follow changed after the first read
            # was announced to nobody. Read again; changes after this read reach us as messages.
            latest = set(await self.db.following(self.user_id))
            if latest == following:
                self.following = following
                return
            following = latest

    async def _send_history(self) -> None:
        posts, horizon = await self.db.history(self._authors(), self.settings.history_size)
        await self._send_posts(posts)
        if horizon is not None:
            self.seen.raise_floor(horizon)
            self._history_pending = False
        # else the next sync sends the history again (duplicates are dropped), rather than
        # every post after a floor of 0

    async def _send_posts_after_floor(self, authors: list[int]) -> None:
        """Every change of these authors' posts after the floor (new, edited, deleted: a post
        deleted after the floor goes out as a deleted frame, since the client may show it), page
        by page, then raise the floor.

        A page covers every committed change only up to its horizon (a change below the page's
        last version may still be committing), so a full page is sent up to there and the next
        one read from there: the pages then cover one unbroken range, and the last read's
        horizon is a floor that no change can be missing under. Without a horizon past the
        cursor (a transaction has run for minutes) pages are read on from their last version,
        and the floor is left where it was."""
        after, unbroken = self.seen.floor, True
        while True:
            posts, horizon = await self.db.changes_after(authors, after, RESUME_PAGE)
            if len(posts) < RESUME_PAGE:
                await self._send_posts(posts)
                if unbroken and horizon is not None:
                    self.seen.raise_floor(horizon)
                return
            unbroken = unbroken and horizon is not None and horizon > after
            cut = min(posts[-1].version, horizon) if unbroken else posts[-1].version
            await self._send_posts([post for post in posts if post.version <= cut])
            if unbroken:
                self.seen.raise_floor(cut)
            after = cut

    async def _send_posts(self, posts: list[Post], *, even_below_floor: bool = False) -> None:
        last = None
        for post in posts:
            if self.seen.add(post.version, even_below_floor=even_below_floor):
                last = self.socket.write_text_frame(post.frame())
        if last is not None:
            await last  # back-pressure: the next page waits until this one left the process

    async def _send(self, frame: bytes) -> None:
        await self.socket.write_text_frame(frame)

    async def _send_checkpoint(self) -> None:
        self._deliveries_since_checkpoint = 0
        if self.seen.floor > self._checkpoint:
            self._checkpoint = self.seen.floor
            await self._send(wire.checkpoint_frame(self._checkpoint))

    def _release_held(self) -> None:
        held, self._held = self._held, []
        self._enter(SessionPhase.LIVE)
        for delivery, done in held:
            written = self._deliver(delivery)
            if written is None or written.done():
                done.set_result(None)
            else:
                written.add_done_callback(functools.partial(_settle, done))

    # --- live posts ----------------------------------------------------------------------------

    def _deliver(self, delivery: Delivery) -> asyncio.Future | None:
        return self._write(delivery.websocket_frame, (delivery,)) if self._shows(delivery) else None

    def _shows(self, delivery: Delivery) -> bool:
        """Whether the post is this feed's and new to it; counts it as seen if so."""
        author = delivery.author_id
        if author not in self.following and author != self.user_id:
            return False
        return self.seen.add(delivery.version)

    def _write(self, frames: bytes, deliveries: Sequence[Delivery]) -> asyncio.Future | None:
        """Write the frames of posts the session has just counted as seen, in one piece."""
        try:
            written = self.socket.write_prebuilt(frames)
        except WebSocketClosedError:
            return None  # the handler's on_close ends the session
        for delivery in deliveries:
            self.metrics.delivered(delivery.created_ms)
        self._deliveries_since_checkpoint += len(deliveries)
        if (
            self._deliveries_since_checkpoint >= CHECKPOINT_EVERY
            and self.seen.floor > self._checkpoint
        ):
            self._spawn(self._send_checkpoint())
        if written is not None and not written.done():
            self._count_unsent(written, len(deliveries), len(frames))
        return written

    def _count_unsent(self, written: asyncio.Future, frames: int, size: int) -> None:
        """Tornado buffers whatever the socket does not take, without a limit: a client that
        stops reading is closed (4008) once it has too much waiting, rather than grow the
        process. In session mode the broker's prefetch keeps this small; in process mode posts
        are acknowledged as they are fanned out, and this is the bound."""
        self._unsent_frames += frames
        self._unsent_bytes += size
        if (
            self._unsent_frames > self.settings.session_queue_max
            or self._unsent_bytes > self.settings.socket_buffer_bytes
        ):
            self.on_overflow()
        else:
            written.add_done_callback(functools.partial(self._sent, frames, size))

    def _sent(self, frames: int, size: int, _written: asyncio.Future) -> None:
        self._unsent_frames -= frames
        self._unsent_bytes -= size

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, WebSocketClosedError):
            log.error("session of user %d: task failed", self.user_id, exc_info=error)

    async def _change_follow(self, author_id: int) -> None:
        """Bring the subscription for one author in line with the database. The message only
        says that something changed: two changes published out of commit order (two tabs) still
        end in the state the database holds."""
        try:
            async with self._lock:
                if self.closed or not self.ready or not self.fanout.is_ready:
                    return  # the next sync reads the follows anyway
                follow = await self.db.is_following(self.user_id, author_id)
                self._check_open()
                if follow == (author_id in self.following):
                    return
                if follow:
                    await self.fanout.follow(self, author_id)
                    self.following.add(author_id)
                    posts, _ = await self.db.history([author_id], self.settings.history_size)
                    # Posts below the floor were not sent unless the author was followed when
                    # the floor was set: then they are settled already.
                    below = author_id not in self._floor_authors
                    await self._send_posts(posts, even_below_floor=below)
                else:
                    self.following.discard(author_id)  # drops posts already on their way
                    await self.fanout.unfollow(self, author_id)
                await self._send(wire.following_frame(len(self.following)))
        except (BrokerUnavailable, WebSocketClosedError):
            pass  # the next sync re-reads the follows; a closed socket ends the session
        except DatabaseUnavailable:
            self.close(Close.SERVER_ERROR)


def _settle(done: asyncio.Future, _written: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)
