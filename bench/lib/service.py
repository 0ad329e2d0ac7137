"""The service under test: run.py started here (start_service, own_service), or instances already
running (attach); either way a Target that says where to connect and which processes to read."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import pathlib
import secrets
import sys
from collections.abc import AsyncIterator, Collection, Sequence

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from bench.lib.population import random_id_floor
from bench.lib.processes import REPO, ManagedProcess, wait_ready
from bench.lib.procstats import descendants
from deploy.processes import free_port
from feed_app.auth import issue_token
from feed_app.config import DEV_JWT_SECRET

TOKEN_TTL = 24 * 3600
# A service started to be measured measures delivery, not its limits: a popular author posts many
# times a second and one process holds 10,000 sockets. Instances given with --url need the same.
UNLIMITED = {
    "FEED_POST_RATE": "1000000/second",
    "FEED_FOLLOW_RATE": "1000000/second",
    "FEED_SOCKETS_PER_USER": "1000000",
    "FEED_SOCKETS_MAX": "1000000",
}


@dataclasses.dataclass
class Target:
    """Where the service runs, how to sign in to it, and how to read its processes."""

    urls: list[str]
    jwt_secret: str
    process: ManagedProcess | None = None
    pid_roots: list[int] = dataclasses.field(default_factory=list)
    # Signing a token per socket would cost the client more than the socket: one per user.
    _tokens: dict[int, str] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return self.urls[0]

    def pids(self) -> list[int]:
        if self.process is not None:
            return self.process.pids()
        return [pid for root in self.pid_roots for pid in descendants(root)]

    @property
    def pids_known(self) -> bool:
        return bool(self.process or self.pid_roots)

    def token(self, user_id: int) -> str:
        if user_id not in self._tokens:
            self._tokens[user_id] = issue_token(user_id, self.jwt_secret, TOKEN_TTL)
        return self._tokens[user_id]

    def feed_url(self, user_id: int, index: int = 0) -> str:
        """The feed socket of a user, on the instance `index` picks round-robin."""
        base = self.urls[index % len(self.urls)].replace("http", "ws", 1)
        return f"{base}/post/feed/{user_id}?token={self.token(user_id)}"


async def read_metrics(url: str, names: Collection[str]) -> dict[str, float] | None:
    """These metrics (unlabelled) from an instance's /metrics; None if it did not answer."""
    try:
        response = await AsyncHTTPClient().fetch(f"{url}/metrics", request_timeout=5)
    except (HTTPClientError, OSError):
        return None
    values = {}
    for line in response.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return values


async def read_histogram(url: str, name: str) -> dict[float, float] | None:
    """A histogram's cumulative bucket counts from an instance's /metrics, by upper bound in
    seconds (inf for +Inf); None if it did not answer."""
    try:
        response = await AsyncHTTPClient().fetch(f"{url}/metrics", request_timeout=5)
    except (HTTPClientError, OSError):
        return None
    buckets = {}
    prefix = f'{name}_bucket{{le="'
    for line in response.body.decode().splitlines():
        if line.startswith(prefix):
            bound, _, value = line[len(prefix) :].partition('"} ')
            buckets[float(bound)] = float(value)
    return buckets


def histogram_percentiles(
    before: dict[float, float], after: dict[float, float], quantiles: Sequence[float]
) -> dict[str, float | None]:
    """Percentiles (ms) of what a histogram counted between two readings, interpolated linearly
    inside a bucket as Prometheus's histogram_quantile does (so only as fine as its buckets);
    None for one in the +Inf bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    found: dict[str, float | None] = {"count": counts[-1] if counts else 0}
    for q in quantiles:
        rank, lower, below, value = q * found["count"], 0.0, 0.0, None
        for bound, cumulative in zip(bounds, counts, strict=True):
            if cumulative >= rank > 0:
                if bound != float("inf"):
                    inside = (rank - below) / (cumulative - below)
                    value = round((lower + (bound - lower) * inside) * 1000, 2)
                break
            lower, below = bound, cumulative
        found[f"p{q * 100:g}"] = value
    return found


async def attach(args: argparse.Namespace) -> Target:
    """The instances given with --url (options.running_service_options), once they are ready."""
    secret = args.jwt_secret or os.environ.get("FEED_JWT_SECRET") or DEV_JWT_SECRET
    roots = [int(p) for p in args.service_pids.split(",") if p.strip()]
    urls = [url.rstrip("/") for url in args.url]
    for url in urls:
        await wait_ready(url, 10)
    return Target(urls, secret, pid_roots=roots)


async def start_service(
    db_dsn: str,
    amqp_url: str,
    settings: dict[str, str],
    log_path: pathlib.Path,
    args: Sequence[str] = (),
    run_py: pathlib.Path = REPO / "run.py",
) -> Target:
    """run.py on a free port of 127.0.0.1 with a random JWT secret and these FEED_* settings
    (none from this environment) and run.py arguments; returns once it is ready. `run_py` may be
    another checkout's, to measure two versions of the service with the same client; it runs in
    its own directory."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
    env.update(FEED_DB_DSN=db_dsn, FEED_AMQP_URL=amqp_url, FEED_JWT_SECRET=secrets.token_hex(32))
    env.update(settings)
    argv = [sys.executable, str(run_py), "--host", "127.0.0.1", "--port", str(port)]
    service = ManagedProcess("the service", [*argv, *args], log_path, env=env, cwd=run_py.parent)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(url, 60, service)
    return Target([url], env["FEED_JWT_SECRET"], process=service)


@contextlib.asynccontextmanager
async def own_service(
    db_dsn: str, amqp_url: str, settings: dict[str, str], log_path: pathlib.Path
) -> AsyncIterator[Target]:
    """start_service, with its users' ids from a random block above 10^12 as in the load test
    (posts are routed by author id on a broker others share); stops it after."""
    service = await start_service(db_dsn, amqp_url, settings, log_path)
    try:
        await asyncio.to_thread(_ids_from_a_random_block, db_dsn)
        yield service
    finally:
        service.process.stop()


def _ids_from_a_random_block(dsn: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        first = random_id_floor()
        cur.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (first,))
    conn.close()
