"""Soak test: open and close feed sessions for a long time and watch for anything that grows.

    .venv/bin/python bench/soak.py                   # 20,000 open/close cycles at 50/s (~8 min)
    .venv/bin/python bench/soak.py --smoke           # 300 cycles (~25 s); the test suite runs it
    .venv/bin/python bench/soak.py --duration 600 --rate 40 --hangup-every 20
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8888 --service-pids 1234 \\
        --db-dsn postgresql://127.0.0.1:5432/feed --jwt-secret "$FEED_JWT_SECRET"

What a run does, in order:
 1. starts the service (run.py on a free port, database feed_bench, --fanout, --service-env
    and --service-arg passed on) and waits for /readyz; or, with --url, uses one that is
    already running (--service-pids gives its memory and file descriptors);
 2. seeds U users following F authors each, in a fresh id range (bench/lib/population.py);
 3. runs cycles at --rate per second, at most --concurrency at a time: a client opens a feed
    websocket as the next user, waits for `ready`, holds it --hold seconds, closes it and waits
    for the server's close frame. Every --hangup-every-th cycle instead sends a valid upgrade
    request with a valid token and drops the TCP connection at once: by FIN (close), RST
    (SO_LINGER 0) or shutdown(), in turn;
 4. after the warm-up cycles it lets the sessions drain and takes the baseline (RSS, fds); after
    the last cycle it drains again, until no session and no queue of the run is left or
    --drain-timeout has passed;
 5. samples every --sample-every seconds, printing a progress line: the service's RSS and open
    fds (/proc), feed_open_sessions (/metrics), this run's session queues (rabbitmqctl), and the
    broker's RSS (its beam.smp, /proc);
 6. prints the figures and writes bench/results/soak-<time>.json, a chart soak-<time>.png and the
    service's log soak-<time>.service.log.

Slopes are least-squares fits of a memory reading against cycles done, over the samples from the
baseline on. The exit status is 1 when a target is missed: RSS growth after the warm-up over
--max-rss-growth-mb (reported, not checked, by --smoke: a few hundred cycles are inside the noise
of the allocator and the collector), session queues of the run left, sessions left, fds grown by
more than --fd-tolerance, or over 1% of the cycles failed; 2 when the run could not be carried
out; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import pathlib
import secrets
import socket
import statistics
import struct
import sys
import time
import urllib.parse
from typing import Any

# Run as a script, only bench/ is on sys.path: add the repository so feed_app and bench import.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import psycopg2
import psycopg2.extensions
import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from bench.lib import options
from bench.lib.feedclient import summarize
from bench.lib.population import build_population, seed_database
from bench.lib.processes import run_tool, scan_log
from bench.lib.procstats import (
    broker_pid,
    connections_to_port,
    open_fds,
    processes_named,
    queue_counts,
    rss_bytes,
)
from bench.lib.report import write_json
from bench.lib.service import Target, attach, start_service
from feed_app.fanout import MODES

HANGUP_MODES = ("fin", "rst", "shutdown")
MAX_FAILED_SHARE = 0.01
SETTLE_SECONDS = 10.0  # at most, between the warm-up and the baseline

# Values used when an option is not given: a full run, and --smoke.
FULL = {
    "cycles": 20000,
    "rate": 50.0,
    "concurrency": 200,
    "hold": 3.0,
    "users": 200,
    "hangup_every": 20,
    "sample_every": 5.0,
    "drain_timeout": 30.0,
}
SMOKE = {
    "cycles": 300,
    "rate": 30.0,
    "concurrency": 10,
    "hold": 0.0,
    "users": 50,
    "hangup_every": 10,
    "sample_every": 2.0,
    "drain_timeout": 15.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = parser.add_argument_group("cycles")
    add = load.add_argument
    add("--cycles", type=int, help=f"open/close cycles, warm-up included [{FULL['cycles']:,}]")
    add("--duration", type=float, help="seconds of cycling instead (or whichever ends first)")
    add("--rate", type=float, help=f"cycles started per second [{FULL['rate']:g}; smoke 30]")
    add("--concurrency", type=int, help="cycles in flight at most [200; smoke 10]")
    add(
        "--hold",
        type=float,
        help="seconds a session stays open after ready [3; smoke 0]: sessions that outlive a"
        " young-generation collection or two, as real ones do, show what the collector leaves",
    )
    add(
        "--hangup-every",
        type=int,
        help="every Nth cycle hangs up during the handshake; 0: never [20; smoke 10]",
    )
    add("--users", type=int, help="users, taken in turn [200; smoke 50]")
    add("--follows", type=int, default=25, help="authors each user follows [25]")
    add("--zipf", type=float, default=1.0, help="exponent of author popularity [1.0]")
    add("--seed", type=int, default=1, help="random seed of the follow graph [1]")
    add("--timeout", type=float, default=15.0, help="seconds for a session to get ready [15]")

    measure = parser.add_argument_group("measurement and targets")
    add = measure.add_argument
    add("--warmup", type=int, help="cycles left out of the slope [10%% of the cycles, >= 100]")
    add("--sample-every", type=float, help="seconds between samples and progress lines [5]")
    add("--drain-timeout", type=float, help="seconds to wait for sessions and queues [30]")
    add("--max-rss-growth-mb", type=float, default=5.0, help="RSS growth target [5]")
    add("--fd-tolerance", type=int, default=3, help="fds the service may gain [3]")

    target = options.service_options(parser)
    add = target.add_argument
    add("--fanout", choices=MODES, help="run.py --fanout [the service's default]")
    add(
        "--service-arg",
        action="append",
        default=[],
        help="an extra argument for run.py (repeatable), e.g. --service-arg=--prefetch=32",
    )
    options.running_service_options(target)

    run = parser.add_argument_group("run")
    add = run.add_argument
    add("--smoke", action="store_true", help="short run for the test suite; RSS not checked")
    options.output_options(run, "soak", chart=True)
    add("--quiet", action="store_true", help="no progress lines")

    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None and not (name == "cycles" and args.duration):
            setattr(args, name, value)
    planned = args.cycles or round(args.rate * args.duration)
    if args.warmup is None:
        args.warmup = min(max(100, planned // 10), planned // 2)
    if args.rate <= 0 or args.concurrency < 1 or args.users < 2 or args.hangup_every < 0:
        parser.error("need --rate > 0, --concurrency >= 1, --users >= 2, --hangup-every >= 0")
    if planned <= args.warmup:
        parser.error(f"{planned} cycles leave nothing after the warm-up of {args.warmup}")
    if len(args.url) > 1:
        parser.error("one --url: the soak reads one instance's sessions, memory and fds")
    args.chart = args.chart or args.json.with_suffix(".png")
    return args


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
                if self.args.hold:
                    await asyncio.sleep(self.args.hold)
        finally:
            connection.close()
            await self.wait_closed(connection, timeout)

    async def wait_ready(
        self, connection: tornado.websocket.WebSocketClientConnection, deadline: float
    ) -> bool:
        while True:
            try:
                message = await asyncio.wait_for(
                    connection.read_message(), max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                self.failures["timeout waiting for ready"] += 1
                return False
            if message is None:
                self.failures[f"closed before ready ({connection.close_code})"] += 1
                return False
            if json.loads(message).get("type") == "ready":
                return True

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
        try:
            response = await AsyncHTTPClient().fetch(
                f"{self.target.url}/metrics", request_timeout=5
            )
        except (HTTPClientError, OSError):
            return None
        for line in response.body.decode().splitlines():
            name, _, value = line.partition(" ")
            if name == "feed_open_sessions":
                return int(float(value))
        return None

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
            f" (hang-ups {hangups}, failed {failed}) | RSS {_mb(entry['rss_kb'])} MB"
            f" | fds {_text(entry['fds'])} | sessions {_text(entry['open_sessions'])}"
            f" | queues {_text(entry['queues'])} | broker {_mb(entry['broker_rss_kb'])} MB"
        )

    # --- results ---------------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        by_phase = {s["phase"]: s for s in self.samples}  # the last sample of each phase
        first, baseline, final = by_phase["start"], by_phase["baseline"], by_phase["final"]
        measured = _measured(self.samples)
        sessions_left = _minus(final["open_sessions"], first["open_sessions"])
        return {
            "config": options.recorded(self.args),
            "cycles": self.cycles_done,
            "warmup_cycles": self.args.warmup,
            "sessions_ready": len(self.ready_seconds),
            "hangups": dict(self.hangups),
            "failures": dict(self.failures),
            "cycles_per_s": round(self.cycles_done / self.cycling_seconds, 1),
            "ready_ms": summarize(self.ready_seconds),
            "rss_mb": {k: _mb(s["rss_kb"]) for k, s in _points(first, baseline, final)},
            "rss_growth_mb": _mb(_minus(final["rss_kb"], baseline["rss_kb"])),
            "rss_slope_kb_per_1000": _slope(measured, "rss_kb"),
            "fds": {k: s["fds"] for k, s in _points(first, baseline, final)},
            "db_connections": {k: s["db_connections"] for k, s in _points(first, baseline, final)},
            # The database pool grows with demand up to its size: not a leak, so not counted.
            "fds_growth": _minus(_other_fds(final), _other_fds(baseline)),
            "sessions_left": sessions_left,
            "queues_left": final["queues"],
            "broker_rss_mb": {
                k: _mb(s["broker_rss_kb"]) for k, s in _points(first, baseline, final)
            },
            "broker_rss_slope_kb_per_1000": _slope(measured, "broker_rss_kb"),
            "drain_seconds": round(self.drain_seconds, 1),
            "service_log": (
                {"path": str(self.log_path), **scan_log(self.log_path, limit=10)}
                if self.target and self.target.process
                else None
            ),
            "samples": self.samples,
        }


def _other_fds(sample: dict[str, Any]) -> int | None:
    return _minus(sample["fds"], sample["db_connections"])


def _points(*samples: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["phase"], s) for s in samples]


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _text(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _fit(samples: list[dict[str, Any]], field: str) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of `field` against cycles done; None if too few."""
    points = [(s["cycles"], s[field]) for s in samples if s[field] is not None]
    if len({x for x, _ in points}) < 2:
        return None
    return tuple(statistics.linear_regression(*zip(*points, strict=True)))


def _slope(samples: list[dict[str, Any]], field: str) -> float | None:
    """The fitted slope of `field` (KB) in KB per 1,000 cycles."""
    fit = _fit(samples, field)
    return None if fit is None else round(fit[0] * 1000, 1)


def _measured(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples the slopes are fitted over: from the baseline (after the warm-up) on."""
    return [s for s in samples if s["phase"] in ("baseline", "measure", "final")]


def verdict(results: dict[str, Any], args: argparse.Namespace) -> tuple[int, list[str]]:
    """(exit status, the targets missed)."""
    missed = []
    growth = results["rss_growth_mb"]
    if not args.smoke and growth is not None and growth > args.max_rss_growth_mb:
        missed.append(f"RSS grew {growth} MB after the warm-up (> {args.max_rss_growth_mb})")
    if results["queues_left"] is None:
        missed.append("session queues could not be counted (rabbitmqctl)")
    elif results["queues_left"]:
        missed.append(f"{results['queues_left']} session queues left")
    if results["sessions_left"] is None:
        missed.append("open sessions could not be read (/metrics)")
    elif results["sessions_left"] > 0:
        missed.append(f"{results['sessions_left']} sessions left")
    if results["fds_growth"] is not None and results["fds_growth"] > args.fd_tolerance:
        missed.append(f"fds grew by {results['fds_growth']} (> {args.fd_tolerance})")
    failed = sum(results["failures"].values())
    if failed > MAX_FAILED_SHARE * results["cycles"]:
        missed.append(f"{failed} of {results['cycles']:,} cycles failed")
    return (1 if missed else 0), missed


def print_summary(results: dict[str, Any]) -> None:
    rss, fds, broker = results["rss_mb"], results["fds"], results["broker_rss_mb"]
    db = results["db_connections"]
    slope = results["rss_slope_kb_per_1000"]
    rows = [
        (
            "cycles done (warm-up excluded from slopes)",
            f"{results['cycles']:,} ({results['warmup_cycles']:,}) at {results['cycles_per_s']}/s",
        ),
        (
            "sessions ready / hang-ups",
            f"{results['sessions_ready']:,} / "
            + (", ".join(f"{k} {v}" for k, v in results["hangups"].items()) or "none"),
        ),
        ("failed cycles", ", ".join(f"{k} x{v}" for k, v in results["failures"].items()) or "0"),
        (
            "session ready p50/p99/max",
            " / ".join(_text(results["ready_ms"][k]) for k in ("p50", "p99", "max")) + " ms",
        ),
        (
            "service RSS start / baseline / final",
            f"{rss['start']} / {rss['baseline']} / {rss['final']} MB",
        ),
        ("RSS growth after warm-up", f"{results['rss_growth_mb']} MB"),
        ("RSS slope", f"{_text(slope)} KB per 1,000 sessions"),
        (
            "fds start / baseline / final (database)",
            " / ".join(f"{fds[k]} ({db[k]})" for k in ("start", "baseline", "final")),
        ),
        ("fds growth after warm-up, database aside", _text(results["fds_growth"])),
        ("sessions left", _text(results["sessions_left"])),
        ("session queues left", _text(results["queues_left"])),
        ("broker RSS baseline / final", f"{broker['baseline']} / {broker['final']} MB"),
        ("broker RSS slope", f"{_text(results['broker_rss_slope_kb_per_1000'])} KB per 1,000"),
        ("drain", f"{results['drain_seconds']} s"),
    ]
    log = results.get("service_log") or {}
    if log:
        rows.append(("service log problem lines", _text(log.get("problems"))))
    width = max(len(label) for label, _ in rows)
    print("\n" + "=" * (width + 50))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print("=" * (width + 50))
    for line in log.get("examples", [])[:5]:
        print("  log: " + line)


def write_chart(results: dict[str, Any], path: pathlib.Path) -> None:
    """Service RSS (with its fit), broker RSS, and sessions / queues / fds against cycles."""
    import matplotlib  # imported here: only runs that draw a chart need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    x = [s["cycles"] for s in samples]

    def series(field: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if s[field] is None else s[field] / scale for s in samples]

    figure, (service, broker, counts) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    service.plot(x, series("rss_kb", 1024), marker=".", label="service RSS")
    measured = _measured(samples)
    fit = _fit(measured, "rss_kb")
    if fit:
        ends = [measured[0]["cycles"], measured[-1]["cycles"]]
        fitted = [(fit[0] * end + fit[1]) / 1024 for end in ends]
        service.plot(ends, fitted, "--", color="grey", label="least-squares fit after warm-up")
    service.set_ylabel("service RSS (MB)")
    service.legend(loc="upper left")
    broker.plot(x, series("broker_rss_kb", 1024), marker=".", color="tab:orange")
    broker.set_ylabel("broker RSS (MB)")
    counts.plot(x, series("open_sessions"), marker=".", label="open sessions (/metrics)")
    counts.plot(x, series("queues"), marker=".", label="session queues of the run")
    counts.set_ylabel("sessions, queues")
    fds = counts.twinx()
    fds.plot(x, series("fds"), color="grey", alpha=0.6, label="service fds")
    fds.set_ylabel("fds")
    lines, extra = counts.get_legend_handles_labels(), fds.get_legend_handles_labels()
    counts.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left")
    counts.set_xlabel("cycles done")
    for axis in (service, broker, counts):
        axis.axvline(results["warmup_cycles"], color="grey", linestyle=":")
        axis.grid(True, alpha=0.3)
    figure.suptitle(
        f"{results['cycles']:,} cycles: RSS {_text(results['rss_slope_kb_per_1000'])} KB per"
        f" 1,000 sessions, growth {results['rss_growth_mb']} MB; sessions left"
        f" {results['sessions_left']}, queues left {results['queues_left']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_tool(Soak(args).run(), "soak")
    code, missed = verdict(results, args)
    results["missed"] = missed
    print_summary(results)
    write_json(results, args.json)
    print(f"\nresults: {args.json}")
    if not args.no_chart:
        write_chart(results, args.chart)
        print(f"chart:   {args.chart}")
    print("FAIL: " + "; ".join(missed) if missed else "OK: every target met")
    return code


if __name__ == "__main__":
    sys.exit(main())
