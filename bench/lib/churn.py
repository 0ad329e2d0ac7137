"""The soak's run (bench/soak.py): cycles of sessions opened and closed, or hung up during the
handshake, at a steady rate, with the service's and the broker's readings sampled all along, and
the figures computed from those samples."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import secrets
import socket
import statistics
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import psycopg2.extensions
import tornado.websocket
from tornado.httpclient import HTTPClientError, HTTPRequest

from bench.lib import options
from bench.lib.feedclient import summarize
from bench.lib.population import build_population, seed_database
from bench.lib.processes import scan_log
from bench.lib.procstats import (
    broker_pid,
    connections_to_port,
    open_fds,
    processes_named,
    queue_counts,
    rss_bytes,
)
from bench.lib.service import Target, attach, read_metrics, start_service
from feed_app.wire import ANSWER_FRAME_TYPES, post_message

HANGUP_MODES = ("fin", "rst", "shutdown")
SETTLE_SECONDS = 10.0  # at most, between the warm-up and the baseline


class Soak:
    """One run: start, seed, warm up, take the baseline, cycle, drain, sample all along."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.population, _ = build_population(
            args.users, args.follows, args.users, args.zipf, args.seed
        )
        self.target: Target | None = None
        self.log_path = args.json.with_suffix(".service.log")
        self.db_port = int(psycopg2.extensions.parse_dsn(args.db_dsn).get("port", 5432))
        self.broker_pids: list[int] = []
        self.samples: list[dict[str, Any]] = []
        self.phase = "start"
        self.started = time.monotonic()
        self.next_index = 0
        self.cycles_done = 0
        self.in_flight = 0
        self.ready_seconds: list[float] = []
        self.posts_stored = 0
        self.hangups: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.cycling_seconds = 0.0
        self.drain_seconds = 0.0

    def say(self, text: str) -> None:
        print(text, flush=True)

    # --- phases ----------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        args = self.args
        sampler = None
        try:
            self.target = await self.start_target()
            await self.seed()
            self.broker_pids = [pid] if (pid := await broker_pid()) else []
            self.broker_pids = self.broker_pids or processes_named("beam.smp")
            await self.sample("start")
            sampler = asyncio.ensure_future(self.sample_periodically())
            budget = args.duration
            self.phase = "warmup"
            await self.run_cycles(args.warmup, budget)
            self.phase = "settle"
            await self.settle()
            await self.sample("baseline")
            self.phase = "measure"
            remaining = args.cycles - args.warmup if args.cycles else None
            budget = None if args.duration is None else max(0.0, budget - self.cycling_seconds)
            await self.run_cycles(remaining, budget)
            self.phase = "drain"
            await self.drain()
            sampler.cancel()
            await self.sample("final")
        finally:
            if sampler:
                sampler.cancel()
            if self.target and self.target.process:
                self.say("stopping the service")
                await asyncio.to_thread(self.target.process.stop)
        return self.results()

    async def start_target(self) -> Target:
        args = self.args
        if args.url:
            return await attach(args)
        extra = [*(["--fanout", args.fanout] if args.fanout else []), *args.service_arg]
        self.say(f"starting the service: run.py {' '.join(extra)}".rstrip())
        settings = dict(args.service_env)
        return await start_service(args.db_dsn, args.amqp_url, settings, self.log_path, extra)

    async def seed(self) -> None:
        base = await asyncio.to_thread(
            seed_database, self.args.db_dsn, self.population, truncate=False
        )
        self.say(
            f"seeded {self.population.user_count:,} users (ids {base}..) following"
            f" {self.args.follows} authors each"
        )

    async def run_cycles(self, count: int | None, budget: float | None) -> None:
        """Start `count` cycles (or as many as `budget` seconds allow) at --rate, at most
        --concurrency at a time, and wait for them to end."""
        args = self.args
        slots = asyncio.Semaphore(args.concurrency)
        running: set[asyncio.Task] = set()
        started = time.monotonic()
        deadline = None if budget is None else started + budget
        done = 0
        while (count is None or done < count) and (deadline is None or time.monotonic() < deadline):
            wait = started + done / args.rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await slots.acquire()
            task = asyncio.ensure_future(self.cycle(self.next_index))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda _task: slots.release())
            self.next_index += 1
            done += 1
        if running:
            await asyncio.gather(*running)
        self.cycling_seconds += time.monotonic() - started

    async def settle(self) -> None:
        """Between the warm-up and the baseline: wait until the service's open sessions stop
        changing (closes finish asynchronously), within SETTLE_SECONDS."""
        deadline = time.monotonic() + SETTLE_SECONDS
        previous = None
        while time.monotonic() < deadline:
            current = await self.open_sessions()
            if current is not None and current == previous:
                return
            previous = current
            await asyncio.sleep(1.0)

    async def drain(self) -> None:
        """Wait until the run left no session and no queue, or --drain-timeout passed."""
        started = time.monotonic()
        before = self.samples[0].get("open_sessions") or 0
        deadline = started + self.args.drain_timeout
        while time.monotonic() < deadline:
            sessions, queues = await asyncio.gather(
                self.open_sessions(), queue_counts(self.population.user_ids())
            )
            if sessions is not None and sessions <= before and (queues or {}).get("sessions") == 0:
                break
            await asyncio.sleep(1.0)
        self.drain_seconds = time.monotonic() - started

    # --- one cycle -------------------------------------------------------------------------------

    async def cycle(self, index: int) -> None:
        every = self.args.hangup_every
        user = index % self.population.user_count
        self.in_flight += 1
        try:
            if every and index % every == every - 1:
                await self.hang_up(user, HANGUP_MODES[(index // every) % len(HANGUP_MODES)])
            else:
                await self.open_and_close(user)
        except Exception as exc:  # one odd cycle must not end a run of thousands
            self.failures[f"unexpected {type(exc).__name__}: {exc}"] += 1
        finally:
            self.in_flight -= 1
            self.cycles_done += 1

    def feed_url(self, user: int) -> str:
        return self.target.feed_url(self.population.user_id(user))

    async def open_and_close(self, user: int) -> None:
        timeout = self.args.timeout
        started = time.monotonic()
        request = HTTPRequest(self.feed_url(user), connect_timeout=timeout, request_timeout=timeout)
        try:
            connection = await tornado.websocket.websocket_connect(request)
        except HTTPClientError as exc:
            self.failures[f"connect: HTTP {exc.code}"] += 1
            return
        except (OSError, tornado.websocket.WebSocketError) as exc:
            self.failures[f"connect: {type(exc).__name__}"] += 1
            return
        try:
            if await self.wait_ready(connection, started + timeout):
                self.ready_seconds.append(time.monotonic() - started)
                for ref in range(self.args.posts):
                    if not await self.post(connection, ref, f"soak post {user}.{ref}"):
                        break
                if self.args.hold:
                    await asyncio.sleep(self.args.hold)
        finally:
            connection.close()
            await self.wait_closed(connection, timeout)

    async def wait_ready(
        self, connection: tornado.websocket.WebSocketClientConnection, deadline: float
    ) -> bool:
        ready = await self.read_until(connection, deadline, "ready", lambda f: f["type"] == "ready")
        return ready is not None

    async def post(
        self, connection: tornado.websocket.WebSocketClientConnection, ref: int, text: str
    ) -> bool:
        """A post message on the session's socket (docs/websocket.md), until its answer: every
        post must be stored. The feed's own frames that come meanwhile are read and let go."""
        await connection.write_message(post_message(ref, text))
        deadline = time.monotonic() + self.args.timeout
        answer = await self.read_until(
            connection,
            deadline,
            "a post's answer",
            lambda f: f["type"] in ANSWER_FRAME_TYPES and f.get("ref") == ref,
        )
        if answer is None:
            return False
        if answer["type"] != "posted":
            self.failures[f"post refused ({answer.get('status')})"] += 1
            return False
        self.posts_stored += 1
        return True

    async def read_until(
        self,
        connection: tornado.websocket.WebSocketClientConnection,
        deadline: float,
        awaited: str,
        wanted: Callable[[dict[str, Any]], bool],
    ) -> dict[str, Any] | None:
        """Read frames until one is `wanted`; None, counted as a failed cycle, when the deadline
        or the socket's close comes first."""
        while True:
            try:
                message = await asyncio.wait_for(
                    connection.read_message(), max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                self.failures[f"timeout waiting for {awaited}"] += 1
                return None
            if message is None:
                self.failures[f"closed before {awaited} ({connection.close_code})"] += 1
                return None
            frame = json.loads(message)
            if wanted(frame):
                return frame

    async def wait_closed(
        self, connection: tornado.websocket.WebSocketClientConnection, timeout: float
    ) -> None:
        """Read until the server's close frame: then its on_close has run."""
        deadline = time.monotonic() + timeout
        try:
            while await asyncio.wait_for(
                connection.read_message(), max(0.0, deadline - time.monotonic())
            ):
                pass
        except asyncio.TimeoutError:
            self.failures["server did not close"] += 1

    async def hang_up(self, user: int, mode: str) -> None:
        """A valid upgrade request with a valid token, then the TCP connection dropped at once,
        while the server is still checking the token and the user."""
        url = urllib.parse.urlsplit(self.feed_url(user))
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, (url.hostname, url.port)), self.args.timeout
            )
            await loop.sock_sendall(sock, request)
            if mode == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "shutdown":
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, asyncio.TimeoutError) as exc:
            self.failures[f"hang-up: {type(exc).__name__}"] += 1
            return
        finally:
            sock.close()
        self.hangups[mode] += 1

    # --- samples ---------------------------------------------------------------------------------

    async def open_sessions(self) -> int | None:
        """feed_open_sessions from the service's /metrics; None if it did not answer."""
        values = await read_metrics(self.target.url, ("feed_open_sessions",))
        found = (values or {}).get("feed_open_sessions")
        return None if found is None else int(found)

    async def sample(self, phase: str | None = None) -> dict[str, Any]:
        """One reading of everything; `phase` names it, else the phase the run is in once the
        slow readings (rabbitmqctl) are done. The /proc readings are taken then too."""
        sessions, queues = await asyncio.gather(
            self.open_sessions(), queue_counts(self.population.user_ids())
        )
        pids = self.target.pids()
        entry: dict[str, Any] = {
            "t": round(time.monotonic() - self.started, 2),
            "phase": phase or self.phase,
            "cycles": self.cycles_done,
            "in_flight": self.in_flight,
            "rss_kb": rss_bytes(pids) // 1024 if pids else None,
            "fds": open_fds(pids) if pids else None,
            "db_connections": connections_to_port(pids, self.db_port) if pids else None,
            "broker_rss_kb": rss_bytes(self.broker_pids) // 1024 if self.broker_pids else None,
            "open_sessions": sessions,
            "queues": queues["sessions"] if queues else None,
            "queues_all": queues["all"] if queues else None,
        }
        self.samples.append(entry)
        if not self.args.quiet:
            self.say(self.progress_line(entry))
        return entry

    async def sample_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.args.sample_every)
            await self.sample()

    def progress_line(self, entry: dict[str, Any]) -> str:
        failed = sum(self.failures.values())
        hangups = sum(self.hangups.values())
        return (
            f"  [{entry['t']:5.0f}s] {entry['phase']:<8} cycles {entry['cycles']:,}"
            f" (hang-ups {hangups}, failed {failed}) | RSS {as_mb(entry['rss_kb'])} MB"
            f" | fds {shown(entry['fds'])} | sessions {shown(entry['open_sessions'])}"
            f" | queues {shown(entry['queues'])} | broker {as_mb(entry['broker_rss_kb'])} MB"
        )

    # --- results ---------------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        by_phase = {s["phase"]: s for s in self.samples}  # the last sample of each phase
        first, baseline, final = by_phase["start"], by_phase["baseline"], by_phase["final"]
        measured = after_warmup(self.samples)
        sessions_left = minus(final["open_sessions"], first["open_sessions"])
        return {
            "config": options.recorded(self.args),
            "cycles": self.cycles_done,
            "warmup_cycles": self.args.warmup,
            "sessions_ready": len(self.ready_seconds),
            "posts_stored": self.posts_stored,
            "hangups": dict(self.hangups),
            "failures": dict(self.failures),
            "cycles_per_s": round(self.cycles_done / self.cycling_seconds, 1),
            "ready_ms": summarize(self.ready_seconds),
            "rss_mb": {k: as_mb(s["rss_kb"]) for k, s in points(first, baseline, final)},
            "rss_growth_mb": as_mb(minus(final["rss_kb"], baseline["rss_kb"])),
            "rss_slope_kb_per_1000": slope(measured, "rss_kb"),
            "fds": {k: s["fds"] for k, s in points(first, baseline, final)},
            "db_connections": {k: s["db_connections"] for k, s in points(first, baseline, final)},
            # The database pool grows with demand up to its size: not a leak, so not counted.
            "fds_growth": minus(other_fds(final), other_fds(baseline)),
            "sessions_left": sessions_left,
            "queues_left": final["queues"],
            "broker_rss_mb": {
                k: as_mb(s["broker_rss_kb"]) for k, s in points(first, baseline, final)
            },
            "broker_rss_slope_kb_per_1000": slope(measured, "broker_rss_kb"),
            "drain_seconds": round(self.drain_seconds, 1),
            "service_log": (
                {"path": str(self.log_path), **scan_log(self.log_path, limit=10)}
                if self.target and self.target.process
                else None
            ),
            "samples": self.samples,
        }


def other_fds(sample: dict[str, Any]) -> int | None:
    return minus(sample["fds"], sample["db_connections"])


def points(*samples: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["phase"], s) for s in samples]


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def as_mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def shown(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def least_squares(samples: list[dict[str, Any]], field: str) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of `field` against cycles done; None if too few."""
    points = [(s["cycles"], s[field]) for s in samples if s[field] is not None]
    if len({x for x, _ in points}) < 2:
        return None
    return tuple(statistics.linear_regression(*zip(*points, strict=True)))


def slope(samples: list[dict[str, Any]], field: str) -> float | None:
    """The fitted slope of `field` (KB) in KB per 1,000 cycles."""
    fit = least_squares(samples, field)
    return None if fit is None else round(fit[0] * 1000, 1)


def after_warmup(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples the slopes are fitted over: from the baseline (after the warm-up) on."""
    return [s for s in samples if s["phase"] in ("baseline", "measure", "final")]
