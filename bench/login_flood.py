"""Password guessing against one account, and what it does to delivery for everyone else.

    .venv/bin/python bench/login_flood.py                  # 30 loops, 3 x (100 quiet, 100 flood)
    .venv/bin/python bench/login_flood.py --loops 30 --rounds 3 --url http://127.0.0.1:8888

1. Starts the service (run.py on a free port, database feed_bench, the default limits
   except FEED_POST_RATE, which the delay measurement needs raised), or uses --url.
2. Registers a victim, and an author followed by a user with two open feed sockets.
3. Quiet: the delay from POST /post/create to both sockets, one post at a time
   (bench/lib/api.py, `delays`).
4. Flood: --loops connections (in a child process, so the flood's CPU is not the measuring
   client's) each send wrong-password logins for the victim over keep-alive, each as soon as
   the previous answer came; once they run, the same delay measurement again.
   Steps 3 and 4 alternate --rounds times, so the machine's drift falls on both alike.
5. Prints the answers by status, the password hashes the service computed during the flood
   (feed_password_hashes_total), and the two delay figures with their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


from bench.lib import options
from bench.lib.api import delays, describe, new_user, open_follower
from bench.lib.options import RESULTS_DIR
from bench.lib.processes import run_tool
from bench.lib.service import UNLIMITED, own_service, read_metrics


async def guess(host: str, port: int, victim: int, until: float, answers: Counter) -> None:
    """One attacker connection: wrong passwords for `victim`, back to back, over keep-alive."""
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"id": victim, "password": "not the password"}).encode()
    request = (
        f"POST /login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.monotonic() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
            await reader.readexactly(length)
            answers[int(head.split()[1])] += 1
    finally:
        writer.close()


async def flood(url: str, victim: int, loops: int, seconds: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    answers: Counter = Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*(guess(host, int(port), victim, until, answers) for _ in range(loops)))
    print(json.dumps({str(status): count for status, count in answers.items()}), flush=True)


async def metric(url: str, name: str) -> float:
    values = await read_metrics(url, (name,))
    if values is None or name not in values:
        raise RuntimeError(f"{url}/metrics did not give {name}")
    return values[name]


async def measure(url: str, args: argparse.Namespace) -> None:
    victim, _ = await new_user(url)
    author_token, sessions = await open_follower(url)
    await delays(url, author_token, sessions, 10)  # warm-up, not counted
    quiet: list[float] = []
    flooded: list[float] = []
    answers: Counter = Counter()
    hashed = 0.0
    # Quiet and flood alternate, so that the machine's own drift falls on both alike.
    for _ in range(args.rounds):
        quiet += await delays(url, author_token, sessions, args.posts)
        hashes = await metric(url, "feed_password_hashes_total")
        argv = [sys.executable, __file__, "--flood", url, "--victim", str(victim)]
        argv += ["--loops", str(args.loops), "--flood-seconds", str(args.flood_seconds)]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(args.ramp)  # every loop connected and hammering
        flooded += await delays(url, author_token, sessions, args.posts)
        hashed += await metric(url, "feed_password_hashes_total") - hashes
        out, _ = await asyncio.to_thread(child.communicate)
        answers.update({int(status): count for status, count in json.loads(out).items()})
    seconds = args.rounds * args.flood_seconds
    length = f"{args.rounds} x {args.flood_seconds:g} s"
    print(f"flood: {args.loops} loops against user {victim}, {length}")
    print(f"  answers: {dict(sorted(answers.items()))} ({answers.total() / seconds:,.0f}/s)")
    print(f"  password hashes computed during the floods: {hashed:.0f}")
    posts = f"{args.rounds} x {args.posts} posts x 2 sessions"
    print(f"quiet: {posts}: {describe(quiet)}")
    print(f"flood: {posts}: {describe(flooded)}")
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(f"median under flood / quiet: {ratio:.2f}")


async def run(args: argparse.Namespace) -> None:
    if args.url:
        await measure(args.url.rstrip("/"), args)
        return
    settings = {"FEED_POST_RATE": UNLIMITED["FEED_POST_RATE"], **dict(args.service_env)}
    log = RESULTS_DIR / "login_flood.service.log"
    async with own_service(args.db_dsn, args.amqp_url, settings, log) as service:
        await measure(service.url, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running service (its FEED_POST_RATE raised)")
    parser.add_argument("--loops", type=int, default=30, help="parallel guessing loops [30]")
    parser.add_argument("--posts", type=int, default=100, help="posts per measurement [100]")
    parser.add_argument("--rounds", type=int, default=3, help="quiet/flood pairs [3]")
    parser.add_argument("--ramp", type=float, default=1.0, help="flood seconds before [1]")
    parser.add_argument("--flood-seconds", type=float, default=8.0, help="flood length [8]")
    # e.g. --service-env FEED_REFUSAL_DELAY=0 to refuse at once, or
    # FEED_LOGIN_RATE_USER=1000000/second for no limit
    options.service_options(parser)
    parser.add_argument("--flood", help=argparse.SUPPRESS)  # the child process: flood this URL
    parser.add_argument("--victim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        asyncio.run(flood(args.flood, args.victim, args.loops, args.flood_seconds))
    else:
        run_tool(run(args), "login flood")


if __name__ == "__main__":
    main()
