"""A bare Tornado websocket server: the ceiling the feed service is compared with.

It speaks the feed's client-visible protocol (GET /post/feed/<user_id> upgrades, sends
{"type": "ready", ...}, then post frames) but has no database, no broker and no per-session
bookkeeping: a post is encoded once and written to every connection of every follower. Whatever
the load-test client can receive from it is the most any websocket feed written with Tornado can
deliver to that client on this machine, so the service's deliveries/s divided by this number says
how much of that the service's real work (PostgreSQL, RabbitMQ, exactness) costs.

    POST /setup   {"following": {"<user id>": [author ids...]}}   the follow graph
    WS   /post/feed/<user id>                                      a client; any query is ignored
    POST /burst   {"posts": [{"id", "author_id", "text"}, ...], "prebuilt": false}
                  push them all, as fast as the sockets take them; answers {"writes": n,
                  "seconds": s, "cpu_seconds": c} when all are written. With "prebuilt", each
                  post's whole websocket frame (header and payload) is built once and the same
                  bytes go to every socket with one send() (the stream's buffer takes only what
                  the kernel does not): the floor of one write per socket, below
                  which no websocket feed in Python on this machine can deliver. Without it,
                  write_message() per socket, as any Tornado handler writes.
    GET  /readyz                                                   200 once listening

It runs on the event loop the service runs on by default (FEED_EVENT_LOOP, else the setting's
default), so that the floor is not slower than the service for want of uvloop.

Run by bench/loadtest.py (--ceilings); standalone: `python bench/bare_push_server.py --port 9001`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable

import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError

# Run as a script, only bench/ is on sys.path: add the repository so feed_app imports.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from feed_app import wire
from feed_app.config import Settings, use_event_loop
from feed_app.feed_socket import send_or_buffer

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

    async def push(self, posts: list[dict], *, prebuilt: bool) -> int:
        created_at = datetime.datetime.now(datetime.timezone.utc).isoformat()
        write = _write_prebuilt if prebuilt else _write_message
        # A socket's writes complete in order: waiting for its last one is waiting for all.
        writes, last_write = 0, {}
        for number, post in enumerate(posts, 1):
            payload = wire.post_frame({**post, "created_at": created_at})
            frame = wire.websocket_text_frame(payload) if prebuilt else payload
            for user in self.followers.get(post["author_id"], ()):
                for socket in list(self.connections.get(user, ())):
                    try:
                        pending = write(socket, frame)
                    except (tornado.websocket.WebSocketClosedError, StreamClosedError):
                        continue
                    writes += 1
                    if pending is not None:
                        last_write[socket] = pending
            if number % FLUSH_EVERY == 0 or number == len(posts):
                await asyncio.gather(*last_write.values(), return_exceptions=True)
                last_write = {}
        return writes


def _write_message(socket: PushSocket, payload: bytes) -> Awaitable[None] | None:
    return socket.write_message(payload)


def _write_prebuilt(socket: PushSocket, frame: bytes) -> Awaitable[None] | None:
    """The floor's write: the frame straight to the kernel, one send() per socket, with the
    stream's buffer only for what the kernel does not take (the service's own primitive)."""
    if socket.ws_connection is None:
        raise tornado.websocket.WebSocketClosedError()
    return send_or_buffer(socket.ws_connection.stream, frame)


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
        burst = json.loads(self.request.body)
        started, cpu_started = time.monotonic(), time.process_time()
        writes = await self.hub.push(burst["posts"], prebuilt=burst.get("prebuilt", False))
        self.finish(
            {
                "writes": writes,
                "seconds": time.monotonic() - started,
                "cpu_seconds": time.process_time() - cpu_started,
            }
        )


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
    use_event_loop(os.environ.get("FEED_EVENT_LOOP", Settings.event_loop))
    asyncio.run(main())
