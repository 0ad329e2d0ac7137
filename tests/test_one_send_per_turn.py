"""pika's transport as the service installs it (feed_app/broker/one_send_per_turn.py), against
the real broker: what one loop turn writes leaves in one send(), and nothing is lost or
reordered when the kernel takes only part of it."""

import asyncio

import pika
import pytest
from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app.broker import one_send_per_turn
from tests.conftest import AMQP_URL


async def _channel() -> tuple[AsyncioConnection, object]:
    loop = asyncio.get_running_loop()
    opened, channel_open = loop.create_future(), loop.create_future()
    connection = AsyncioConnection(
        pika.URLParameters(AMQP_URL),
        on_open_callback=opened.set_result,
        on_open_error_callback=lambda _c, error: opened.set_exception(error),
        custom_ioloop=loop,
    )
    await asyncio.wait_for(opened, 10)
    connection.channel(on_open_callback=channel_open.set_result)
    return connection, await asyncio.wait_for(channel_open, 10)


async def _queue(channel) -> str:
    declared = asyncio.get_running_loop().create_future()
    channel.queue_declare("", exclusive=True, callback=declared.set_result)
    return (await asyncio.wait_for(declared, 10)).method.queue


async def _read(channel, queue: str, count: int) -> list[bytes]:
    bodies: list[bytes] = []
    all_read = asyncio.get_running_loop().create_future()

    def on_message(_channel, _method, _properties, body: bytes) -> None:
        bodies.append(body)
        if len(bodies) == count:
            all_read.set_result(None)

    channel.basic_consume(queue, on_message, auto_ack=True)
    await asyncio.wait_for(all_read, 20)
    return bodies


@pytest.mark.gen_test(timeout=30)
async def test_the_frames_of_one_turn_leave_in_one_send(monkeypatch):
    one_send_per_turn.install()
    connection, channel = await _channel()
    try:
        assert isinstance(connection._transport, one_send_per_turn.OneSendPerTurnTransport)
        queue = await _queue(channel)
        sends: list[int] = []
        real_send = connection._transport._sigint_safe_send

        def counting_send(sock, data):
            sends.append(len(data))
            return real_send(sock, data)

        monkeypatch.setattr(connection._transport, "_sigint_safe_send", counting_send)
        bodies = [f"post {n}".encode() for n in range(20)]
        for body in bodies:  # 20 publishes, three frames each, in one turn
            channel.basic_publish("", queue, body)
        assert await _read(channel, queue, len(bodies)) == bodies
        assert sends[0] >= sum(len(body) for body in bodies)  # the whole turn's publishes
        assert len(sends) <= 2  # those, and the consume that the next turn wrote
    finally:
        connection.close()


@pytest.mark.gen_test(timeout=30)
async def test_what_the_kernel_does_not_take_follows_in_order():
    one_send_per_turn.install()
    connection, channel = await _channel()
    try:
        queue = await _queue(channel)
        # Far more than a socket's send buffer: most of it waits for the writable event, and
        # what the next turns write must queue behind it.
        bodies = [b"a" * 16_000_000, b"b", b"c" * 3_000_000]
        channel.basic_publish("", queue, bodies[0])
        await asyncio.sleep(0)
        channel.basic_publish("", queue, bodies[1])
        await asyncio.sleep(0)
        channel.basic_publish("", queue, bodies[2])
        assert await _read(channel, queue, 3) == bodies
    finally:
        connection.close()
