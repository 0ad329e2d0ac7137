"""CPU per confirmed publish through pika, with pika's own transport or the service's.

    .venv/bin/python bench/publish_confirms.py --transport pika --in-flight 1 8
    .venv/bin/python bench/publish_confirms.py --transport service --in-flight 1 8

Publishes --messages messages to amq.direct under a routing key nothing is bound to, with
publisher confirms, keeping --in-flight of them unconfirmed at once (the outbox relay's fast
path with that many posts at a time), and prints this process's CPU per confirmed publish.
`service` installs feed_app/broker/one_send_per_turn.py first: one send() per loop turn instead
of one per frame. Run the two in turn, several times, and compare them pair by pair.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib import options
from bench.lib.amqp import open_channel, open_connection

BODY = b"x" * 300  # about a post's frame


class Publisher:
    def __init__(self, channel) -> None:
        self.channel = channel
        self.unconfirmed: dict[int, asyncio.Future] = {}
        self.tag = 0

    async def confirm_mode(self) -> None:
        ready = asyncio.get_running_loop().create_future()
        self.channel.confirm_delivery(self._on_confirm, callback=ready.set_result)
        await ready

    def _on_confirm(self, frame) -> None:
        last, multiple = frame.method.delivery_tag, frame.method.multiple
        for tag in [t for t in self.unconfirmed if t <= last] if multiple else [last]:
            self.unconfirmed.pop(tag).set_result(None)

    async def publish_each(self, count: int) -> None:
        for _ in range(count):
            self.tag += 1
            confirmed = asyncio.get_running_loop().create_future()
            self.unconfirmed[self.tag] = confirmed
            self.channel.basic_publish("amq.direct", "bench-nobody", BODY)
            await confirmed


async def measure(url: str, messages: int, in_flight: int) -> tuple[float, float]:
    connection = await open_connection(url)
    try:
        publisher = Publisher(await open_channel(connection))
        await publisher.confirm_mode()
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(
            *(publisher.publish_each(messages // in_flight) for _ in range(in_flight))
        )
        return time.process_time() - cpu, time.monotonic() - wall
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["pika", "service"], required=True)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--messages", type=int, default=8000)
    options.service_options(parser, database=False)
    args = parser.parse_args()
    if args.transport == "service":
        # Imported only here: importing feed_app.broker installs it for the whole process.
        from feed_app.broker import one_send_per_turn

        one_send_per_turn.install()
    for in_flight in args.in_flight:
        cpu, wall = asyncio.run(measure(args.amqp_url, args.messages, in_flight))
        print(
            f"{args.transport:8} in flight {in_flight:3}: {cpu / args.messages * 1e6:6.1f} µs CPU"
            f" per confirmed publish, {args.messages / wall:8.0f}/s"
        )


if __name__ == "__main__":
    main()
