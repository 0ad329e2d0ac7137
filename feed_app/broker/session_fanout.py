"""`session` mode, the seed's design: every feed socket has an exclusive queue of its own, bound
once per followed author and once to the user's control key. The broker does the fan-out.

A delivery is acknowledged once its frame has left the process, so with the consume channels'
prefetch a slow client holds back its own queue only; when that queue overflows (x-max-length)
the broker dead-letters the oldest post and the subscriber is told (on_overflow).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Iterable
from typing import Any

import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app import wire
from feed_app.broker import messages
from feed_app.broker.channel import Channel
from feed_app.broker.connection import AMQP_FAILURES, Broker
from feed_app.broker.fanout_base import BrokerFanout
from feed_app.fanout import BrokerUnavailable, Subscriber

log = logging.getLogger(__name__)

QUEUE_EXPIRES_MS = 60_000  # safety net: an unused session queue vanishes after a minute
CONSUME_CHANNELS, SETUP_CHANNELS = 4, 2


class SessionQueue:
    """One subscriber's queue on the current connection, and the channels it uses."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber: Subscriber | None = subscriber
        self.name = self._new_name()
        self.channel: Channel | None = None  # consumes the queue
        self.setup: Channel | None = None  # declares, binds, deletes it
        self.authors: set[int] = set()  # bound on the current connection
        self.consume_sent = False  # basic.consume is on its way on `channel`, or done
        self.consuming = False  # ... and the broker has answered it

    def _new_name(self) -> str:
        assert self.subscriber is not None
        return wire.session_queue(self.subscriber.user_id)

    def lost(self) -> None:
        """The exclusive queue died with the connection. The next one gets a new name: after a
        connection lost on this side only, the broker keeps the old queue until it notices (a
        heartbeat or two), and declaring that name again would fail with RESOURCE_LOCKED."""
        self.channel = self.setup = None
        self.authors = set()
        self.consume_sent = self.consuming = False
        if self.subscriber is not None:
            self.name = self._new_name()

    def on_message(self, pika_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        channel = self.channel
        if channel is None or channel.pika is not pika_channel:
            return  # a delivery from before a reconnect; its queue and channel are gone
        channel.delivered(method.delivery_tag)
        message = messages.decode(method, properties, body)
        subscriber = self.subscriber
        written = None
        if subscriber is not None and message is not None:
            if isinstance(message, messages.FollowChange):
                subscriber.on_follow_change(message.author_id)
            else:
                written = subscriber.on_post(message)
        if written is None or written.done():
            channel.ack(method.delivery_tag)
        else:
            written.add_done_callback(functools.partial(_ack, channel, method.delivery_tag))

    def on_overflow(self) -> None:
        if self.subscriber is not None:
            self.subscriber.on_overflow()


def _ack(channel: Channel, delivery_tag: int, written: asyncio.Future) -> None:
    if not written.cancelled():
        written.exception()  # a failed write means the socket closed; nothing to report
    channel.ack(delivery_tag)


class SessionFanout(BrokerFanout):
    def __init__(self, broker: Broker, *, queue_max: int, prefetch: int) -> None:
        super().__init__(broker)
        self.queue_max = queue_max
        self.prefetch = prefetch
        self._queues: dict[Subscriber, SessionQueue] = {}
        self._consume: list[Channel] = []
        self._setup: list[Channel] = []
        self._round_robin = itertools.count()

    # --- what metrics and tests read ----------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    @property
    def bindings(self) -> int:
        return sum(len(queue.authors) + 1 for queue in self._queues.values() if queue.channel)

    @property
    def channels(self) -> int:
        return len(self._consume) + len(self._setup)

    def queue_of(self, subscriber: Subscriber) -> str | None:
        queue = self._queues.get(subscriber)
        return queue.name if queue else None

    def _known_subscribers(self) -> list[Subscriber]:
        return list(self._queues)

    # --- the broker's connection ---------------------------------------------------------------

    async def _set_up(self, connection: AsyncioConnection) -> None:
        try:
            consume = [
                await self.broker.open_channel(connection, prefetch=self.prefetch)
                for _ in range(CONSUME_CHANNELS)
            ]
            setup = [await self.broker.open_channel(connection) for _ in range(SETUP_CHANNELS)]
        except AMQP_FAILURES as exc:
            self.broker.reconnect(f"cannot open session channels ({exc})", connection)
            return
        if not self.still_current(connection):
            return
        self._consume, self._setup = consume, setup
        self._ready.set()
        for subscriber in list(self._queues):
            subscriber.on_fanout_ready()

    def on_broker_lost(self) -> None:
        self._consume, self._setup = [], []
        self._ready.clear()
        for queue in self._queues.values():
            queue.lost()
        for subscriber in list(self._queues):
            subscriber.on_fanout_lost()

    # --- the seam ------------------------------------------------------------------------------

    async def attach(self, subscriber: Subscriber, authors: Iterable[int]) -> None:
        queue = self._queues.get(subscriber)
        if queue is None:
            queue = self._queues[subscriber] = SessionQueue(subscriber)
        if not self.is_ready:
            raise BrokerUnavailable("not connected to RabbitMQ")
        try:
            if queue.channel is None:
                await self._declare(queue)
            await self._bind(queue, set(authors))
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def _declare(self, queue: SessionQueue) -> None:
        turn = next(self._round_robin)
        channel = self._consume[turn % len(self._consume)]
        setup = self._setup[turn % len(self._setup)]
        queue.channel, queue.setup = channel, setup
        await self.broker.declare_bounded_queue(
            setup, queue.name, self.queue_max, QUEUE_EXPIRES_MS, queue.on_overflow
        )
        assert queue.subscriber is not None
        # No-wait, like the authors' binds: the barrier after those covers this one too.
        setup.pika.queue_bind(queue.name, wire.EXCHANGE, wire.control_key(queue.subscriber.user_id))
        queue.consume_sent = True
        await channel.call(channel.pika.basic_consume, queue.name, queue.on_message)
        if queue.channel is not channel or not channel.is_open:
            raise BrokerUnavailable("connection lost while declaring")
        queue.consuming = True

    async def _bind(self, queue: SessionQueue, authors: set[int]) -> None:
        setup = queue.setup
        assert setup is not None
        for author_id in queue.authors - authors:
            setup.pika.queue_unbind(queue.name, wire.EXCHANGE, wire.author_key(author_id))
        # Without a callback, queue_bind is sent without waiting: all binds go out in one burst,
        # and the barrier after them returns once every one is in place.
        for author_id in authors - queue.authors:
            setup.pika.queue_bind(queue.name, wire.EXCHANGE, wire.author_key(author_id))
        queue.authors = authors
        await self._barrier(queue, setup)

    async def _barrier(self, queue: SessionQueue, setup: Channel) -> None:
        """A synchronous method after no-wait ones: the broker answers a channel's commands in
        order, so when it returns, every bind sent before it is in place."""
        await setup.call(setup.pika.queue_declare, queue.name, passive=True)
        if queue.setup is not setup:
            raise BrokerUnavailable("connection lost while binding")

    async def follow(self, subscriber: Subscriber, author_id: int) -> None:
        queue = self._subscribed(subscriber)
        await self._rebind(queue, queue.authors | {author_id})

    async def unfollow(self, subscriber: Subscriber, author_id: int) -> None:
        queue = self._subscribed(subscriber)
        await self._rebind(queue, queue.authors - {author_id})

    def _subscribed(self, subscriber: Subscriber) -> SessionQueue:
        queue = self._queues.get(subscriber)
        if queue is None or queue.setup is None:
            raise BrokerUnavailable("not subscribed on the current connection")
        return queue

    async def _rebind(self, queue: SessionQueue, authors: set[int]) -> None:
        try:
            await self._bind(queue, authors)
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    def detach(self, subscriber: Subscriber) -> None:
        queue = self._queues.pop(subscriber, None)
        if queue is None:
            return
        queue.subscriber = None  # deliveries already on their way are acked, not delivered
        self.broker.forget_overflow(queue.name)
        # Deleting the queue also cancels its consumer, and doing it on the setup channel keeps
        # the slow part (dropping every binding) off the channel that carries others' acks. While
        # basic.consume awaits its answer, though, a delete on another channel could overtake it
        # (and the consume's NOT_FOUND would close the channel): then it goes after it, on the
        # consume channel. Were the connection gone, the exclusive queue would have gone with it.
        channel = queue.channel if queue.consume_sent and not queue.consuming else queue.setup
        if channel is not None and channel.is_open:
            channel.pika.queue_delete(queue.name)
