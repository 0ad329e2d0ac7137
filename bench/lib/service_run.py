"""The load test against one fan-out mode: start the service in that mode (or use instances given
with --url), seed the population, open the sessions, run the posting phases, stop the service.

`--fanout both` makes one ServiceRun per mode, one after another, on the same population and the
same posts (bench/loadtest.py): each mode gets a fresh database and fresh user ids, so neither
sees the other's posts as history.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from bench.lib import report, saturation
from bench.lib.feedclient import FeedClient, Tracker, open_clients, ratio, summarize
from bench.lib.population import Population, choose_authors, seed_database
from bench.lib.posting import Plan, PostingPhase, Service
from bench.lib.processes import scan_log
from bench.lib.procstats import CpuMeter, processes_named, rabbitmq_snapshot, rss_bytes
from bench.lib.service import (
    UNLIMITED,
    Target,
    attach,
    histogram_percentiles,
    read_histogram,
    read_metrics,
    start_service,
)

SERVICE_METRICS = (
    "feed_deliveries_total",
    "feed_publishes_total",
    "feed_slow_client_closes_total",
    "feed_broker_reconnects_total",
    "feed_open_sessions",
    "feed_outbox_backlog",
)
LATENCY_HISTOGRAM = "feed_create_to_send_seconds"


def phase_authors(population: Population, rate: float, duration: float, args: Any) -> list[int]:
    """The authors of a phase's posts. Drawn from a generator seeded by the run's seed and the
    phase's rate and length, so every mode gets the same posts at the same rate."""
    rng = random.Random(f"{args.seed}/{rate:.6g}/{duration:.6g}")
    posts = max(1, round(rate * duration))
    return choose_authors(population, posts, args.author_choice, rng)


class ServiceRun:
    """One mode: start, seed, connect, post (one phase, or the saturation search), tear down."""

    def __init__(self, args: argparse.Namespace, mode: str, population: Population) -> None:
        self.args = args
        self.mode = mode
        self.population = population
        self.fan_out = population.sessions_by_author()
        self.connect_tracker = Tracker()  # connect errors; each phase has a tracker of its own
        self.clients: list[FeedClient] = []
        self.target: Target | None = None
        self.log_path = args.json.with_suffix(f".{mode}.service.log")
        self.seed_seconds = self.sessions_seconds = 0.0
        self.memory_before: dict[str, int] = {}
        self.memory_sessions: dict[str, int] = {}

    def say(self, text: str) -> None:
        print(f"[{self.mode}] {text}", flush=True)

    async def run(self) -> dict[str, Any]:
        results: dict[str, Any] = {"fanout": self.mode}
        try:
            self.target = await self.start_target()
            await self.seed()
            self.memory_before = self.snapshot_memory()
            results["sessions"] = await self.open_sessions()
            user_ids = self.population.user_ids()
            results["rabbitmq"] = await rabbitmq_snapshot(user_ids, self.target.pids())
            self.memory_sessions = self.snapshot_memory()
            if self.args.saturate:
                results["saturation"] = await self.find_saturation()
                held = results["saturation"]["rate_held"]
                # The latency at half the rate it holds: what the service does with headroom.
                results["phase"] = await self.phase(held / 2) if held else None
            else:
                results["phase"] = await self.phase(self.args.rate)
            results["service_metrics"] = await self.service_metrics()
        finally:
            for client in self.clients:
                client.close()
            if self.target and self.target.process:
                self.say("stopping the service")
                await asyncio.to_thread(self.target.process.stop)
        results.update(
            population={**self.population.summary(), "seed_seconds": self.seed_seconds},
            memory=self.memory_section(results["sessions"]["ready"]),
            service_log=(
                {"path": str(self.log_path), **scan_log(self.log_path)}
                if self.target and self.target.process
                else None
            ),
        )
        rmq = results["rabbitmq"]
        rmq["queue_bytes_per_session"] = ratio(
            rmq.get("run_queue_memory_bytes"), results["sessions"]["ready"]
        )
        return results

    # --- set-up --------------------------------------------------------------------------------

    async def start_target(self) -> Target:
        args = self.args
        if args.url:
            return await attach(args)
        run_args = ["--workers", str(args.workers), "--fanout", self.mode]
        self.say(f"starting the service: run.py {' '.join(run_args)}")
        settings = {**UNLIMITED, **dict(args.service_env)}
        return await start_service(
            args.db_dsn, args.amqp_url, settings, self.log_path, run_args, args.run_py
        )

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
        return self.target.token(self.population.user_id(user_index))

    async def open_sessions(self) -> dict[str, Any]:
        """Open every session, measuring what their set-up cost the service and the broker."""
        args, pop = self.args, self.population
        self.clients = [
            FeedClient(i, self.target.feed_url(pop.user_id(u), i), self.connect_tracker)
            for i, u in enumerate(pop.session_users)
        ]
        self.say(f"opening {len(self.clients):,} sessions...")
        service_cpu = CpuMeter(self.target.pids)
        broker_cpu = CpuMeter(lambda: processes_named("beam.smp"))
        service_cpu.start()
        broker_cpu.start()
        started = time.monotonic()
        opening = open_clients(
            self.clients, args.connect_concurrency, args.ready_timeout, started + args.ready_timeout
        )
        await report.while_reporting(opening, self.connect_progress, args.quiet)
        self.sessions_seconds = time.monotonic() - started
        service_cpu.stop()
        broker_cpu.stop()
        ready = sum(1 for c in self.clients if c.is_open)
        self.say(
            f"{ready:,} of {len(self.clients):,} sessions ready in {self.sessions_seconds:.1f} s"
        )
        return {
            "opened": len(self.clients),
            "ready": ready,
            "seconds_to_all_ready": round(self.sessions_seconds, 3),
            "ready_per_s": ratio(ready, self.sessions_seconds, 1),
            "ready_ms": summarize([c.ready_seconds for c in self.clients if c.ready_seconds]),
            # CPU the set-up of one session costs (database reads, queue declare and binds).
            "service_cpu_ms_per_session": (
                ratio(service_cpu.seconds * 1000, ready, 3) if self.target.pids_known else None
            ),
            "rabbitmq_cpu_ms_per_session": ratio(broker_cpu.seconds * 1000, ready, 3),
            "connect_errors": self.connect_tracker.connect_errors,
        }

    def connect_progress(self, elapsed: float) -> str:
        ready = sum(1 for c in self.clients if c.ready_at is not None)
        failed = sum(self.connect_tracker.connect_errors.values())
        return (
            f"  [{elapsed:4.0f}s] sessions ready {ready:,}/{len(self.clients):,}, failed {failed}"
        )

    # --- posting -------------------------------------------------------------------------------

    async def phase(self, rate: float) -> dict[str, Any]:
        args = self.args
        self.say(f"posting {rate:g} posts/s for {args.duration:g} s")
        plan = Plan(
            rate=rate,
            duration=args.duration,
            authors=phase_authors(self.population, rate, args.duration, args),
            text_size=args.text_size,
            drain=args.drain,
            change_share=args.change_share,
            post_on_sockets=args.post_via == "socket",
        )
        service = Service(self.target.urls, self.target.pids, self.target.pids_known, self.token)
        url = self.target.url  # one process answers for all of a URL's workers
        before = await read_histogram(url, LATENCY_HISTOGRAM)
        posting = PostingPhase(
            service,
            self.clients,
            self.fan_out,
            plan,
            quiet=args.quiet,
            session_users=self.population.session_users,
        )
        phase = await posting.run()
        after = await read_histogram(url, LATENCY_HISTOGRAM)
        # From the post's creation to its write on a socket: the service's own share of the
        # client's create->receive. Only the first URL's instance, when there are several.
        phase["service_latency_ms"] = (
            histogram_percentiles(before, after, (0.5, 0.95, 0.99))
            if before is not None and after
            else None
        )
        return phase

    async def find_saturation(self) -> dict[str, Any]:
        args = self.args

        async def step(rate: float) -> dict[str, Any]:
            phase = await self.phase(rate)
            why_not = saturation.why_not_held(phase, args.hold_tolerance)
            deliveries = phase["deliveries"]
            self.say(
                f"  {rate:g} posts/s: {deliveries['achieved_per_s']} of"
                f" {deliveries['expected_per_s']} deliveries/s, "
                + ("held" if why_not is None else f"not held ({why_not})")
            )
            return phase

        return await saturation.search(
            step,
            start=args.rate,
            factor=args.step_factor,
            max_steps=args.max_steps,
            refine=args.refine,
            tolerance=args.hold_tolerance,
        )

    # --- readings ------------------------------------------------------------------------------

    async def service_metrics(self) -> list[dict[str, float]]:
        """The service's own counters (one process per URL answers), to compare with ours."""
        found = []
        for url in self.target.urls:
            values = await read_metrics(url, SERVICE_METRICS)
            if values is not None:
                found.append(values)
        return found

    def snapshot_memory(self) -> dict[str, int]:
        return {
            "service": rss_bytes(self.target.pids()),
            "rabbitmq": rss_bytes(processes_named("beam.smp")),
        }

    def memory_section(self, ready: int) -> dict[str, Any]:
        """RSS before any session and with all of them, and the growth per ready session. The
        broker's RSS is shared with whatever else uses it meanwhile, so its growth is noisier."""
        before, after = self.memory_before, self.memory_sessions
        known = bool(self.target and self.target.pids_known)

        def growth(who: str) -> int | None:
            if who not in before or who not in after:
                return None
            return ratio(after[who] - before[who], ready)

        return {
            "service_rss_before": before.get("service") if known else None,
            "service_rss_sessions": after.get("service") if known else None,
            "service_bytes_per_session": growth("service") if known else None,
            "rabbitmq_rss_before": before.get("rabbitmq"),
            "rabbitmq_rss_sessions": after.get("rabbitmq"),
            "rabbitmq_bytes_per_session": growth("rabbitmq"),
        }
