"""Session set-up time for a user who follows many authors, beside the broker's own share.

    .venv/bin/python bench/connect.py                    # 500 and 5,000 followed authors
    .venv/bin/python bench/connect.py --follows 500 --connects 50

For each N it seeds one user following N fresh authors, starts the service, and opens feed
sockets one after another, timing connect -> `ready`. Then, as the baseline, a bare pika client
does what a session asks of RabbitMQ (declare the queue, N no-wait binds, a barrier, consume,
delete) with nothing else around it. The gap between the two is the service's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import secrets
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.websocket import websocket_connect

from bench.ceilings import call, open_channel, open_connection
from bench.feedclient import summarize
from bench.population import Population, seed_database
from bench.processes import ManagedProcess, free_port, wait_ready
from feed_app.auth import issue_token
from feed_app.config import Settings

REPO = pathlib.Path(__file__).resolve().parent.parent


async def time_service(
    url: str, user_id: int, secret: str, connects: int, gap: float
) -> list[float]:
    token = issue_token(user_id, secret, 600)
    ws_url = url.replace("http", "ws", 1) + f"/post/feed/{user_id}?token={token}"
    times = []
    for _ in range(connects):
        started = time.perf_counter()
        ws = await websocket_connect(ws_url)
        while json.loads(await asyncio.wait_for(ws.read_message(), 30))["type"] != "ready":
            pass
        times.append(time.perf_counter() - started)
        ws.close()
        # Dropping the closed session's queue costs the broker about as much as binding it did:
        # let that finish, so that each set-up is timed on its own.
        await asyncio.sleep(gap)
    return times


async def time_broker(amqp_url: str, follows: int, connects: int) -> list[float]:
    connection = await open_connection(amqp_url)
    channel = await open_channel(connection)
    times = []
    for _ in range(connects):
        queue = f"bench.connect.{secrets.token_hex(4)}"
        started = time.perf_counter()
        await call(channel.queue_declare, queue, exclusive=True, auto_delete=True)
        for author in range(follows):
            channel.queue_bind(queue, "amq.direct", f"bench.{author}")
        await call(channel.queue_declare, queue, passive=True)
        await call(channel.basic_consume, queue, lambda *_: None)
        times.append(time.perf_counter() - started)
        await call(channel.queue_delete, queue)
    connection.close()
    return times


async def measure(args: argparse.Namespace, follows: int) -> dict:
    population = Population(
        follows=[list(range(1, follows + 1))] + [[]] * follows, session_users=[0]
    )
    await asyncio.to_thread(seed_database, args.db_dsn, population, truncate=True)
    secret, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "FEED_DB_DSN": args.db_dsn, "FEED_AMQP_URL": args.amqp_url}
    env["FEED_JWT_SECRET"] = secret
    log = REPO / "bench" / "results" / f"connect-{follows}.service.log"
    argv = [sys.executable, str(REPO / "run.py"), "--port", str(port)]
    service = ManagedProcess("the service", argv, log, env=env, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, 60, service)
        service_times = await time_service(
            url, population.user_id(0), secret, args.connects, args.gap
        )
    finally:
        service.stop()
    broker_times = await time_broker(args.amqp_url, follows, args.connects)
    return {
        "follows": follows,
        "service": summarize(service_times),
        "broker": summarize(broker_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--follows", type=int, action="append", help="N (repeatable) [500, 5000]")
    parser.add_argument("--connects", type=int, default=30, help="sessions opened per N [30]")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between sessions [1]")
    parser.add_argument("--db-dsn", default="postgresql://127.0.0.1:5432/feed_bench")
    parser.add_argument("--amqp-url", default=os.environ.get("FEED_AMQP_URL", Settings.amqp_url))
    args = parser.parse_args()
    header = ("follows", "", "p50", "p95", "p99", "max")
    print(" ".join(f"{h:>8}" for h in header), f" (ms, {args.connects} sessions each)")
    for follows in args.follows or [500, 5000]:
        result = asyncio.run(measure(args, follows))
        for who in ("service", "broker"):
            figures = [result[who][k] for k in ("p50", "p95", "p99", "max")]
            print(f"{follows:>8} {who:>8}", " ".join(f"{f:>8.1f}" for f in figures))


if __name__ == "__main__":
    main()
