"""Session set-up time: connect -> `ready` for users who follow N authors, in each fan-out mode,
beside the broker's own time for what a session-mode socket asks of it.

    .venv/bin/python bench/connect.py                          # 500 and 5,000 authors, session
    .venv/bin/python bench/connect.py --fanout both            # both modes, side by side
    .venv/bin/python bench/connect.py --fanout process --follows 20 --connects 100

For each N it seeds, in a fresh id range:
- a holder and K users who all follow the same N authors, and
- K users who each follow N authors nobody else follows.
Then, for each mode, it starts the service and opens sockets one after another (a gap between
them, so that dropping the last socket's queue or bindings does not land on the next one):
- "bound": the holder's socket is opened first and stays open; then each of the first K users
  connects. In process mode their authors are bound already: set-up binds only the user's
  control key. In session mode every socket binds all N authors anyway.
- "new": each of the other K users connects; every socket binds N authors in either mode. (In
  process mode a closed socket's authors are unbound UNBIND_AFTER seconds later, in the
  background, while later sockets connect.)
Last, the baseline: a bare pika client does what a session-mode socket asks of RabbitMQ (declare
the queue, N no-wait binds, a barrier, consume, delete) with nothing else around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import secrets
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.websocket import websocket_connect

from bench.lib import options
from bench.lib.amqp import call, open_channel, open_connection
from bench.lib.feedclient import ratio, summarize
from bench.lib.options import RESULTS_DIR
from bench.lib.population import Population, seed_database
from bench.lib.processes import run_tool
from bench.lib.service import Target, own_service
from feed_app.config import MODES
from feed_app.wire import frame_type

CASES = ("bound", "new")
PERCENTILES = ("p50", "p95", "p99", "max")


def connect_population(follows: int, connects: int) -> Population:
    """User 0 holds the shared authors bound; users 1..K follow those same N authors; users
    K+1..2K follow N authors each, their own; the authors follow nobody."""
    first_author = 2 * connects + 1
    shared = list(range(first_author, first_author + follows))
    own_blocks = [
        list(range(first_author + follows * (1 + k), first_author + follows * (2 + k)))
        for k in range(connects)
    ]
    authors = follows * (1 + connects)
    return Population(
        follows=[shared] * (1 + connects) + own_blocks + [[]] * authors, session_users=[]
    )


async def open_until_ready(url: str) -> Any:
    ws = await websocket_connect(url)
    while frame_type(await asyncio.wait_for(ws.read_message(), 60)) != "ready":
        pass
    return ws


async def time_connects(
    service: Target, population: Population, users: range, gap: float
) -> list[float]:
    times = []
    for user in users:
        ws_url = service.feed_url(population.user_id(user))
        started = time.perf_counter()
        ws = await open_until_ready(ws_url)
        times.append(time.perf_counter() - started)
        ws.close()
        await asyncio.sleep(gap)
    return times


async def time_mode(args: argparse.Namespace, mode: str, follows: int) -> dict[str, Any]:
    """The service in this mode, on users seeded afresh (run.py creates the database)."""
    log = RESULTS_DIR / f"connect-{follows}.{mode}.service.log"
    settings = {**dict(args.service_env), "FEED_FANOUT": mode}
    async with own_service(args.db_dsn, args.amqp_url, settings, log) as service:
        population = connect_population(follows, args.connects)
        await asyncio.to_thread(seed_database, args.db_dsn, population, truncate=True)
        holder = await open_until_ready(service.feed_url(population.user_id(0)))
        try:
            bound = await time_connects(service, population, range(1, args.connects + 1), args.gap)
        finally:
            holder.close()
        new = await time_connects(
            service, population, range(args.connects + 1, 2 * args.connects + 1), args.gap
        )
    return {"bound": summarize(bound), "new": summarize(new)}


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


async def measure(args: argparse.Namespace, follows: int, modes: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"follows": follows}
    # The broker's own time first: after a service has stopped, the broker goes on dropping its
    # queues' bindings for a while, and binds made meanwhile wait.
    result["broker"] = summarize(await time_broker(args.amqp_url, follows, args.connects))
    for mode in modes:
        print(f"  {follows} follows, {mode} mode...", flush=True)
        result[mode] = await time_mode(args, mode, follows)
    if "session" in result and "process" in result:
        result["process_over_session_p99"] = {
            case: ratio(result["process"][case]["p99"], result["session"][case]["p99"], 3)
            for case in CASES
        }
    return result


def print_result(result: dict[str, Any]) -> None:
    follows = result["follows"]
    rows = [
        (f"{case} authors, {mode}", result[mode][case])
        for case in CASES
        for mode in MODES
        if mode in result
    ]
    rows.append(("RabbitMQ alone", result["broker"]))
    for label, stats in rows:
        figures = " ".join(f"{stats[k]:>8.1f}" for k in PERCENTILES)
        print(f"{follows:>8} {label:>22} {figures}")
    for case, value in result.get("process_over_session_p99", {}).items():
        print(f"{follows:>8} {case + ' authors, p99':>22} process / session = {value}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--fanout", choices=[*MODES, "both"], default="session", help="mode(s) to time [session]")
    add("--follows", type=int, action="append", help="N (repeatable) [500, 5000]")
    add("--connects", type=int, default=30, help="sockets timed per case, mode and N [30]")
    add("--gap", type=float, default=1.0, help="seconds between sockets [1]")
    options.service_options(parser)
    options.output_options(parser, "connect")
    return parser.parse_args()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = list(MODES) if args.fanout == "both" else [args.fanout]
    results = []
    for follows in args.follows or [500, 5000]:
        results.append(await measure(args, follows, modes))
    return results


def main() -> None:
    args = parse_args()
    results = run_tool(run(args), "connect")
    header = " ".join(f"{h:>8}" for h in PERCENTILES)
    print(f"\n{'follows':>8} {'':>22} {header}  (ms, {args.connects} sockets each)")
    for result in results:
        print_result(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
