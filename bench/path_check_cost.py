"""What the delivery-path check (feed_app/path_check.py) costs one process, at 3 and at 100
processes sharing a deployment: messages per second, and the CPU of its parts measured here.

    .venv/bin/python bench/path_check_cost.py [--peers 2 99] [--db-dsn ...]

Per tick (every path_check.BEAT seconds) a process publishes one beat, receives one from every
peer, writes its report and reads every peer's in one statement, and judges. Measured:
- the judging: hearing every peer's beat and one verdict, in Python (timeit);
- the statement, against a scratch database holding that many peers (wall time per call, which
  bounds PostgreSQL's CPU for it);
- a beat received: pika's delivery callback work that is ours (parse, hear), in Python (timeit).
What is not measured here, pika decoding a delivery frame and RabbitMQ routing it, is the same
work as a post's delivery: BENCHMARKS.md has that per delivery for the process fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import secrets
import sys
import timeit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib.options import SERVER_DSN
from bench.lib.processes import run_tool
from feed_app import wire
from feed_app.db import BeatReport, Database, drop_database, prepare_database
from feed_app.path_check import BEAT, LIVE_WITHIN, PathJudge

CALLS = 200  # statements timed per peer count


def judging_us(peers: int) -> float:
    """Microseconds of one tick's judging: every peer's beat heard, then one verdict."""
    judge = PathJudge()
    judge.on_bound()
    names = [f"host.{n}.abcdef" for n in range(peers)]
    judge.judge(0.0, {}, judge.generation)
    beat = [1]

    def tick() -> None:
        beat[0] += 1
        for name in names:
            judge.hear(name, beat[0])
        reports = {name: BeatReport(beat[0], beat[0], 1.0) for name in names}
        judge.judge(1.0, reports, judge.generation)

    return min(timeit.repeat(tick, number=200, repeat=5)) / 200 * 1e6


def beat_received_us() -> float:
    """Microseconds of ours per beat received: parse the body, hear it."""
    judge = PathJudge()
    judge.on_bound()
    body = wire.heartbeat_body("host.123.abcdef", 7)

    def receive() -> None:
        process, beat = wire.parse_heartbeat(body)
        judge.hear(process, beat)

    return min(timeit.repeat(receive, number=20_000, repeat=5)) / 20_000 * 1e6


async def statement_ms(dsn: str, peers: int) -> float:
    """Milliseconds per report statement with `peers` other processes reporting."""
    db = await Database.connect(dsn, 2)
    try:
        for n in range(peers):
            await db.report_beats(f"peer.{n}", 1, 1, LIVE_WITHIN)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for beat in range(CALLS):
            await db.report_beats("me", beat, beat, LIVE_WITHIN)
        return (loop.time() - started) / CALLS * 1000
    finally:
        await db.close()


async def measure(args: argparse.Namespace) -> None:
    per_beat = beat_received_us()
    print(f"one tick every {BEAT} s; a beat received costs {per_beat:.1f} µs of ours")
    print("| processes | beats out/s | beats in/s | judging µs/s | statement ms/s | ours µs/s |")
    print("|---|---|---|---|---|---|")
    for peers in args.peers:
        dsn = f"{args.db_server}/feed_bench_path_{secrets.token_hex(4)}"
        prepare_database(dsn)
        try:
            statement = await statement_ms(dsn, peers)
        finally:
            drop_database(dsn)
        ticks = 1 / BEAT
        judging = judging_us(peers) * ticks
        receiving = per_beat * peers * ticks
        print(
            f"| {peers + 1} | {ticks:.0f} | {peers * ticks:.0f} | {judging:.0f} "
            f"| {statement * ticks:.2f} | {judging + receiving:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 99], help="other processes")
    parser.add_argument("--db-server", default=SERVER_DSN, help="PostgreSQL server [%(default)s]")
    run_tool(measure(parser.parse_args()), "path_check_cost")


if __name__ == "__main__":
    main()
