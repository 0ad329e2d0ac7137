"""The seam between the service and the broker: how a session subscribes to authors and how their
posts come back to it (Fanout), how the outbox relay publishes them (Publisher), and the error
either raises while the broker is away. The broker layer (feed_app/broker/) implements them, and
sessions and the outbox relay reach the broker only through them. There are two fan-outs:

- `session` mode, the seed's design: an exclusive queue per socket, bound once per followed
  author. The broker does the fan-out: one AMQP delivery per socket per post.
- `process` mode: one exclusive queue per process, bound once per author that any local session
  follows (reference-counted), and an in-memory index from author to sessions. One AMQP delivery
  per process per post; the frame is shared by every socket it is written to.

Both keep the one rule that makes a session exact: `attach` and `follow` return only once every
live post of those authors is certain to reach the subscriber, so what the session reads from
PostgreSQL after that, and what arrives live, overlap rather than leave a gap (the session drops
the overlap by post id).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import Protocol

from feed_app import wire


class BrokerUnavailable(Exception):
    """No open connection to RabbitMQ right now (it is being re-established)."""


class BrokerListener(Protocol):
    """Told when the broker connection opens (set up on it) and when it is lost."""

    def on_broker_open(self) -> None: ...
    def on_broker_lost(self) -> None: ...


class Publisher(Protocol):
    """What the outbox relay publishes through. Each publish raises BrokerUnavailable at once when
    there is no connection, else returns a future that resolves once the broker confirmed the
    message (BrokerUnavailable if the connection went first or the broker refused it)."""

    listeners: list[BrokerListener]  # told in order

    @property
    def is_open(self) -> bool: ...

    def publish_post(
        self, author_id: int, version: int, frame: bytes, created_ms: int
    ) -> asyncio.Future: ...

    def publish_follow_change(self, user_id: int, author_id: int) -> asyncio.Future: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """A live change of a post (new, edited, deleted): its version for de-duplication (one
    sequence numbers every change), its author, the websocket frame to forward, and when it was
    made (for the change-to-send latency). `websocket_frame` is that frame with its websocket
    header, built here once: in process mode one Delivery goes to every local follower, and each
    socket then gets the same bytes instead of framing them again."""

    version: int
    author_id: int
    frame: bytes
    created_ms: int | None
    websocket_frame: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "websocket_frame", wire.websocket_text_frame(self.frame))


class Subscriber(Protocol):
    """What a fan-out calls back: a feed session."""

    user_id: int

    def on_post(self, delivery: Delivery) -> asyncio.Future | None:
        """A live post of a subscribed author. Returns the pending write while the frame is on
        its way to the socket (session mode acknowledges the message once it has left the
        process, so a slow socket holds back its own queue only), else None: the kernel took it
        at once, or it is not written."""

    def on_posts(self, deliveries: list[Delivery]) -> None:
        """Several live posts at once, in the order they arrived (process mode, when one read
        from the broker brought more than one for this subscriber): as on_post for each, with
        the frames written together."""

    def on_follow_change(self, author_id: int) -> None:
        """The user's follow of this author changed, on some instance."""

    def on_fanout_lost(self) -> None:
        """Live posts may be missed from now on (the broker connection dropped, the process
        queue overflowed): hold what arrives until on_fanout_ready."""

    def on_fanout_ready(self) -> None:
        """Deliveries flow again: attach again and read what was missed from PostgreSQL."""

    def on_overflow(self) -> None:
        """This subscriber fell too far behind and lost live posts: close it (4008)."""


class Fanout(Protocol):
    @property
    def is_ready(self) -> bool:
        """Whether attach can succeed now (the broker is connected and set up)."""

    async def attach(self, subscriber: Subscriber, authors: Iterable[int]) -> None:
        """Subscribe to exactly these authors and to the user's follow changes. Called again
        with the new set after a follow list was re-read and on every on_fanout_ready. Raises
        BrokerUnavailable when the broker is not there; the subscriber stays known to the
        fan-out and hears on_fanout_ready when it is back."""

    async def follow(self, subscriber: Subscriber, author_id: int) -> None:
        """Add one author; returns once its live posts are certain to arrive."""

    async def unfollow(self, subscriber: Subscriber, author_id: int) -> None:
        """Remove one author (posts already on their way may still arrive: the session drops
        them, since it no longer follows the author)."""

    def detach(self, subscriber: Subscriber) -> None:
        """Forget the subscriber; nothing is delivered to it afterwards."""

    def resync_all(self) -> None:
        """Every subscriber reads what it may have missed from PostgreSQL: live posts were lost
        on the way, and the broker did not say (feed_app/path_check.py found it)."""

    # What metrics read.
    subscribers: int  # known subscribers
    bindings: int  # bindings in place on the broker
