"""PostgreSQL: schema set-up at start, a connection pool, and one small helper per query."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import time
from typing import Any

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from feed_app import wire
from feed_app.horizon import HorizonClock

log = logging.getLogger(__name__)

SQL_DIR = pathlib.Path(__file__).resolve().parent.parent / "sql"
MIGRATION_LOCK = 0x46454544  # pg_advisory_lock key ("FEED") serialising concurrent start-ups
# Seconds for connecting or for one query (aiopg closes a connection whose query times out). It
# bounds how long a request waits on a PostgreSQL that accepts connections but does not answer.
QUERY_TIMEOUT = 3.0
HORIZON_ATTEMPTS = 30  # samples a read with a horizon waits for the horizon clock at start-up


def _cancellation_lost() -> bool:
    """aiopg waits for each statement with asyncio.wait_for, which in Python 3.11 swallows a
    cancellation that lands as the statement completes: the statement's result comes back and the
    cancelled task carries on (a closed session into its history's warm-up wait, seconds past
    its end). The task still counts the request (Task.cancelling()), so the caller raises it once
    the statement is done. Not raised here: the task keeps the exception, the exception its
    traceback's frames, and this frame holds the task, a cycle that would keep a closed session
    until the collector runs."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (or answered too slowly); the caller answers 503."""


class PostNotFound(Exception):
    """No such post, or it was deleted (only a delete may find a deleted post)."""


class NotYourPost(Exception):
    """A change of a post by someone who is not its author."""


class UnknownUser(Exception):
    """A row would refer to a user that does not exist: a validly signed token of a user who is
    not in this database (it was recreated, or another deployment shares the secret)."""


@dataclasses.dataclass(frozen=True)
class Post:
    id: int
    author_id: int
    text: str
    created_at: datetime.datetime
    author_name: str
    version: int  # the change number of its latest change (sql/006_post_changes.sql)
    edited_at: datetime.datetime | None
    deleted_at: datetime.datetime | None  # set: a tombstone, its text gone

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "author_id": self.author_id,
            "author_name": self.author_name,
            "text": self.text,
            "created_at": self.created_at.isoformat(),
            "edited_at": self.edited_at.isoformat() if self.edited_at else None,
            "version": self.version,
        }

    def frame(self) -> bytes:
        """The websocket frame of its latest change."""
        if self.deleted_at is not None:
            return wire.deleted_frame(self.id, self.version)
        return wire.post_frame(self.to_json())

    @property
    def changed_at(self) -> datetime.datetime:
        """When its latest change was made (the start of the create-to-send latency)."""
        return self.deleted_at or self.edited_at or self.created_at


@dataclasses.dataclass(frozen=True)
class BeatReport:
    """A process's last report of its heartbeats (live_processes)."""

    sent: int  # the last beat it had published when it reported
    confirmed: int  # the last beat the broker had confirmed
    at: float  # when, on PostgreSQL's clock (seconds)


# --- schema, applied synchronously before the event loop starts ----------------------------------


def prepare_database(dsn: str) -> None:
    """Create the database if missing, then apply the not-yet-applied files of sql/ in order."""
    _create_database_if_missing(dsn)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        # Several processes may start at once; one applies, the others wait and find it done.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        applied = {version for (version,) in cur.fetchall()}
        for path in sorted(SQL_DIR.glob("*.sql")):
            if path.name not in applied:
                log.info("applying %s", path.name)
                cur.execute(path.read_text())
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (path.name,))
    conn.close()


def _create_database_if_missing(dsn: str) -> None:
    params = psycopg2.extensions.parse_dsn(dsn)
    name = params.get("dbname", "")
    try:
        psycopg2.connect(dsn).close()
        return
    except psycopg2.OperationalError as exc:
        if f'database "{name}" does not exist' not in str(exc):
            raise
    admin = psycopg2.connect(**{**params, "dbname": "postgres"})
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            quoted = psycopg2.extensions.quote_ident(name, cur)
            cur.execute(f"CREATE DATABASE {quoted}")
        log.info("created database %s", name)
    except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
        pass  # another process created it first
    finally:
        admin.close()


def drop_database(dsn: str) -> None:
    """Drop the DSN's database, sessions and all (tests, benchmarks and the local cluster make
    databases of their own and drop them when done)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    admin = psycopg2.connect(**{**params, "dbname": "postgres"})
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            name = psycopg2.extensions.quote_ident(params["dbname"], cur)
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


# --- queries --------------------------------------------------------------------------------------

_POST_COLUMNS = "id, author_id, text, created_at, version, edited_at, deleted_at"
# A Post row from posts p: the columns, then the author's name from the join.
_POST_ROW = "p.id, p.author_id, p.text, p.created_at, u.name, p.version, p.edited_at, p.deleted_at"
_JOIN_AUTHOR = "JOIN users u ON u.id = p.author_id"

# A page of the caller's feed, newest first: the caller's own posts and those of the authors the
# caller follows, with ids below %(before)s, deleted ones left out; %(depth)s = offset + limit
# (the reads per author match the partial index posts_live_author_id_idx). Two ways to find the
# page, both bounded whatever the follow list looks like (figures in BENCHMARKS.md, "Feed pages"):
# - `quick`: when the authors post often, the page is among the newest %(window)s posts, read
#   backwards along the id index and kept when their author is followed;
# - otherwise (quick found fewer than depth): the newest post of each author (one index probe
#   each on posts (author_id, id)); the depth-th newest of those is a floor that every post of
#   the page is at or above, so at most `depth` authors are read further, each down to the
#   floor and at most `depth` posts deep.
# The count of `quick` is computed once and switches one branch off, so only one way runs.
FEED_PAGE_SQL = f"""
    WITH authors AS MATERIALIZED (
        SELECT author_id FROM follows WHERE follower_id = %(user)s
        UNION ALL SELECT %(user)s
    ), quick AS MATERIALIZED (
        SELECT recent.id FROM (
            SELECT id, author_id FROM posts WHERE id < %(before)s AND deleted_at IS NULL
            ORDER BY id DESC LIMIT %(window)s
        ) recent
        WHERE recent.author_id IN (SELECT author_id FROM authors)
        ORDER BY recent.id DESC LIMIT %(depth)s
    ), newest AS MATERIALIZED (
        SELECT authors.author_id, latest.id
        FROM authors CROSS JOIN LATERAL (
            SELECT id FROM posts
            WHERE author_id = authors.author_id AND id < %(before)s AND deleted_at IS NULL
            ORDER BY id DESC LIMIT 1
        ) latest
    ), floor AS (
        SELECT CASE WHEN count(*) < %(depth)s THEN 0 ELSE min(id) END AS id
        FROM (SELECT id FROM newest ORDER BY id DESC LIMIT %(depth)s) deepest
    ), page AS (
        SELECT id FROM quick WHERE (SELECT count(*) FROM quick) = %(depth)s
        UNION ALL
        SELECT older.id
        FROM newest CROSS JOIN floor CROSS JOIN LATERAL (
            SELECT id FROM posts
            WHERE author_id = newest.author_id AND id < %(before)s AND id >= floor.id
                AND deleted_at IS NULL
            ORDER BY id DESC LIMIT %(depth)s
        ) older
        WHERE newest.id >= floor.id AND (SELECT count(*) FROM quick) < %(depth)s
        ORDER BY id DESC OFFSET %(offset)s LIMIT %(limit)s
    )
    SELECT {_POST_ROW} FROM page JOIN posts p ON p.id = page.id {_JOIN_AUTHOR}
    ORDER BY p.id DESC"""
# How many of the newest posts `quick` reads per post of the page: enough when the followed
# authors wrote at least 1% of the recent posts.
FEED_WINDOW_PER_POST = 100

# People whose lower-cased name starts with %(prefix)s (LIKE wildcards escaped): a range scan
# of users_name_search_idx in its own order (sql/003_people_and_paging.sql).
USER_SEARCH_SQL = """
    SELECT id, name FROM users
    WHERE lower(name) COLLATE "C" LIKE lower(%(prefix)s) || '%%'
    ORDER BY lower(name) COLLATE "C", id LIMIT %(limit)s"""


class Database:
    """The process's connection pool and the queries the service runs.

    aiopg runs in autocommit mode, so each helper is one statement and one transaction; where two
    things must happen atomically they are one statement (see insert_posts).
    """

    def __init__(self, pool: aiopg.Pool) -> None:
        self.pool = pool
        self.horizon = HorizonClock()
        self._sampling: asyncio.Task | None = None
        self._stall_logged = 0.0

    @classmethod
    async def connect(cls, dsn: str, pool_size: int) -> Database:
        pool = await aiopg.create_pool(
            dsn,
            minsize=1,
            maxsize=pool_size,
            timeout=QUERY_TIMEOUT,
            pool_recycle=300,
            options="-c timezone=UTC",
        )
        db = cls(pool)
        db._sampling = asyncio.ensure_future(db._sample_horizon())
        return db

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool; connections still in use after the timeout are dropped, so that a
        query stuck on a silent server cannot hold a shutdown."""
        if self._sampling:
            self._sampling.cancel()
        self.pool.close()
        try:
            await asyncio.wait_for(self._all_released(), timeout)
        except asyncio.TimeoutError:
            log.warning("database connections still busy after %.1f s: dropping them", timeout)
            self.pool.terminate()
        with contextlib.suppress(asyncio.TimeoutError):  # a connect still under way
            await asyncio.wait_for(self.pool.wait_closed(), 1)

    async def _all_released(self) -> None:
        """Poll rather than wait in pool.wait_closed(): aiopg's release() of a connection that a
        cancelled query closed does not wake that wait, which then lasts until the timeout (a
        session closed during shutdown while it was reading did exactly that)."""
        while self.pool.size > self.pool.freesize:
            await asyncio.sleep(0.02)

    async def _run(self, sql: str, params: Any = None, *, retry: bool = True) -> list[tuple]:
        """One statement. A read (retry=True) that fails on a broken connection is retried once on
        a fresh one, because after a PostgreSQL restart every pooled connection is dead and only
        use reveals it; a timeout is not retried, so a silent server costs one QUERY_TIMEOUT."""
        try:
            async with self.pool.acquire() as conn, conn.cursor() as cur:
                try:
                    await cur.execute(sql, params)
                    rows = await cur.fetchall() if cur.description else []
                finally:
                    # An aiopg Cursor and its Transaction refer to each other: left as they are,
                    # every query is a cycle that holds its result set until the collector runs,
                    # which the tuned collector (run.py) does rarely. Cut, reference counting
                    # frees it at once. (aiopg 1.4.0 is its last release.)
                    cur._transaction = None
            if _cancellation_lost():
                raise asyncio.CancelledError()
            return rows
        except asyncio.TimeoutError as exc:
            raise DatabaseUnavailable(f"no answer within {QUERY_TIMEOUT} s") from exc
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            await self.pool.clear()
            if retry:
                return await self._run(sql, params, retry=False)
            raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc

    async def ping(self) -> None:
        await self._run("SELECT 1")

    def _horizon_stalled(self) -> None:
        now = time.monotonic()
        if now - self._stall_logged > 60:
            self._stall_logged = now
            log.warning(
                "post horizon stalled: a transaction on the server has been running for minutes;"
                " feeds stay exact but checkpoints stop advancing until it ends"
            )

    async def _sample_horizon(self) -> None:
        """Feed the horizon clock (feed_app/horizon.py) for as long as the pool is open."""
        # The sample's own transaction id costs a commit record; it needs no flush to disk.
        sql = """
            SELECT pg_current_xact_id()::text::bigint,
                   CASE WHEN is_called THEN last_value ELSE last_value - 1 END,
                   set_config('synchronous_commit', 'off', true)
            FROM post_ids"""
        while not self.pool.closed:
            try:
                [(xid, last_value, _)] = await self._run(sql)
            except DatabaseUnavailable:
                pass  # requests report the outage; the clock resumes with the database
            else:
                self.horizon.add_sample(xid, last_value)
            await asyncio.sleep(self.horizon.next_sample_in())

    # users and follows

    async def create_user(self, name: str, password_hash: str) -> int:
        sql = "INSERT INTO users (name, password_hash) VALUES (%s, %s) RETURNING id"
        [(user_id,)] = await self._run(sql, (name, password_hash), retry=False)
        return user_id

    async def get_user(self, user_id: int) -> tuple[int, str] | None:
        rows = await self._run("SELECT id, name FROM users WHERE id = %s", (user_id,))
        return rows[0] if rows else None

    async def newest_change(self) -> int:
        """The highest change number handed out so far (post ids and versions share the
        sequence); 0 before the first."""
        [(last, called)] = await self._run("SELECT last_value, is_called FROM post_ids")
        return last if called else 0

    async def get_password_hash(self, user_id: int) -> str | None:
        rows = await self._run("SELECT password_hash FROM users WHERE id = %s", (user_id,))
        return rows[0][0] if rows else None

    async def follow(self, follower_id: int, author_id: int, most: int, lease: float) -> int | None:
        """Follow, unless the follower already follows `most` others (then None). Following
        an author again is a no-op. Concurrent follows of one user each count the follows
        committed before them, so together they can pass `most` by the number in flight.

        The change is queued in follow_outbox in the same statement; returns its id, for the
        relay to announce (relay.announce_follow_change)."""
        sql = """
            WITH mine AS (
                SELECT count(*) AS n, bool_or(author_id = %(author)s) AS already
                FROM follows WHERE follower_id = %(follower)s
            ), added AS (
                INSERT INTO follows (follower_id, author_id)
                SELECT %(follower)s, %(author)s FROM mine WHERE n < %(most)s
                ON CONFLICT DO NOTHING
            ), announced AS (
                INSERT INTO follow_outbox (follower_id, author_id, claimed_until)
                SELECT %(follower)s, %(author)s, now() + %(lease)s * interval '1 second'
                FROM mine WHERE n < %(most)s OR coalesce(already, false)
                RETURNING id
            )
            SELECT (SELECT id FROM announced)"""
        params = {"follower": follower_id, "author": author_id, "most": most, "lease": lease}
        try:
            [(change_id,)] = await self._run(sql, params, retry=False)
        except psycopg2.errors.ForeignKeyViolation as exc:
            raise UnknownUser(f"user {follower_id} or {author_id} does not exist") from exc
        return change_id

    async def unfollow(self, follower_id: int, author_id: int, lease: float) -> int:
        """Stop following (a no-op if not following); the change is queued as follow() does."""
        sql = """
            WITH gone AS (
                DELETE FROM follows WHERE follower_id = %(follower)s AND author_id = %(author)s
            )
            INSERT INTO follow_outbox (follower_id, author_id, claimed_until)
            VALUES (%(follower)s, %(author)s, now() + %(lease)s * interval '1 second')
            RETURNING id"""
        params = {"follower": follower_id, "author": author_id, "lease": lease}
        [(change_id,)] = await self._run(sql, params, retry=False)
        return change_id

    async def is_following(self, follower_id: int, author_id: int) -> bool:
        sql = "SELECT EXISTS (SELECT 1 FROM follows WHERE follower_id = %s AND author_id = %s)"
        [(following,)] = await self._run(sql, (follower_id, author_id))
        return following

    async def search_users(self, prefix: str, limit: int) -> list[tuple[int, str]]:
        """Users whose name starts with `prefix`, ignoring case, by name then id."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return await self._run(USER_SEARCH_SQL, {"prefix": escaped, "limit": limit})

    async def followed_users(self, user_id: int) -> list[tuple[int, str]]:
        """The users this user follows, with their names, by name then id."""
        sql = """
            SELECT u.id, u.name FROM follows f JOIN users u ON u.id = f.author_id
            WHERE f.follower_id = %s ORDER BY lower(u.name), u.id"""
        return await self._run(sql, (user_id,))

    async def following(self, user_id: int) -> list[int]:
        sql = "SELECT author_id FROM follows WHERE follower_id = %s"
        return [author_id for (author_id,) in await self._run(sql, (user_id,))]

    # log-ins and their refresh tokens (sql/007_logins.sql)

    async def create_login(self, user_id: int, refresh_hash: bytes, refresh_ttl: float) -> int:
        """A new log-in of the user with its first refresh token; returns the log-in's id.

        The user's dead log-ins go on the way, so the table holds each user's live devices and
        little more: those ended a refresh-token lifetime ago, and those whose every refresh
        token has expired (abandoned devices). Either can have no access token left alive, as
        long as refresh tokens outlive access tokens, so no process needs to remember them."""
        sql = """
            WITH dead AS (
                DELETE FROM logins l
                WHERE l.user_id = %(user)s AND (
                    l.revoked_at < now() - %(ttl)s * interval '1 second'
                    OR NOT EXISTS (
                        SELECT 1 FROM refresh_tokens t
                        WHERE t.login_id = l.id AND t.expires_at > now()))
            ), login AS (
                INSERT INTO logins (user_id) VALUES (%(user)s) RETURNING id
            ), token AS (
                INSERT INTO refresh_tokens (hash, login_id, expires_at)
                SELECT %(hash)s, id, now() + %(ttl)s * interval '1 second' FROM login
            )
            SELECT id FROM login"""
        params = {"user": user_id, "hash": refresh_hash, "ttl": refresh_ttl}
        try:
            [(login_id,)] = await self._run(sql, params, retry=False)
        except psycopg2.errors.ForeignKeyViolation as exc:
            raise UnknownUser(f"user {user_id} does not exist") from exc
        return login_id

    async def rotate_refresh_token(
        self, old_hash: bytes, new_hash: bytes, ttl: float, grace: float
    ) -> tuple[str, int | None, int | None]:
        """(outcome, user id, log-in id): the outcomes are rotate_refresh_token()'s, in the
        schema."""
        sql = "SELECT * FROM rotate_refresh_token(%s, %s, %s, %s)"
        [row] = await self._run(sql, (old_hash, new_hash, ttl, grace), retry=False)
        return row

    async def end_logins(self, user_id: int, only: int | None = None, keep: int = 0) -> list[int]:
        """End the user's live log-ins (only the one given, or all but `keep`); returns the ids
        of those it ended."""
        sql = """
            UPDATE logins SET revoked_at = now()
            WHERE user_id = %(user)s AND revoked_at IS NULL
              AND (%(only)s::bigint IS NULL OR id = %(only)s) AND id <> %(keep)s
            RETURNING id"""
        params = {"user": user_id, "only": only, "keep": keep}
        return [login_id for (login_id,) in await self._run(sql, params, retry=False)]

    async def change_password(self, user_id: int, password_hash: str, keep: int) -> list[int]:
        """Store the new hash and end every other live log-in of the user, in one statement;
        returns the ids of the log-ins it ended."""
        sql = """
            WITH changed AS (
                UPDATE users SET password_hash = %(hash)s WHERE id = %(user)s
            )
            UPDATE logins SET revoked_at = now()
            WHERE user_id = %(user)s AND revoked_at IS NULL AND id <> %(keep)s
            RETURNING id"""
        params = {"user": user_id, "hash": password_hash, "keep": keep}
        return [login_id for (login_id,) in await self._run(sql, params, retry=False)]

    async def ended_logins(
        self, after: datetime.datetime | None, within: float
    ) -> tuple[set[int], datetime.datetime]:
        """The log-ins ended after `after` (or, given None, within the last `within` seconds),
        and PostgreSQL's clock at the read, from which the next read can go on."""
        sql = """
            SELECT now(), array(
                SELECT id FROM logins
                WHERE revoked_at > coalesce(%s, now() - %s * interval '1 second'))"""
        [(read_at, login_ids)] = await self._run(sql, (after, within))
        return set(login_ids), read_at

    # posts

    async def insert_posts(self, posts: list[tuple[int, str]], lease: float) -> list[Post | None]:
        """Store several posts, each with its outbox row, in one statement and one transaction
        (create_posts(), in the schema). Returns each post in the order given, or None where
        its author does not exist: that post is left out and the others are stored."""
        if len(posts) == 1:
            return [await self._insert_post(*posts[0], lease)]
        sql = f"""
            SELECT c.slot, {_POST_ROW}
            FROM create_posts(%(authors)s, %(texts)s, %(lease)s) c,
                LATERAL (SELECT (c.post).*) p {_JOIN_AUTHOR}"""
        authors = [author for author, _ in posts]
        params = {"authors": authors, "texts": [text for _, text in posts], "lease": lease}
        stored: list[Post | None] = [None] * len(posts)
        for slot, *row in await self._run(sql, params, retry=False):
            stored[slot - 1] = Post(*row)
        return stored

    async def _insert_post(self, author_id: int, text: str, lease: float) -> Post | None:
        """A batch of one, by create_post(): its plain arguments cost PostgreSQL less than
        create_posts()'s arrays, locks and join (BENCHMARKS.md, "The whole issue side by side"),
        and a quiet process sends every post alone."""
        sql = f"""
            SELECT {_POST_ROW} FROM create_post(%(author)s, %(text)s, %(lease)s) p
            {_JOIN_AUTHOR}"""
        params = {"author": author_id, "text": text, "lease": lease}
        try:
            [row] = await self._run(sql, params, retry=False)
        except psycopg2.errors.ForeignKeyViolation:
            return None
        return Post(*row)

    async def change_post(
        self, post_id: int, author_id: int, text: str | None, lease: float
    ) -> tuple[Post, bool]:
        """Edit the author's post (text) or delete it (text None), with its outbox row, in one
        statement (change_post(), in the schema). Returns the post as it is now and whether it
        changed: deleting a deleted post changes nothing and returns its tombstone. Raises
        PostNotFound (no such post, or an edit of a deleted one) and NotYourPost."""
        sql = f"""
            SELECT {_POST_ROW}, c.refusal
            FROM change_post(%(post)s, %(author)s, %(text)s, %(lease)s) c
            LEFT JOIN LATERAL (SELECT (c.post).*) p ON true LEFT {_JOIN_AUTHOR}"""
        params = {"post": post_id, "author": author_id, "text": text, "lease": lease}
        [(*row, refusal)] = await self._run(sql, params, retry=False)
        if refusal == "missing":
            raise PostNotFound(post_id)
        if refusal == "forbidden":
            raise NotYourPost(post_id)
        return Post(*row), refusal is None

    async def get_post(self, post_id: int) -> Post | None:
        sql = f"""
            SELECT {_POST_ROW} FROM posts p {_JOIN_AUTHOR}
            WHERE p.id = %s AND p.deleted_at IS NULL"""
        rows = await self._run(sql, (post_id,))
        return Post(*rows[0]) if rows else None

    async def feed_page(self, user_id: int, before: int, offset: int, limit: int) -> list[Post]:
        params = {
            "user": user_id,
            "before": before,
            "depth": offset + limit,
            "offset": offset,
            "limit": limit,
            "window": (offset + limit) * FEED_WINDOW_PER_POST,
        }
        return [Post(*row) for row in await self._run(FEED_PAGE_SQL, params)]

    async def history(self, author_ids: list[int], limit: int) -> tuple[list[Post], int | None]:
        """The newest `limit` live posts of these authors, oldest first, each in its latest
        state, and the read's horizon (see changes_after): what a new socket starts with.

        The ids first, then the rows: the ids alone come from the partial index
        posts_live_author_id_idx, whereas for whole rows PostgreSQL may prefer a backward scan
        of every post, which for authors who rarely post reads most of the table (a second at
        10M posts: BENCHMARKS.md, "Edits and deletes")."""
        sql = f"""
            SELECT {_POST_COLUMNS} FROM posts WHERE id IN (
                SELECT id FROM posts WHERE author_id = ANY(%s) AND deleted_at IS NULL
                ORDER BY id DESC LIMIT %s)"""
        posts, horizon = await self._read_with_horizon(sql, (author_ids, limit))
        posts.sort(key=lambda post: post.id)  # the join with users keeps no order
        return posts, horizon

    async def changes_after(
        self, author_ids: list[int], after: int, limit: int
    ) -> tuple[list[Post], int | None]:
        """The posts of these authors changed after change number `after` (new, edited or
        deleted: tombstones included), each once in its latest state, by version, and the
        read's horizon: every committed change numbered up to it is in the read
        (feed_app/horizon.py). Changes above it may be in the read too, and others may still
        commit below the highest version returned.

        A session subscribes before it calls this and drops live changes at or below the
        horizon or already sent: it then misses nothing and shows nothing twice.

        The horizon is None when a transaction somewhere on the server has been running for
        longer than the clock remembers (feed_app/horizon.py): the read is good, but nobody can
        say up to where."""
        sql = f"""
            SELECT {_POST_COLUMNS} FROM posts
            WHERE author_id = ANY(%s) AND version > %s ORDER BY version LIMIT %s"""
        posts, horizon = await self._read_with_horizon(sql, (author_ids, after, limit))
        posts.sort(key=lambda post: post.version)  # the join with users keeps no order
        return posts, horizon

    async def _read_with_horizon(self, sql: str, params: Any) -> tuple[list[Post], int | None]:
        """The posts `sql` reads from posts (its _POST_COLUMNS, in its order) and the horizon
        of the read's snapshot."""
        sql = f"""
            SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, {_POST_ROW}
            FROM (VALUES (1)) AS one LEFT JOIN LATERAL ({sql}) p ON true LEFT {_JOIN_AUTHOR}"""
        rows = await self._run(sql, params)
        for _ in range(HORIZON_ATTEMPTS):
            if self.horizon.warm:
                break
            await asyncio.sleep(HorizonClock.WARMING_EVERY)  # the clock has only just started
            rows = await self._run(sql, params)
        horizon = self.horizon.horizon(rows[0][0])
        if horizon is None:
            self._horizon_stalled()
        return [Post(*row[1:]) for row in rows if row[1] is not None], horizon

    # outbox

    async def claim_outbox(
        self, lease: float, limit: int, mine: list[int], busy: list[int]
    ) -> list[tuple[int, Post]]:
        """Take over, and extend the lease of, the outbox rows listed in `mine` (this process
        failed to publish them) and the rows whose lease ran out (their writer died or is stuck),
        except the `busy` ones this process is publishing or has published. Returns each row's
        version with its post as it is now: a later change overtook the row's when the two
        differ, and that later state is what goes out."""
        sql = f"""
            WITH claimed AS (
                UPDATE outbox SET claimed_until = now() + %(lease)s * interval '1 second'
                WHERE version IN (
                    SELECT version FROM outbox
                    WHERE version = ANY(%(mine)s)
                       OR (claimed_until < now() AND version <> ALL(%(busy)s))
                    ORDER BY version LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
                RETURNING version, post_id)
            SELECT claimed.version, {_POST_ROW}
            FROM claimed JOIN posts p ON p.id = claimed.post_id {_JOIN_AUTHOR}
            ORDER BY claimed.version"""
        params = {"lease": lease, "limit": limit, "mine": mine, "busy": busy}
        rows = await self._run(sql, params, retry=False)
        return [(version, Post(*row)) for version, *row in rows]

    async def delete_outbox(self, versions: list[int]) -> None:
        await self._run("DELETE FROM outbox WHERE version = ANY(%s)", (versions,))

    async def claim_follow_changes(self, lease: float, limit: int) -> list[tuple[int, int, int]]:
        """(id, follower, author) of follow changes whose announcement was not confirmed within
        their lease, taken over for another lease."""
        sql = """
            UPDATE follow_outbox SET claimed_until = now() + %(lease)s * interval '1 second'
            WHERE id IN (
                SELECT id FROM follow_outbox WHERE claimed_until < now()
                ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
            RETURNING id, follower_id, author_id"""
        return await self._run(sql, {"lease": lease, "limit": limit}, retry=False)

    async def delete_follow_changes(self, change_ids: list[int]) -> None:
        await self._run("DELETE FROM follow_outbox WHERE id = ANY(%s)", (change_ids,))

    # live processes (feed_app/path_check.py)

    async def report_beats(
        self, process: str, sent: int, confirmed: int, live_within: float
    ) -> tuple[float, dict[str, BeatReport]]:
        """Record this process's beats, and return the time of this statement (PostgreSQL's
        clock, in seconds) with every other process's last report, from those that reported
        within live_within seconds. Rows of processes gone for an hour are dropped on the way:
        a killed process cannot delete its own."""
        sql = """
            WITH mine AS (
                INSERT INTO live_processes (id, sent, confirmed)
                VALUES (%(me)s, %(sent)s, %(confirmed)s)
                ON CONFLICT (id) DO UPDATE
                SET sent = EXCLUDED.sent, confirmed = EXCLUDED.confirmed, seen_at = now()),
            gone AS (
                DELETE FROM live_processes WHERE seen_at < now() - interval '1 hour')
            SELECT extract(epoch FROM now())::float8, id, sent, confirmed,
                   extract(epoch FROM seen_at)::float8
            FROM live_processes
            WHERE id <> %(me)s AND seen_at > now() - %(within)s * interval '1 second'
            UNION ALL SELECT extract(epoch FROM now())::float8, NULL, 0, 0, 0"""
        params = {"me": process, "sent": sent, "confirmed": confirmed, "within": live_within}
        rows = await self._run(sql, params, retry=False)
        reports = {peer: BeatReport(*row) for _, peer, *row in rows if peer is not None}
        return rows[0][0], reports

    async def forget_process(self, process: str) -> None:
        await self._run("DELETE FROM live_processes WHERE id = %s", (process,), retry=False)

    async def outbox_backlog(self) -> int:
        [(count,)] = await self._run("SELECT count(*) FROM outbox")
        return count
