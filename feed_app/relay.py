"""The outbox relay: every committed change of a post (new, edited, deleted) reaches the broker,
whatever fails in between.

A change and its outbox row, keyed by the change's version, are committed together
(db.insert_posts, db.change_post). The process that wrote them publishes at once (the fast path)
and deletes the row when the broker confirms. What is left over
is found by the sweep: the rows this process failed to publish (the broker was down, the confirm
never came), at once when the broker is back, and anybody's rows whose lease ran out (their
writer died), by any instance. A change can therefore be published twice, never zero times;
sessions de-duplicate by version. A leftover row is published with its post's state when the
sweep claims it, which may be a later change's: clients keep the highest version of a post.

Why the sweep takes this process's own rows by id and not "every row I wrote": a post commits a
moment before its request handler hands it to the fast path, and a sweep running in between would
publish it too (seen under load as a few duplicate publishes a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from feed_app.db import Database, DatabaseUnavailable, Post
from feed_app.fanout import BrokerUnavailable, Publisher
from feed_app.metrics import Metrics

log = logging.getLogger(__name__)

SWEEP_BATCH = 500
DELETE_LINGER = 0.1  # seconds


class OutboxRelay:
    def __init__(self, db: Database, broker: Publisher, metrics: Metrics, lease: float) -> None:
        self.db = db
        self.broker = broker
        self.metrics = metrics
        self.lease = lease
        # Versions (outbox keys) this process is publishing, and those the broker confirmed whose
        # outbox rows are not deleted yet: the sweep must not take either for leftovers and
        # publish them again.
        self._in_flight: set[int] = set()
        self._confirmed: set[int] = set()
        self._unpublished: set[int] = set()  # the fast path failed: the sweep's job
        self._tasks: set[asyncio.Task] = set()
        self._wake_deleter = asyncio.Event()
        self._wake_sweeper = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        self.broker.listeners.append(self)
        for loop in (self._delete_confirmed, self._sweep):
            self._spawn(loop())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- fast path ----------------------------------------------------------------------------

    def publish(self, post: Post) -> None:
        """Publish a post's just-committed change; failures are left to the sweep."""
        if not self.broker.is_open:
            self._unpublished.add(post.version)
        elif post.version not in self._in_flight | self._confirmed:
            self._in_flight.add(post.version)
            self._spawn(self._publish(post.version, post))

    async def _publish(self, row: int, post: Post) -> None:
        """Publish the post's state for the outbox row `row` and wait for the confirm; the
        caller has put the row in _in_flight."""
        try:
            created_ms = int(post.changed_at.timestamp() * 1000)
            await self.broker.publish_post(post.author_id, post.version, post.frame(), created_ms)
        except BrokerUnavailable as exc:
            log.info("change %d not published yet (%s); the outbox keeps it", row, exc)
            self._unpublished.add(row)
            return
        finally:
            self._in_flight.discard(row)
        self.metrics.publishes += 1
        self._confirmed.add(row)
        self._wake_deleter.set()

    async def _delete_confirmed(self) -> None:
        """Delete confirmed rows in batches: one statement per DELETE_LINGER, not one per post.
        A row deleted late costs nothing but outbox space; its post was already published."""
        while not self._stopping:
            await self._wake_deleter.wait()
            await asyncio.sleep(DELETE_LINGER)
            self._wake_deleter.clear()
            batch = list(self._confirmed)
            try:
                await self.db.delete_outbox(batch)
            except DatabaseUnavailable as exc:
                # The ids stay in _confirmed, so the next sweep retries the delete, not the publish.
                log.warning("cannot delete %d outbox rows: %s", len(batch), exc)
                continue
            self._confirmed.difference_update(batch)

    # --- recovery ----------------------------------------------------------------------------

    def on_broker_open(self) -> None:
        self._wake_sweeper.set()

    def on_broker_lost(self) -> None:
        pass

    async def _sweep(self) -> None:
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_sweeper.wait(), self.lease / 2)
            self._wake_sweeper.clear()
            if self._confirmed:
                self._wake_deleter.set()
            if self.broker.is_open:
                await self.sweep_once()
                await self.sweep_follow_changes()

    async def sweep_once(self) -> int:
        """Claim and publish leftover outbox rows; returns how many were claimed."""
        claimed = 0
        while self.broker.is_open:
            try:
                mine = sorted(self._unpublished)[:SWEEP_BATCH]
                busy = sorted(self._in_flight | self._confirmed)
                rows = await self.db.claim_outbox(self.lease, SWEEP_BATCH, mine, busy)
            except DatabaseUnavailable as exc:
                log.warning("outbox sweep skipped: %s", exc)
                break
            if rows:
                log.info("republishing %d changes from the outbox", len(rows))
            claimed_rows = {row for row, _ in rows}
            # Own rows not claimed are gone (another instance published them after the lease),
            # unless the batch was full and they did not fit.
            self._unpublished -= set(mine) if len(rows) < SWEEP_BATCH else claimed_rows
            self._in_flight |= claimed_rows
            await asyncio.gather(*(self._publish(row, post) for row, post in rows))
            claimed += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        return claimed

    async def flush(self, deadline: float) -> None:
        """On shutdown: publish what this process still owns and delete the confirmed rows."""
        if self.broker.is_open:
            await asyncio.wait_for(self.sweep_once(), max(0.1, deadline - time.monotonic()))
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._confirmed:
            await self.db.delete_outbox(list(self._confirmed))
            self._confirmed.clear()

    async def stop(self, timeout: float) -> None:
        """Stop the loops. They also check _stopping: a cancellation that lands as a query
        completes can be swallowed inside aiopg (asyncio.wait_for, Python 3.11), and a loop that
        lost it would go on for ever, holding the shutdown."""
        self._stopping = True
        if self in self.broker.listeners:
            self.broker.listeners.remove(self)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # --- follow changes ----------------------------------------------------------------------

    async def announce_follow_change(self, change_id: int, user_id: int, author_id: int) -> bool:
        """Tell the user's open sessions, on every instance, that the follow of this author
        changed (each checks the database and binds or unbinds), and drop the change's
        follow_outbox row once the broker confirmed it. When that fails, the row's lease runs
        out and the sweep announces it again, from whichever instance. Announced twice costs a
        session one more look at the database."""
        try:
            await asyncio.wait_for(self.broker.publish_follow_change(user_id, author_id), 5)
        except (BrokerUnavailable, asyncio.TimeoutError) as exc:
            log.warning("follow change of user %d not announced yet: %s", user_id, exc)
            return False
        try:
            await self.db.delete_follow_changes([change_id])
        except DatabaseUnavailable as exc:
            log.warning("follow change %d announced, its row stays: %s", change_id, exc)
        return True

    async def sweep_follow_changes(self) -> None:
        try:
            changes = await self.db.claim_follow_changes(self.lease, SWEEP_BATCH)
        except DatabaseUnavailable as exc:
            log.warning("follow change sweep skipped: %s", exc)
            return
        if changes:
            log.info("announcing %d follow changes from the outbox", len(changes))
        await asyncio.gather(*(self.announce_follow_change(*change) for change in changes))
