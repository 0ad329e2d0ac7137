"""Load test of the live feed: websocket sessions, posts at a fixed rate, each delivery checked.

    .venv/bin/python bench/loadtest.py                  # default run, under a minute
    .venv/bin/python bench/loadtest.py --smoke          # tiny run, fails on lost/duplicated posts
    .venv/bin/python bench/loadtest.py --fanout both    # both fan-out modes, side by side
    .venv/bin/python bench/loadtest.py --fanout both --saturate   # the rate each mode holds

What a run does, in order, for each fan-out mode (--fanout session|process, or both in turn):
 1. starts the service (run.py --workers W --fanout MODE) on a free port against a dedicated
    database (feed_bench by default, created by run.py) and waits for /readyz; or, with --url,
    uses instances that are already running;
 2. seeds U users and a Zipf-shaped follow graph with COPY (one shared password hash) into a fresh
    id range, so the run's users have no posts and no history pollutes the measurement;
 3. opens S websocket sessions with self-minted tokens and waits for `ready` on each;
 4. posts R posts/s for T seconds (POST /post/create) with tagged texts, and records for every
    post which open sessions must receive it, then which did, when, and how often (with
    --change-share, that share of the actions edit or delete a post instead, audited alike); with
    --saturate, steps of T seconds at rising rates instead, until one is not held (see
    bench/lib/saturation.py), then T seconds at half the highest rate held;
 5. drains for a few seconds, then reports latency, throughput, LOST and DUPLICATED deliveries,
    errors, service/RabbitMQ CPU and memory, and the run's queues and bindings in RabbitMQ;
 6. stops the service.
Then, with --ceilings, it measures a bare Tornado push server and a bare pika consumer the same
way (once, whatever the number of modes), prints the modes side by side with the ceilings and
the process/session ratios, and writes a results JSON and a PNG chart (bench/results/).

The exit status is 1 when a delivery was lost or duplicated, or nothing was delivered at all;
2 when the run could not be carried out (the service did not start, ...); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
from typing import Any

# Run as a script, only bench/ is on sys.path: add the repository so feed_app and bench import.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.httpclient import AsyncHTTPClient

from bench.lib import ceilings, compare, options, report
from bench.lib.population import build_population
from bench.lib.processes import REPO, run_tool
from bench.lib.service_run import ServiceRun, phase_authors
from feed_app.config import MODES

HTTP_MAX_CLIENTS = 200

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
    shape.add_argument(
        "--change-share",
        type=float,
        default=0.0,
        help="fraction of the actions that edit or delete (in turn) one of the phase's posts"
        " instead of posting, each audited like a post [0]",
    )
    shape.add_argument(
        "--post-via",
        choices=["http", "socket"],
        default="http",
        help="post with POST /post/create, or as post messages on an open feed socket of the "
        "author's own, as the page does, falling back to HTTP for an author with none [http]",
    )
    shape.add_argument("--seed", type=int, default=1, help="random seed of the population [1]")

    target = options.service_options(parser)
    target.add_argument(
        "--fanout",
        choices=[*MODES, "both"],
        default="session",
        help="run.py --fanout: a queue per socket (session), one per process (process), or both"
        " in turn with the same population and load; with --url, the mode the instances run"
        " [session]",
    )
    target.add_argument("--workers", type=int, default=1, help="run.py --workers [1]")
    target.add_argument(
        "--run-py",
        type=pathlib.Path,
        default=REPO / "run.py",
        help="the service to start: another checkout's run.py measures that version with this"
        " client (give it a --db-dsn of its own when its schema differs) [this checkout's]",
    )
    options.running_service_options(target)
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
    add(
        "--drain",
        type=float,
        help="seconds to wait for late deliveries after the last post [5; with --saturate 30]",
    )
    options.output_options(run, "loadtest", chart=True)
    add("--quiet", action="store_true", help="no progress lines")

    search = parser.add_argument_group(
        "saturation (--saturate: at most --max-steps steps of --duration seconds, plus one at"
        " half the rate held, each followed by its drain)"
    )
    add = search.add_argument
    add(
        "--saturate",
        action="store_true",
        help="find the highest posting rate each mode holds, starting at --rate",
    )
    add("--step-factor", type=float, default=2.0, help="rate multiplier between steps [2]")
    add("--max-steps", type=int, default=8, help="steps at most, refinements included [8]")
    add(
        "--refine",
        type=int,
        default=3,
        help="bisections between the highest rate held and the lowest not held [3]",
    )
    add(
        "--hold-tolerance",
        type=float,
        default=0.05,
        help="a rate is held when the posts went out and the deliveries/s came within this"
        " fraction of it [0.05]",
    )

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
    if args.drain is None:  # an overloaded step needs time to clear its backlog
        args.drain = 30.0 if args.saturate else 5.0
    args.no_chart = args.no_chart or (args.smoke and args.chart is None)
    args.chart = args.chart or args.json.with_suffix(".png")
    if args.users < 2 or args.sessions < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("need --users >= 2, --sessions >= 1, --rate > 0 and --duration > 0")
    if not 0 <= args.change_share < 1:
        parser.error("--change-share is a fraction: 0 <= share < 1")
    if args.saturate and (args.step_factor <= 1 or args.max_steps < 1):
        parser.error("--saturate needs --step-factor > 1 and --max-steps >= 1")
    args.run_py = args.run_py.resolve()
    if args.url and args.fanout == "both":
        parser.error("--fanout both starts the service in each mode: not with --url")
    return args


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


async def run_load_test(args: argparse.Namespace) -> dict[str, Any]:
    """Each mode in turn on the same population and posts, then the ceilings once."""
    results: dict[str, Any] = {
        "config": options.recorded(args),
        "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "http_client": configure_http_client(),
        "runs": {},
    }
    population, _rng = build_population(
        args.users, args.follows, args.sessions, args.zipf, args.seed
    )
    modes = list(MODES) if args.fanout == "both" else [args.fanout]
    for mode in modes:
        results["runs"][mode] = await ServiceRun(args, mode, population).run()
    if args.ceilings:
        results["ceilings"] = await ceilings.measure(
            population,
            phase_authors(population, args.rate, args.duration, args),
            text_size=args.text_size,
            amqp_url=args.amqp_url,
            pika_messages=args.pika_messages,
            log_path=args.json.with_suffix(".bare.log"),
            concurrency=args.connect_concurrency,
            ready_timeout=args.ready_timeout,
            drain_timeout=max(args.drain, 10),
            say=lambda text: print(text, flush=True),
        )
    results["comparison"] = compare.compare(results)
    return results


def verdict(results: dict[str, Any]) -> tuple[int, str]:
    """Lost or duplicated deliveries in any phase of any mode fail the run, and so does a main
    phase that delivered nothing."""
    problems = []
    for mode, run in results["runs"].items():
        steps = (run.get("saturation") or {}).get("steps", [])
        phases = [p for p in (run.get("phase"), *steps) if p]
        lost = sum(p["deliveries"]["lost"] for p in phases)
        duplicated = sum(p["deliveries"]["duplicated"] for p in phases)
        if lost:
            problems.append(f"{mode}: {lost} deliveries LOST")
        if duplicated:
            problems.append(f"{mode}: {duplicated} deliveries DUPLICATED")
        if not run.get("phase") or not run["phase"]["deliveries"]["delivered"]:
            problems.append(f"{mode}: nothing was delivered")
    return (1, "FAIL: " + ", ".join(problems)) if problems else (0, "OK: no lost or duplicated")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_tool(run_load_test(args), "load test")
    code, message = verdict(results)
    results["verdict"] = message
    report.print_table(results)
    for mode, run in results["runs"].items():
        log = run.get("service_log") or {}
        if log.get("problems"):
            print(f"\n[{mode}] service log {log['path']}: {log['problems']} suspicious lines:")
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
