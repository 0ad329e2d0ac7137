"""pika's callbacks as awaitables, for the tools that talk to RabbitMQ without the service: the
pika ceiling (ceilings.py) and the broker's own time for a session's set-up (connect.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection


async def open_connection(url: str) -> AsyncioConnection:
    loop = asyncio.get_running_loop()
    opened: asyncio.Future = loop.create_future()

    def on_error(_connection: Any, error: Exception) -> None:
        if not opened.done():
            opened.set_exception(ConnectionError(f"cannot connect to RabbitMQ: {error}"))

    AsyncioConnection(
        pika.URLParameters(url),
        on_open_callback=opened.set_result,
        on_open_error_callback=on_error,
        custom_ioloop=loop,
    )
    return await asyncio.wait_for(opened, 10)


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await a pika method that takes `callback=` (the same idea as feed_app.broker.Channel)."""
    future = asyncio.get_running_loop().create_future()
    method(*args, callback=lambda reply: future.done() or future.set_result(reply), **kwargs)
    # Generous: a broker still dropping thousands of bindings of a run just before answers late.
    return await asyncio.wait_for(future, 60)


async def open_channel(connection: AsyncioConnection) -> Any:
    future = asyncio.get_running_loop().create_future()
    connection.channel(on_open_callback=future.set_result)
    return await asyncio.wait_for(future, 10)
