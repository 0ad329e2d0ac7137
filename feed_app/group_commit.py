"""Group commit of new posts: the posts a process is asked for while it waits on PostgreSQL go
in together, one statement and one commit for the lot (db.insert_posts, sql/008_create_posts.sql).

A post asked for when no batch is at PostgreSQL waits only for the end of the current event-loop
turn, so that posts whose requests were read in the same turn share its commit. While
MOST_IN_FLIGHT batches are at PostgreSQL, new posts gather and go as the next batch when one of
them returns: the busier the process, the larger the batches, and each post waits at most for
the batch ahead of it. A post whose author does not exist fails alone (UnknownUser).

A statement that fails (DatabaseUnavailable: unreachable, too slow, cancelled by the server)
fails every post of its batch, and every post waiting behind it: they would meet the same
server, and without this a silent PostgreSQL would answer the posts gathered behind two batches
only after two more timeouts each. After a timeout the batch's fate is unknown, as a single
statement's is: PostgreSQL may still commit it (docs/delivery.md).

Each stored post is handed to `on_stored` (the outbox relay's fast path) as soon as its batch
returns, in the same callback that answers its request, so that a request abandoned meanwhile
changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from feed_app.db import Database, DatabaseUnavailable, Post, UnknownUser
from feed_app.metrics import Metrics
from feed_app.once_per_turn import OncePerTurn

# Batches at PostgreSQL at once. More than one keeps a slow commit from holding every new post;
# few keeps the batches large.
MOST_IN_FLIGHT = 2
MOST_PER_BATCH = 200  # bounds one statement's size and its transaction's length


class GroupCommit:
    def __init__(
        self, db: Database, lease: float, on_stored: Callable[[Post], None], metrics: Metrics
    ) -> None:
        self.db = db
        self.lease = lease
        self.on_stored = on_stored
        self.metrics = metrics
        self._waiting: list[tuple[int, str, asyncio.Future[Post]]] = []
        self._in_flight = 0
        self._sender = OncePerTurn(self._send)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    async def create(self, author_id: int, text: str) -> Post:
        """Store a post with its outbox row; returns it once committed."""
        if self._stopping:
            raise DatabaseUnavailable("the service is shutting down")
        future: asyncio.Future[Post] = asyncio.get_running_loop().create_future()
        self._waiting.append((author_id, text, future))
        self._sender.ask()
        return await future

    async def stop(self, timeout: float) -> None:
        """On shutdown: refuse new posts (503) and let the batches at PostgreSQL finish, so that
        their posts reach the relay before it flushes."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        self._fail_waiting(DatabaseUnavailable("the service is shutting down"))

    def _send(self) -> None:
        """Send what waits as batches, as far as MOST_IN_FLIGHT allows; the rest goes when a
        batch returns."""
        while self._waiting and self._in_flight < MOST_IN_FLIGHT:
            batch = self._waiting[:MOST_PER_BATCH]
            del self._waiting[:MOST_PER_BATCH]
            self._in_flight += 1
            task = asyncio.ensure_future(self._store(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store(self, batch: list[tuple[int, str, asyncio.Future[Post]]]) -> None:
        try:
            posts = await self.db.insert_posts([(a, t) for a, t, _ in batch], self.lease)
        except Exception as exc:  # every request of the batch answers with it (503 or 500)
            _fail(batch, exc)
            if isinstance(exc, DatabaseUnavailable):
                self._fail_waiting(exc)
            return
        except asyncio.CancelledError:
            # aiopg reports a statement the server cancelled (pg_cancel_backend, a
            # statement_timeout) as this task's cancellation: no request may wait for ever.
            _fail(batch, DatabaseUnavailable("the statement was cancelled"))
            raise
        finally:
            self._in_flight -= 1
            self._send()
        stored: list[tuple[asyncio.Future[Post], Post]] = []
        for (author_id, _, future), post in zip(batch, posts, strict=True):
            if post is not None:
                stored.append((future, post))
            elif not future.done():
                future.set_exception(UnknownUser(f"user {author_id} does not exist"))
        if stored:
            self.metrics.post_commits += 1
            self.metrics.posts_created += len(stored)
        for future, post in stored:
            if not future.done():
                future.set_result(post)
        for _, post in stored:
            self.on_stored(post)

    def _fail_waiting(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        _fail(waiting, exc)


def _fail(posts: list[tuple[int, str, asyncio.Future[Post]]], exc: Exception) -> None:
    for *_, future in posts:
        if not future.done():
            future.set_exception(exc)
