"""Load test of the live feed: websocket sessions, posts at a fixed rate, each delivery checked.

    .venv/bin/python bench/loadtest.py               # default run, under a minute
    .venv/bin/python bench/loadtest.py --smoke       # tiny run, fails on lost/duplicated posts
    .venv/bin/python bench/loadtest.py --users 10000 --sessions 11000 --rate 20 --duration 20

What a run does, in order:
 1. starts the service (run.py --workers W) on a free port against a dedicated database
    (feed_bench by default, created by run.py) and waits for /readyz; or, with --url, uses
    instances that are already running;
 2. seeds U users and a Zipf-shaped follow graph with COPY (one shared password hash) into a fresh
    id range, so the run's users have no posts and no history pollutes the measurement;
 3. opens S websocket sessions with self-minted tokens and waits for `ready` on each;
 4. posts R posts/s for T seconds (POST /post/create) with tagged texts, and records for every
    post which open sessions must receive it, then which did, when, and how often;
 5. drains for a few seconds, then reports latency, throughput, LOST and DUPLICATED deliveries,
    errors, and service/RabbitMQ CPU and memory;
 6. with --ceilings, measures a bare Tornado push server and a bare pika consumer the same way;
 7. prints a table and writes a results JSON and a PNG chart (bench/results/ by default).

The exit status is 1 when a delivery was lost or duplicated, or nothing was delivered at all;
2 when the run could not be carried out (the service did not start, ...); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import re
import resource
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

# Run as a script, only bench/ is on sys.path: add the repository so feed_app and bench import.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from bench import ceilings, report
from bench.feedclient import FeedClient, PostRecord, Tracker, open_clients, summarize
from bench.population import build_population, choose_authors, seed_database
from bench.processes import ManagedProcess, free_port, scan_log, stop_all, wait_ready
from bench.procstats import (
    CpuMeter,
    descendants,
    processes_named,
    rabbitmq_snapshot,
    rss_bytes,
)
from feed_app.auth import issue_token
from feed_app.config import DEV_JWT_SECRET, Settings, redact_url

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_DSN = "postgresql://127.0.0.1:5432/feed_bench"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
TOKEN_TTL = 24 * 3600
HTTP_MAX_CLIENTS = 200
MAX_POSTS_IN_FLIGHT = 500
# The service this script starts measures delivery, not its limits: a popular author posts many
# times a second and one process holds 10,000 sockets. Instances given with --url need the same.
UNLIMITED = {
    "FEED_POST_RATE": "1000000/second",
    "FEED_FOLLOW_RATE": "1000000/second",
    "FEED_SOCKETS_PER_USER": "1000000",
    "FEED_SOCKETS_MAX": "1000000",
}

# Values used when an option is not given: a full run, and --smoke.
FULL = {"users": 2000, "sessions": 2500, "follows": 20, "rate": 50.0, "duration": 10.0}
SMOKE = {"users": 50, "sessions": 60, "follows": 5, "rate": 20.0, "duration": 5.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    shape = parser.add_argument_group("population and load")
    shape.add_argument("--users", type=int, help=f"users U [{FULL['users']}; smoke 50]")
    shape.add_argument(
        "--follows", type=int, help=f"authors each user follows F [{FULL['follows']}; smoke 5]"
    )
    shape.add_argument(
        "--sessions", type=int, help=f"websocket sessions S [{FULL['sessions']}; smoke 60]"
    )
    shape.add_argument("--rate", type=float, help=f"posts per second R [{FULL['rate']:g}; 20]")
    shape.add_argument(
        "--duration", type=float, help=f"seconds of posting T [{FULL['duration']:g}; 5]"
    )
    shape.add_argument(
        "--zipf", type=float, default=1.0, help="exponent s of author popularity 1/rank^s [1.0]"
    )
    shape.add_argument(
        "--author-choice",
        choices=["uniform", "followers"],
        default="uniform",
        help="who posts: every user equally (uniform), or in proportion to follower count"
        " (followers: mostly the popular authors, so a far larger fan-out) [uniform]",
    )
    shape.add_argument("--text-size", type=int, default=140, help="characters per post [140]")
    shape.add_argument("--seed", type=int, default=1, help="random seed of the population [1]")

    target = parser.add_argument_group("service under test")
    target.add_argument("--workers", type=int, default=1, help="run.py --workers [1]")
    target.add_argument(
        "--db-dsn",
        default=os.environ.get("FEED_BENCH_DB_DSN", DEFAULT_DSN),
        help=f"bench database (FEED_BENCH_DB_DSN) [{DEFAULT_DSN}]",
    )
    target.add_argument(
        "--amqp-url",
        default=os.environ.get("FEED_AMQP_URL", DEFAULT_AMQP),
        help="RabbitMQ URL for the spawned service and the pika ceiling (FEED_AMQP_URL)",
    )
    target.add_argument(
        "--url",
        action="append",
        default=[],
        help="test an already running instance (repeatable; sessions and posts are spread"
        " round-robin); --db-dsn must then name its database",
    )
    target.add_argument(
        "--service-pids",
        default="",
        help="with --url: comma-separated pids of the instances (children are included),"
        " for their CPU and memory",
    )
    target.add_argument(
        "--jwt-secret",
        default=None,
        help="with --url: the instances' FEED_JWT_SECRET (default: $FEED_JWT_SECRET, else the"
        " dev secret); a spawned service gets a random one",
    )
    target.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="empty users/follows/posts/outbox first (only for a database whose name contains"
        " 'bench') [on when the service is spawned, off with --url]",
    )

    run = parser.add_argument_group("run")
    add = run.add_argument
    add("--smoke", action="store_true", help="small quick run: no ceilings, no chart")
    add("--ceilings", action=argparse.BooleanOptionalAction, default=None, help="[on; smoke off]")
    add("--pika-messages", type=int, default=20000, help="messages of the pika ceiling [20000]")
    add("--connect-concurrency", type=int, default=100, help="handshakes in flight [100]")
    add(
        "--ready-timeout",
        type=float,
        help="seconds for all sessions to be ready [60, or sessions/100 if more]",
    )
    add("--drain", type=float, default=5.0, help="seconds to wait for late deliveries [5]")
    add("--json", type=pathlib.Path, help="results file [bench/results/<time>.json]")
    add("--chart", type=pathlib.Path, help="chart file [bench/results/<time>.png]")
    add("--no-chart", action="store_true", help="do not draw the chart")
    add("--quiet", action="store_true", help="no progress lines")

    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ceilings is None:
        args.ceilings = not args.smoke
    if args.ready_timeout is None:  # session set-up runs at ~100-300/s on this 2-core machine
        args.ready_timeout = max(60.0, args.sessions / 100)
    if args.truncate is None:
        args.truncate = not args.url
    args.no_chart = args.no_chart or (args.smoke and args.chart is None)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.json = args.json or RESULTS_DIR / f"{stamp}.json"
    args.chart = args.chart or args.json.with_suffix(".png")
    if args.users < 2 or args.sessions < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("need --users >= 2, --sessions >= 1, --rate > 0 and --duration > 0")
    return args


def raise_fd_limit() -> None:
    """Every session is a socket here and in the service (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def configure_http_client() -> str:
    """curl_httpclient (keep-alive, faster) when pycurl is installed, else the simple client."""
    try:
        import pycurl  # noqa: F401

        AsyncHTTPClient.configure(
            "tornado.curl_httpclient.CurlAsyncHTTPClient", max_clients=HTTP_MAX_CLIENTS
        )
        return "curl"
    except ImportError:
        AsyncHTTPClient.configure(None, max_clients=HTTP_MAX_CLIENTS)
        return "simple"


@dataclasses.dataclass
class Target:
    """Where the service runs, and how to read its processes."""

    urls: list[str]
    jwt_secret: str
    process: ManagedProcess | None = None
    pid_roots: list[int] = dataclasses.field(default_factory=list)

    def pids(self) -> list[int]:
        if self.process is not None:
            return self.process.pids()
        return [pid for root in self.pid_roots for pid in descendants(root)]

    def websocket_url(self, index: int, user_id: int, token: str) -> str:
        base = self.urls[index % len(self.urls)].replace("http", "ws", 1)
        return f"{base}/post/feed/{user_id}?token={token}"


@dataclasses.dataclass
class Readings:
    """What the phases measured besides the tracker's counts, filled in as the run goes."""

    memory_before: dict[str, int] = dataclasses.field(default_factory=dict)  # RSS, no sessions
    memory_sessions: dict[str, int] = dataclasses.field(default_factory=dict)  # all sessions
    session_cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # opening them
    rabbitmq: dict[str, Any] = dataclasses.field(default_factory=dict)  # CLI snapshot
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)  # posting + drain
    service_metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)


class LoadTest:
    """One run: start, seed, connect, post, drain, measure, tear down."""

    def __init__(self, args: argparse.Namespace, http_client: str) -> None:
        self.args = args
        self.http_client = http_client  # which AsyncHTTPClient implementation posts
        self.population, rng = build_population(
            args.users, args.follows, args.sessions, args.zipf, args.seed
        )
        posts = max(1, round(args.rate * args.duration))
        self.authors = choose_authors(self.population, posts, args.author_choice, rng)
        self.fan_out = self.population.sessions_by_author()
        self.tracker = Tracker()
        self.clients: list[FeedClient] = []
        self.target: Target | None = None
        self.tokens: dict[int, str] = {}
        self.results: dict[str, Any] = {}
        self.log_path = args.json.with_suffix(".service.log")
        self.seed_seconds = self.sessions_seconds = 0.0
        self.post_start = time.monotonic()
        self.open_at_end: set[int] = set()  # sessions still open when the drain ended
        self.readings = Readings()
        self.started_at = datetime.datetime.now().isoformat(timespec="seconds")

    def say(self, text: str) -> None:
        print(text, flush=True)

    # --- phases --------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        readings = self.readings
        try:
            self.target = await self.start_target()
            await self.seed()
            readings.memory_before = self.snapshot_memory()
            readings.session_cpu = await self.open_sessions()
            readings.rabbitmq = await rabbitmq_snapshot(self.population.user_ids())
            readings.memory_sessions = self.snapshot_memory()
            readings.measured = await self.post_and_drain()
            readings.service_metrics = await self.service_metrics()
        finally:
            self.tracker.measuring = False
            for client in self.clients:
                client.close()
            if self.target and self.target.process:
                self.say("stopping the service")
                await asyncio.to_thread(self.target.process.stop)
        self.results = self.collect()
        if self.args.ceilings:
            self.results["ceilings"] = await self.measure_ceilings()
        return self.results

    @property
    def service_pids_known(self) -> bool:
        return bool(self.target and (self.target.process or self.target.pid_roots))

    async def start_target(self) -> Target:
        args = self.args
        if args.url:
            secret = args.jwt_secret or os.environ.get("FEED_JWT_SECRET") or DEV_JWT_SECRET
            roots = [int(p) for p in args.service_pids.split(",") if p.strip()]
            for url in args.url:
                await wait_ready(url.rstrip("/"), 10)
            return Target([u.rstrip("/") for u in args.url], secret, pid_roots=roots)
        port = free_port()
        secret = secrets.token_hex(32)
        env = {
            **os.environ,
            "FEED_DB_DSN": args.db_dsn,
            "FEED_AMQP_URL": args.amqp_url,
            "FEED_JWT_SECRET": secret,
            **UNLIMITED,
        }
        argv = [sys.executable, str(REPO / "run.py"), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(args.workers)]
        self.say(f"starting the service: run.py --port {port} --workers {args.workers}")
        process = ManagedProcess("the service", argv, self.log_path, env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, 60, process)
        return Target([url], secret, process=process)

    async def seed(self) -> None:
        started = time.monotonic()
        base = await asyncio.to_thread(
            seed_database, self.args.db_dsn, self.population, truncate=self.args.truncate
        )
        self.seed_seconds = time.monotonic() - started
        summary = self.population.summary()
        self.say(
            f"seeded {summary['users']:,} users (ids {base}..) and {summary['follows']:,}"
            f" follows in {self.seed_seconds:.2f} s; top author has"
            f" {summary['top_author_followers']:,} followers"
        )

    def token(self, user_index: int) -> str:
        if user_index not in self.tokens:
            user_id = self.population.user_id(user_index)
            self.tokens[user_index] = issue_token(user_id, self.target.jwt_secret, TOKEN_TTL)
        return self.tokens[user_index]

    async def open_sessions(self) -> dict[str, float]:
        """Open every session; returns the CPU seconds the service and broker spent on it."""
        args, pop = self.args, self.population
        self.clients = [
            FeedClient(i, self.target.websocket_url(i, pop.user_id(u), self.token(u)), self.tracker)
            for i, u in enumerate(pop.session_users)
        ]
        self.say(f"opening {len(self.clients):,} sessions...")
        meters = {
            "service": CpuMeter(self.target.pids),
            "rabbitmq": CpuMeter(lambda: processes_named("beam.smp")),
        }
        for meter in meters.values():
            meter.start()
        started = time.monotonic()
        opening = open_clients(
            self.clients, args.connect_concurrency, args.ready_timeout, started + args.ready_timeout
        )
        await self.while_reporting(opening, self.connect_progress)
        ready = sum(1 for c in self.clients if c.is_open)
        self.sessions_seconds = time.monotonic() - started
        cpu = {name: meter.stop() for name, meter in meters.items()}
        self.say(
            f"{ready:,} of {len(self.clients):,} sessions ready in {self.sessions_seconds:.1f} s"
        )
        return cpu

    async def post_and_drain(self) -> dict[str, Any]:
        """The measured phase: CPU meters run from the first post to the end of the drain."""
        service_cpu = CpuMeter(self.target.pids)
        broker_cpu = CpuMeter(lambda: processes_named("beam.smp"))
        client_cpu = CpuMeter(lambda: [os.getpid()])
        for meter in (service_cpu, broker_cpu, client_cpu):
            meter.start()
        self.tracker.measuring = True
        self.post_start = time.monotonic()
        await self.while_reporting(self.post_at_rate(), self.post_progress)
        posted_until = time.monotonic()
        await self.while_reporting(self.drain(), self.post_progress)
        drained = time.monotonic()
        self.open_at_end = {c.index for c in self.clients if c.is_open}
        for meter in (service_cpu, broker_cpu, client_cpu):
            meter.stop()
        self.tracker.measuring = False
        return {
            "posting_seconds": posted_until - self.post_start,
            "measured_seconds": drained - self.post_start,
            "drain_seconds": drained - posted_until,
            "service_cpu": service_cpu.seconds,
            "rabbitmq_cpu": broker_cpu.seconds,
            "client_cpu": client_cpu.seconds,
            "rss_end": rss_bytes(self.target.pids()),
        }

    async def post_at_rate(self) -> None:
        """Post i is sent at start + i/R. If the service answers too slowly and too many requests
        are in flight, sending waits (the achieved rate then shows it) rather than piling up;
        sending stops at T + 10 s whatever happened."""
        args = self.args
        http = AsyncHTTPClient()
        in_flight: set[asyncio.Task] = set()
        deadline = self.post_start + args.duration + 10
        for i, author in enumerate(self.authors):
            delay = self.post_start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(in_flight) >= MAX_POSTS_IN_FLIGHT and time.monotonic() < deadline:
                await asyncio.wait(in_flight, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() >= deadline:
                break
            task = asyncio.ensure_future(self.post_one(http, i, author))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=max(0.1, deadline - time.monotonic()))

    async def post_one(self, http: AsyncHTTPClient, number: int, author: int) -> None:
        expected = frozenset(s for s in self.fan_out[author] if self.clients[s].is_open)
        record: PostRecord = self.tracker.new_post(author, expected, time.monotonic())
        url = self.target.urls[number % len(self.target.urls)] + "/post/create"
        body = json.dumps({"text": self.tracker.text(record.index, self.args.text_size)})
        headers = {"Authorization": f"Bearer {self.token(author)}"}
        status, error = 599, None
        try:
            response = await http.fetch(
                url, method="POST", body=body, headers=headers, request_timeout=10
            )
            status = response.code
            record.post_id = _post_id(response.body)
        except HTTPClientError as exc:
            status = exc.code
            error = f"HTTP {exc.code}" if exc.code != 599 else f"HTTP 599 {exc.message}"
        except OSError as exc:
            error = type(exc).__name__
        self.tracker.on_http_result(record, status, error)

    async def drain(self) -> None:
        """Wait for every expected delivery (or the drain timeout) after the last answer."""
        deadline = time.monotonic() + self.args.drain
        while self.tracker.outstanding() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def service_metrics(self) -> list[dict[str, float]]:
        """The service's own counters (one process per URL answers), to compare with ours."""
        wanted = (
            "feed_deliveries_total",
            "feed_publishes_total",
            "feed_slow_client_closes_total",
            "feed_broker_reconnects_total",
            "feed_open_sessions",
            "feed_outbox_backlog",
        )
        found = []
        for url in self.target.urls:
            try:
                response = await AsyncHTTPClient().fetch(f"{url}/metrics", request_timeout=5)
            except (HTTPClientError, OSError):
                continue
            values = {}
            for line in response.body.decode().splitlines():
                name, _, value = line.partition(" ")
                if name in wanted:
                    values[name] = float(value)
            found.append(values)
        return found

    async def measure_ceilings(self) -> dict[str, Any]:
        args = self.args
        self.say("ceiling (a): bare Tornado push server, same sessions and posts...")
        bare = await ceilings.bare_push_ceiling(
            self.population,
            self.authors,
            args.text_size,
            log_path=args.json.with_suffix(".bare.log"),
            concurrency=args.connect_concurrency,
            ready_timeout=args.ready_timeout,
            drain_timeout=max(args.drain, 10),
        )
        self.say(f"  {bare.get('deliveries_per_s')} deliveries/s")
        self.say(f"ceiling (b): bare pika, {args.pika_messages:,} messages...")
        body_size = len(self.sample_frame())
        prefetch = int(os.environ.get("FEED_PREFETCH", Settings().prefetch))
        pika_result = await ceilings.pika_ceiling(
            args.amqp_url, args.pika_messages, body_size, prefetch, timeout=60
        )
        self.say(f"  {pika_result.get('messages_per_s')} messages/s")
        rates = [r for r in (bare.get("deliveries_per_s"), pika_result.get("messages_per_s")) if r]
        achieved = self.results["deliveries"]["achieved_per_s"]
        lower = min(rates) if rates else None
        return {
            "bare_push": bare,
            "pika": pika_result,
            "lower_per_s": lower,
            "ratio_to_lower": round(achieved / lower, 3) if lower and achieved else None,
        }

    def sample_frame(self) -> str:
        """A post frame as the service sends it, to size the ceilings' messages alike."""
        post = {
            "id": 123456,
            "author_id": self.population.user_id(0),
            "text": self.tracker.text(0, self.args.text_size),
            "created_at": "2025-01-01T00:00:00.000000+00:00",
        }
        return json.dumps({"type": "post", "post": post}, separators=(",", ":"))

    # --- progress ------------------------------------------------------------------------------

    async def while_reporting(self, work: Any, line: Callable[[float], str]) -> None:
        """Await `work`, printing line(elapsed) once a second meanwhile."""
        task = asyncio.ensure_future(work)
        started = time.monotonic()
        try:
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                if not task.done() and not self.args.quiet:
                    self.say(line(time.monotonic() - started))
            await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def connect_progress(self, elapsed: float) -> str:
        ready = sum(1 for c in self.clients if c.ready_at is not None)
        failed = sum(self.tracker.connect_errors.values())
        return (
            f"  [{elapsed:4.0f}s] sessions ready {ready:,}/{len(self.clients):,}, failed {failed}"
        )

    def post_progress(self, _elapsed: float) -> str:
        t = self.tracker
        now = time.monotonic()
        elapsed = now - self.post_start
        ok = sum(1 for r in t.posts if r.status == 201)
        recent = sum(1 for x in t.receive_times[-200_000:] if x > now - 1.0)
        p99 = t.histogram.quantile(0.99)
        errors = sum(t.http_errors.values()) + sum(t.socket_closes.values())
        p99_text = "-" if p99 is None else f"{p99 * 1000:.1f} ms"
        return (
            f"  [{elapsed:4.0f}s] sent {len(t.posts):,}/{len(self.authors):,} (ok {ok:,})"
            f" | received {t.delivered:,}/{t.expected_total:,} ({recent:,}/s)"
            f" | p99 {p99_text} | dup {t.duplicated} | errors {errors}"
        )

    # --- results -------------------------------------------------------------------------------

    def snapshot_memory(self) -> dict[str, int]:
        return {
            "service": rss_bytes(self.target.pids()),
            "rabbitmq": rss_bytes(processes_named("beam.smp")),
        }

    def collect(self) -> dict[str, Any]:
        t, readings = self.tracker, self.readings
        return {
            "config": self.config(),
            "started_at": self.started_at,
            "http_client": self.http_client,
            "population": {**self.population.summary(), "seed_seconds": self.seed_seconds},
            "sessions": self.sessions_section(),
            "posts": self.posts_section(),
            "deliveries": self.deliveries_section(),
            "latency_ms": summarize(t.latencies),
            "errors": {
                "http": t.http_errors,
                "socket_closes": t.socket_closes,
                "connect": t.connect_errors,
            },
            "resources": self.resources_section(),
            "rabbitmq": {
                **readings.rabbitmq,
                "bytes_per_session_queue": _ratio(
                    readings.rabbitmq.get("session_queue_memory_bytes"),
                    readings.rabbitmq.get("session_queues"),
                ),
            },
            "service_metrics": readings.service_metrics,
            "service_log": (
                {"path": str(self.log_path), **scan_log(self.log_path)}
                if self.target and self.target.process
                else None
            ),
            "time_series": report.time_series(t, self.post_start),
        }

    def config(self) -> dict[str, Any]:
        """The options of the run, without secrets (the JWT secret, the broker password)."""
        config = {
            key: str(value) if isinstance(value, pathlib.Path) else value
            for key, value in vars(self.args).items()
        }
        config["jwt_secret"] = "(set)" if config["jwt_secret"] else None
        config["amqp_url"] = redact_url(config["amqp_url"])
        # A key=value DSN ("dbname=x password=y") is not a URL: redact its password by hand.
        config["db_dsn"] = re.sub(r"(password=)\S+", r"\1***", redact_url(config["db_dsn"]))
        return config

    def sessions_section(self) -> dict[str, Any]:
        ready = sum(1 for c in self.clients if c.ready_at is not None)
        cpu = self.readings.session_cpu
        return {
            "opened": len(self.clients),
            "ready": ready,
            "seconds_to_all_ready": round(self.sessions_seconds, 3),
            "ready_per_s": _ratio(ready, self.sessions_seconds, 1),
            "ready_ms": summarize([c.ready_seconds for c in self.clients if c.ready_seconds]),
            # CPU the set-up of one session costs (database reads, queue declare and binds).
            "service_cpu_ms_per_session": (
                _ratio(cpu.get("service", 0) * 1000, ready, 3) if self.service_pids_known else None
            ),
            "rabbitmq_cpu_ms_per_session": _ratio(cpu.get("rabbitmq", 0) * 1000, ready, 3),
        }

    def send_span(self) -> float | None:
        """Seconds over which posts were sent (one interval per post)."""
        starts = [r.started for r in self.tracker.posts]
        return (max(starts) - min(starts) + 1 / self.args.rate) if starts else None

    def posts_section(self) -> dict[str, Any]:
        posts = self.tracker.posts
        return {
            "planned": len(self.authors),
            "sent": len(posts),
            "accepted": sum(1 for r in posts if r.status == 201),
            "achieved_rate": _ratio(len(posts), self.send_span(), 2),
            "request_ms": summarize([r.answered - r.started for r in posts if r.answered]),
        }

    def deliveries_section(self) -> dict[str, Any]:
        """Expected = open sessions following the author when the post was sent, over the posts
        the service accepted; achieved/s = those deliveries over first send to last receipt."""
        t = self.tracker
        accepted = [r for r in t.posts if r.status == 201]
        expected = sum(len(r.expected) for r in accepted)
        delivered = sum(sum(1 for s in r.received if s in r.expected) for r in accepted)
        receive_span = (
            max(t.receive_times) - min(r.started for r in t.posts) if t.receive_times else None
        )
        lost, lost_closed = t.losses(self.open_at_end)
        return {
            "expected": expected,
            "delivered": t.delivered,
            "delivered_expected": delivered,
            "mean_fan_out": _ratio(expected, len(accepted), 2),
            "expected_per_s": _ratio(expected, self.send_span(), 1),
            "achieved_per_s": _ratio(delivered, receive_span, 1),
            "lost": lost,
            "duplicated": t.duplicated,
            "lost_to_closed_sessions": lost_closed,
            "unexpected": t.unexpected,
            "history_frames": t.foreign_frames,
        }

    def resources_section(self) -> dict[str, Any]:
        """CPU over the measured phase (first post to end of drain) per delivery received, and
        memory: the service's growth from no sessions to all sessions, per ready session."""
        r, known = self.readings, self.service_pids_known
        measured = r.measured
        deliveries = self.tracker.delivered
        ready = sum(1 for c in self.clients if c.ready_at is not None)
        growth = r.memory_sessions.get("service", 0) - r.memory_before.get("service", 0)

        def service(value: Any) -> Any:
            return value if known else None

        return {
            "measured_seconds": round(measured["measured_seconds"], 3),
            "drain_seconds": round(measured["drain_seconds"], 3),
            "service_pids_known": known,
            "service_rss_before": service(r.memory_before.get("service")),
            "service_rss_sessions": service(r.memory_sessions.get("service")),
            "service_rss_end": service(measured["rss_end"]),
            "service_bytes_per_session": service(_ratio(growth, ready, 0)),
            "service_cpu_seconds": service(round(measured["service_cpu"], 3)),
            "service_cpu_us_per_delivery": service(
                _ratio(measured["service_cpu"] * 1e6, deliveries, 2)
            ),
            "rabbitmq_cpu_seconds": round(measured["rabbitmq_cpu"], 3),
            "rabbitmq_cpu_us_per_delivery": _ratio(measured["rabbitmq_cpu"] * 1e6, deliveries, 2),
            "rabbitmq_rss_before": r.memory_before.get("rabbitmq"),
            "rabbitmq_rss": r.memory_sessions.get("rabbitmq"),
            "client_cpu_seconds": round(measured["client_cpu"], 3),
            "client_cpu_percent": _ratio(
                100 * measured["client_cpu"], measured["measured_seconds"], 1
            ),
        }


def _post_id(body: bytes) -> int | None:
    """The id in a 201 answer; None if the body is odd (the post was still created)."""
    try:
        return int(json.loads(body)["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _ratio(numerator: float | None, denominator: float | None, digits: int = 0) -> Any:
    """numerator/denominator rounded (an int for digits=0), None if either is missing or 0."""
    if numerator is None or not denominator:
        return None
    value = round(numerator / denominator, digits)
    return int(value) if digits == 0 else value


def verdict(results: dict[str, Any]) -> tuple[int, str]:
    d = results["deliveries"]
    problems = []
    if d["lost"]:
        problems.append(f"{d['lost']} deliveries LOST")
    if d["duplicated"]:
        problems.append(f"{d['duplicated']} deliveries DUPLICATED")
    if not d["delivered"]:
        problems.append("nothing was delivered")
    return (1, "FAIL: " + ", ".join(problems)) if problems else (0, "OK: no lost or duplicated")


async def run_load_test(args: argparse.Namespace) -> dict[str, Any]:
    return await LoadTest(args, configure_http_client()).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        results = asyncio.run(run_load_test(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError, psycopg2.Error) as exc:
        print(f"load test failed: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all()
    code, message = verdict(results)
    results["verdict"] = message
    report.print_table(results)
    log = results.get("service_log") or {}
    if log.get("problems"):
        print(f"\nservice log {log['path']}: {log['problems']} suspicious lines, first ones:")
        for line in log["examples"][:10]:
            print("  " + line)
    report.write_json(results, args.json)
    print(f"\nresults: {args.json}")
    if not args.no_chart:
        report.write_chart(results, args.chart)
        print(f"chart:   {args.chart}")
    print(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
