"""The AMQP envelope of the wire formats in feed_app/wire.py: the properties a post's change or a
follow change is published with, and the decoding of what a queue delivers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pika

from feed_app import wire
from feed_app.fanout import Delivery

log = logging.getLogger(__name__)

FOLLOW_CHANGE_PROPERTIES = pika.BasicProperties(type=wire.FOLLOW_CHANGE, delivery_mode=1)
# A beat that waited this long says nothing about the path any more (feed_app/path_check.py).
HEARTBEAT_PROPERTIES = pika.BasicProperties(delivery_mode=1, expiration="10000")


@dataclasses.dataclass(frozen=True, slots=True)
class FollowChange:
    user_id: int
    author_id: int


def post_properties(version: int, created_ms: int) -> pika.BasicProperties:
    """The change's version and time travel as properties, so that a receiver can de-duplicate
    and measure latency without decoding the body (which is the websocket frame itself)."""
    return pika.BasicProperties(
        message_id=str(version),
        content_type="application/json",
        delivery_mode=1,  # transient: the queues it lands in are transient anyway
        headers={"created_ms": created_ms},
    )


def decode(method: Any, properties: Any, body: bytes) -> Delivery | FollowChange | None:
    """A delivered message as a post or a follow change; None (logged) for anything else on the
    vhost. Raising instead would make pika drop the whole connection, and every session on it."""
    try:
        if properties.type == wire.FOLLOW_CHANGE:
            user_id = wire.user_of_control_key(method.routing_key)
            return FollowChange(user_id, int(body))
        if wire.frame_type(body) not in wire.CHANGE_FRAME_TYPES:
            raise ValueError("the body is not a post's change")  # it would go to browsers as is
        created_ms = (properties.headers or {}).get("created_ms")
        if not isinstance(created_ms, int) or isinstance(created_ms, bool):
            created_ms = None  # only for the latency histogram: a post without it is still a post
        author_id = wire.author_of(method.routing_key)
        return Delivery(int(properties.message_id), author_id, body, created_ms)
    except (TypeError, ValueError):
        log.warning("dropping a malformed message: %r %r", method.routing_key, properties)
        return None


def dead_lettered_from(properties: pika.BasicProperties) -> str | None:
    """The queue a dead-lettered message overflowed from."""
    headers = properties.headers or {}
    queue = headers.get("x-first-death-queue")
    if queue is None and headers.get("x-death"):
        queue = headers["x-death"][0].get("queue")
    return queue
