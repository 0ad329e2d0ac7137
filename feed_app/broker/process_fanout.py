"""`process` mode: one exclusive queue per process, bound once per author that any local session
follows (and once per local user's control key), and an in-memory index from routing key to the
local subscribers. One AMQP delivery per process per post, whatever the number of sockets; the
frame in it is written to every one of them as it is.

Bindings are reference-counted: an author is bound when its first local follower attaches and
unbound once no local session has followed it for UNBIND_AFTER seconds (sessions come and go;
rebinding a popular author on every reconnect would be churn for nothing). The index changes
only on the event loop, so "the last follower left" and "a new one arrived" cannot interleave
badly: a new follower of an author still bound, or waiting to be unbound, costs nothing; one of an
author whose unbind was already sent binds it again, on the same channel, so the broker applies
the two in order.

Messages are acknowledged as they are fanned out: a slow socket holds back nobody. Each session
bounds what it has not yet written to its socket (sessions.py); the process queue itself is
bounded too, and when it overflows (the whole process fell behind), every subscriber reads what
it missed from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pika.adapters.asyncio_connection import AsyncioConnection

from feed_app import wire
from feed_app.broker import messages
from feed_app.broker.channel import Channel
from feed_app.broker.connection import AMQP_FAILURES, Broker
from feed_app.broker.fanout_base import BrokerFanout
from feed_app.fanout import BrokerUnavailable, Delivery, Subscriber
from feed_app.once_per_turn import OncePerTurn

log = logging.getLogger(__name__)

Arrived = Delivery | messages.FollowChange  # what a message of the process queue carries

QUEUE_MAX = 100_000  # messages waiting for this process before the oldest are dropped
QUEUE_EXPIRES_MS = 60_000
PREFETCH = 1000  # acks go once per loop turn; this only bounds what is in flight between them
UNBIND_AFTER = 10.0  # seconds an author stays bound without a local follower
UNBIND_CHANNELS = 4  # unbinds out at once


class Binding(enum.Enum):
    """Where one routing key's binding to the process queue is."""

    UNBOUND = enum.auto()  # followed here, not bound: no connection yet, or it was lost
    BOUND = enum.auto()  # followed here; bound once KeyState.bound is done
    IDLE = enum.auto()  # bound (or its bind out), no local follower since KeyState.idle_since
    DUE = enum.auto()  # idle for UNBIND_AFTER: waits in the due queue for a free unbinder
    UNBINDING = enum.auto()  # its unbind is out; a bind asked for meanwhile waits for the reply


@dataclass(eq=False)
class KeyState:
    """One routing key: its state, its local subscribers, its bind and how long it was idle."""

    state: Binding = Binding.UNBOUND
    subscribers: set[Subscriber] = field(default_factory=set)
    # Done once bound; None until a bind is asked for (after an unbind, or a lost connection).
    bound: asyncio.Future | None = None
    idle_since: float | None = None  # when its last local subscriber left, while it has none


class ProcessFanout(BrokerFanout):
    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        self.queue = ""  # named anew on every connection (see _set_up)
        # Routing keys followed here, bound, or on their way out; a key in none of these states
        # has no entry.
        self._routes: dict[str, KeyState] = {}
        self._keys: dict[Subscriber, set[str]] = {}  # subscriber -> its routing keys
        self._to_bind: list[str] = []  # sent with the next flush
        self._due: collections.deque[str] = collections.deque()  # idle long enough: to unbind
        self._channel: Channel | None = None
        self._setup: Channel | None = None
        self._free_unbinders: list[Channel] = []  # unbind channels with no unbind out
        self._flush = OncePerTurn(self._bind_asked)
        # Messages that came after the first of this loop turn, in order, for its end; the
        # first is fanned out at once, and asks for the end of the turn.
        self._arrived: list[tuple[KeyState, Arrived]] = []
        self._fan_out = OncePerTurn(self._fan_out_arrived)
        self._barriers: set[asyncio.Task] = set()
        self._unbind_timer: asyncio.TimerHandle | None = None
        self._healing: asyncio.TimerHandle | None = None

    # --- what metrics and tests read ----------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._keys)

    @property
    def bindings(self) -> int:
        return sum(route.bound is not None for route in self._routes.values())

    @property
    def unbinds_out(self) -> int:
        return sum(route.state is Binding.UNBINDING for route in self._routes.values())

    @property
    def channels(self) -> int:
        in_use = sum(channel is not None for channel in (self._channel, self._setup))
        return in_use + (UNBIND_CHANNELS if in_use else 0)

    def queue_of(self, subscriber: Subscriber) -> str | None:
        return self.queue if subscriber in self._keys else None

    def _known_subscribers(self) -> list[Subscriber]:
        return list(self._keys)

    # --- the broker's connection ---------------------------------------------------------------

    async def _set_up(self, connection: AsyncioConnection) -> None:
        # A new name each time: after a connection is lost on this side only, the broker keeps
        # the old exclusive queue until it notices (a heartbeat or two), and declaring that name
        # again would fail with RESOURCE_LOCKED.
        self.queue = wire.process_queue()
        try:
            channel = await self.broker.open_channel(connection, prefetch=PREFETCH)
            setup = await self.broker.open_channel(connection)
            unbinders = [await self.broker.open_channel(connection) for _ in range(UNBIND_CHANNELS)]
            await self.broker.declare_bounded_queue(
                setup, self.queue, QUEUE_MAX, QUEUE_EXPIRES_MS, self._on_queue_overflow
            )
            self._channel, self._setup, self._free_unbinders = channel, setup, unbinders
            await self._bind_all([key for key, route in self._routes.items() if route.subscribers])
            await channel.call(channel.pika.basic_consume, self.queue, self._on_message)
        except AMQP_FAILURES as exc:
            self.broker.reconnect(f"cannot set up the process queue ({exc})", connection)
            return
        if not self.still_current(connection):
            return
        self._ready.set()
        log.info("process queue %s bound to %d routing keys", self.queue, self.bindings)
        for subscriber in list(self._keys):
            subscriber.on_fanout_ready()

    def on_broker_lost(self) -> None:
        self._ready.clear()
        self._channel = self._setup = None
        self._free_unbinders = []
        self._fail_bindings(BrokerUnavailable("connection lost"))
        for subscriber in list(self._keys):
            subscriber.on_fanout_lost()

    def _fail_bindings(self, error: Exception) -> None:
        """The broker forgot every binding with the connection: what is followed here is bound
        again by the next _set_up, the rest is forgotten."""
        routes, self._routes, self._to_bind = self._routes, {}, []
        self._due.clear()
        for key, route in routes.items():
            future = route.bound
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: whoever waited on it has its own copy
            if route.subscribers:
                self._routes[key] = KeyState(subscribers=route.subscribers)

    def _on_queue_overflow(self) -> None:
        """The process fell so far behind that the broker dropped posts from its queue: which
        sessions lost which posts is unknown, so every one reads what it missed. Overflows come
        in bursts (one notice per dropped post); they are healed once per burst."""
        self._resync_everyone(f"process queue {self.queue} overflowed")

    def _resync_everyone(self, why: str) -> None:
        if self._healing is None:
            log.warning("%s; every session resyncs", why)
            self._healing = asyncio.get_running_loop().call_later(0.5, self._heal)
            for subscriber in list(self._keys):
                subscriber.on_fanout_lost()

    def _heal(self) -> None:
        self._healing = None
        for subscriber in self._known_subscribers():
            subscriber.on_fanout_ready()

    # --- deliveries ----------------------------------------------------------------------------

    def _on_message(self, pika_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        channel = self._channel
        if channel is None or channel.pika is not pika_channel:
            return  # from before a reconnect
        channel.ack_through(method.delivery_tag)
        route = self._routes.get(method.routing_key)
        if route is None or not route.subscribers:
            return  # an author nobody here follows any more (its unbind is on its way)
        message = messages.decode(method, properties, body)
        if message is None:
            return
        if self._fan_out.asked:
            self._arrived.append((route, message))
            return
        # The first message of a turn goes out at once, as a lone post should; what comes after
        # it in the same turn waits for the turn's end (_fan_out_arrived).
        self._fan_out.ask()
        self._fan_out_one(route, message)

    def _fan_out_one(self, route: KeyState, message: Arrived) -> None:
        # A tuple: a subscriber may close (and leave the set) while it is being written to.
        if isinstance(message, messages.FollowChange):
            for subscriber in tuple(route.subscribers):
                subscriber.on_follow_change(message.author_id)
        else:
            for subscriber in tuple(route.subscribers):
                subscriber.on_post(message)

    def _fan_out_arrived(self) -> None:
        """Fan out what arrived after the turn's first message. pika hands over every message
        of one read in one turn; when that is several posts (a burst, or a process that fell
        behind), each socket gets the frames of all of them in one write instead of one each.
        Runs before anything the next turn reads, so every socket gets posts in arrival order."""
        arrived, self._arrived = self._arrived, []
        try:
            self._fan_out_together(arrived)
        except Exception:
            # Raised in pika's callback, an error drops the connection, and the reconnect has
            # every session read what it missed; raised here it would only be logged, and the
            # turn's posts would be lost to the sessions not yet written to.
            log.exception("fanning out %d messages failed", len(arrived))
            self._resync_everyone("a fan-out failed")

    def _fan_out_together(self, arrived: list[tuple[KeyState, Arrived]]) -> None:
        if len(arrived) == 1:
            self._fan_out_one(*arrived[0])
            return
        batches: dict[Subscriber, list[Delivery]] = {}
        for route, message in arrived:
            if isinstance(message, messages.FollowChange):
                self._fan_out_one(route, message)
            else:
                for subscriber in tuple(route.subscribers):
                    batch = batches.get(subscriber)
                    if batch is None:
                        batches[subscriber] = [message]
                    else:
                        batch.append(message)
        for subscriber, batch in batches.items():
            if len(batch) == 1:
                subscriber.on_post(batch[0])
            else:
                subscriber.on_posts(batch)

    # --- the seam ------------------------------------------------------------------------------

    async def attach(self, subscriber: Subscriber, authors: Iterable[int]) -> None:
        keys = {wire.control_key(subscriber.user_id)} | {wire.author_key(a) for a in authors}
        old = self._keys.get(subscriber, set())
        self._keys[subscriber] = keys
        for key in keys - old:
            self._add(subscriber, key)
        for key in old - keys:
            self._remove(subscriber, key)
        await self._bind_all(keys)

    async def follow(self, subscriber: Subscriber, author_id: int) -> None:
        key = wire.author_key(author_id)
        self._keys.setdefault(subscriber, set()).add(key)
        self._add(subscriber, key)
        await self._bind_all([key])

    async def unfollow(self, subscriber: Subscriber, author_id: int) -> None:
        key = wire.author_key(author_id)
        self._keys.get(subscriber, set()).discard(key)
        self._remove(subscriber, key)

    def detach(self, subscriber: Subscriber) -> None:
        for key in self._keys.pop(subscriber, ()):
            self._remove(subscriber, key)

    def _add(self, subscriber: Subscriber, key: str) -> None:
        route = self._routes.get(key) or self._routes.setdefault(key, KeyState())
        route.subscribers.add(subscriber)
        route.idle_since = None
        if route.state in (Binding.IDLE, Binding.DUE):
            route.state = Binding.BOUND  # about to be unbound: keep it

    def _remove(self, subscriber: Subscriber, key: str) -> None:
        route = self._routes.get(key)
        if route is None or not route.subscribers:
            return
        route.subscribers.discard(subscriber)
        if route.subscribers:
            return
        if route.bound is None:
            if route.state is Binding.UNBOUND:
                del self._routes[key]
            return
        route.idle_since = asyncio.get_running_loop().time()
        if route.state is Binding.BOUND:
            route.state = Binding.IDLE
        self._start_unbind_timer()

    def _start_unbind_timer(self) -> None:
        if self._unbind_timer is None:
            self._unbind_timer = asyncio.get_running_loop().call_later(
                UNBIND_AFTER, self._unbind_idle
            )

    # --- bindings ------------------------------------------------------------------------------

    async def _bind_all(self, keys: Iterable[str]) -> None:
        """Return once every key is bound: at once for keys bound already, else after the next
        flush (binds requested in one loop turn share one burst and one barrier)."""
        if not self.is_ready and self._setup is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        waiting = []
        for key in keys:
            route = self._routes.get(key) or self._routes.setdefault(key, KeyState())
            future = route.bound
            if future is None:
                future = route.bound = asyncio.get_running_loop().create_future()
                if route.state is Binding.UNBOUND:
                    route.state = Binding.BOUND
                self._to_bind.append(key)
                self._flush.ask()
            if not future.done():
                waiting.append(future)
        if waiting:
            # Shielded: these futures are shared by every session waiting for the same keys (and
            # by _set_up); one waiter cancelled (its socket closed) must not cancel them.
            await asyncio.gather(*(asyncio.shield(future) for future in waiting))

    def _bind_asked(self) -> None:
        """Send the binds asked for since the last flush, with one barrier behind them."""
        keys_asked = self._to_bind
        keys, self._to_bind = [], []
        for key in keys_asked:
            # A key whose unbind is out on another channel, bound now, could be unbound after:
            # it waits for the reply (_on_unbound flushes it then).
            waits = self._routes[key].state is Binding.UNBINDING
            (self._to_bind if waits else keys).append(key)
        setup = self._setup
        if setup is None or not keys:
            return
        for key in keys:
            setup.pika.queue_bind(self.queue, wire.EXCHANGE, key)  # no-wait: one burst
        futures = [self._routes[key].bound for key in keys]
        barrier = asyncio.ensure_future(self._confirm_bound(setup, futures))
        self._barriers.add(barrier)
        barrier.add_done_callback(self._barriers.discard)

    async def _confirm_bound(self, setup: Channel, futures: list[asyncio.Future]) -> None:
        """A synchronous method after no-wait binds: the broker answers a channel's commands in
        order, so when it returns, every bind sent before it is in place. It resolves the futures
        of its own flush only: a key unbound and bound again since has a future of its own."""
        try:
            await setup.call(setup.pika.queue_declare, self.queue, passive=True)
        except AMQP_FAILURES:
            return  # the channel died: on_broker_lost fails every waiting binding
        for future in futures:
            if not future.done():
                future.set_result(None)

    def _unbind_idle(self) -> None:
        """Unbind the keys idle for UNBIND_AFTER (see _unbind_next)."""
        loop = asyncio.get_running_loop()
        self._unbind_timer = None
        due = loop.time() - UNBIND_AFTER
        idle = [(key, r) for key, r in self._routes.items() if r.state is Binding.IDLE]
        for key, route in idle:
            if route.idle_since is not None and route.idle_since <= due:
                route.state = Binding.DUE
                self._due.append(key)
        while self._free_unbinders and self._due:
            unbinder = self._free_unbinders.pop()
            if unbinder.is_open:  # not after broker.stop(), which tells no listener
                self._unbind_next(unbinder)
        if any(route.state is Binding.IDLE for _key, route in idle):
            self._unbind_timer = loop.call_later(UNBIND_AFTER / 2, self._unbind_idle)

    def _unbind_next(self, unbinder: Channel) -> None:
        """Unbind has no no-wait form: pika sends one and holds every later command of the
        channel until its reply. On the setup channel thousands of them (a socket following
        5,000 authors closed ten seconds ago) would hold new sessions' binds for seconds, so
        they go on channels of their own, one out on each at a time. A key followed again
        before its turn just stays bound; one whose unbind is out waits for the reply."""
        while self._due:
            key = self._due.popleft()
            route = self._routes.get(key)
            # Idle again since it was queued, it still goes in its turn; never while its bind
            # is out.
            if (
                route is not None
                and route.state in (Binding.IDLE, Binding.DUE)
                and route.bound is not None
                and route.bound.done()
            ):
                route.state, route.bound, route.idle_since = Binding.UNBINDING, None, None
                done = functools.partial(self._on_unbound, unbinder, key)
                unbinder.pika.queue_unbind(self.queue, wire.EXCHANGE, key, callback=done)
                return
        self._free_unbinders.append(unbinder)

    def _on_unbound(self, unbinder: Channel, key: str, _reply: Any) -> None:
        route = self._routes.get(key)
        if route is not None and route.state is Binding.UNBINDING:
            if route.bound is None:
                del self._routes[key]
            else:  # followed again while its unbind was out: its bind waits in _to_bind
                route.state = Binding.BOUND if route.subscribers else Binding.IDLE
                if route.state is Binding.IDLE:
                    self._start_unbind_timer()
                self._flush.ask()
        if unbinder.is_open and self._setup is not None:
            self._unbind_next(unbinder)
