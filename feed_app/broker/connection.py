"""The process's one AMQP connection to RabbitMQ, kept alive as an explicit state machine.

    CLOSED --start()--> CONNECTING --opened--> OPEN --lost--> WAITING --backoff--> CONNECTING ...
    any state --stop()--> STOPPING --closed--> STOPPED

Why one connection and a handful of channels: every websocket session needs its posts, but a
channel per session would run into the broker's channel_max (2047 by default), and exceeding it
closes the whole connection. The fan-outs (session_fanout.py, process_fanout.py) open the few
channels they need through open_channel(), in two roles:

- consume channels carry deliveries and acks;
- setup channels carry queue declares, binds, unbinds and deletes.

Why two roles: the broker runs a channel's commands one after another, and binding churn is slow
on it (a session following thousands of authors keeps a channel busy for a long while, and
deleting its queue as long again: docs/delivery.md has the set-up figures). On a shared channel,
every other session's acks would wait behind that, their prefetch would run out, and their
posts would stall. Kept apart, binding churn delays only other sessions' set-up.

Why a lost channel drops the connection: an error on a shared channel kills every consumer on it.
Rather than a second, rarer recovery path for "this channel's sessions", the broker reconnects and
every listener heals the one way it already knows (declare, bind, read back from PostgreSQL).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app import wire
from feed_app.broker import messages, one_send_per_turn
from feed_app.broker.channel import Channel
from feed_app.broker.nodes import NodeList
from feed_app.config import redact_url
from feed_app.fanout import BrokerListener, BrokerUnavailable

log = logging.getLogger(__name__)

# Every plain-TCP connection of the process sends what a loop turn wrote with one send().
one_send_per_turn.install()

BACKOFF_FIRST, BACKOFF_CAP = 0.25, 5.0  # seconds; full jitter in between
# Seconds a node has to answer the opening of a connection (channels, confirms), and to answer
# a close: a node in a partition can hang on both, and must not hold the process on it.
SETUP_TIMEOUT, CLOSE_TIMEOUT = 10.0, 2.0


# What a set-up step on a connection can fail with: the connection or channel went away, the
# broker did not answer in time, or it refused the command.
AMQP_FAILURES = (BrokerUnavailable, asyncio.TimeoutError, pika.exceptions.AMQPError)


class State(enum.Enum):
    CLOSED = "closed"  # not started
    CONNECTING = "connecting"
    OPEN = "open"
    WAITING = "waiting"  # the backoff before the next attempt
    STOPPING = "stopping"  # stop() closes the connection; nothing reconnects from here on
    STOPPED = "stopped"  # stop() is done: the broker stays closed


class Broker:
    """The connection, the confirmed publish channel, and the overflow queue that tells a queue's
    owner it overflowed. Listeners (the fan-out, the outbox relay) hear when it opens and when it
    is lost; open_channel() gives them channels of their own on the live connection."""

    def __init__(
        self,
        urls: list[str],
        *,
        nodes_file: str = "",
        on_reconnect: Callable[[], None] = lambda: None,
    ) -> None:
        # A cluster is a list of nodes: each connection attempt tries the next one.
        self._nodes = NodeList(urls, nodes_file)
        self.endpoint = ""  # host:port of the node connected to (or being tried)
        self._on_reconnect = on_reconnect
        self.state = State.CLOSED
        self.listeners: list[BrokerListener] = []  # told in order: the fan-out before the relay
        self._connection: AsyncioConnection | None = None
        self._publish_channel: Channel | None = None
        self._unconfirmed: dict[int, asyncio.Future] = {}
        self._next_delivery_tag = 1
        self._overflow_handlers: dict[str, Callable[[], None]] = {}
        self.overflow_queue = ""
        self._attempt = 0
        self._opened = asyncio.Event()
        self._closed = asyncio.Event()
        self._reconnect_handle: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task | None = None

    @staticmethod
    def _parameters_from(url: str) -> pika.URLParameters:
        parameters = pika.URLParameters(url)
        if "heartbeat" not in url:
            parameters.heartbeat = 15  # find a dead broker in ~30 s rather than pika's 60 s
        parameters.connection_attempts = 1  # retries are ours, with backoff
        parameters.socket_timeout = 5
        # pika allows 15 s for TCP and the AMQP handshake: a node hung in a partition would hold
        # the process that long before the next node of the list is tried.
        parameters.stack_timeout = 5
        parameters.blocked_connection_timeout = 30
        return parameters

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._closed.clear()
        self._connect()

    async def wait_open(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._opened.wait(), timeout)

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    async def stop(self) -> None:
        """Close the connection and stay closed: no reconnect is scheduled from here on."""
        self.state = State.STOPPING
        if self._reconnect_handle:
            self._reconnect_handle.cancel()
        connection = self._connection
        if connection is not None and not connection.is_closed:
            if not connection.is_closing:
                connection.close()
            await self._closed.wait()
        self.state = State.STOPPED

    @property
    def _stopping(self) -> bool:
        return self.state in (State.STOPPING, State.STOPPED)

    @property
    def connection(self) -> AsyncioConnection | None:
        """The connection of now: a listener that sets up on it names it to open_channel and
        reconnect, so that a set-up begun on a connection since lost touches only that one."""
        return self._connection

    def reconnect(self, reason: str, connection: AsyncioConnection | None = None) -> None:
        """Drop a connection that cannot be used as it is (a listener failed to set up on it):
        the usual path then reconnects, and every listener sets up again from scratch. Only the
        current connection is dropped, and only if it is the one named."""
        connection = connection or self._connection
        if connection is self._connection and connection is not None and connection.is_open:
            log.warning("%s: reconnecting", reason)
            # The reason goes to the broker as an AMQP short string: 255 bytes at most.
            connection.close(320, reason.encode()[:255].decode(errors="ignore"))
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abandon, connection)

    def _abandon(self, connection: AsyncioConnection) -> None:
        """Drop a connection whose close the node never answered, as pika drops one whose
        heartbeats stopped: the usual lost-connection path follows at once."""
        if not connection.is_closed:
            log.warning("RabbitMQ did not answer the close in %.0f s: dropping it", CLOSE_TIMEOUT)
            connection._terminate_stream(BrokerUnavailable("the node did not answer the close"))

    def _connect(self) -> None:
        url = self._nodes.next()
        parameters = self._parameters_from(url)
        self.endpoint = f"{parameters.host}:{parameters.port}"
        log.info("connecting to %s", redact_url(url))
        self.state = State.CONNECTING
        self._connection = AsyncioConnection(
            parameters,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            # pika would otherwise make a loop of its own that never runs: use Tornado's.
            custom_ioloop=asyncio.get_running_loop(),
        )

    def _schedule_reconnect(self) -> None:
        # Full jitter: instances that lost the same broker do not all come back at once.
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2**self._attempt))
        self._attempt += 1
        self.state = State.WAITING
        log.info("reconnecting to RabbitMQ in %.2f s (attempt %d)", delay, self._attempt)
        self._reconnect_handle = asyncio.get_running_loop().call_later(delay, self._connect)

    # --- connection callbacks --------------------------------------------------------------------

    def _on_connection_open(self, connection: AsyncioConnection) -> None:
        self._opening = asyncio.ensure_future(self._open_publishing(connection))

    def _on_connection_open_error(self, _connection: AsyncioConnection, error: Exception) -> None:
        log.warning("cannot connect to RabbitMQ: %s", error or type(error).__name__)
        if self._stopping:
            self._closed.set()
        else:
            self._schedule_reconnect()

    def _on_connection_closed(self, _connection: AsyncioConnection, reason: Exception) -> None:
        was_open = self.state is State.OPEN
        self._forget_channels(reason)
        if self._stopping:
            self._closed.set()
            return
        log.warning("RabbitMQ connection lost: %s", reason)
        if was_open:
            for listener in list(self.listeners):
                listener.on_broker_lost()
        self._schedule_reconnect()

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: Exception) -> None:
        if self.state is State.OPEN:
            reason_text = f"channel {channel.channel_number} closed ({reason})"
            self.reconnect(reason_text, channel.connection)

    async def _open_publishing(self, connection: AsyncioConnection) -> None:
        try:
            await asyncio.wait_for(self._set_up_publishing(connection), SETUP_TIMEOUT)
        except AMQP_FAILURES as exc:
            # A connection that died is reconnected by _on_connection_closed; one that is still
            # up but could not set up its channels is closed, so that path reconnects it too.
            self.reconnect(f"cannot open channels ({exc})", connection)
            return
        if connection is not self._connection or not connection.is_open:
            return
        if self._attempt:
            self._on_reconnect()
        self._attempt = 0
        self.state = State.OPEN
        self._opened.set()
        log.info("RabbitMQ connection open")
        for listener in list(self.listeners):
            listener.on_broker_open()

    async def _set_up_publishing(self, connection: AsyncioConnection) -> None:
        self._publish_channel = await self.open_channel(connection)
        await self._publish_channel.call(
            self._publish_channel.pika.confirm_delivery, self._on_confirm
        )
        self._next_delivery_tag = 1
        await self._declare_overflow_queue(self._publish_channel)

    async def open_channel(
        self, connection: AsyncioConnection | None = None, *, prefetch: int | None = None
    ) -> Channel:
        """A new channel on the live connection; with prefetch, each consumer on it gets at most
        that many unacknowledged messages."""
        connection = connection or self._connection
        if connection is None or not connection.is_open:
            raise BrokerUnavailable("not connected to RabbitMQ")
        future = asyncio.get_running_loop().create_future()

        def lost(_connection: AsyncioConnection, reason: Exception) -> None:
            if not future.done():  # pika never answers a channel open on a lost connection
                future.set_exception(BrokerUnavailable(f"connection lost: {reason}"))

        connection.add_on_close_callback(lost)
        connection.channel(on_open_callback=future.set_result)
        channel = Channel(await asyncio.wait_for(future, 10))
        channel.pika.add_on_close_callback(self._on_channel_closed)
        if prefetch is not None:
            await channel.call(channel.pika.basic_qos, prefetch_count=prefetch)
        return channel

    def _forget_channels(self, reason: Exception) -> None:
        self._opened.clear()
        for future in self._unconfirmed.values():
            if not future.done():
                future.set_exception(BrokerUnavailable(f"connection lost: {reason}"))
        self._unconfirmed.clear()
        self._publish_channel = None
        self._overflow_handlers.clear()  # exclusive queues die with their connection

    # --- publishing with confirms ----------------------------------------------------------------

    def publish_post(self, author_id: int, version: int, frame: bytes, created_ms: int):
        """Publish the frame of a post's change to its author's routing key; the future resolves
        once the broker has confirmed it."""
        properties = messages.post_properties(version, created_ms)
        return self._publish(wire.author_key(author_id), frame, properties)

    def publish_follow_change(self, user_id: int, author_id: int) -> asyncio.Future:
        """Tell the user's sessions, on every instance, that the follow of this author changed."""
        body = str(author_id).encode()
        return self._publish(wire.control_key(user_id), body, messages.FOLLOW_CHANGE_PROPERTIES)

    def publish_heartbeat(self, body: bytes) -> asyncio.Future:
        """A heartbeat of this process to every process's heartbeat queue (broker/heartbeat.py)."""
        return self._publish(wire.HEARTBEAT_KEY, body, messages.HEARTBEAT_PROPERTIES)

    def _publish(
        self, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> asyncio.Future:
        channel = self._publish_channel
        if self.state is not State.OPEN or channel is None or not channel.is_open:
            raise BrokerUnavailable("not connected to RabbitMQ")
        future = asyncio.get_running_loop().create_future()
        self._unconfirmed[self._next_delivery_tag] = future
        self._next_delivery_tag += 1
        channel.pika.basic_publish(wire.EXCHANGE, routing_key, body, properties)
        return future

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [method.delivery_tag]
        if method.multiple:
            tags = [tag for tag in self._unconfirmed if tag <= method.delivery_tag]
        for tag in tags:
            future = self._unconfirmed.pop(tag, None)
            if future and not future.done():
                if acked:
                    future.set_result(None)
                else:
                    future.set_exception(BrokerUnavailable("broker refused the message"))

    # --- bounded queues --------------------------------------------------------------------------

    async def declare_bounded_queue(
        self,
        channel: Channel,
        name: str,
        max_length: int,
        expires_ms: int,
        on_overflow: Callable[[], None],
    ) -> None:
        """An exclusive, auto-delete queue that keeps at most max_length messages. When its
        consumer lets it fill, the broker drops the oldest and dead-letters it to this
        connection's overflow queue, and on_overflow is called: that is how the owner learns
        that it lost messages. x-expires is a safety net: an unused queue vanishes even if its
        delete was lost."""
        arguments = {
            "x-expires": expires_ms,
            "x-max-length": max_length,
            "x-overflow": "drop-head",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.overflow_queue,
        }
        await channel.call(
            channel.pika.queue_declare, name, exclusive=True, auto_delete=True, arguments=arguments
        )
        if channel.is_open:  # else the queue died with its connection (_forget_channels)
            self._overflow_handlers[name] = on_overflow

    def forget_overflow(self, queue: str) -> None:
        """The queue is gone, or its owner no longer cares that it overflows."""
        self._overflow_handlers.pop(queue, None)

    async def _declare_overflow_queue(self, channel: Channel) -> None:
        self.overflow_queue = wire.overflow_queue()
        await channel.call(
            channel.pika.queue_declare,
            self.overflow_queue,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 1000},
        )
        await channel.call(
            channel.pika.basic_consume, self.overflow_queue, self._on_overflow, auto_ack=True
        )

    def _on_overflow(
        self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes
    ) -> None:
        queue = messages.dead_lettered_from(properties)
        handler = self._overflow_handlers.get(queue)
        if handler:
            handler()
