"""What the two fan-outs share: the broker they live on, and being ready once the broker is open
and the fan-out has set itself up on the new connection (channels, and in process mode the queue
and its bindings)."""

from __future__ import annotations

import asyncio

from feed_app.broker.connection import Broker


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
        self._setting_up = asyncio.ensure_future(self._set_up())

    async def _set_up(self) -> None:
        """Set up on the new connection, then set _ready and tell the subscribers."""
        raise NotImplementedError
