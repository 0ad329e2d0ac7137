"""The measuring side: websocket feed clients and the bookkeeping of every post and delivery.

The same FeedClient and Tracker measure the service and the bare push server (the ceiling), so
the two numbers differ only by what is behind the socket.

Matching: each post's text starts with a marker `#<nonce>:<8-digit index>#`. A frame is matched by
finding the marker in the raw text (no JSON parsing per frame: at tens of thousands of frames per
second, the client's own CPU is part of what limits the measurement). The nonce is fresh per
tracker, so a post from an earlier run, or history, never matches.

Edits and deletes (loadtest --change-share) are audited as posts are, each a record of its own:
an edit's new text carries the edit's own marker, and a `deleted` frame (no text) is matched by
the post id, which the tracker learns before the delete is sent.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import json
import math
import secrets
import statistics
import time
from collections.abc import Sequence
from typing import Any

import picows
import tornado.websocket

from feed_app.wire import ANSWER_FRAME_TYPES, Close, frame_type, post_message

INDEX_DIGITS = 8


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p95/p99/max (milliseconds by default) and count of a list of seconds."""
    ordered = sorted(values)

    def at(p: float) -> float | None:
        value = percentile(ordered, p)
        return None if value is None else round(value * scale, 3)

    return {
        "count": len(ordered),
        "p50": at(50),
        "p95": at(95),
        "p99": at(99),
        "max": at(100),
    }


def ratio(numerator: float | None, denominator: float | None, digits: int = 0) -> Any:
    """numerator/denominator rounded (an int for digits=0), None if either is missing or 0."""
    if numerator is None or not denominator:
        return None
    value = round(numerator / denominator, digits)
    return int(value) if digits == 0 else value


class LatencyHistogram:
    """Log-spaced buckets (2% wide, 10 µs to ~100 s): a running p99 for the progress line at a
    cost independent of how many deliveries were seen; exact percentiles are computed at the end."""

    RATIO = 1.02
    LOW = 1e-5

    def __init__(self) -> None:
        self.bounds = [self.LOW * self.RATIO**i for i in range(820)]
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        target, running = q * self.total, 0
        for index, count in enumerate(self.counts):
            running += count
            if running >= target:
                return self.bounds[min(index, len(self.bounds) - 1)]
        return self.bounds[-1]


@dataclasses.dataclass(eq=False)
class PostRecord:
    """One post, edit or delete: when its request started, which sessions must get it, which
    did and when."""

    index: int
    author: int  # user index
    started: float  # monotonic time the HTTP request started (or the burst started)
    expected: frozenset[int] = frozenset()  # sessions open and following the author at send time
    kind: str = "post"  # or "edit", "delete"
    status: int | None = None  # HTTP status; None while in flight, 599 for a transport error
    answered: float | None = None
    post_id: int | None = None  # the post made, edited or deleted
    received: dict[int, float] = dataclasses.field(default_factory=dict)  # session -> time

    @property
    def accepted(self) -> bool:
        return self.status == (201 if self.kind == "post" else 200)

    @property
    def failed(self) -> bool:
        return self.status is not None and not self.accepted


class Tracker:
    """All posts of one measurement and what the clients received; all counters live here."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(3)
        self.marker = f"#{self.nonce}:"
        self.posts: list[PostRecord] = []  # every action: posts, edits, deletes
        self.deletes: dict[int, PostRecord] = {}  # post id -> the delete of it
        self.latencies: list[float] = []  # seconds, expected deliveries only
        self.histogram = LatencyHistogram()
        self.receive_times: list[float] = []
        self.delivered = 0  # first receipt of a post on a session
        self.delivered_expected = 0
        self.expected_total = 0  # over posts sent so far (including ones that later failed)
        self.duplicated = 0
        self.unexpected = 0  # a session got a post it was not expected to get
        self.foreign_frames = 0  # frames of posts not from this measurement (history)
        self.http_errors: dict[str, int] = {}
        self.socket_closes: dict[str, int] = {}
        self.connect_errors: dict[str, int] = {}
        self.measuring = False  # closes while measuring are errors; at tear-down they are not
        self.started = time.monotonic()

    def text(self, index: int, size: int) -> str:
        head = f"{self.marker}{index:0{INDEX_DIGITS}d}# bench post "
        return head + "x" * max(0, size - len(head))

    def new_post(
        self,
        author: int,
        expected: frozenset[int],
        started: float,
        kind: str = "post",
        post_id: int | None = None,
    ) -> PostRecord:
        """A record of an action about to be sent; a delete's frames are matched from now on."""
        record = PostRecord(len(self.posts), author, started, expected, kind, post_id=post_id)
        self.posts.append(record)
        self.expected_total += len(expected)
        if kind == "delete" and post_id is not None:
            self.deletes[post_id] = record
        return record

    def on_post_frame(self, session: int, frame: str, now: float) -> None:
        at = frame.find(self.marker)
        if at < 0:
            self.foreign_frames += 1
            return
        start = at + len(self.marker)
        self._received(self.posts[int(frame[start : start + INDEX_DIGITS])], session, now)

    def on_deleted_frame(self, session: int, frame: str, now: float) -> None:
        record = self.deletes.get(json.loads(frame)["id"])
        if record is None:
            self.foreign_frames += 1
        else:
            self._received(record, session, now)

    def _received(self, record: PostRecord, session: int, now: float) -> None:
        if session in record.received:
            self.duplicated += 1
            return
        record.received[session] = now
        self.delivered += 1
        self.receive_times.append(now)
        if session in record.expected:
            latency = now - record.started
            self.delivered_expected += 1
            self.latencies.append(latency)
            self.histogram.add(latency)
        else:
            self.unexpected += 1

    @staticmethod
    def _count(counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    def on_result(self, record: PostRecord, status: int, error: str | None) -> None:
        record.status = status
        record.answered = time.monotonic()
        if not record.accepted:
            self._count(self.http_errors, error or f"HTTP {status}")

    def on_close(self, code: int | None, reason: str | None) -> None:
        if self.measuring:
            self._count(self.socket_closes, close_label(code, reason))

    def on_connect_error(self, error: str) -> None:
        self._count(self.connect_errors, error)

    # --- end-of-run accounting -------------------------------------------------------------

    def outstanding(self) -> int:
        """Expected deliveries not received yet, plus posts still waiting for their answer."""
        waiting = sum(1 for r in self.posts if r.status is None)
        failed_expected = sum(len(r.expected) for r in self.posts if r.failed)
        failed_received = sum(
            sum(1 for s in r.received if s in r.expected) for r in self.posts if r.failed
        )
        missing = (self.expected_total - failed_expected) - (
            self.delivered_expected - failed_received
        )
        return waiting + missing

    def losses(self, open_sessions: set[int]) -> tuple[int, int]:
        """(lost on sessions still open, undelivered to sessions that closed meanwhile) over the
        actions the service accepted (201 for a post, 200 for an edit or a delete)."""
        lost = lost_closed = 0
        for record in self.posts:
            if not record.accepted:
                continue
            for session in record.expected:
                if session not in record.received:
                    if session in open_sessions:
                        lost += 1
                    else:
                        lost_closed += 1
        return lost, lost_closed


def tail_parts(posts: Sequence[PostRecord], share: float = 0.01) -> dict[str, Any] | None:
    """Where the slowest `share` of the deliveries spent their time, against all of them (medians,
    ms): the post's request until its answer (the post path), its answer until the post's first
    receipt on any session (the broker and the first write), and that first receipt until this
    one (the drain of the post's fan-out, in the service and in this client). A delivery that
    came before its post's answer counts from the first receipt only."""
    parts = []  # (latency, request, to first receipt, drain), seconds
    for record in posts:
        if record.answered is None or not record.received:
            continue
        first = min(record.received.values())
        request = min(record.answered, first) - record.started
        for session, at in record.received.items():
            if session in record.expected:
                latency = at - record.started
                parts.append((latency, request, first - record.started - request, at - first))
    if len(parts) < 100:
        return None
    parts.sort()
    slowest = parts[-max(1, int(len(parts) * share)) :]

    def medians(rows: list[tuple[float, ...]]) -> dict[str, float]:
        names = ("latency", "request", "to_first_receipt", "drain")
        return {name: round(1000 * statistics.median(row[i] for row in rows), 2)
                for i, name in enumerate(names)}  # fmt: skip

    return {"share": share, "slowest": medians(slowest), "all": medians(parts)}


def close_label(code: int | None, reason: str | None) -> str:
    """'4008 TOO_SLOW' for the codes the service sends (its reasons are long sentences), else the
    code and whatever reason came with it."""
    try:
        return f"{code} {Close(code).name}"
    except ValueError:
        return f"{code} {reason or ''}".strip()


class FeedClient:
    """One feed websocket, on picows: its frames are parsed in C and handed to a plain callback,
    so the client's own CPU per frame stays small beside the service's. With Tornado's client
    each frame went through several futures and loop callbacks: a post written to 400 sockets
    took this client longer to read than the service to write, and set the measured tail."""

    def __init__(
        self, index: int, url: str, tracker: Tracker, source_ip: str | None = None
    ) -> None:
        self.index = index
        self.url = url
        # A client address of its own (127.0.0.x): one address has ~28,000 ephemeral ports
        # towards one server port, fewer than the sockets bench/many_sockets.py holds.
        self.source_ip = source_ip
        self.tracker = tracker
        self.transport: picows.WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.started: float | None = None
        self.ready_at: float | None = None
        self.following: int | None = None
        self.closed = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._answers: dict[int, asyncio.Future] = {}  # post messages sent, by ref
        self._refs = itertools.count()

    @property
    def is_open(self) -> bool:
        return self.ready_at is not None and not self.closed

    @property
    def ready_seconds(self) -> float | None:
        if self.ready_at is None or self.started is None:
            return None
        return self.ready_at - self.started

    async def open(self, timeout: float) -> bool:
        """Connect and wait for `ready`; False (and the error counted) if either fails."""
        self.started = time.monotonic()
        local = {"local_addr": (self.source_ip, 0)} if self.source_ip else {}
        try:
            self.transport, _ = await asyncio.wait_for(
                picows.ws_connect(
                    lambda: _Listener(self), self.url, websocket_handshake_timeout=timeout, **local
                ),
                timeout,
            )
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)
            return True
        except picows.WSInvalidStatusError as exc:
            status = exc.response.status if exc.response else "?"
            self.tracker.on_connect_error(f"HTTP {int(status)}")
        except asyncio.TimeoutError:
            self.tracker.on_connect_error("timeout waiting for ready")
        except (OSError, picows.WSError) as exc:
            self.tracker.on_connect_error(type(exc).__name__)
        self.close()
        return False

    def on_message(self, message: str) -> None:
        now = time.monotonic()
        kind = frame_type(message)
        if kind == "post":
            self.tracker.on_post_frame(self.index, message, now)
        elif kind == "deleted":
            self.tracker.on_deleted_frame(self.index, message, now)
        elif kind in ANSWER_FRAME_TYPES:
            answer = json.loads(message)
            waiting = self._answers.pop(answer["ref"], None)
            if waiting is not None and not waiting.done():
                waiting.set_result(answer)
        elif kind == "ready" and self.ready_at is None:
            self.ready_at = now
            self.following = json.loads(message).get("following")
            if not self.ready.done():
                self.ready.set_result(True)
        # other frames (checkpoint, following) carry no post

    async def post(self, text: str, timeout: float) -> dict:
        """Post as this socket's user (docs/websocket.md): the answer, posted or refused.
        WebSocketClosedError if the socket closes first, asyncio.TimeoutError past `timeout`."""
        if self.transport is None or self.closed:
            raise tornado.websocket.WebSocketClosedError()
        ref = next(self._refs)
        answer = self._answers[ref] = asyncio.get_running_loop().create_future()
        try:
            self.transport.send(picows.WSMsgType.TEXT, post_message(ref, text).encode())
            return await asyncio.wait_for(answer, timeout)
        finally:
            self._answers.pop(ref, None)

    def on_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ready_at is not None:
            self.tracker.on_close(self.close_code, self.close_reason)
        if not self.ready.done():
            self.ready.set_exception(tornado.websocket.WebSocketClosedError())
            self.ready.exception()  # retrieved: nobody else may be waiting for it any more
        for waiting in self._answers.values():
            if not waiting.done():
                waiting.set_exception(tornado.websocket.WebSocketClosedError())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()
        if not self.ready.done():
            self.ready.cancel()


class _Listener(picows.WSListener):
    """picows' callbacks for one FeedClient."""

    def __init__(self, client: FeedClient) -> None:
        self.client = client

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.client.on_message(frame.get_payload_as_utf8_text())
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            self.client.close_code = int(frame.get_close_code())
            message = frame.get_close_message()
            self.client.close_reason = message.decode(errors="replace") if message else None
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.client.on_closed()


async def open_clients(
    clients: Sequence[FeedClient], concurrency: int, timeout: float, deadline: float
) -> None:
    """Open all clients, at most `concurrency` handshakes at a time (the service's listen backlog
    and the connect burst would otherwise dominate the ready time), within an overall deadline."""
    semaphore = asyncio.Semaphore(concurrency)

    async def open_one(client: FeedClient) -> None:
        async with semaphore:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                client.tracker.on_connect_error("overall ready deadline passed")
                return
            await client.open(min(timeout, remaining))

    await asyncio.gather(*(open_one(c) for c in clients))
