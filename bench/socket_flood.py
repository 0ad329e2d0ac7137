"""Many feed sockets opened at once with one token: how many open, how the rest are refused,
and whether RabbitMQ got a queue for any refused one.

    .venv/bin/python bench/socket_flood.py                 # 1,000 sockets, the default limits
    .venv/bin/python bench/socket_flood.py --sockets 1000 --concurrency 200

Starts the service (run.py on a free port, database feed_bench, default limits), registers
one user, then opens --sockets websockets to its feed with its token, --concurrency handshakes
at a time, and keeps the opened ones open. While they are open it lists RabbitMQ's queues
(`rabbitmqctl list_queues`, run once) and counts those of this user (named <user id>.<random>);
then it closes everything and counts again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench.lib import options
from bench.lib.api import feed_url, new_user
from bench.lib.options import RESULTS_DIR
from bench.lib.processes import run_tool
from bench.lib.service import own_service


async def open_one(url: str, outcomes: Counter, opened: list[WebSocketClientConnection]) -> None:
    try:
        ws = await asyncio.wait_for(websocket_connect(url), 60)
    except HTTPClientError as exc:
        body = json.loads(exc.response.body) if exc.response and exc.response.body else {}
        retry = exc.response.headers.get("Retry-After") if exc.response else None
        outcomes[f"{exc.code} {body.get('error', '?')!r} Retry-After {retry}"] += 1
        return
    while json.loads(await asyncio.wait_for(ws.read_message(), 30))["type"] != "ready":
        pass
    opened.append(ws)
    outcomes["101 ready"] += 1


def user_queues(user_id: int) -> int:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, check=True
    ).stdout.split()
    return sum(name.startswith(f"{user_id}.") for name in listed)


async def measure(base: str, args: argparse.Namespace) -> None:
    user_id, token = await new_user(base)
    url = feed_url(base, user_id, token)
    outcomes: Counter = Counter()
    opened: list[WebSocketClientConnection] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def gated() -> None:
        async with gate:
            await open_one(url, outcomes, opened)

    started = time.monotonic()
    await asyncio.gather(*(gated() for _ in range(args.sockets)))
    took = time.monotonic() - started
    while_open = await asyncio.to_thread(user_queues, user_id)
    print(f"{args.sockets} sockets with one token, {args.concurrency} at a time, in {took:.1f} s:")
    for outcome, count in outcomes.most_common():
        print(f"  {count:>5} {outcome}")
    print(f"RabbitMQ queues of this user while {len(opened)} sockets are open: {while_open}")
    for ws in opened:
        ws.close(1000)
    await asyncio.sleep(2)  # the service drops each closed socket's queue
    print(f"after closing them: {await asyncio.to_thread(user_queues, user_id)}")


async def run(args: argparse.Namespace) -> None:
    log = RESULTS_DIR / "socket_flood.service.log"
    settings = dict(args.service_env)
    async with own_service(args.db_dsn, args.amqp_url, settings, log) as service:
        await measure(service.url, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", type=int, default=1000, help="sockets to open [1000]")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes at once [200]")
    options.service_options(parser)
    run_tool(run(parser.parse_args()), "socket flood")


if __name__ == "__main__":
    main()
