"""Restart RabbitMQ under steady posting and time how long the feed sessions stay dark.

    python run.py &                                        # the service under test
    .venv/bin/python bench/broker_restart.py --url http://127.0.0.1:8888 --restarts 3

Needs rabbitmqctl on this machine (it runs `rabbitmqctl stop_app` and `start_app`, which drops
every connection to the local broker: run it where nothing else uses that broker). Posts go out
every --interval seconds throughout; for each restart it reports the time from the broker
answering again to both sessions receiving a post created after that, and at the end the posts
lost or duplicated on either session (both must be zero).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.websocket import websocket_connect

from bench.lib.api import call, follower_feed
from feed_app.config import Settings


class Session:
    def __init__(self) -> None:
        self.arrivals: dict[int, list[float]] = {}

    async def read(self, ws) -> None:
        while (text := await ws.read_message()) is not None:
            message = json.loads(text)
            if message["type"] == "post":
                self.arrivals.setdefault(message["post"]["id"], []).append(time.monotonic())


async def post_steadily(base: str, token: str, interval: float, sent: dict, stop: asyncio.Event):
    while not stop.is_set():
        started = time.monotonic()
        try:
            post = await call(base, "POST", "/post/create", {"text": "restart"}, token)
            sent[post["id"]] = started
        except Exception as exc:  # the service must keep accepting posts; report, don't stop
            print(f"  post failed: {exc}")
        await asyncio.sleep(interval)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120, capture_output=True)


async def measure(base: str, restarts: int, interval: float) -> int:
    author_token, ws_url = await follower_feed(base)
    sessions = [Session(), Session()]
    readers = []
    for session in sessions:
        ws = await websocket_connect(ws_url)
        readers.append(asyncio.ensure_future(session.read(ws)))
    sent: dict[int, float] = {}
    stop = asyncio.Event()
    poster = asyncio.ensure_future(post_steadily(base, author_token, interval, sent, stop))
    await asyncio.sleep(1)
    for restart in range(restarts):
        stopped = time.monotonic()
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.to_thread(rabbitmqctl, "start_app")
        back = time.monotonic()
        deadline = back + 60
        while time.monotonic() < deadline:
            after = [pid for pid, at in sent.items() if at >= back]
            if after and all(after[0] in s.arrivals for s in sessions):
                live = max(s.arrivals[after[0]][0] for s in sessions) - back
                print(
                    f"restart {restart + 1}: sessions live {live:.2f} s after start_app returned,"
                    f" {back + live - stopped:.2f} s after stop_app began"
                )
                break
            await asyncio.sleep(0.01)
        else:
            print(f"restart {restart + 1}: sessions not live within 60 s")
        await asyncio.sleep(2)
    stop.set()
    await poster
    await asyncio.sleep(3)  # drain
    lost = sum(1 for s in sessions for pid in sent if pid not in s.arrivals)
    duplicated = sum(1 for s in sessions for times in s.arrivals.values() if len(times) > 1)
    print(f"{len(sent)} posts, 2 sessions: lost {lost}, duplicated {duplicated}")
    for reader in readers:
        reader.cancel()
    return 1 if lost or duplicated else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=f"http://{Settings.host}:{Settings.port}")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between posts")
    args = parser.parse_args()
    return asyncio.run(measure(args.url, args.restarts, args.interval))


if __name__ == "__main__":
    sys.exit(main())
