"""Is every post published by another process reaching this one? A check of the whole delivery
path that does not take the broker's word for it.

Why: a publisher confirm says the broker took a post, not that any queue got it. In a network
partition between RabbitMQ nodes, each side drops the other side's queue records and bindings, so
a post is confirmed and reaches nobody while every connection stays open and every node says it
is fine (docs/partitions.md). The recovery that makes sessions exact (read what was missed from
PostgreSQL) has to be triggered by something that sees the loss.

How: every process publishes a numbered heartbeat every BEAT seconds through its own connection,
to a key every process binds a queue of its own to (broker/heartbeat.py), and on the same tick
writes the number of its last *confirmed* beat to PostgreSQL (live_processes) and reads every
other live process's. PostgreSQL says which peers are alive and how far they have got; what this
process heard says what reached it. A peer whose confirmed beats have not arrived is a peer whose
posts may not be arriving either: the path from it is broken. The cost is per process, never per
socket or per post: one beat and one statement per tick, and one delivery per peer per tick.

What is done about it (PathCheck):
- broken: move to another RabbitMQ node (reconnect, the next of the list), which makes every
  session subscribe again and read what it missed from PostgreSQL. A process that hears fewer of
  its peers moves sooner: one that hears nobody is most likely the one cut off, and once it moved
  the others hear it again and stay where they are. While no node hears everyone, it keeps moving,
  less often each time, and every move reads again: posts come late, none is lost;
- whole again (every beating peer heard since the last bind): every session reads what it missed
  once more, for the posts lost between its last read and the heal;
- a lost beat (a peer's numbers skip one, later ones arrived): a post may have been lost with it,
  so every session reads what it missed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import time
from collections.abc import Callable
from typing import Protocol

from feed_app.db import BeatReport, Database, DatabaseUnavailable

log = logging.getLogger(__name__)

BEAT = 0.5  # seconds between two beats, and between two reports to PostgreSQL
GAP = 2  # confirmed beats of a peer not heard before its path counts as broken
LIVE_WITHIN = 5.0  # seconds: a peer that has not reported for longer is gone, not silent
MOVE_WAIT = 4.0  # seconds before moving when all peers but one are heard (less when fewer are)
MOVE_SPACING_CAP = 16.0  # seconds: the longest wait between two moves while nothing is whole
BIND_WAIT = 5.0  # seconds a connected process may go without its heartbeat queue bound
CONFIRM_WAIT = 5.0  # seconds of this process's beats left unconfirmed before it moves


@dataclasses.dataclass(frozen=True)
class Verdict:
    silent: frozenset[str]  # live peers whose confirmed beats have not reached this process
    peers: int  # live peers
    whole: bool  # every beat confirmed since the bind has arrived
    gap: bool  # a beat sent after the bind was lost though later ones came, since the last verdict


class PathJudge:
    """The pure logic: what the beats heard and the peers' reports say about the path.

    A beat is evidence only if this process's heartbeat queue was bound when it was sent, so the
    reckoning starts again on every bind, from a moment on PostgreSQL's clock (the one clock all
    processes share) known to be after the bind: the time of a report statement issued after it.
    A peer's report written after that moment says which beat it had sent when it wrote it; every
    later beat was sent after the bind and must arrive. So for each peer:
    - silent: GAP or more beats were confirmed past the last one heard (or, if none was heard yet,
      past the last one excused) and have not arrived;
    - a gap: a beat after the excused ones is skipped by one that arrived.
    Until a report written after that moment is read, a peer is not judged (nor proven whole).
    """

    def __init__(self) -> None:
        self.generation = 0  # binds so far: a report read across a bind is not used
        self.bound = False
        self._since: float | None = None  # PostgreSQL time known to be after the bind
        self._heard: dict[str, int] = {}  # peer -> highest beat heard since the bind
        self._first_heard: dict[str, int] = {}  # peer -> first beat heard since the bind
        self._excused: dict[str, int] = {}  # peer -> beats up to here may have been sent before
        self._gap = False

    def on_bound(self) -> None:
        self.generation += 1
        self.bound = True
        self._since = None
        self._heard.clear()
        self._first_heard.clear()
        self._excused.clear()
        self._gap = False

    def on_lost(self) -> None:
        self.bound = False

    def hear(self, peer: str, beat: int) -> None:
        if not self.bound:
            return
        last = self._heard.get(peer)
        if last is None:
            self._first_heard[peer] = beat
            self._heard[peer] = beat
            self._check_first(peer)
        elif beat > last:
            self._gap = self._gap or beat > last + 1
            self._heard[peer] = beat

    def _check_first(self, peer: str) -> None:
        first, excused = self._first_heard.get(peer), self._excused.get(peer)
        if first is not None and excused is not None and first > excused + 1:
            self._gap = True  # beats sent after the bind and before `first` were lost

    def judge(self, now: float, reports: dict[str, BeatReport], generation: int) -> Verdict | None:
        """The verdict on the peers' reports, read by a statement issued at `generation` that
        ran at `now` (PostgreSQL's clock); None when there is nothing to judge by."""
        if not self.bound or generation != self.generation:
            return None
        if self._since is None:
            self._since = now  # issued after the bind: reports from now on are after it
        for table in (self._heard, self._first_heard, self._excused):
            for gone in set(table) - set(reports):
                del table[gone]
        silent, unproven = set(), False
        for peer, report in reports.items():
            if peer not in self._excused:
                if report.at < self._since:
                    unproven = True  # not judged until it reported after the bind
                    continue
                self._excused[peer] = report.sent
                self._check_first(peer)
            accounted = self._heard.get(peer, self._excused[peer])
            if report.confirmed - accounted >= GAP:
                silent.add(peer)
            in_flight = 1 if peer in self._heard else 0  # the latest beat may be on its way
            unproven = unproven or report.confirmed > accounted + in_flight
        gap, self._gap = self._gap, False
        return Verdict(frozenset(silent), len(reports), not silent and not unproven, gap)


class PathState(enum.Enum):
    UNKNOWN = "unknown"  # not judged yet on this connection (starting, or reconnecting)
    WHOLE = "whole"
    BROKEN = "broken"


class Heartbeats(Protocol):
    """The broker's half (broker/heartbeat.py's HeartbeatLink)."""

    @property
    def is_bound(self) -> bool: ...
    @property
    def is_connected(self) -> bool: ...
    def publish(self, beat: int) -> asyncio.Future: ...


class PathCheck:
    """Runs the check on its tick and acts on the verdicts (see the module's docstring)."""

    def __init__(
        self,
        process: str,
        db: Database,
        *,
        resync_all: Callable[[], None],
        move: Callable[[str], None],
        on_break: Callable[[], None] = lambda: None,
    ) -> None:
        self.process = process
        self.db = db
        self.judge = PathJudge()
        self.heartbeats: Heartbeats | None = None  # set by the wiring, which makes the link
        self._resync_all, self._move, self._on_break = resync_all, move, on_break
        self.state = PathState.UNKNOWN
        self.silent: frozenset[str] = frozenset()
        self.broken_since: float | None = None  # time.time() the path broke, while it is broken
        self._beat = 0  # the last beat sent
        self._confirmed = 0  # the last beat the broker confirmed
        self._bound_after = 0  # the last beat sent before the current connection's bind
        self._moves = 0  # moves in the current break
        self._move_at: float | None = None  # monotonic time of the next move, while broken
        self._last_move = 0.0
        self._unbound_since: float | None = None  # monotonic: connected, heartbeat queue not bound
        self._task: asyncio.Task | None = None

    def report(self) -> dict[str, object]:
        """For /readyz: the path's state and, while it is broken, since when and which peers.
        A broken path leaves the instance ready: its sessions stay exact (they read what they
        missed from PostgreSQL) and it moves to a whole node by itself, while taking it out of
        the balancer would only move its clients to instances that a partition most likely
        cut off as well (docs/partitions.md)."""
        report: dict[str, object] = {"delivery_path": self.state.value}
        if self.broken_since is not None:
            since = datetime.datetime.fromtimestamp(self.broken_since, datetime.timezone.utc)
            report["broken_since"] = since.isoformat()
            report["silent_peers"] = sorted(self.silent)
        return report

    # --- what the heartbeat link calls -----------------------------------------------------------

    def on_beat(self, peer: str, beat: int) -> None:
        self.judge.hear(peer, beat)

    def on_bound(self) -> None:
        self.judge.on_bound()
        self._bound_after = self._beat  # beats sent on a connection since lost never confirm

    def on_lost(self) -> None:
        self.judge.on_lost()

    # --- the tick --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop beating and leave the live set at once, so that no peer waits for this one."""
        if self._task is not None:
            self._task.cancel()
        try:
            await self.db.forget_process(self.process)
        except DatabaseUnavailable as exc:
            log.info("live_processes row left to expire: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            self._check_bound()
            self._check_confirms()
            self._send_beat()
            generation = self.judge.generation
            try:
                now, reports = await self.db.report_beats(
                    self.process, self._beat, self._confirmed, LIVE_WITHIN
                )
            except DatabaseUnavailable:
                continue  # no posts are made without the database either; judge when it is back
            verdict = self.judge.judge(now, reports, generation)
            if verdict is not None:
                self._act(verdict)

    def _check_bound(self) -> None:
        """A node that accepts the connection but never answers the set-up on it (a node in a
        partition can hang so) gives no verdict at all: leave it after BIND_WAIT."""
        if self.heartbeats is None or not self.heartbeats.is_connected or self.heartbeats.is_bound:
            self._unbound_since = None
            return
        now = time.monotonic()
        if self._unbound_since is None:
            self._unbound_since = now
        elif now - self._unbound_since >= BIND_WAIT:
            self._unbound_since = None
            self._move(f"the node set nothing up in {BIND_WAIT:.0f} s")

    def _check_confirms(self) -> None:
        """A node that takes this process's posts and confirms none (one hung in a partition
        waits on the other side for as long as Erlang takes to notice, 60 s) holds them all in
        the outbox: leave it after CONFIRM_WAIT, and the outbox publishes them through the next
        node. Peers do not count this process silent meanwhile, since nothing it sends is
        confirmed."""
        waiting = self._beat - max(self._confirmed, self._bound_after)
        if waiting * BEAT >= CONFIRM_WAIT and self.heartbeats is not None:
            self._bound_after = self._beat
            self._move(f"the node confirmed none of {waiting} heartbeats")

    def _send_beat(self) -> None:
        if self.heartbeats is None or not self.heartbeats.is_bound:
            return
        self._beat += 1
        beat = self._beat
        try:
            confirmed = self.heartbeats.publish(beat)
        except Exception:  # BrokerUnavailable: the connection is being re-established
            return
        confirmed.add_done_callback(lambda future: self._on_confirmed(beat, future))

    def _on_confirmed(self, beat: int, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._confirmed = max(self._confirmed, beat)

    # --- verdicts --------------------------------------------------------------------------------

    def _act(self, verdict: Verdict) -> None:
        if verdict.silent:
            self._broken(verdict)
        elif verdict.whole:
            self._whole()
        if verdict.gap and self.state is PathState.WHOLE:
            log.warning("a heartbeat was lost on its way here; every session reads what it missed")
            self._resync_all()

    def _broken(self, verdict: Verdict) -> None:
        now = time.monotonic()
        heard = verdict.peers - len(verdict.silent)
        if self.state is not PathState.BROKEN:
            self.state = PathState.BROKEN
            self.broken_since = time.time()
            self._moves = 0
            self._on_break()
            log.warning(
                "delivery path broken: %d of %d peers not heard (%s); posts published through"
                " them may not reach this process's sessions",
                len(verdict.silent),
                verdict.peers,
                ", ".join(sorted(verdict.silent)),
            )
        self.silent = verdict.silent
        if self._move_at is None:
            wait = MOVE_WAIT * heard / verdict.peers
            spacing = min(MOVE_SPACING_CAP, 2.0**self._moves) if self._moves else 0.0
            self._move_at = max(now + wait, self._last_move + spacing)
        if now >= self._move_at:
            self._moves += 1
            self._last_move, self._move_at = now, None
            self._move(f"delivery path broken: {len(verdict.silent)} peers not heard")

    def _whole(self) -> None:
        was = self.state
        self.state, self.silent, self._move_at = PathState.WHOLE, frozenset(), None
        if was is PathState.BROKEN:
            assert self.broken_since is not None
            log.warning(
                "delivery path whole again after %.1f s (%d moves); every session reads what"
                " it missed",
                time.time() - self.broken_since,
                self._moves,
            )
            self.broken_since = None
            self._resync_all()
