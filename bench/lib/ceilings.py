"""Ceilings measured in the same run, on the same machine, with the same client code.

(a) bare push: bench/bare_push_server.py gets the same users, follow graph and sessions, and the
    same posts (authors in the same order, text size; repeated up to a minimum burst size) in
    one unthrottled burst; deliveries/s is what the client receives from it. It bounds what
    any Tornado websocket feed can reach with this client here. Then the floor: the same burst
    again, each post's whole frame built once and the same bytes written to every socket's
    stream. Its server CPU per write is the least a delivery can cost in Python here; the
    service's CPU per delivery is compared with it.
(b) bare pika: one AsyncioConnection publishes M messages (with publisher confirms, like the
    service) into a queue that another AsyncioConnection consumes (prefetch like the service,
    one manual ack per message); messages/s is what one consumer gets through the broker.

The service's deliveries/s over the lower ceiling says how close to the plumbing's limit it is.
With `loadtest.py --fanout both` they are measured once, after both modes ran.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pathlib
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import pika
from tornado.httpclient import AsyncHTTPClient

from bench.lib.amqp import call, open_channel, open_connection
from bench.lib.feedclient import FeedClient, Tracker, open_clients, ratio
from bench.lib.population import Population
from bench.lib.processes import ManagedProcess, wait_ready
from deploy.processes import free_port
from feed_app import wire
from feed_app.config import Settings

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent


# A burst shorter than a second measures start-up more than throughput: the run's posts are
# repeated (same authors, same order) until the burst holds at least this many deliveries.
MIN_BURST_DELIVERIES = 50_000
MAX_BURST_REPEATS = 20


def _repeat_until(items: list[int], weight: Callable[[int], int], total: int) -> list[int]:
    result: list[int] = []
    per_round = sum(weight(item) for item in items)
    for _ in range(MAX_BURST_REPEATS):
        result += items
        if per_round * (len(result) // max(1, len(items))) >= total:
            break
    return result


async def _drain(tracker: Tracker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while tracker.outstanding() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def bare_push_ceiling(
    population: Population,
    authors: list[int],
    text_size: int,
    *,
    log_path: pathlib.Path,
    concurrency: int,
    ready_timeout: float,
    drain_timeout: float,
) -> dict[str, Any]:
    """Deliveries/s from the bare push server to the same sessions for the same posts, written
    with write_message(); under "floor", the same burst again with each frame built once."""
    port = free_port()
    server = ManagedProcess(
        "bare push server",
        [sys.executable, str(BENCH_DIR / "bare_push_server.py"), "--port", str(port)],
        log_path,
    )
    clients: list[FeedClient] = []
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, 15, server)
        http = AsyncHTTPClient()
        following = {
            str(population.user_id(u)): [population.user_id(a) for a in authors_of_u]
            for u, authors_of_u in enumerate(population.follows)
        }
        await http.fetch(f"{base}/setup", method="POST", body=json.dumps({"following": following}))

        tracker = Tracker()
        clients = [
            FeedClient(i, f"ws://127.0.0.1:{port}/post/feed/{population.user_id(u)}", tracker)
            for i, u in enumerate(population.session_users)
        ]
        await open_clients(clients, concurrency, ready_timeout, time.monotonic() + ready_timeout)
        fan_out = population.sessions_by_author()
        sequence = _repeat_until(authors, lambda a: len(fan_out[a]), MIN_BURST_DELIVERIES)
        burst = functools.partial(
            _burst,
            f"{base}/burst",
            tracker,
            clients,
            population,
            sequence,
            text_size,
            drain_timeout,
        )
        push = await burst(prebuilt=False)
        return {**push, "floor": await burst(prebuilt=True)}
    finally:
        for client in clients:
            client.close()
        await asyncio.to_thread(server.stop)


async def _burst(
    url: str,
    tracker: Tracker,
    clients: list[FeedClient],
    population: Population,
    sequence: list[int],
    text_size: int,
    drain_timeout: float,
    *,
    prebuilt: bool,
) -> dict[str, Any]:
    """One burst of posts by these authors, in this order, pushed to every open follower."""
    fan_out = population.sessions_by_author()
    delivered_before, received_before = tracker.delivered, len(tracker.receive_times)
    started = time.monotonic()
    posts = []
    for author in sequence:
        open_sessions = frozenset(s for s in fan_out[author] if clients[s].is_open)
        record = tracker.new_post(author, open_sessions, started)
        record.status = 201
        posts.append(
            {
                "id": record.index + 1,
                "author_id": population.user_id(author),
                "text": tracker.text(record.index, text_size),
            }
        )
    tracker.measuring = True
    response = await AsyncHTTPClient().fetch(
        url,
        method="POST",
        body=json.dumps({"posts": posts, "prebuilt": prebuilt}),
        request_timeout=drain_timeout + 60,
    )
    pushed = json.loads(response.body)
    await _drain(tracker, drain_timeout)
    tracker.measuring = False
    delivered = tracker.delivered - delivered_before
    last = max(tracker.receive_times[received_before:], default=started)
    elapsed = max(last - started, 1e-9)
    lost, _ = tracker.losses({c.index for c in clients if c.is_open})
    return {
        "deliveries": delivered,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(delivered / elapsed, 1),
        "server_write_seconds": round(pushed["seconds"], 3),
        "server_cpu_us_per_write": ratio(pushed["cpu_seconds"] * 1e6, pushed["writes"], 2),
        "lost": lost,
        "duplicated": tracker.duplicated,
        "sessions_ready": sum(1 for c in clients if c.is_open),
    }


async def measure(
    population: Population,
    authors: list[int],
    *,
    text_size: int,
    amqp_url: str,
    pika_messages: int,
    log_path: pathlib.Path,
    concurrency: int,
    ready_timeout: float,
    drain_timeout: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Both ceilings, for these posts to this population's sessions."""
    say("ceiling (a): bare Tornado push server, same sessions and posts...")
    bare = await bare_push_ceiling(
        population,
        authors,
        text_size,
        log_path=log_path,
        concurrency=concurrency,
        ready_timeout=ready_timeout,
        drain_timeout=drain_timeout,
    )
    floor = bare.get("floor", {})
    say(f"  {bare.get('deliveries_per_s')} deliveries/s, {bare.get('server_cpu_us_per_write')} µs")
    say(f"  floor: {floor.get('deliveries_per_s')}/s, {floor.get('server_cpu_us_per_write')} µs")
    say(f"ceiling (b): bare pika, {pika_messages:,} messages...")
    body_size = len(sample_frame(population, text_size))
    prefetch = int(os.environ.get("FEED_PREFETCH", Settings().prefetch))
    pika_result = await pika_ceiling(amqp_url, pika_messages, body_size, prefetch, timeout=60)
    say(f"  {pika_result.get('messages_per_s')} messages/s")
    rates = [r for r in (bare.get("deliveries_per_s"), pika_result.get("messages_per_s")) if r]
    return {"bare_push": bare, "pika": pika_result, "lower_per_s": min(rates, default=None)}


def sample_frame(population: Population, text_size: int) -> bytes:
    """A post frame as the service sends it, to size the pika ceiling's messages alike."""
    post = {
        "id": 123456,
        "author_id": population.user_id(0),
        "author_name": "bench0",
        "text": Tracker().text(0, text_size),
        "created_at": "2025-01-01T00:00:00.000000+00:00",
    }
    return wire.post_frame(post)


# --- bare pika --------------------------------------------------------------------------------


class _Confirms:
    """Publisher confirms with a bounded window of unconfirmed messages."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self._event = asyncio.Event()

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        count = method.delivery_tag - self.confirmed if method.multiple else 1
        self.confirmed += count
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += count
        self._event.set()

    async def room(self, deadline: float) -> None:
        while self.published - self.confirmed >= self.window and time.monotonic() < deadline:
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), max(0.01, deadline - time.monotonic()))


async def pika_ceiling(
    url: str, messages: int, body_size: int, prefetch: int, timeout: float
) -> dict[str, Any]:
    """Messages/s from one publishing AsyncioConnection to one consuming one."""
    publisher = consumer = None
    queue = f"bench.ceiling.{secrets.token_hex(6)}"
    body = b"x" * body_size
    properties = pika.BasicProperties(delivery_mode=1, content_type="application/json")
    received = 0
    done = asyncio.get_running_loop().create_future()
    deadline = time.monotonic() + timeout
    try:
        consumer = await open_connection(url)
        publisher = await open_connection(url)
        consume_channel = await open_channel(consumer)
        await call(consume_channel.basic_qos, prefetch_count=prefetch)
        await call(consume_channel.queue_declare, queue, auto_delete=True, exclusive=True)

        def on_message(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
            nonlocal received
            channel.basic_ack(method.delivery_tag)
            received += 1
            if received >= messages and not done.done():
                done.set_result(time.monotonic())

        await call(consume_channel.basic_consume, queue, on_message)
        publish_channel = await open_channel(publisher)
        confirms = _Confirms(window=1000)
        await call(publish_channel.confirm_delivery, confirms.on_confirm)
        started = time.monotonic()
        for _ in range(messages):
            await confirms.room(deadline)
            publish_channel.basic_publish("", queue, body, properties)
            confirms.published += 1
        finished = await asyncio.wait_for(done, max(0.1, deadline - time.monotonic()))
        elapsed = max(finished - started, 1e-9)
        return {
            "messages": received,
            "seconds": round(elapsed, 3),
            "messages_per_s": round(received / elapsed, 1),
            "body_bytes": body_size,
            "prefetch": prefetch,
            "nacked": confirms.nacked,
        }
    except (asyncio.TimeoutError, ConnectionError) as exc:
        return {"error": str(exc) or type(exc).__name__, "messages": received}
    finally:
        for connection in (publisher, consumer):
            if connection is not None and connection.is_open:
                connection.close()
        await asyncio.sleep(0.1)  # let the close frames go out
