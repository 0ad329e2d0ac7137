"""EXPLAIN ANALYZE timings of feed pages, people search and the following list, on the database
bench/seed_posts.py builds (default `feed_paging`).

    .venv/bin/python bench/measure_paging.py              # every case, 5 runs each
    .venv/bin/python bench/measure_paging.py --plans      # and the plan of each case's last run

The service's own SQL is measured: it is captured from feed_app.db.Database's methods, so what
is timed is what the handlers run. Beside it, for comparison, the feed query this service ran
before keyset paging: at offset 0 PostgreSQL plans it as a backward scan of the posts' id index
filtered by the follow set, the other usual answer, fast when the followed authors post often.
Each case runs --runs times in a row; the figures are planning + execution time in ms
(min / median / max) and the shared buffers of the last run (hit / read from outside
PostgreSQL's cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib.options import PAGING_DSN
from feed_app.db import Database
from feed_app.handlers import MAX_FEED_LIMIT, MAX_FEED_OFFSET
from feed_app.sessions import RESUME_PAGE
from feed_app.wire import MAX_ID

PAGE = 20
DEEP_PAGES = 50  # "page 51": the before= a reader reaches after pressing "load older" 50 times
OLD_ID = 1_000_000  # before= this: history months old (ids run 1..10M)
# A resume since= this many changes before the newest: a client away for a minute at a busy
# hour, and for a day or more (at 3 s per post, 100,000 changes are about 3.5 days).
RESUME_BEHIND = (1_000, 100_000)

# The feed query before keyset paging: a join ordered by id with OFFSET.
OLD_FEED_SQL = """
    SELECT p.id, p.author_id, p.text, p.created_at
    FROM posts p JOIN follows f ON f.author_id = p.author_id
    WHERE f.follower_id = %(user)s ORDER BY p.id DESC OFFSET %(offset)s LIMIT %(limit)s"""


class CapturedSql(Database):
    """A Database whose queries are recorded instead of run: the service's exact SQL."""

    def __init__(self) -> None:
        super().__init__(pool=None)
        self.sql: tuple[str, Any] | None = None
        for _ in range(2):  # a horizon for any snapshot: a read returns at once
            self.horizon.add_sample(0, 0)

    async def _run(self, sql: str, params: Any = None, *, retry: bool = True) -> list[tuple]:
        self.sql = (sql, params)
        return [(0, None, None, None, None, None)] if "pg_snapshot_xmin" in sql else []


def service_sql(method: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    db = CapturedSql()
    asyncio.run(getattr(db, method)(*args, **kwargs))
    assert db.sql is not None
    return db.sql


def explain(cur, sql: str, params: Any, runs: int, timing: bool) -> tuple[list[float], dict]:
    """Per-node timing (for --plans) costs a clock read per row and node: off for the figures."""
    times, plan = [], {}
    options = "ANALYZE, BUFFERS, FORMAT JSON" + ("" if timing else ", TIMING OFF")
    for _ in range(runs):
        cur.execute(f"EXPLAIN ({options}) " + sql, params)
        [(result,)] = cur.fetchall()
        plan = result[0]
        times.append(plan["Planning Time"] + plan["Execution Time"])
    return times, plan


def feed_path(node: dict, depth: int | None) -> str:
    """Which way FEED_PAGE_SQL found the page: the newest posts ("recent") or the floor."""
    if depth is None:
        return ""
    stack = [node]
    while stack:
        node = stack.pop()
        if node.get("Subplan Name") == "CTE quick":
            return "recent" if node["Actual Rows"] == depth else "floor"
        stack.extend(node.get("Plans", []))
    return ""


def report(label: str, times: list[float], plan: dict, show_plan: bool, depth: int | None) -> None:
    top = plan["Plan"]
    figures = f"{min(times):8.2f} {statistics.median(times):8.2f} {max(times):8.2f}"
    buffers = f"{top.get('Shared Hit Blocks', 0)}/{top.get('Shared Read Blocks', 0)}"
    path = feed_path(top, depth)
    print(
        f"{label:<58} {figures}   rows {top['Actual Rows']:<4} buffers {buffers:<9} {path}",
        flush=True,
    )
    if show_plan:
        print(json.dumps(plan["Plan"], indent=1)[:6000])


def feed_ids(cur, user: int, pages: int) -> list[int]:
    """The ids a reader sees after `pages` pages of the feed (the service's query)."""
    sql, params = service_sql("feed_page", user, MAX_ID, 0, PAGE * pages)
    cur.execute(sql, params)
    return [row[0] for row in cur.fetchall()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=PAGING_DSN, help="built by seed_posts.py [feed_paging]")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--plans", action="store_true", help="print each case's plan")
    parser.add_argument("--no-old", action="store_true", help="skip the slow old feed query")
    args = parser.parse_args()

    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SET statement_timeout = '60s'")
    cur.execute("SELECT shape, user_id FROM bench_shapes ORDER BY user_id DESC")
    shapes = cur.fetchall()
    cur.execute("SELECT (SELECT count(*) FROM users), (SELECT last_value FROM post_ids)")
    users, changes = cur.fetchone()
    print(f"{users:,} users, {changes:,} changes (posts, edits, deletes); {args.runs} runs each")
    print(f"{'case':<58} {'min':>8} {'median':>8} {'max':>8}   (ms)    shared buffers hit/read")

    def case(label: str, sql: str, params: Any) -> None:
        times, plan = explain(cur, sql, params, args.runs, args.plans)
        depth = params.get("depth") if isinstance(params, dict) else None
        report(label, times, plan, args.plans, depth)

    for shape, user in shapes:
        cur.execute("SELECT count(*) FROM follows WHERE follower_id = %s", (user,))
        (follows,) = cur.fetchone()
        name = f"{shape} ({follows} follows)"
        seen = feed_ids(cur, user, DEEP_PAGES)
        deep_before = seen[-1] if len(seen) == PAGE * DEEP_PAGES else MAX_ID
        pages = {
            "first page": (MAX_ID, 0, PAGE),
            "first page, limit 100": (MAX_ID, 0, 100),
            f"offset {MAX_FEED_OFFSET}": (MAX_ID, MAX_FEED_OFFSET, PAGE),
            f"offset {MAX_FEED_OFFSET}, limit {MAX_FEED_LIMIT}": (
                MAX_ID,
                MAX_FEED_OFFSET,
                MAX_FEED_LIMIT,
            ),
            f"page {DEEP_PAGES + 1} (before=)": (deep_before, 0, PAGE),
            f"before={OLD_ID:,}": (OLD_ID, 0, PAGE),
        }
        for page, (before, offset, limit) in pages.items():
            case(f"feed {name}: {page}", *service_sql("feed_page", user, before, offset, limit))
        if not args.no_old:
            for offset in (0, 10_000):
                old = {"user": user, "offset": offset, "limit": PAGE}
                case(f"  old query {name}: offset {offset}", OLD_FEED_SQL, old)
        cur.execute("SELECT array_agg(author_id) FROM follows WHERE follower_id = %s", (user,))
        (authors,) = cur.fetchone()
        history = service_sql("history", sorted(authors), PAGE)
        case(f"  socket history (history) {name}", *history)
        for behind in RESUME_BEHIND:
            resume = service_sql("changes_after", sorted(authors), changes - behind, RESUME_PAGE)
            case(f"  resume {behind:,} back (changes_after) {name}", *resume)
        case(f"following list {name}", *service_sql("followed_users", user))

    for prefix in ("a", "al", "ali", "alice sm", "zz", "%", "É"):
        for limit in (10, 50):
            sql, params = service_sql("search_users", prefix, limit)
            case(f"search q={prefix!r} limit {limit}", sql, params)
    unindexed = "SELECT id, name FROM users WHERE name ILIKE %(p)s ORDER BY name, id LIMIT 10"
    case("  unindexed ILIKE 'al%' limit 10", unindexed, {"p": "al%"})
    conn.close()


if __name__ == "__main__":
    main()
