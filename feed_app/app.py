"""Application wiring: one Service per process holds the pool, the broker, the relay and the open
sessions; make_app maps URLs to handlers; start and stop bring it all up and down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time

import tornado.httpserver
import tornado.web

from feed_app import edge, handlers, login_handlers, wire
from feed_app.broker import Broker, HeartbeatLink, make_fanout
from feed_app.config import Settings, trusted_networks
from feed_app.db import Database
from feed_app.feed_socket import FeedSocketHandler
from feed_app.group_commit import GroupCommit
from feed_app.limits import Limits
from feed_app.metrics import Exporter, Metrics
from feed_app.path_check import PathCheck, PathState
from feed_app.relay import OutboxRelay
from feed_app.revocations import Revocations
from feed_app.sessions import FeedSession, FeedSocket
from feed_app.wire import Close

log = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).resolve().parent.parent / "static"
# The client sends its next token, or a post: 1000 characters, each at most 12 bytes of JSON (a
# surrogate pair escaped), and the message's other fields. Tornado's default would be 10 MiB.
MAX_WS_MESSAGE = 16 * 1024


class Service:
    def __init__(self, settings: Settings, db: Database, broker: Broker, metrics: Metrics) -> None:
        self.settings = settings
        self.db = db
        self.broker = broker
        self.fanout = make_fanout(
            settings.fanout,
            broker,
            queue_max=settings.session_queue_max,
            prefetch=settings.prefetch,
        )
        self.metrics = metrics
        self.relay = OutboxRelay(db, broker, metrics, settings.outbox_lease)
        self.posts = GroupCommit(db, settings.outbox_lease, self.relay.publish, metrics)
        self.path_check = PathCheck(
            wire.process_id(),
            db,
            resync_all=self._resync_all,
            move=broker.reconnect,
            on_break=self._count_break,
        )
        self.path_check.heartbeats = HeartbeatLink(broker, self.path_check.process, self.path_check)
        self.sessions: set[FeedSession] = set()
        self.limits = Limits(settings, metrics)
        self.revocations = Revocations(db, settings.access_token_ttl)
        self.exporter = Exporter(
            metrics,
            self._gauges,
            lambda: broker.endpoint if broker.is_open else None,
            {
                "name": settings.instance,
                "fanout": settings.fanout,
                "workers": str(settings.workers),
                # The loop this process runs on (FEED_EVENT_LOOP): "uvloop" or "asyncio".
                "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            },
        )
        self.server: tornado.httpserver.HTTPServer | None = None
        self.stopping = False

    @classmethod
    async def create(cls, settings: Settings) -> Service:
        """Connect the pool (fails fast if PostgreSQL is down at start) and begin connecting the
        broker (the service starts without it: posts wait in the outbox, sessions wait to bind)."""
        metrics = Metrics()
        db = await Database.connect(settings.db_dsn, settings.db_pool_size)

        def count_reconnect() -> None:
            metrics.broker_reconnects += 1

        urls = [url.strip() for url in settings.amqp_url.split(",") if url.strip()]
        broker = Broker(urls, nodes_file=settings.amqp_nodes_file, on_reconnect=count_reconnect)
        service = cls(settings, db, broker, metrics)
        broker.start()
        service.relay.start()
        service.path_check.start()
        service.revocations.start()
        service.exporter.start()
        return service

    def _resync_all(self) -> None:
        self.metrics.path_resyncs += 1
        self.fanout.resync_all()

    def _count_break(self) -> None:
        self.metrics.path_breaks += 1

    def _gauges(self) -> dict[str, float]:
        return {
            "feed_open_sessions": len(self.sessions),
            "feed_fanout_subscribers": self.fanout.subscribers,
            "feed_fanout_bindings": self.fanout.bindings,
            "feed_delivery_path_broken": int(self.path_check.state is PathState.BROKEN),
            "feed_delivery_path_silent_peers": len(self.path_check.silent),
        }

    def open_session(self, user_id: int, socket: FeedSocket) -> FeedSession | None:
        """A session for a socket that passed its checks, or None (the socket is closed with
        1001) when the handshake finished after shutdown began."""
        if self.stopping:
            socket.close(Close.GOING_AWAY, Close.GOING_AWAY.reason)
            return None
        session = FeedSession(
            user_id,
            socket,
            db=self.db,
            fanout=self.fanout,
            metrics=self.metrics,
            settings=self.settings,
            on_closed=self.sessions.discard,
        )
        self.sessions.add(session)
        return session

    def listen(self, sockets: list | None = None) -> None:
        app = make_app(self)
        self.server = tornado.httpserver.HTTPServer(app, max_body_size=edge.MAX_READ_BODY)
        if sockets is None:
            self.server.listen(self.settings.port, self.settings.host)
        else:
            self.server.add_sockets(sockets)

    async def stop(self) -> None:
        """Graceful shutdown within settings.shutdown_timeout: stop accepting, close feed sockets
        with 1001 (clients reconnect elsewhere), let the posts at PostgreSQL commit, flush the
        outbox, close broker and pool."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.stopping = True
        if self.server:
            self.server.stop()
        for session in list(self.sessions):
            session.close(Close.GOING_AWAY)
        await self.posts.stop(max(0.1, deadline - time.monotonic()))
        try:
            await self.relay.flush(deadline)
        except Exception as exc:  # shutdown goes on; the lease hands leftovers to another process
            log.warning("outbox not flushed: %s", exc)
        await self.relay.stop(max(0.1, deadline - time.monotonic()))
        await self.path_check.stop()
        await self.revocations.stop()
        try:
            await asyncio.wait_for(self.broker.stop(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("broker connection did not close in time")
        await self.db.close(max(0.1, deadline - time.monotonic()))
        self.limits.hashing.shutdown()
        self.exporter.stop()
        if self.server:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.close_all_connections(), 1)


def make_app(service: Service) -> tornado.web.Application:
    s = {"service": service}
    return edge.FeedApplication(
        [
            (
                r"/()",
                handlers.StaticPage,
                {"path": STATIC_DIR, "default_filename": "index.html"},
            ),
            (r"/user/register", handlers.RegisterHandler, s),
            (r"/login", login_handlers.LoginHandler, s),
            (wire.REFRESH_PATH, login_handlers.RefreshHandler, s),
            (r"/logout", login_handlers.LogoutHandler, {**s, "everywhere": False}),
            (r"/logout/all", login_handlers.LogoutHandler, {**s, "everywhere": True}),
            (r"/user/password", login_handlers.PasswordHandler, s),
            (r"/user/get/([^/]+)", handlers.UserHandler, s),
            (r"/user/search", handlers.UserSearchHandler, s),
            (r"/friend/set/([^/]+)", handlers.FollowHandler, {**s, "follow": True}),
            (r"/friend/delete/([^/]+)", handlers.FollowHandler, {**s, "follow": False}),
            (r"/friend/list", handlers.FollowingListHandler, s),
            (r"/post/create", handlers.CreatePostHandler, s),
            (r"/post/update", handlers.UpdatePostHandler, s),
            (r"/post/delete/([^/]+)", handlers.DeletePostHandler, s),
            (r"/post/get/([^/]+)", handlers.PostHandler, s),
            (r"/post/feed", handlers.FeedPageHandler, s),
            (r"/post/feed/([^/]+)", FeedSocketHandler, s),
            (r"/healthz", handlers.HealthHandler, s),
            (r"/readyz", handlers.ReadyHandler, s),
            (r"/metrics", handlers.MetricsHandler, s),
            (r"/openapi\.json", handlers.OpenApiHandler, s),
        ],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=s,
        websocket_ping_interval=service.settings.ping_interval,
        websocket_ping_timeout=service.settings.ping_interval,
        websocket_max_message_size=MAX_WS_MESSAGE,
        trusted_proxies=trusted_networks(service.settings.trusted_proxies),
        hsts_max_age=service.settings.hsts_max_age,
    )
