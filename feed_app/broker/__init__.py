"""The broker layer: every pika call of the service is in this package.

connection.py holds the process's one AMQP connection (channel.py its channels, nodes.py the
nodes it tries in turn); session_fanout.py and process_fanout.py are the two ways of getting posts
to feed sessions, and the connection is how the outbox relay publishes (feed_app/fanout.py is
the seam: Fanout, Publisher, BrokerUnavailable).
"""

from __future__ import annotations

from feed_app.broker.connection import Broker
from feed_app.broker.heartbeat import HeartbeatLink
from feed_app.broker.process_fanout import ProcessFanout
from feed_app.broker.session_fanout import SessionFanout
from feed_app.fanout import Fanout

__all__ = ["Broker", "HeartbeatLink", "ProcessFanout", "SessionFanout", "make_fanout"]


def make_fanout(mode: str, broker: Broker, *, queue_max: int, prefetch: int) -> Fanout:
    if mode == "process":
        fanout: Fanout = ProcessFanout(broker)
    elif mode == "session":
        fanout = SessionFanout(broker, queue_max=queue_max, prefetch=prefetch)
    else:
        raise ValueError(f"unknown fan-out mode {mode!r}")
    # The fan-out hears about the connection first: its subscribers set up on it.
    broker.listeners.insert(0, fanout)
    return fanout
