"""The benchmark population: users, a heavy-tailed follow graph, sessions, and who posts when.

Everything is built in memory from a seed first (so a run is reproducible and the bare-server
ceiling can replay the exact same pattern), then written to PostgreSQL in bulk with COPY.
Users are handled by index (0..U-1) until the database hands out an id range; the id of index i
is then `base_id + i`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
import secrets
from collections.abc import Iterable

import psycopg2
import psycopg2.extensions

from feed_app.auth import hash_password_sync

BENCH_PASSWORD = "bench-password"  # nobody logs in: the load test mints tokens itself
# Emptied by --truncate; a table the service's schema lacks (an older version run with --run-py)
# is skipped.
SEED_TABLES = ("users", "follows", "posts", "outbox", "logins", "refresh_tokens")
COPY_BATCH = 200_000  # rows per COPY call: bounded memory, few round trips


@dataclasses.dataclass
class Population:
    """Who follows whom, which user each session belongs to, and the posting authors."""

    follows: list[list[int]]  # user index -> indexes of the authors it follows
    session_users: list[int]  # session index -> user index
    base_id: int = 0  # set by seed_database: user id of index 0

    @property
    def user_count(self) -> int:
        return len(self.follows)

    def user_id(self, index: int) -> int:
        return self.base_id + index

    def user_ids(self) -> range:
        return range(self.base_id, self.base_id + self.user_count)

    def follower_counts(self) -> list[int]:
        counts = [0] * self.user_count
        for authors in self.follows:
            for author in authors:
                counts[author] += 1
        return counts

    def sessions_by_author(self) -> list[list[int]]:
        """author index -> indexes of the sessions a post of it reaches (the fan-out of a post):
        those whose user follows it, and the author's own."""
        sessions_of_user: list[list[int]] = [[] for _ in range(self.user_count)]
        for session, user in enumerate(self.session_users):
            sessions_of_user[user].append(session)
        fan_out: list[list[int]] = [list(sessions) for sessions in sessions_of_user]
        for user, authors in enumerate(self.follows):
            for author in authors:
                fan_out[author].extend(sessions_of_user[user])
        return fan_out

    def summary(self) -> dict[str, float]:
        counts = sorted(self.follower_counts(), reverse=True)
        total = sum(counts) or 1
        return {
            "users": self.user_count,
            "follows": sum(len(a) for a in self.follows),
            "sessions": len(self.session_users),
            "users_with_sessions": len(set(self.session_users)),
            "top_author_followers": counts[0] if counts else 0,
            "top10_authors_share_of_follows": round(sum(counts[:10]) / total, 3),
            "authors_with_followers": sum(1 for c in counts if c),
        }


def zipf_cum_weights(n: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf(exponent): rank k is chosen ∝ 1/k^s.

    With s≈1 the first few authors are followed by most users while the median author has a
    handful of followers, which is the shape that makes fan-out (not post rate) the hard part.
    """
    return list(itertools.accumulate(1.0 / (rank**exponent) for rank in range(1, n + 1)))


def build_follow_graph(
    users: int, per_user: int, exponent: float, rng: random.Random
) -> list[list[int]]:
    """Each user follows `per_user` distinct other users drawn by Zipf popularity (index 0 is
    the most popular author). Draws are batched and bounded; self-follows are skipped."""
    per_user = min(per_user, users - 1)
    cum = zipf_cum_weights(users, exponent)
    population = range(users)
    graph = []
    for user in range(users):
        chosen: dict[int, None] = {}  # insertion-ordered set: the first distinct draws win
        for _attempt in range(50):
            if len(chosen) >= per_user:
                break
            for author in rng.choices(population, cum_weights=cum, k=2 * per_user):
                if author != user and len(chosen) < per_user:
                    chosen[author] = None
        if len(chosen) < per_user:  # extremely skewed exponent: fill uniformly
            others = [a for a in population if a != user and a not in chosen]
            chosen.update(dict.fromkeys(rng.sample(others, per_user - len(chosen))))
        graph.append(sorted(chosen))
    return graph


def assign_sessions(users: int, sessions: int, rng: random.Random) -> list[int]:
    """Session index -> user index. About 10% of the sessions are a second (or third...) session
    of a user who already has one, like a phone and a laptop, because the service binds each
    session separately and that path must be exercised; past `users` sessions every user has one.
    """
    distinct = min(users, max(1, sessions - sessions // 10))
    owners = rng.sample(range(users), distinct)
    extra = [rng.choice(owners) for _ in range(sessions - distinct)]
    result = owners + extra
    rng.shuffle(result)
    return result


def choose_authors(
    population: Population, posts: int, choice: str, rng: random.Random
) -> list[int]:
    """The author index of every post, in order.

    "uniform": every user posts equally often (realistic: popularity is not posting rate), so a
    post reaches F·(sessions/users) sessions on average. "followers": an author posts in
    proportion to its follower count, so mostly the celebrities post and the mean fan-out is
    Σf²/Σf, far larger: use it to stress fan-out.
    """
    users = range(population.user_count)
    if choice == "uniform":
        return rng.choices(users, k=posts)
    weights = population.follower_counts()
    if not any(weights):
        return rng.choices(users, k=posts)
    return rng.choices(users, weights=weights, k=posts)


def build_population(users: int, follows: int, sessions: int, exponent: float, seed: int):
    rng = random.Random(seed)
    graph = build_follow_graph(users, follows, exponent, rng)
    return Population(follows=graph, session_users=assign_sessions(users, sessions, rng)), rng


# --- PostgreSQL ---------------------------------------------------------------------------------


def database_name(dsn: str) -> str:
    return psycopg2.extensions.parse_dsn(dsn).get("dbname", "")


def copy_rows(cur, table: str, columns: str, rows: Iterable[tuple]) -> int:
    """COPY rows (no tabs, newlines or backslashes in values) in batches; returns the count."""
    total = 0
    while batch := list(itertools.islice(rows, COPY_BATCH)):
        buffer = io.StringIO("".join("\t".join(map(str, row)) + "\n" for row in batch))
        cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buffer)
        total += len(batch)
    return total


def random_id_floor() -> int:
    """A random start of the run's user ids, between 10^12 and 10^13.

    The service routes posts through the broker-wide amq.direct exchange with the author's id as
    routing key (and follow changes as control.<user id>), so every deployment sharing the
    RabbitMQ vhost (test suites, dev instances, other bench runs) exchanges posts with every other
    one whose user ids coincide, and a session then drops its own post whose id it already saw
    from the other database. Ids no other database on the broker uses keep the run isolated.
    """
    return 10**12 + secrets.randbelow(9 * 10**6) * 10**6


def seed_database(dsn: str, population: Population, *, truncate: bool) -> int:
    """Write the users and follows with COPY; sets and returns population.base_id.

    One password hash is computed and shared (scrypt costs tens of milliseconds each, so one per
    user would take minutes for 10,000 users). The id range starts at a random high id (see
    random_id_floor) and is reserved under a table lock; the users' sequence is moved past it, so
    the run's users are fresh even without truncation: they have no posts, hence no history is
    sent before `ready`.
    """
    if truncate and "bench" not in database_name(dsn):
        raise ValueError(f"refusing to truncate {database_name(dsn)!r}: not a bench database")
    password_hash = hash_password_sync(BENCH_PASSWORD)
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            if truncate:
                cur.execute(
                    "SELECT string_agg(name, ', ') FROM unnest(%s::text[]) AS name"
                    " WHERE to_regclass(name) IS NOT NULL",
                    (list(SEED_TABLES),),
                )
                cur.execute(f"TRUNCATE {cur.fetchone()[0]}")
            cur.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
            cur.execute("SELECT pg_get_serial_sequence('users', 'id')")
            (sequence,) = cur.fetchone()
            cur.execute(
                f"SELECT greatest((SELECT coalesce(max(id), 0) FROM users),"
                f" (SELECT last_value FROM {sequence}))"
            )
            (highest,) = cur.fetchone()
            base = max(highest + 1, random_id_floor())
            population.base_id = base
            copy_rows(
                cur,
                "users",
                "id, name, password_hash",
                ((base + i, f"bench{i}", password_hash) for i in range(population.user_count)),
            )
            copy_rows(
                cur,
                "follows",
                "follower_id, author_id",
                (
                    (base + user, base + author)
                    for user, authors in enumerate(population.follows)
                    for author in authors
                ),
            )
            cur.execute("SELECT setval(%s, %s)", (sequence, base + population.user_count - 1))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE users, follows")  # fresh statistics for the service's queries
    finally:
        conn.close()
    return base
