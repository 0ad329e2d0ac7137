"""Heartbeats through the broker: the AMQP half of the delivery-path check (feed_app/path_check.py
has the reasoning and the other half).

Each process has an exclusive queue of its own, bound to wire.HEARTBEAT_KEY, and publishes its
numbered heartbeats to that key through its one connection, with publisher confirms like a post.
The queue lives on the node the process is connected to, as its feed queues do, and a beat takes
the path a post takes: routed by the publisher's node to whatever queues that node knows are bound.
So a peer's beats stop reaching this process exactly when that node has lost this node's queues
or bindings, which is what a network partition between RabbitMQ nodes does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app import wire
from feed_app.broker.channel import Channel
from feed_app.broker.connection import AMQP_FAILURES, Broker

log = logging.getLogger(__name__)

QUEUE_MAX = 1000  # beats waiting; past it the oldest go (a gap: every session resyncs, no harm)
QUEUE_EXPIRES_MS = 60_000  # safety net, as for the feed queues


class HeartbeatListener(Protocol):
    def on_bound(self) -> None:
        """The queue is bound: beats heard from now on are evidence about this connection."""

    def on_lost(self) -> None:
        """The connection, and the queue with it, is gone."""

    def on_beat(self, peer: str, beat: int) -> None:
        """A beat of another process arrived."""


class HeartbeatLink:
    """The process's heartbeat queue on the current connection, and its beats going out."""

    def __init__(self, broker: Broker, process: str, listener: HeartbeatListener) -> None:
        self.broker = broker
        self.process = process
        self.listener = listener
        self._channel: Channel | None = None
        self._setting_up: asyncio.Task | None = None
        broker.listeners.append(self)

    @property
    def is_bound(self) -> bool:
        return self._channel is not None and self._channel.is_open

    @property
    def is_connected(self) -> bool:
        return self.broker.is_open

    def publish(self, beat: int) -> asyncio.Future:
        """Send one beat; the future resolves when the broker confirmed it (BrokerUnavailable
        when there is no connection)."""
        return self.broker.publish_heartbeat(wire.heartbeat_body(self.process, beat))

    def on_broker_open(self) -> None:
        connection = self.broker.connection
        assert connection is not None
        self._setting_up = asyncio.ensure_future(self._set_up(connection))

    def on_broker_lost(self) -> None:
        self._channel = None
        self.listener.on_lost()

    async def _set_up(self, connection: AsyncioConnection) -> None:
        # A new name on every connection: the broker may still hold the last one's exclusive
        # queue for a heartbeat or two after this side lost it (RESOURCE_LOCKED otherwise).
        queue = wire.heartbeat_queue(self.process)
        arguments = {"x-max-length": QUEUE_MAX, "x-expires": QUEUE_EXPIRES_MS}
        try:
            channel = await self.broker.open_channel(connection)
            await channel.call(
                channel.pika.queue_declare,
                queue,
                exclusive=True,
                auto_delete=True,
                arguments=arguments,
            )
            await channel.call(channel.pika.queue_bind, queue, wire.EXCHANGE, wire.HEARTBEAT_KEY)
            await channel.call(channel.pika.basic_consume, queue, self._on_message, auto_ack=True)
        except AMQP_FAILURES as exc:
            self.broker.reconnect(f"cannot set up the heartbeat queue ({exc})", connection)
            return
        if connection is not self.broker.connection or not connection.is_open:
            return
        self._channel = channel
        self.listener.on_bound()

    def _on_message(self, pika_channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        if self._channel is None or self._channel.pika is not pika_channel:
            return  # from before a reconnect
        try:
            process, beat = wire.parse_heartbeat(body)
        except (UnicodeDecodeError, ValueError):
            log.warning("dropping a malformed heartbeat: %r", body[:80])
            return
        if process != self.process:
            self.listener.on_beat(process, beat)
