"""A feed session: one open websocket, its own queue, and the bookkeeping that makes it exact.

The queue is bound before anything is read from PostgreSQL, and live posts are held back while the
read is sent. A post committed before the read is in the read; one committed after it was published
after the bind, so it is in the queue. The read also returns the horizon (the last post id handed
out when it ran; ids are in commit order) and the session drops live posts at or below the horizon
and any id it has already sent, so the hand-over has neither a gap nor a duplicate.

The same sync runs again whenever the queue was lost (the broker connection dropped): declare,
bind, then read everything after the horizon. So a broker restart costs a client nothing but time.

A client that reconnects resumes with since=<the last checkpoint>, not the highest id it showed:
posts can arrive out of id order (a post whose publish failed comes later, from the outbox), so
"everything up to the highest id shown" is not known to be shown. The checkpoint is the floor,
below which everything is settled; the client drops the ids it already shows.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import pika
import pika.exceptions
from tornado.websocket import WebSocketClosedError

from feed_app.broker import POSTS_EXCHANGE, Broker, BrokerUnavailable, Channel, control_key
from feed_app.config import Settings
from feed_app.db import Database, DatabaseUnavailable, Post
from feed_app.metrics import Metrics
from feed_app.wire import Close

log = logging.getLogger(__name__)

RESUME_PAGE = 500
CHECKPOINT_EVERY = 256  # deliveries; the floor rises with them once the seen-window is full

FOLLOW_CHANGE = "follow-change"  # AMQP message type: the user's follows of one author changed


class FeedSocket(Protocol):
    def write_message(self, message: str) -> Any: ...
    def write_text_frame(self, data: bytes) -> asyncio.Future: ...
    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class SeenPosts:
    """Which post ids the session has sent, so none is sent twice, in bounded memory.

    `floor` means "everything up to here is settled": at or below it a post was either sent or
    deliberately left out (older than the history window). Above it, ids are remembered one by
    one; past `capacity` the oldest remembered id raises the floor instead. That only drops a post
    that arrives more than `capacity` deliveries late, which the outbox does not do in practice.
    Full, it holds ~80 KB (measured), so a busy session costs at most that much more than an idle
    one; 1024 covers minutes of even a very busy feed.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.floor = 0
        self._ids: set[int] = set()
        self._order: collections.deque[int] = collections.deque()

    def add(self, post_id: int, *, even_below_floor: bool = False) -> bool:
        """True the first time an id is seen, False for a duplicate. Ids at or below the floor
        count as seen, unless even_below_floor (the old posts of a newly followed author)."""
        if (post_id <= self.floor and not even_below_floor) or post_id in self._ids:
            return False
        self._ids.add(post_id)
        self._order.append(post_id)
        if len(self._order) > self.capacity:
            oldest = self._order.popleft()
            self._ids.discard(oldest)
            self.floor = max(self.floor, oldest)
        return True

    def raise_floor(self, horizon: int) -> None:
        if horizon <= self.floor:
            return
        self.floor = horizon
        self._order = collections.deque(i for i in self._order if i > horizon)
        self._ids = set(self._order)


class FeedSession:
    def __init__(
        self,
        user_id: int,
        socket: FeedSocket,
        *,
        db: Database,
        broker: Broker,
        metrics: Metrics,
        settings: Settings,
        on_closed: Callable[[FeedSession], None],
    ) -> None:
        self.user_id = user_id
        self.socket = socket
        self.db = db
        self.broker = broker
        self.metrics = metrics
        self.settings = settings
        self.on_closed = on_closed
        self.queue = f"{user_id}.{secrets.token_hex(8)}"
        self.following: set[int] = set()
        self.seen = SeenPosts()
        self.channel: Channel | None = None  # consumes the queue
        self.setup: Channel | None = None  # declares, binds, deletes it
        self.ready = False
        self.closed = False
        self._history_pending = True  # the first sync sends history (or the resume read)
        # Live posts are held here while a sync sends what was read from the database.
        self._held: list[tuple[Channel, Any, pika.BasicProperties, bytes]] | None = []
        self._lock = asyncio.Lock()  # one sync or follow change at a time
        self._sync_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # follow changes and checkpoints in flight
        self._floor_authors: set[int] = set()  # whom the user followed when the floor was set
        self._checkpoint = 0  # the floor last sent to the client as a resume point
        self._deliveries_since_checkpoint = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, since: int | None) -> None:
        if since is not None:
            self.seen.raise_floor(since)
            self._history_pending = False  # resume: everything after `since` instead
        self.broker.listeners.add(self)
        self._resync()

    def close(self, code: Close | None = None) -> None:
        """End the session: the consumer is cancelled and the queue deleted, however it ended.
        With a code, the socket is closed with it; without, the socket is closed already."""
        if self.closed:
            return
        self.closed = True
        self.broker.listeners.discard(self)
        self.broker.watch_overflow(self.queue, None)
        if self._sync_task:
            self._sync_task.cancel()
        for channel, method, _properties, _body in self._held or []:
            channel.ack(method.delivery_tag)  # unacked, they would hold back the channel's acks
        self._held = None
        # self.channel stays: deliveries already on their way are acked by _on_message.
        setup, self.setup = self.setup, None
        if setup and setup.is_open:
            # Deleting the queue also cancels its consumer, and doing it on the setup channel keeps
            # the slow part (dropping every binding) off the channel that carries others' acks.
            # Were the connection gone, the exclusive queue would have gone with it.
            setup.pika.queue_delete(self.queue)
        if code is not None:
            self.socket.close(code, code.reason)
        self.on_closed(self)

    def on_broker_open(self) -> None:
        self._resync()

    def on_broker_lost(self) -> None:
        # The queue died with the connection; live posts wait until the next sync has caught up.
        self.channel = self.setup = None
        self._held = []

    def on_overflow(self) -> None:
        log.info("session %s fell behind; closing it", self.queue)
        self.metrics.slow_client_closes += 1
        self.close(Close.TOO_SLOW)

    # --- sync: bind first, then read, then release live posts ----------------------------------

    def _resync(self) -> None:
        if self.closed:
            return
        if self._sync_task and not self._sync_task.done():
            self._sync_task.cancel()
        self._sync_task = asyncio.ensure_future(self._sync())

    async def _sync(self) -> None:
        try:
            async with self._lock:
                if not self.broker.is_open:
                    # PostgreSQL has the history even while the broker is away. on_broker_open
                    # binds and reads on from the horizon, so nothing falls in between.
                    if self._history_pending:
                        self.following = set(await self.db.following(self.user_id))
                        await self._send_history()
                    return
                await self._bind_queue()
                if self._history_pending:
                    await self._send_history()
                else:
                    await self._send_posts_after_floor(sorted(self.following))
                self._floor_authors = set(self.following)
                if not self.ready:
                    self.ready = True
                    await self._send({"type": "ready", "following": len(self.following)})
                await self._send_checkpoint()
                self._release_held()
        except (BrokerUnavailable, pika.exceptions.AMQPError) as exc:
            log.info("session %s waits for the broker: %s", self.queue, exc)
        except WebSocketClosedError:
            pass  # the handler's on_close ends the session
        except DatabaseUnavailable as exc:
            log.warning("session %s: database unavailable: %s", self.queue, exc)
            self.close(Close.SERVER_ERROR)

    async def _bind_queue(self) -> None:
        channel, setup = self.broker.session_channels()
        self._held = []
        self.channel, self.setup = channel, setup
        arguments = self.broker.session_queue_arguments(self.settings.session_queue_max)
        await setup.call(
            setup.pika.queue_declare,
            self.queue,
            exclusive=True,
            auto_delete=True,
            arguments=arguments,
        )
        self.broker.watch_overflow(self.queue, self.on_overflow)
        setup.pika.queue_bind(self.queue, POSTS_EXCHANGE, control_key(self.user_id))
        self.following = set()
        latest = set(await self.db.following(self.user_id))
        while True:
            # Without a callback, queue_bind is sent without waiting: all binds go out in one
            # burst. The passive declare waits for its reply, and the broker answers a channel's
            # commands in order, so when it returns every binding is in place.
            for author_id in latest - self.following:
                setup.pika.queue_bind(self.queue, POSTS_EXCHANGE, str(author_id))
            await setup.call(setup.pika.queue_declare, self.queue, passive=True)
            self.following = latest
            # Only now is the control key surely bound: a follow changed after the read above
            # was announced to nobody. Read again; changes after this read reach us as messages.
            latest = set(await self.db.following(self.user_id))
            if latest == self.following:
                break
        await channel.call(channel.pika.basic_consume, self.queue, self._on_message)
        if channel is not self.channel or not channel.is_open:
            raise BrokerUnavailable("connection lost while binding")

    async def _send_history(self) -> None:
        posts, horizon = await self.db.posts_after(
            sorted(self.following), 0, self.settings.history_size, newest=True
        )
        await self._send_posts(posts)
        self.seen.raise_floor(horizon)
        self._history_pending = False

    async def _send_posts_after_floor(self, authors: list[int]) -> None:
        """Everything these authors posted after the floor, page by page, then raise the floor."""
        while True:
            posts, horizon = await self.db.posts_after(authors, self.seen.floor, RESUME_PAGE)
            await self._send_posts(posts)
            if len(posts) < RESUME_PAGE:
                self.seen.raise_floor(horizon)
                return
            self.seen.raise_floor(posts[-1].id)

    async def _send_posts(self, posts: list[Post], *, even_below_floor: bool = False) -> None:
        last = None
        for post in posts:
            if self.seen.add(post.id, even_below_floor=even_below_floor):
                last = self.socket.write_message(
                    json.dumps({"type": "post", "post": post.to_json()})
                )
        if last is not None:
            await last  # back-pressure: the next page waits until this one left the process

    async def _send(self, message: dict[str, Any]) -> None:
        await self.socket.write_message(json.dumps(message))

    async def _send_checkpoint(self) -> None:
        self._deliveries_since_checkpoint = 0
        if self.seen.floor > self._checkpoint:
            self._checkpoint = self.seen.floor
            await self._send({"type": "checkpoint", "since": self._checkpoint})

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for channel, method, properties, body in held:
            self._handle(channel, method, properties, body)

    # --- live messages -------------------------------------------------------------------------

    def _on_message(self, pika_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        channel = self.channel
        if channel is None or channel.pika is not pika_channel:
            return  # a delivery from before a reconnect; its queue and channel are gone
        channel.delivered(method.delivery_tag)
        if self.closed:
            channel.ack(method.delivery_tag)
        elif self._held is not None:
            self._held.append((channel, method, properties, body))
        else:
            self._handle(channel, method, properties, body)

    def _handle(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        try:
            if properties.type == FOLLOW_CHANGE:
                author_id, post_id = int(body), None
            else:
                author_id, post_id = int(method.routing_key), int(properties.message_id)
        except (TypeError, ValueError):
            # Not ours (another publisher on the vhost?). Raising here would make pika drop the
            # whole connection, and every session with it.
            log.warning("session %s drops a malformed message %r", self.queue, properties)
            channel.ack(method.delivery_tag)
            return
        if post_id is None:
            channel.ack(method.delivery_tag)
            self._spawn(self._change_follow(author_id))
            return
        if author_id not in self.following or not self.seen.add(post_id):
            channel.ack(method.delivery_tag)
            return
        # The body is already the websocket frame. The ack waits for the write to leave the
        # process, so with the prefetch limit a slow client holds back its own queue only.
        try:
            written = self.socket.write_text_frame(body)
        except WebSocketClosedError:
            channel.ack(method.delivery_tag)  # the session ends; its queue goes with it
            return
        if written.done():
            self._ack(channel, method.delivery_tag, written)
        else:
            written.add_done_callback(
                lambda future: self._ack(channel, method.delivery_tag, future)
            )
        self.metrics.deliveries += 1
        self._deliveries_since_checkpoint += 1
        if (
            self._deliveries_since_checkpoint >= CHECKPOINT_EVERY
            and self.seen.floor > self._checkpoint
        ):
            self._spawn(self._send_checkpoint())
        created_ms = (properties.headers or {}).get("created_ms")
        if created_ms:
            self.metrics.delivery_latency.observe(max(0.0, time.time() - created_ms / 1000))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, WebSocketClosedError):
            log.error("session %s: task failed", self.queue, exc_info=error)

    @staticmethod
    def _ack(channel: Channel, delivery_tag: int, written: asyncio.Future) -> None:
        if not written.cancelled():
            written.exception()  # a failed write means the socket closed; nothing to report
        channel.ack(delivery_tag)

    async def _change_follow(self, author_id: int) -> None:
        """Bring the binding for one author in line with the database. The message only says
        that something changed: two changes published out of commit order (two tabs) still
        end in the state the database holds."""
        try:
            async with self._lock:
                setup = self.setup
                if self.closed or setup is None:
                    return
                follow = await self.db.is_following(self.user_id, author_id)
                if follow == (author_id in self.following):
                    return
                if follow:
                    setup.pika.queue_bind(self.queue, POSTS_EXCHANGE, str(author_id))
                    # A synchronous method as a barrier: the binding is in place after it.
                    await setup.call(setup.pika.queue_declare, self.queue, passive=True)
                    self.following.add(author_id)
                    posts, _ = await self.db.posts_after(
                        [author_id], 0, self.settings.history_size, newest=True
                    )
                    # Posts below the floor were not sent unless the author was followed when
                    # the floor was set: then they are settled already.
                    below = author_id not in self._floor_authors
                    await self._send_posts(posts, even_below_floor=below)
                else:
                    self.following.discard(author_id)  # drops posts already in the queue
                    await setup.call(
                        setup.pika.queue_unbind, self.queue, POSTS_EXCHANGE, str(author_id)
                    )
                await self._send({"type": "following", "following": len(self.following)})
        except (BrokerUnavailable, pika.exceptions.AMQPError, WebSocketClosedError):
            pass  # the next sync re-reads the follows; a closed socket ends the session
        except DatabaseUnavailable:
            self.close(Close.SERVER_ERROR)
