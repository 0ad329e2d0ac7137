"""What sockets that follow their tokens cost: an access token renewed in-band on the open socket
against a socket closed at expiry and reopened with since= (the two choices of docs/websocket.md),
the token refresh itself, and how long each way of ending a log-in takes to close a socket held by
another instance.

    .venv/bin/python bench/token_renewal.py                      # 300 sockets, 20 follows each
    .venv/bin/python bench/token_renewal.py --sockets 1000 --follows 100

It seeds users who each follow --follows authors, starts the service (and, for the revocations,
a second instance on the same database), opens --sockets feed sockets and then measures, by the
CPU seconds of the service's processes (and of RabbitMQ's node, when rabbitmqctl can name it):
- renewal: every socket is sent token messages (a fresh token each, as a page sends one per
  access-token lifetime) and then a ping, whose pong says all were handled;
- reconnect: every socket is closed and opened again with since=, until ready: the queue and the
  bindings of a session-mode socket are made again;
- refresh: POST /token/refresh one after another, each with the cookie the last one set;
- revocation: a socket on instance B, then POST /logout, POST /logout/all or PUT /user/password on
  instance A: the time from sending the request until the socket's close code (4003) arrives.
The CPU of an idle service over the same time is subtracted. Figures at 10,000 sockets with
15-minute tokens follow from these: 10,000 / 900 s = 11.1 renewals (or reconnects) a second.
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookies
import json
import pathlib
import random
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from bench.lib import options
from bench.lib.feedclient import summarize
from bench.lib.population import BENCH_PASSWORD, Population, seed_database
from bench.lib.processes import run_tool
from bench.lib.procstats import CpuMeter, broker_pid
from bench.lib.service import UNLIMITED, Target, own_service, start_service
from feed_app import auth, wire
from feed_app.revocations import POLL_EVERY
from feed_app.wire import frame_type

SOCKETS_AT_SCALE = 10_000
TOKEN_LIFETIME = 15 * 60
NO_LIMITS = {
    **UNLIMITED,
    "FEED_LOGIN_RATE_USER": "1000000/second",
    "FEED_LOGIN_RATE_ADDRESS": "1000000/second",
    "FEED_REFRESH_RATE_ADDRESS": "1000000/second",
    "FEED_HASH_QUEUE": "100000",
}
REVOCATIONS = ("logout", "logout_all", "password")


async def open_until_ready(url: str) -> WebSocketClientConnection:
    ws = await websocket_connect(url)
    while frame_type(await asyncio.wait_for(ws.read_message(), 60)) != "ready":
        pass
    return ws


async def handled(ws: WebSocketClientConnection) -> None:
    """Until the server has handled everything sent before: its pong comes after."""
    pong = asyncio.get_running_loop().create_future()
    ws.on_pong = lambda _data: pong.done() or pong.set_result(None)
    ws.ping(b"barrier")
    await asyncio.wait_for(pong, 60)


class Meter:
    """CPU seconds of the service and the broker over a stretch, less an idle service's."""

    def __init__(self, service: Target, broker: int | None, idle_per_second: float) -> None:
        self.service = CpuMeter(service.pids)
        self.broker = CpuMeter(lambda: [broker] if broker else [])
        self.idle_per_second = idle_per_second
        self.started = 0.0

    def start(self) -> None:
        self.service.start()
        self.broker.start()
        self.started = time.monotonic()

    def stop(self, operations: int) -> dict[str, float]:
        wall = time.monotonic() - self.started
        service = self.service.stop() - self.idle_per_second * wall
        broker = self.broker.stop()
        return {
            "operations": operations,
            "wall_s": round(wall, 2),
            "service_cpu_ms_each": round(1000 * service / operations, 4),
            "broker_cpu_ms_each": round(1000 * broker / operations, 4),
            "per_second": round(operations / wall, 1),
        }


async def idle_cpu_per_second(service: Target, seconds: float = 3.0) -> float:
    meter = CpuMeter(service.pids)
    meter.start()
    await asyncio.sleep(seconds)
    return meter.stop() / seconds


async def renewals(
    service: Target, population: Population, sockets: list, rounds: int, meter: Meter
) -> dict:
    # A fresh token per message, minted before the clock starts: each differs in its expiry.
    tokens = [
        [
            auth.issue_token(population.user_id(i), service.jwt_secret, TOKEN_LIFETIME + r)
            for r in range(rounds)
        ]
        for i in range(len(sockets))
    ]
    meter.start()
    for ws, mine in zip(sockets, tokens, strict=True):
        for token in mine:
            ws.write_message(wire.token_message(token))
    await asyncio.gather(*(handled(ws) for ws in sockets))
    return meter.stop(len(sockets) * rounds)


async def reconnects(service: Target, population: Population, sockets: list, meter: Meter) -> dict:
    meter.start()
    for i, ws in enumerate(sockets):
        ws.close()
        sockets[i] = await open_until_ready(service.feed_url(population.user_id(i)) + "&since=0")
    return meter.stop(len(sockets))


async def log_in(url: str, user_id: int, password: str = BENCH_PASSWORD) -> tuple[str, str]:
    """(access token, refresh token) of a new log-in."""
    body = json.dumps({"id": user_id, "password": password})
    response = await AsyncHTTPClient().fetch(f"{url}/login", method="POST", body=body)
    return json.loads(response.body)["token"], refresh_cookie(response.headers)


def refresh_cookie(headers: Any) -> str:
    for header in headers.get_list("Set-Cookie"):
        cookie = http.cookies.SimpleCookie(header)
        if wire.REFRESH_COOKIE in cookie:
            return cookie[wire.REFRESH_COOKIE].value
    raise RuntimeError("no refresh cookie")


async def refreshes(service: Target, user_id: int, count: int, meter: Meter) -> dict:
    _, cookie = await log_in(service.url, user_id)
    client = AsyncHTTPClient()
    meter.start()
    for _ in range(count):
        request = HTTPRequest(
            service.url + wire.REFRESH_PATH,
            method="POST",
            body=b"",
            headers={"Cookie": f"{wire.REFRESH_COOKIE}={cookie}"},
        )
        cookie = refresh_cookie((await client.fetch(request)).headers)
    return meter.stop(count)


async def time_revocation(
    kind: str, here: str, there: Target, user_id: int, turn: int
) -> tuple[float, float]:
    """Seconds until a socket on `there` closes with 4003: from sending the request on `here`,
    and from its answer (the log-in ended when the answer was sent; negative: the socket closed
    first)."""
    password = password_of(turn) if kind == "password" else BENCH_PASSWORD
    token, _ = await log_in(here, user_id, password)
    ended = token
    if kind == "password":
        ended, _ = await log_in(here, user_id, password)  # the other log-in
    url = f"{there.url.replace('http', 'ws', 1)}/post/feed/{user_id}?token={ended}"
    ws = await open_until_ready(url)
    path, method, body = {
        "logout": ("/logout", "POST", b""),
        "logout_all": ("/logout/all", "POST", b""),
        "password": (
            "/user/password",
            "PUT",
            json.dumps({"old_password": password_of(turn), "new_password": password_of(turn + 1)}),
        ),
    }[kind]
    request = HTTPRequest(
        here + path, method=method, body=body, headers={"Authorization": f"Bearer {token}"}
    )
    started = time.perf_counter()
    answered_at: dict[str, float] = {}
    answer = asyncio.ensure_future(AsyncHTTPClient().fetch(request))
    answer.add_done_callback(lambda _: answered_at.setdefault("at", time.perf_counter()))
    while await asyncio.wait_for(ws.read_message(), 10) is not None:
        pass
    closed = time.perf_counter()
    await answer
    answered = answered_at.get("at", time.perf_counter())
    if ws.close_code != wire.Close.LOGGED_OUT:
        raise RuntimeError(f"{kind}: closed with {ws.close_code}, not 4003")
    return closed - started, closed - answered


def password_of(turn: int) -> str:
    """The password changes back and forth, one change a turn."""
    return BENCH_PASSWORD if turn % 2 == 0 else f"{BENCH_PASSWORD}-{turn}"


async def revocations(args: argparse.Namespace, service: Target, user_ids: list[int]) -> dict:
    log = options.RESULTS_DIR / "token-renewal.instance-b.log"
    settings = {**NO_LIMITS, **dict(args.service_env), "FEED_JWT_SECRET": service.jwt_secret}
    other = await start_service(args.db_dsn, args.amqp_url, settings, log)
    try:
        result = {}
        for kind, user_id in zip(REVOCATIONS, user_ids, strict=True):
            from_request, from_answer = [], []
            for turn in range(args.revocations):
                timed = await time_revocation(kind, service.url, other, user_id, turn)
                from_request.append(timed[0])
                from_answer.append(timed[1])
                # At a random phase of the other instance's polling, as a real log-out comes.
                await asyncio.sleep(random.uniform(0, POLL_EVERY))
            result[kind] = {
                "from_request": summarize(from_request),
                "from_answer": summarize(from_answer),
            }
        return result
    finally:
        other.process.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # Users 0..S-1 hold sockets and follow the F authors S..S+F-1; three more end log-ins.
    authors = list(range(args.sockets, args.sockets + args.follows))
    population = Population(
        follows=[authors] * args.sockets + [[]] * (args.follows + len(REVOCATIONS)),
        session_users=[],
    )
    settings = {**NO_LIMITS, **dict(args.service_env)}
    log = options.RESULTS_DIR / "token-renewal.service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    async with own_service(args.db_dsn, args.amqp_url, settings, log) as service:
        await asyncio.to_thread(seed_database, args.db_dsn, population, truncate=True)
        broker = await broker_pid()
        sockets = [
            await open_until_ready(service.feed_url(population.user_id(i)))
            for i in range(args.sockets)
        ]
        idle = await idle_cpu_per_second(service)
        meter = Meter(service, broker, idle)
        result: dict[str, Any] = {"options": options.recorded(args), "idle_cpu_per_second": idle}
        print("renewals...", flush=True)
        result["renewal"] = await renewals(service, population, sockets, args.rounds, meter)
        print("reconnects...", flush=True)
        result["reconnect"] = await reconnects(service, population, sockets, meter)
        print("refreshes...", flush=True)
        leaver = population.user_id(args.sockets + args.follows)
        result["refresh"] = await refreshes(service, leaver, args.refreshes, meter)
        for ws in sockets:
            ws.close()
        print("revocations...", flush=True)
        enders = [leaver + k for k in range(len(REVOCATIONS))]
        result["revocation_ms"] = await revocations(args, service, enders)
    # The broker is shared with whatever else runs on the machine, and its node's CPU is read
    # whole: its share is an upper bound (a refresh, which does nothing on the broker, shows it).
    rate = SOCKETS_AT_SCALE / TOKEN_LIFETIME
    result["at_10000_sockets"] = {"per_second": round(rate, 1)}
    for kind in ("renewal", "reconnect", "refresh"):
        for part in ("service", "broker"):
            share = rate * result[kind][f"{part}_cpu_ms_each"] / 1000
            result["at_10000_sockets"][f"{kind}_{part}_share_of_a_core"] = round(share, 5)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--sockets", type=int, default=300, help="feed sockets held [300]")
    add("--follows", type=int, default=20, help="authors each socket's user follows [20]")
    add("--rounds", type=int, default=10, help="token messages per socket [10]")
    add("--refreshes", type=int, default=500, help="POST /token/refresh in a row [500]")
    add("--revocations", type=int, default=20, help="times each way of ending a log-in [20]")
    options.service_options(parser)
    options.output_options(parser, "token-renewal")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    result = run_tool(run(args), "token_renewal")
    print(json.dumps({k: v for k, v in result.items() if k != "options"}, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
