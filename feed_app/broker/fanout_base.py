"""What the two fan-outs share: the broker they live on, and being ready once the broker is open
and the fan-out has set itself up on the new connection (channels, and in process mode the queue
and its bindings)."""

from __future__ import annotations

import asyncio

from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app.broker.connection import Broker
from feed_app.fanout import Subscriber


class BrokerFanout:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._ready = asyncio.Event()
        self._setting_up: asyncio.Task | None = None

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.broker.is_open

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    def on_broker_open(self) -> None:
        connection = self.broker.connection
        assert connection is not None
        self._setting_up = asyncio.ensure_future(self._set_up(connection))

    async def _set_up(self, connection: AsyncioConnection) -> None:
        """Set up on this connection, then set _ready and tell the subscribers; nothing, if
        the connection was lost meanwhile (see still_current)."""
        raise NotImplementedError

    def still_current(self, connection: AsyncioConnection) -> bool:
        return connection is self.broker.connection and connection.is_open

    def resync_all(self) -> None:
        for subscriber in self._known_subscribers():
            subscriber.on_fanout_lost()
            subscriber.on_fanout_ready()

    def _known_subscribers(self) -> list[Subscriber]:
        raise NotImplementedError
