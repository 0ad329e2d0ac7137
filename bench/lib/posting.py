"""One posting phase of the load test: posts at a fixed rate for a while to sessions that are
already open, then a drain, and what the phase measured (deliveries, latency, CPU per delivery).

Each phase has a Tracker of its own (the clients are pointed at it for the phase), so its
figures are those of its own posts: the saturation search runs several phases, one after
another, on the same sessions of the same service.

With a change share (loadtest --change-share), that fraction of the actions, evenly spread, are
an edit or a delete (in turn) of one of this phase's posts, the oldest not deleted and not being
changed, by its author (in place of the action's planned author: with thousands of authors few
have an earlier post of their own); before any post was accepted, a post instead. Each change is
audited as a post is: every open session following the author must get it once.

With --post-via socket a post goes as a post message on an open feed socket of its author's, as
the page posts (docs/websocket.md), and over HTTP when the author has none open.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from bench.lib import report
from bench.lib.feedclient import FeedClient, PostRecord, Tracker, ratio, summarize, tail_parts
from bench.lib.procstats import CpuMeter, processes_named, rss_bytes

MAX_POSTS_IN_FLIGHT = 500
LATE_SENDING = 10.0  # seconds past the planned end after which no more posts are sent


@dataclasses.dataclass
class Service:
    """What a phase needs of the service under test: where to post, and its processes."""

    urls: list[str]
    pids: Callable[[], list[int]]
    pids_known: bool  # False for --url without --service-pids: no CPU or memory of it
    token: Callable[[int], str]  # user index -> bearer token


@dataclasses.dataclass
class Plan:
    rate: float  # posts per second
    duration: float  # seconds of posting
    authors: list[int]  # author (user index) of each post, in order
    text_size: int
    drain: float  # seconds to wait for the last deliveries
    change_share: float = 0.0  # fraction of the actions that edit or delete a post
    post_on_sockets: bool = False  # posts go on an open feed socket of the author's, if any

    def kind_of(self, number: int) -> str:
        """Action `number` is a change when the running count of changes steps up at it;
        changes alternate between edits and deletes, so both modes get the same actions."""
        changes_before = math.floor(number * self.change_share)
        if math.floor((number + 1) * self.change_share) == changes_before:
            return "post"
        return "edit" if changes_before % 2 == 0 else "delete"


class PostingPhase:
    def __init__(
        self,
        service: Service,
        clients: list[FeedClient],
        fan_out: list[list[int]],
        plan: Plan,
        *,
        quiet: bool,
        session_users: list[int] | None = None,
    ) -> None:
        self.service = service
        self.clients = clients
        self.fan_out = fan_out  # author index -> sessions whose user follows it
        self.own_sessions: collections.defaultdict[int, list[FeedClient]] = collections.defaultdict(
            list
        )
        for session, user in enumerate(session_users or []):
            self.own_sessions[user].append(clients[session])
        self.plan = plan
        self.quiet = quiet
        self.tracker = Tracker()
        # (author, post id) of this phase's posts that a change may take, oldest first: posts
        # accepted, not deleted, and no change of them in flight.
        self.changeable: collections.deque[tuple[int, int]] = collections.deque()
        self.post_start = time.monotonic()
        self.open_at_end: set[int] = set()  # sessions still open when the drain ended

    async def run(self) -> dict[str, Any]:
        """Post and drain; the CPU meters run from the first post to the end of the drain."""
        for client in self.clients:
            client.tracker = self.tracker
        service_cpu = CpuMeter(self.service.pids)
        broker_cpu = CpuMeter(lambda: processes_named("beam.smp"))
        client_cpu = CpuMeter(lambda: [os.getpid()])
        meters = (service_cpu, broker_cpu, client_cpu)
        for meter in meters:
            meter.start()
        self.tracker.measuring = True
        self.post_start = time.monotonic()
        try:
            await report.while_reporting(self.post_at_rate(), self.progress, self.quiet)
            posted_until = time.monotonic()
            await report.while_reporting(self.drain(), self.progress, self.quiet)
        finally:
            self.tracker.measuring = False
        drained = time.monotonic()
        self.open_at_end = {c.index for c in self.clients if c.is_open}
        for meter in meters:
            meter.stop()
        measured = drained - self.post_start
        return {
            "rate": self.plan.rate,
            "duration": self.plan.duration,
            "posts": self.posts_section(),
            "deliveries": self.deliveries_section(),
            "latency_ms": summarize(self.tracker.latencies),
            "tail_ms": tail_parts(self.tracker.posts),
            "errors": {
                "http": self.tracker.http_errors,
                "socket_closes": self.tracker.socket_closes,
            },
            "resources": self.resources_section(
                measured, drained - posted_until, service_cpu, broker_cpu, client_cpu
            ),
            "time_series": report.time_series(self.tracker, self.post_start),
        }

    # --- posting -------------------------------------------------------------------------------

    async def post_at_rate(self) -> None:
        """Post i is sent at start + i/R. If the service answers too slowly and too many requests
        are in flight, sending waits (the achieved rate then shows it) rather than piling up;
        sending stops LATE_SENDING seconds after the planned end whatever happened."""
        plan = self.plan
        http = AsyncHTTPClient()
        in_flight: set[asyncio.Task] = set()
        deadline = self.post_start + plan.duration + LATE_SENDING
        for i, author in enumerate(plan.authors):
            delay = self.post_start + i / plan.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(in_flight) >= MAX_POSTS_IN_FLIGHT and time.monotonic() < deadline:
                await asyncio.wait(in_flight, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() >= deadline:
                break
            task = asyncio.ensure_future(self.post_one(http, i, author))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=max(0.1, deadline - time.monotonic()))

    async def post_one(self, http: AsyncHTTPClient, number: int, author: int) -> None:
        """One action: a post, or an edit or delete of one of the author's posts."""
        kind, target = self.plan.kind_of(number), None
        if kind != "post" and self.changeable:
            author, target = self.changeable.popleft()
        else:
            kind = "post"
        expected = frozenset(s for s in self.fan_out[author] if self.clients[s].is_open)
        record: PostRecord = self.tracker.new_post(author, expected, time.monotonic(), kind, target)
        text = self.tracker.text(record.index, self.plan.text_size)
        own = self.own_socket(author) if kind == "post" else None
        if own is not None:
            status, post_id, error = await self.post_on_socket(own, text)
        else:
            base = self.service.urls[number % len(self.service.urls)]
            status, post_id, error = await self.send_http(http, base, kind, author, target, text)
        if kind == "post":
            record.post_id = post_id
        if kind != "delete" and record.post_id is not None and error is None:
            self.changeable.append((author, record.post_id))  # changeable (again)
        self.tracker.on_result(record, status, error)

    def own_socket(self, author: int) -> FeedClient | None:
        """With --post-via socket, an open feed socket of the author's own, as a page posts on."""
        if not self.plan.post_on_sockets:
            return None
        return next((c for c in self.own_sessions[author] if c.is_open), None)

    @staticmethod
    async def post_on_socket(client: FeedClient, text: str) -> tuple[int, int | None, str | None]:
        """(status as HTTP would answer, post id, error) of a post message."""
        try:
            answer = await client.post(text, timeout=10)
        except asyncio.TimeoutError:
            return 599, None, "socket: no answer in 10 s"
        except tornado.websocket.WebSocketClosedError:
            return 599, None, "socket: closed before the answer"
        if answer["type"] == "posted":
            return 201, answer["post"]["id"], None
        return answer["status"], None, f"socket: refused {answer['status']}"

    async def send_http(
        self,
        http: AsyncHTTPClient,
        base: str,
        kind: str,
        author: int,
        target: int | None,
        text: str,
    ) -> tuple[int, int | None, str | None]:
        """(status, post id of a post, error) of the action's HTTP request."""
        url, method, body = {
            "post": (base + "/post/create", "POST", {"text": text}),
            "edit": (base + "/post/update", "PUT", {"id": target, "text": text}),
            "delete": (base + f"/post/delete/{target}", "PUT", {}),
        }[kind]
        headers = {"Authorization": f"Bearer {self.service.token(author)}"}
        try:
            response = await http.fetch(
                url, method=method, body=json.dumps(body), headers=headers, request_timeout=10
            )
        except HTTPClientError as exc:
            error = f"HTTP {exc.code}" if exc.code != 599 else f"HTTP 599 {exc.message}"
            return exc.code, None, error
        except OSError as exc:
            return 599, None, type(exc).__name__
        return response.code, _post_id(response.body) if kind == "post" else None, None

    async def drain(self) -> None:
        """Wait for every expected delivery (or the drain timeout) after the last answer."""
        deadline = time.monotonic() + self.plan.drain
        while self.tracker.outstanding() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def progress(self, _elapsed: float) -> str:
        t = self.tracker
        now = time.monotonic()
        ok = sum(1 for r in t.posts if r.accepted)
        recent = sum(1 for x in t.receive_times[-200_000:] if x > now - 1.0)
        p99 = t.histogram.quantile(0.99)
        errors = sum(t.http_errors.values()) + sum(t.socket_closes.values())
        p99_text = "-" if p99 is None else f"{p99 * 1000:.1f} ms"
        return (
            f"  [{now - self.post_start:4.0f}s] sent {len(t.posts):,}/{len(self.plan.authors):,}"
            f" (ok {ok:,}) | received {t.delivered:,}/{t.expected_total:,} ({recent:,}/s)"
            f" | p99 {p99_text} | dup {t.duplicated} | errors {errors}"
        )

    # --- results -------------------------------------------------------------------------------

    def send_span(self) -> float | None:
        """Seconds over which posts were sent (one interval per post)."""
        starts = [r.started for r in self.tracker.posts]
        return (max(starts) - min(starts) + 1 / self.plan.rate) if starts else None

    def posts_section(self) -> dict[str, Any]:
        """Every action counts as a post here (sent, accepted, rate, request time); `by_kind`
        splits them, with each kind's send-to-receive latency."""
        posts = self.tracker.posts
        section = {
            "planned": len(self.plan.authors),
            "sent": len(posts),
            "accepted": sum(1 for r in posts if r.accepted),
            "achieved_rate": ratio(len(posts), self.send_span(), 2),
            "request_ms": summarize([r.answered - r.started for r in posts if r.answered]),
        }
        if self.plan.change_share:
            section["by_kind"] = {
                kind: {
                    "sent": sum(1 for r in posts if r.kind == kind),
                    "accepted": sum(1 for r in posts if r.kind == kind and r.accepted),
                    "latency_ms": summarize(
                        [
                            at - r.started
                            for r in posts
                            if r.kind == kind
                            for session, at in r.received.items()
                            if session in r.expected
                        ]
                    ),
                }
                for kind in ("post", "edit", "delete")
            }
        return section

    def deliveries_section(self) -> dict[str, Any]:
        """Expected = open sessions following the author when the post was sent, over the posts
        the service accepted; achieved/s = those deliveries over first send to last receipt."""
        t = self.tracker
        accepted = [r for r in t.posts if r.accepted]
        expected = sum(len(r.expected) for r in accepted)
        delivered = sum(sum(1 for s in r.received if s in r.expected) for r in accepted)
        receive_span = (
            max(t.receive_times) - min(r.started for r in t.posts) if t.receive_times else None
        )
        lost, lost_closed = t.losses(self.open_at_end)
        return {
            "expected": expected,
            "delivered": t.delivered,
            "delivered_expected": delivered,
            "mean_fan_out": ratio(expected, len(accepted), 2),
            "expected_per_s": ratio(expected, self.send_span(), 1),
            "achieved_per_s": ratio(delivered, receive_span, 1),
            "lost": lost,
            "duplicated": t.duplicated,
            "lost_to_closed_sessions": lost_closed,
            "unexpected": t.unexpected,
            "history_frames": t.foreign_frames,
        }

    def resources_section(
        self,
        measured: float,
        drain: float,
        service_cpu: CpuMeter,
        broker_cpu: CpuMeter,
        client_cpu: CpuMeter,
    ) -> dict[str, Any]:
        """CPU over the measured phase (first post to end of drain) per delivery received."""
        deliveries = self.tracker.delivered
        known = self.service.pids_known

        def service(value: Any) -> Any:
            return value if known else None

        return {
            "measured_seconds": round(measured, 3),
            "drain_seconds": round(drain, 3),
            "service_cpu_seconds": service(round(service_cpu.seconds, 3)),
            "service_cpu_us_per_delivery": service(ratio(service_cpu.seconds * 1e6, deliveries, 2)),
            "service_rss_end": service(rss_bytes(self.service.pids())),
            "rabbitmq_cpu_seconds": round(broker_cpu.seconds, 3),
            "rabbitmq_cpu_us_per_delivery": ratio(broker_cpu.seconds * 1e6, deliveries, 2),
            "client_cpu_seconds": round(client_cpu.seconds, 3),
            "client_cpu_percent": ratio(100 * client_cpu.seconds, measured, 1),
            "service_waiting_percent": service(
                ratio(100 * service_cpu.waiting_seconds, measured, 1)
            ),
            "client_waiting_percent": ratio(100 * client_cpu.waiting_seconds, measured, 1),
        }


def _post_id(body: bytes) -> int | None:
    """The id in a 201 answer; None if the body is odd (the post was still created)."""
    try:
        return int(json.loads(body)["id"])
    except (ValueError, KeyError, TypeError):
        return None
