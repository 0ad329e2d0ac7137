"""Up to which post id a read is certain to have seen every committed post.

Post ids come from a sequence (sql/002_post_ids_from_a_sequence.sql), so nothing serialises the
writers of a deployment: a post can commit after one with a higher id. A session that reads from
PostgreSQL and then drops live posts it has "already covered" must know what the read covered,
and "every post up to the highest id it returned" is not that: a lower id may still be in flight.

Each sample reads the sequence's last value L_i and takes a transaction id N_i of its own
(pg_current_xact_id(): above every transaction id assigned before it). Take two samples in a row:
every transaction that holds a post id <= L_i took it before sample i read the sequence, and took
its transaction id before that (create_post() and create_posts() make sure of the order), so its
transaction id is below N_(i+1), assigned later still. A read whose snapshot has xmin >= N_(i+1)
finds every transaction below N_(i+1) finished, so every committed post with an id <= L_i is in
it.

(Not the snapshot's xmax: PostgreSQL sets it to the newest *finished* transaction id + 1, so a
transaction still running with a newer id is neither below it nor listed as running.)

The horizon of a read is the largest such L_i. It lags the newest id by one to two sampling periods
(plus the longest transaction then running); posts above it that the read did return are
remembered one by one by the session, so the lag costs nothing but a little memory.

Why two periods: a read waits until the clock is warm, so a process just started samples quickly
until then; after that, a sample every half second keeps the lag at a second or less for a
fifth of the cost. Each sample is a statement and a transaction id, and at 0.1 s the samples were
half of what an idle process and its PostgreSQL spend (BENCHMARKS.md, "The horizon clock's
cost").
"""

from __future__ import annotations

import bisect
import collections


class HorizonClock:
    WARMING_EVERY = 0.1  # seconds between samples until the clock is warm
    SAMPLE_EVERY = 0.5  # seconds between samples after that
    REMEMBER_FOR = 300.0  # seconds: reads whose snapshot is this far behind still get a horizon
    KEEP = round(REMEMBER_FOR / SAMPLE_EVERY)  # samples

    def __init__(self) -> None:
        # (N_(i+1), L_i) pairs; both grow from one sample to the next.
        self._pairs: collections.deque[tuple[int, int]] = collections.deque(maxlen=self.KEEP)
        self._previous_last_value: int | None = None

    @property
    def warm(self) -> bool:
        """Whether the clock has run long enough for a read to expect a horizon: a few samples,
        so that transactions that were running as it started have finished."""
        return len(self._pairs) >= 3

    def next_sample_in(self) -> float:
        """Seconds until the next sample."""
        return self.SAMPLE_EVERY if self.warm else self.WARMING_EVERY

    def add_sample(self, xid: int, last_value: int) -> None:
        """One sample: the transaction id it took, and the sequence's last value."""
        if self._previous_last_value is not None:
            self._pairs.append((xid, self._previous_last_value))
        self._previous_last_value = last_value

    def horizon(self, xmin: int) -> int | None:
        """The horizon of a read whose snapshot had this xmin; None when no sample is old enough
        to tell (the clock has just started, or a transaction older than KEEP samples was
        still running when the read was made)."""
        index = bisect.bisect_right(self._pairs, (xmin, float("inf"))) - 1
        return self._pairs[index][1] if index >= 0 else None
