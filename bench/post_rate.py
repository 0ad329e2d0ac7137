"""Posts per second the service commits, against concurrent posters, with 1 to N instances.

    .venv/bin/python bench/post_rate.py --instances 1 2 3 --posters 1 8 32
    .venv/bin/python bench/post_rate.py --run-py /other/checkout/run.py ...   # another version

For each instance count it starts that many run.py processes on one fresh database (limits
raised: this measures the write path, not the limits), then for each poster count runs that many
concurrent clients, each posting as a user of its own, one POST /post/create after another,
spread over the instances in turn, for --duration seconds after a warm-up. It prints posts/s, the
latency of a POST (p50, p99), and the CPU each post cost the service, PostgreSQL and RabbitMQ.
Every post is committed (201) or counted as an error. Each poster keeps its connection alive
(curl_httpclient), as a browser does; --client new-connections opens one per POST (Tornado's
simple client), which adds the service's accept and close to every post. --post-via socket posts as
post messages on a feed socket of the poster's own instead (docs/websocket.md): that socket also
gets each post back (a user's posts are in their own feed), so compare it with --post-via http
--own-sockets 1, which does the same receiving and writing.

By default nothing but the posts is measured: no feed socket is open, so delivery costs nothing.
With --own-sockets K each poster holds K feed sockets open as itself, so that the service also
receives each post back from the broker and writes it K times, and --rate paces each poster:
K = 0, 1 and 33 at one rate separate creating, receiving and writing a post. Several rates
(--rate 8 64 0) run one after another on the same instances: what a post costs against how
quiet the process is (BENCHMARKS.md, "Why a quiet post costs twice a busy one"). The
instances, PostgreSQL, RabbitMQ and this client share the machine's cores. PostgreSQL's CPU is
that of the backends serving this run's database plus the server's WAL writer, checkpointer and
background writer (shared with anything else writing on the server); RabbitMQ's is its whole
node (shared likewise): run it on a quiet machine for those two columns.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
import secrets
import statistics
import sys
import time
from collections.abc import Callable

import psycopg2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from bench.lib import options
from bench.lib.feedclient import FeedClient, Tracker
from bench.lib.options import RESULTS_DIR, SERVER_DSN
from bench.lib.processes import REPO, ManagedProcess, run_tool, wait_ready
from bench.lib.procstats import CpuMeter, broker_pid
from bench.lib.service import UNLIMITED
from deploy.processes import free_port
from feed_app.auth import issue_token
from feed_app.db import drop_database


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--posters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[0],
        help="posts/s of each poster, one run per rate [0: one after another]",
    )
    parser.add_argument(
        "--own-sockets",
        type=int,
        default=0,
        help="feed sockets each poster holds open as itself: its every post is then received "
        "back from the broker and written to them (what receiving and writing a post cost) [0]",
    )
    service = options.service_options(parser, database=False)
    service.add_argument("--run-py", default=str(REPO / "run.py"), help="the service to start")
    parser.add_argument(
        "--post-via",
        choices=["http", "socket"],
        default="http",
        help="post with POST /post/create, or as post messages on a feed socket of the poster's "
        "own (docs/websocket.md), one answered before the next [http]",
    )
    parser.add_argument(
        "--client",
        choices=["keep-alive", "new-connections"],
        default="keep-alive",
        help="keep-alive (curl_httpclient, as browsers and HAProxy do) or a new TCP connection "
        "per POST (Tornado's simple client): the difference is the accept/close cost",
    )
    return parser.parse_args()


class Instances:
    """N run.py processes on one database of their own, dropped at the end."""

    def __init__(self, count: int, args: argparse.Namespace) -> None:
        self.database = f"feed_post_rate_{secrets.token_hex(3)}"
        self.dsn = f"{SERVER_DSN}/{self.database}"
        self.secret = secrets.token_hex(32)
        self.urls: list[str] = []
        self.processes: list[ManagedProcess] = []
        self.count, self.args = count, args

    async def __aenter__(self) -> Instances:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
        env.update(UNLIMITED, FEED_DB_DSN=self.dsn, FEED_AMQP_URL=self.args.amqp_url)
        env.update(FEED_JWT_SECRET=self.secret, FEED_DB_POOL_SIZE="20")
        env.update(self.args.service_env)
        for n in range(self.count):
            port = free_port()
            log = RESULTS_DIR / f"post-rate-{self.database}-{n}.log"
            argv = [sys.executable, self.args.run_py, "--port", str(port)]
            cwd = pathlib.Path(self.args.run_py).parent
            self.processes.append(ManagedProcess(f"instance {n}", argv, log, env=env, cwd=cwd))
            self.urls.append(f"http://127.0.0.1:{port}")
            # One after the other: the first creates the database and applies the schema.
            await wait_ready(self.urls[-1], 60, self.processes[-1])
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for process in self.processes:
            process.stop()
        drop_database(self.dsn)

    def pids(self) -> list[int]:
        return [pid for process in self.processes for pid in process.pids()]

    def postgres_pids(self) -> list[int]:
        """The backends serving this database, and the server's own writers (see the top)."""
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "OR backend_type IN ('walwriter', 'checkpointer', 'background writer')"
            )
            pids = [pid for (pid,) in cur.fetchall()]
        conn.close()
        return pids

    def users(self, count: int) -> list[tuple[int, str]]:
        """Ids and tokens of `count` new users (made in the database: registering is not
        measured)."""
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO users (name, password_hash) "
                "SELECT 'poster ' || n, 'none' FROM generate_series(1, %s) n RETURNING id",
                (count,),
            )
            ids = [user_id for (user_id,) in cur.fetchall()]
        conn.close()
        return [(user_id, issue_token(user_id, self.secret, 3600)) for user_id in ids]


async def post_for(
    next_url: Callable[[], str],
    user: tuple[int, str],
    until: float,
    warm_until: float,
    into: list,
    rate: float,
    args: argparse.Namespace,
) -> int:
    """Post until `until`, one after another or at --rate, over HTTP or the user's own feed
    socket (--post-via); latencies after `warm_until` go into `into`. Returns the errors."""
    send = await (socket_poster if args.post_via == "socket" else http_poster)(next_url, *user)
    errors, n, first = 0, 0, time.monotonic()
    while (started := time.monotonic()) < until:
        if rate:
            await asyncio.sleep(max(0.0, first + n / rate - started))
            started = time.monotonic()
        n += 1
        if not await send(f"post {n}"):
            errors += 1
        elif started >= warm_until:
            into.append(time.monotonic() - started)
    return errors


async def http_poster(next_url: Callable[[], str], _user_id: int, token: str) -> Callable:
    """POST /post/create, spread over the instances in turn."""
    client = AsyncHTTPClient()

    async def send(text: str) -> bool:
        request = HTTPRequest(
            next_url() + "/post/create",
            "POST",
            headers={"Authorization": f"Bearer {token}"},
            body=json.dumps({"text": text}),
            request_timeout=30,
        )
        try:
            await client.fetch(request)
        except (HTTPClientError, OSError):
            return False
        return True

    return send


async def socket_poster(next_url: Callable[[], str], user_id: int, token: str) -> Callable:
    """Post messages on a feed socket of the user's own (the load test's FeedClient), each
    answered before the next."""
    url = f"{next_url().replace('http', 'ws', 1)}/post/feed/{user_id}?token={token}"
    client = FeedClient(0, url, Tracker())
    if not await client.open(timeout=10):
        raise ConnectionError(f"the feed socket of user {user_id} did not open")

    async def send(text: str) -> bool:
        return (await client.post(text, timeout=30))["type"] == "posted"

    return send


async def open_own_sockets(url: str, user_id: int, token: str, count: int, frames: list) -> list:
    """`count` feed sockets of the user, each with the task that reads it to the end; frames
    counts what they got."""
    sockets = []
    for _ in range(count):
        ws_url = f"{url.replace('http', 'ws', 1)}/post/feed/{user_id}?token={token}"
        socket = await tornado.websocket.websocket_connect(ws_url)
        await socket.read_message()  # "ready"
        sockets.append((socket, asyncio.ensure_future(read_all(socket, frames))))
    return sockets


async def read_all(socket, frames: list) -> None:
    while await socket.read_message() is not None:
        frames[0] += 1


async def measure(
    instances: Instances, posters: int, rate: float, args: argparse.Namespace
) -> dict:
    duration, warmup = args.duration, args.warmup
    users = instances.users(posters)
    frames = [0]
    sockets = [
        socket
        for n, (user_id, token) in enumerate(users)
        for socket in await open_own_sockets(
            instances.urls[n % len(instances.urls)], user_id, token, args.own_sockets, frames
        )
    ]
    now = time.monotonic()
    latencies: list[float] = []
    urls = itertools.cycle(instances.urls)

    def next_url() -> str:
        return next(urls)

    end, warm = now + warmup + duration, now + warmup
    posting = asyncio.gather(
        *(post_for(next_url, u, end, warm, latencies, rate, args) for u in users)
    )
    broker = await broker_pid()
    await asyncio.sleep(now + warmup - time.monotonic())
    # After the warm-up: the pools have opened the connections the posting needs.
    postgres = instances.postgres_pids()
    meters = {
        "service": CpuMeter(instances.pids),
        "postgres": CpuMeter(lambda: postgres),
        "rabbitmq": CpuMeter(lambda: [broker] if broker else []),
    }
    for meter in meters.values():
        meter.start()
    frames_before = frames[0]
    errors = await posting
    latencies.sort()
    cpu_ms = {name: 1000 * meter.stop() / max(len(latencies), 1) for name, meter in meters.items()}
    for socket, reader in sockets:
        socket.close()
        await reader
    return {
        "frames_per_post": round((frames[0] - frames_before) / max(len(latencies), 1), 1),
        "instances": instances.count,
        "posters": posters,
        "posts_per_s": round(len(latencies) / duration),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)
        if latencies
        else None,
        "errors": sum(errors),
        **{f"{name}_cpu_ms_per_post": round(ms, 3) for name, ms in cpu_ms.items()},
    }


async def measure_all(args: argparse.Namespace) -> None:
    client = "tornado.curl_httpclient.CurlAsyncHTTPClient" if args.client == "keep-alive" else None
    AsyncHTTPClient.configure(client, max_clients=max(args.posters) * 2)
    print(
        f"{'instances':>9} {'posters':>7} {'posts/s':>8} {'p50 ms':>7} {'p99 ms':>7} errors"
        "   CPU ms per post: service postgres rabbitmq   frames/post"
    )
    for count in args.instances:
        async with Instances(count, args) as instances:
            for posters, rate in itertools.product(args.posters, args.rate):
                row = await measure(instances, posters, rate, args)
                print(
                    f"{row['instances']:>9} {row['posters']:>7} {row['posts_per_s']:>8} "
                    f"{row['p50_ms']:>7} {row['p99_ms']:>7} {row['errors']:>6} "
                    f"{row['service_cpu_ms_per_post']:>25} {row['postgres_cpu_ms_per_post']:>8} "
                    f"{row['rabbitmq_cpu_ms_per_post']:>8}   {row['frames_per_post']}",
                    flush=True,
                )


def main() -> None:
    run_tool(measure_all(parse_args()), "post rate")


if __name__ == "__main__":
    main()
