"""A channel of the broker connection: awaitable synchronous methods, and coalesced acks."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import pika.channel

from feed_app.fanout import BrokerUnavailable
from feed_app.once_per_turn import OncePerTurn

ACKED_ALONE_COMPACTION = 4096


class Channel:
    """A pika channel whose synchronous methods are awaitable and fail when the channel dies, and
    whose acknowledgements are coalesced.

    Why coalesce: one post fans out to every session on a channel within one event-loop turn, and
    an ack frame each (encoded by pika, one send() each) cost as much as the deliveries. So acks
    wait for the end of the turn; the longest run of settled tags from the oldest unacknowledged
    one goes as a single `multiple` ack, and only tags behind a slow session's pending write are
    acknowledged one by one (so a slow client never holds back the others' prefetch).
    """

    def __init__(self, channel: pika.channel.Channel) -> None:
        self.pika = channel
        self._pending: set[asyncio.Future] = set()
        self._unacked: collections.deque[int] = collections.deque()  # delivery order
        self._settled: set[int] = set()  # ready to ack
        self._acked_alone: set[int] = set()  # acked individually, still in _unacked
        self._through = 0  # ack_through: the newest tag to acknowledge with all before it
        self._flush = OncePerTurn(self._flush_acks)
        channel.add_on_close_callback(self._on_closed)

    def delivered(self, delivery_tag: int) -> None:
        self._unacked.append(delivery_tag)

    def ack_through(self, delivery_tag: int) -> None:
        """Acknowledge this delivery and every earlier one, at the end of the turn. For a
        consumer that settles every message as it arrives (the process queue): one frame per
        turn whatever the number of messages, and no bookkeeping per message."""
        self._through = delivery_tag
        self._flush.ask()

    def ack(self, delivery_tag: int) -> None:
        self._settled.add(delivery_tag)
        self._flush.ask()

    def _flush_acks(self) -> None:
        if not self.pika.is_open:
            return
        if self._through:
            self.pika.basic_ack(self._through, multiple=True)
            self._through = 0
        unacked, settled, acked_alone = self._unacked, self._settled, self._acked_alone
        last = None
        while unacked and (unacked[0] in settled or unacked[0] in acked_alone):
            tag = unacked.popleft()
            if tag in settled:
                settled.discard(tag)
                last = tag
            else:
                acked_alone.discard(tag)
        if last is not None:
            self.pika.basic_ack(last, multiple=True)
        for tag in settled:
            self.pika.basic_ack(tag)
        acked_alone |= settled
        settled.clear()
        if len(acked_alone) > ACKED_ALONE_COMPACTION:
            # A slow session has kept the oldest tag pending for long: drop the tags acked since
            # from the queue now, rather than holding them until that write completes.
            self._unacked = collections.deque(t for t in unacked if t not in acked_alone)
            acked_alone.clear()

    @property
    def is_open(self) -> bool:
        return self.pika.is_open

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a pika method taking `callback=`; wait for the broker's reply frame."""
        if not self.pika.is_open:
            raise BrokerUnavailable("channel closed")
        future = asyncio.get_running_loop().create_future()
        self._pending.add(future)

        def on_reply(frame: Any) -> None:
            if not future.done():
                future.set_result(frame)

        try:
            method(*args, callback=on_reply, **kwargs)
            return await future
        finally:
            self._pending.discard(future)

    def _on_closed(self, _channel: pika.channel.Channel, reason: Exception) -> None:
        for future in self._pending:
            if not future.done():
                future.set_exception(BrokerUnavailable(f"channel closed: {reason}"))
