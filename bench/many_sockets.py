"""Many open feed sockets on one service process: memory per socket, in the service and the broker.

    .venv/bin/python bench/many_sockets.py --sockets 10000                 # process mode
    .venv/bin/python bench/many_sockets.py --sockets 50000 --at 100 --at 10000
    .venv/bin/python bench/many_sockets.py --sockets 2000 --fanout session

Starts the service (one process, run.py --fanout MODE, the load test's raised limits), seeds the
load test's population (U users following F authors each, Zipf popularity) and opens N sockets
spread over those users, in steps: up to each --at count, then up to N. After each step, and
before the first, it waits --settle seconds and reads the service's RSS, the broker's RSS and
memory breakdown, and the run's queues and bindings (bench/lib/procstats.py). Nothing is
posted: this measures what an idle socket costs.

The sockets are held by client processes (bench/socket_holder.py), --per-client each, every one
from an address of its own (127.0.0.2, .3, ...): a process can hold only as many sockets as its
open-file limit allows, and one address has ~28,000 ports towards the service's one port. The
service needs N open files and more: if the hard limit (`ulimit -Hn`) is lower, this script says
so and stops; raising it needs root with CAP_SYS_RESOURCE (`ulimit -Hn 65536` in the shell that
runs this, `prlimit`, or LimitNOFILE= under systemd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib import options
from bench.lib.feedclient import ratio
from bench.lib.population import Population, build_population, seed_database
from bench.lib.processes import REPO, run_tool
from bench.lib.procstats import processes_named, rabbitmq_snapshot, rss_bytes
from bench.lib.service import UNLIMITED, own_service
from feed_app.config import MODES

FD_MARGIN = 500  # open files besides the sockets: database pool, broker, log, listener, ...
BATCH_TIMEOUT = 60.0  # seconds for one socket to become ready
RABBITMQ_KEYS = (  # what is kept of each RabbitMQ snapshot
    "run_queues",
    "run_bindings",
    "run_control_bindings",
    "run_queue_memory_bytes",
    "queue_procs_bytes",
    "mnesia_bytes",
    "other_ets_bytes",
    "binary_bytes",
    "connection_bytes",
)


class Holder:
    """One socket_holder.py process and the sockets it was asked to open."""

    def __init__(self, process: asyncio.subprocess.Process, source_ip: str) -> None:
        self.process = process
        self.source_ip = source_ip

    @classmethod
    async def start(cls, number: int) -> Holder:
        source_ip = f"127.0.{(number + 2) // 256}.{(number + 2) % 256}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "bench" / "socket_holder.py"),
            "--source-ip",
            source_ip,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process, source_ip)

    async def open(self, urls: list[str], concurrency: int) -> dict[str, Any]:
        deadline = max(BATCH_TIMEOUT, len(urls) / 50)  # set-up runs at hundreds per second
        command = {
            "open": urls,
            "concurrency": concurrency,
            "timeout": BATCH_TIMEOUT,
            "deadline": deadline,
        }
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), deadline + 30)
        if not line:
            raise RuntimeError(f"socket holder {self.source_ip} exited")
        return json.loads(line)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()


def check_fd_limit(sockets: int, per_client: int) -> int:
    """The sockets per holder, within the hard open-file limit (run_tool raises the soft one to
    it, and the service and the holders inherit that); exit with a message when the service
    cannot hold them."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < sockets + FD_MARGIN:
        print(
            f"{sockets:,} sockets need {sockets + FD_MARGIN:,} open files in the service process;"
            f" this shell allows {hard:,} (ulimit -Hn). Raise it as root (ulimit -Hn"
            f" {sockets + FD_MARGIN}; it needs CAP_SYS_RESOURCE) or use --sockets"
            f" {hard - FD_MARGIN} or fewer.",
            file=sys.stderr,
        )
        sys.exit(2)
    return min(per_client, hard - FD_MARGIN)


async def reading(
    sockets: int, ready: int, seconds: float, pids: list[int], population: Population
) -> dict[str, Any]:
    rabbitmq = await rabbitmq_snapshot(population.user_ids(), pids)
    return {
        "sockets": sockets,
        "ready": ready,
        "open_seconds": round(seconds, 2),
        "service_rss": rss_bytes(pids),
        "rabbitmq_rss": rss_bytes(processes_named("beam.smp")),
        **{key: rabbitmq.get(key) for key in RABBITMQ_KEYS},
    }


async def run(args: argparse.Namespace, per_client: int) -> dict[str, Any]:
    population, _rng = build_population(
        args.users, args.follows, args.sockets, args.zipf, args.seed
    )
    settings = {**UNLIMITED, **dict(args.service_env), "FEED_FANOUT": args.fanout}
    log = args.json.with_suffix(".service.log")
    holders: list[Holder] = []
    readings = []
    async with own_service(args.db_dsn, args.amqp_url, settings, log) as service:
        await asyncio.to_thread(seed_database, args.db_dsn, population, truncate=True)

        def url(session: int) -> str:
            return service.feed_url(population.user_id(population.session_users[session]))

        try:
            await asyncio.sleep(args.settle)
            readings.append(await reading(0, 0, 0.0, service.process.pids(), population))
            print_reading(readings[-1], readings[0])
            opened = ready = 0
            for target in sorted({n for n in args.at if n < args.sockets} | {args.sockets}):
                started = time.monotonic()
                answers = await open_range(holders, opened, target, per_client, url, args)
                ready += sum(a["ready"] for a in answers)
                seconds = time.monotonic() - started
                failed = {k: v for a in answers for k, v in a["failed"].items()}
                opened = target
                await asyncio.sleep(args.settle)
                step = await reading(target, ready, seconds, service.process.pids(), population)
                step["failed"] = failed
                step["ready_ms"] = [a["ready_ms"] for a in answers]
                readings.append(step)
                print_reading(step, readings[0])
        finally:
            await asyncio.gather(*(holder.stop() for holder in holders))
    return {
        "config": options.recorded(args),
        "population": population.summary(),
        "per_client": per_client,
        "readings": readings,
    }


async def open_range(
    holders: list[Holder],
    start: int,
    end: int,
    per_client: int,
    url: Callable[[int], str],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Sockets start..end-1; socket i is held by holder i // per_client (started when needed)."""
    batches: dict[int, list[str]] = {}
    for session in range(start, end):
        batches.setdefault(session // per_client, []).append(url(session))
    while len(holders) <= max(batches):
        holders.append(await Holder.start(len(holders)))
    # Each holder opens at most its share of the handshakes in flight at once.
    concurrency = max(1, args.connect_concurrency // len(batches))
    return await asyncio.gather(
        *(holders[number].open(urls, concurrency) for number, urls in batches.items())
    )


def print_reading(step: dict[str, Any], first: dict[str, Any]) -> None:
    sockets = step["sockets"]
    service_growth = step["service_rss"] - first["service_rss"]
    broker_growth = step["rabbitmq_rss"] - first["rabbitmq_rss"]
    print(
        f"{sockets:>7,} sockets ({step['ready']:,} ready in {step['open_seconds']} s):"
        f" service RSS {step['service_rss'] / 2**20:,.1f} MiB"
        f" (+{_per(service_growth, sockets)} per socket),"
        f" RabbitMQ RSS {step['rabbitmq_rss'] / 2**20:,.1f} MiB"
        f" (+{_per(broker_growth, sockets)} per socket),"
        f" queues {step['run_queues']}, bindings {step['run_bindings']}"
        f" ({step['run_control_bindings']} control),"
        f" queue procs {_mib(step['queue_procs_bytes'])}, mnesia {_mib(step['mnesia_bytes'])}",
        flush=True,
    )
    if step.get("failed"):
        print(f"        failed: {step['failed']}", flush=True)


def _per(growth: int, sockets: int) -> str:
    value = ratio(growth, sockets)
    return "-" if value is None else f"{value:,} B"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--sockets", type=int, default=10_000, help="sockets N to hold at the end [10000]")
    add("--at", type=int, action="append", help="also read at this many sockets [100]")
    add("--fanout", choices=MODES, default="process", help="the service's mode [process]")
    add("--users", type=int, default=2000, help="users U the sockets belong to [2000]")
    add("--follows", type=int, default=20, help="authors F each user follows [20]")
    add("--zipf", type=float, default=1.0, help="exponent of author popularity [1.0]")
    add("--seed", type=int, default=1, help="random seed of the population [1]")
    add("--per-client", type=int, default=10_000, help="sockets per client process [10000]")
    add("--connect-concurrency", type=int, default=100, help="handshakes in flight [100]")
    add("--settle", type=float, default=3.0, help="seconds before each reading [3]")
    options.service_options(parser)
    options.output_options(parser, "sockets")
    args = parser.parse_args()
    args.at = args.at or [100]
    return args


def main() -> None:
    args = parse_args()
    per_client = check_fd_limit(args.sockets, args.per_client)
    results = run_tool(run(args, per_client), "many sockets")
    first, last = results["readings"][1], results["readings"][-1]
    results["rabbitmq_rss_last_over_first"] = ratio(last["rabbitmq_rss"], first["rabbitmq_rss"], 3)
    print(
        f"RabbitMQ RSS at {last['sockets']:,} sockets / at {first['sockets']:,}:"
        f" {results['rabbitmq_rss_last_over_first']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
