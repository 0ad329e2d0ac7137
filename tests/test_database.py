"""The database layer on its own, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest

from feed_app.db import Database
from tests.faults import wait_for


@pytest.mark.gen_test(timeout=30)
async def test_closing_the_database_while_a_cancelled_query_closes_its_connection(db_dsn):
    """Shutdown cancels sessions mid-query and then closes the pool: a connection that the
    cancellation closed comes back to the pool while the close waits, and must end that wait
    (aiopg's own pool.wait_closed() is not woken by it and sat out its whole timeout)."""
    db = await Database.connect(db_dsn, 2)
    query = asyncio.ensure_future(db._run("SELECT pg_sleep(5)", retry=False))
    await wait_for(lambda: db.pool.size > db.pool.freesize, 5, "the query holds a connection")
    closing = asyncio.ensure_future(db.close(timeout=20))
    await asyncio.sleep(0.1)  # the close is waiting for the busy connection
    query.cancel()
    await asyncio.wait_for(closing, 5)
    assert db.pool.closed


@pytest.mark.gen_test(timeout=30)
async def test_a_query_leaves_no_cycle_for_the_collector(db_dsn):
    """With young collections every 50,000 allocations (run.py), each query left in a cycle kept
    its result set in memory for thousands of queries: the soak saw the service grow by 8 MB
    before the first collection. A finished query must be freed by reference counting alone."""
    db = await Database.connect(db_dsn, 2)
    try:
        await db.ping()
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                await db._run("SELECT 1, 'x'")
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = {type(thing).__module__ for thing in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not {module for module in left if module.startswith(("aiopg", "psycopg2"))}
    finally:
        await db.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_cancellation_a_library_swallowed_is_raised_when_the_statement_ends(db_dsn):
    """aiopg's asyncio.wait_for (Python 3.11) drops a cancellation that lands as a statement
    completes, and the cancelled task carried on: a closed session went on into its history's
    warm-up wait and outlived the test's loop ("Task was destroyed but it is pending"). Here the
    task swallows its own cancellation the same way and then runs a statement: it must end
    cancelled, and, with nobody reading its result (as nobody reads a closed session's), leave
    no cycle that keeps its frames' objects until the collector runs."""
    db = await Database.connect(db_dsn, 2)

    async def carry_on_after_a_swallowed_cancellation(_held: object) -> str:
        asyncio.current_task().cancel()
        # Swallowed, as wait_for does when the inner future completed meanwhile.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        await db.ping()
        return "carried on"

    held = Held()
    freed = weakref.ref(held)
    gc.disable()
    try:
        task = asyncio.ensure_future(carry_on_after_a_swallowed_cancellation(held))
        del held
        await asyncio.wait([task])
        assert task.cancelled()
        del task
        assert freed() is None, "the task's frames outlived it: a cycle waits for the collector"
        await db.ping()  # the pool and other tasks are unaffected
    finally:
        gc.enable()
        await db.close()


class Held:
    """An object only the task's frame refers to."""
