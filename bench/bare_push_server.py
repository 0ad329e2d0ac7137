"""A bare Tornado websocket server: the ceiling the feed service is compared with.

It speaks the feed's client-visible protocol (GET /post/feed/<user_id> upgrades, sends
{"type": "ready", ...}, then post frames) but has no database, no broker and no per-session
bookkeeping: a post is encoded once and written to every connection of every follower. Whatever
the load-test client can receive from it is the most any websocket feed written with Tornado can
deliver to that client on this machine, so the service's deliveries/s divided by this number says
how much of that the service's real work (PostgreSQL, RabbitMQ, exactness) costs.

    POST /setup   {"following": {"<user id>": [author ids...]}}   the follow graph
    WS   /post/feed/<user id>                                      a client; any query is ignored
    POST /burst   {"posts": [{"id", "author_id", "text"}, ...]}    push them all, as fast as the
                  sockets take them; answers {"writes": n, "seconds": s} when all are written
    GET  /readyz                                                   200 once listening

Run by bench/loadtest.py (--ceilings); standalone: `python bench/bare_push_server.py --port 9001`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import signal
import sys
import time
from collections import defaultdict

import tornado.web
import tornado.websocket

# Run as a script, only bench/ is on sys.path: add the repository so feed_app imports.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from feed_app import wire

# Wait for the writes of this many posts to leave the process before pushing more: the same kind
# of back-pressure the service gets from its prefetch window, so a slow client does not make this
# server buffer the whole burst in memory.
FLUSH_EVERY = 20


class Hub:
    """Connections by user and followers by author."""

    def __init__(self) -> None:
        self.following: dict[int, list[int]] = {}
        self.followers: dict[int, list[int]] = defaultdict(list)
        self.connections: dict[int, set[PushSocket]] = defaultdict(set)

    def set_graph(self, following: dict[int, list[int]]) -> None:
        """Who gets an author's posts: its followers and the author (as the service does)."""
        self.following = following
        self.followers = defaultdict(list, {user: [user] for user in following})
        for user, authors in following.items():
            for author in authors:
                self.followers[author].append(user)

    async def push(self, posts: list[dict]) -> int:
        created_at = datetime.datetime.now(datetime.timezone.utc).isoformat()
        writes, pending = 0, []
        for number, post in enumerate(posts, 1):
            frame = wire.post_frame({**post, "created_at": created_at})
            for user in self.followers.get(post["author_id"], ()):
                for socket in list(self.connections.get(user, ())):
                    try:
                        pending.append(socket.write_message(frame))
                        writes += 1
                    except tornado.websocket.WebSocketClosedError:
                        pass
            if number % FLUSH_EVERY == 0 or number == len(posts):
                await asyncio.gather(*pending, return_exceptions=True)
                pending = []
        return writes


class PushSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, hub: Hub) -> None:
        self.hub = hub
        self.user_id = 0

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, user_id: str) -> None:
        self.user_id = int(user_id)
        self.hub.connections[self.user_id].add(self)
        following = len(self.hub.following.get(self.user_id, ()))
        self.write_message(wire.ready_frame(following))

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        self.hub.connections[self.user_id].discard(self)


class SetupHandler(tornado.web.RequestHandler):
    def initialize(self, hub: Hub) -> None:
        self.hub = hub

    def post(self) -> None:
        body = json.loads(self.request.body)
        self.hub.set_graph({int(k): list(v) for k, v in body["following"].items()})
        self.finish({"users": len(self.hub.following)})


class BurstHandler(tornado.web.RequestHandler):
    def initialize(self, hub: Hub) -> None:
        self.hub = hub

    async def post(self) -> None:
        posts = json.loads(self.request.body)["posts"]
        started = time.monotonic()
        writes = await self.hub.push(posts)
        self.finish({"writes": writes, "seconds": time.monotonic() - started})


class ReadyHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ready"})


def make_app(hub: Hub) -> tornado.web.Application:
    args = {"hub": hub}
    return tornado.web.Application(
        [
            (r"/post/feed/(\d+)", PushSocket, args),
            (r"/setup", SetupHandler, args),
            (r"/burst", BurstHandler, args),
            (r"/readyz", ReadyHandler),
        ],
        websocket_max_message_size=4096,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = make_app(Hub()).listen(args.port, args.host, max_body_size=256 * 1024 * 1024)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.stop()


if __name__ == "__main__":
    asyncio.run(main())
