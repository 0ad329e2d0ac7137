"""Soak test: open and close feed sessions for a long time and watch for anything that grows.

    .venv/bin/python bench/soak.py                   # 20,000 open/close cycles at 50/s (~8 min)
    .venv/bin/python bench/soak.py --smoke           # 300 cycles (~25 s); the test suite runs it
    .venv/bin/python bench/soak.py --duration 600 --rate 40 --hangup-every 20
    .venv/bin/python bench/soak.py --duration 720 --posts 1 --fanout process   # posting too
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8888 --service-pids 1234 \\
        --db-dsn postgresql://127.0.0.1:5432/feed --jwt-secret "$FEED_JWT_SECRET"

What a run does, in order:
 1. starts the service (run.py on a free port, database feed_bench, --fanout, --service-env
    and --service-arg passed on) and waits for /readyz; or, with --url, uses one that is
    already running (--service-pids gives its memory and file descriptors);
 2. seeds U users following F authors each, in a fresh id range (bench/lib/population.py);
 3. runs cycles at --rate per second, at most --concurrency at a time: a client opens a feed
    websocket as the next user, waits for `ready`, sends --posts post messages on it (each
    answered before the next), holds it --hold seconds, closes it and waits for the server's
    close frame. Every --hangup-every-th cycle instead sends a valid upgrade request with a
    valid token and drops the TCP connection at once: by FIN (close), RST (SO_LINGER 0) or
    shutdown(), in turn;
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
import pathlib
import sys
from typing import Any

# Run as a script, only bench/ is on sys.path: add the repository so feed_app and bench import.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib import options
from bench.lib.churn import Soak
from bench.lib.churn_report import print_summary, write_chart
from bench.lib.processes import run_tool
from bench.lib.report import write_json
from feed_app.config import MODES

MAX_FAILED_SHARE = 0.01

# Values used when an option is not given: a full run, and --smoke.
FULL = {
    "cycles": 20000,
    "rate": 50.0,
    "concurrency": 200,
    "hold": 3.0,
    "posts": 0,
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
    "posts": 1,
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
        "--posts",
        type=int,
        help="post messages each session sends once ready, one answer after another [0; smoke 1]:"
        " the posting path under the same churn, its posts fanned out to the open sessions",
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
    if (
        args.rate <= 0
        or args.concurrency < 1
        or args.users < 2
        or args.hangup_every < 0
        or args.posts < 0
    ):
        parser.error(
            "need --rate > 0, --concurrency >= 1, --users >= 2, --hangup-every >= 0, --posts >= 0"
        )
    if planned <= args.warmup:
        parser.error(f"{planned} cycles leave nothing after the warm-up of {args.warmup}")
    if len(args.url) > 1:
        parser.error("one --url: the soak reads one instance's sessions, memory and fds")
    args.chart = args.chart or args.json.with_suffix(".png")
    return args


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
