"""Seed a database for measuring feed pages and people search (bench/measure_paging.py).

    .venv/bin/python bench/seed_posts.py            # 100,000 users, 10,000,000 posts (~10 min)
    .venv/bin/python bench/seed_posts.py --users 2000 --posts 100000   # a quick small one

The database (default `feed_paging`) is dropped and created again, so only names starting with
`feed_paging` are accepted: never a test database or the service's own. The schema is the
service's (sql/). Everything is written with COPY.

The population, chosen so that every shape of follow list the feed must serve fast is there:
- users have made-up names (first and last names from short lists, so prefixes are shared by
  thousands of users, as real names are);
- authors post by Zipf(1) popularity (the top author ~800,000 posts, the median a dozen), except
  the last `--rare-authors` users, who post twice each at random moments across the whole history;
- every user follows `--follows` (20) authors chosen by the same popularity;
- four users get the follow lists the measurements need, recorded in the table `bench_shapes`:
  `wide_popular` (500 of the 2,000 most active authors), `wide_uniform` (500 authors at random),
  `rare` (20 rarely-posting authors) and `huge` (5,000 authors at random);
- every `--edit-every` (100th) post is edited and every `--delete-every` (1000th) deleted, after
  all the posts: their versions are the newest change numbers.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.extensions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib.options import PAGING_DSN
from bench.lib.population import (
    BENCH_PASSWORD,
    COPY_BATCH,
    build_follow_graph,
    copy_rows,
    zipf_cum_weights,
)
from feed_app.auth import hash_password_sync
from feed_app.db import drop_database, prepare_database

SECONDS_PER_POST = 3  # created_at spacing: 10M posts span about a year
# Word lists as text, split where used.
FIRST_NAMES_TEXT = (
    "Ada Alan Alice Amir Ana Anna Ben Bob Carla Carol Chen Dan Dave Diego Elena Emma Eva "
    "Farah Grace Hana Ivan Jack Jana Kai Karim Lea Leo Lin Luca Maria Mia Nadia Noah Olga "
    "Omar Paul Priya Ravi Rosa Sam Sara Sofia Tom Uma Vera Wei Yara Yusuf Zoe"
)
LAST_NAMES_TEXT = (
    "Adams Alvarez Baker Brown Chen Costa Dubois Fischer Garcia Hansen Ito Jensen Kim "
    "Kowalski Lopez Martin Meyer Moreau Nakamura Novak Okafor Patel Petrov Rossi Schmidt "
    "Silva Smith Tanaka Weber Wong"
)
WORDS_TEXT = (
    "today coffee train release meeting weekend garden music river code city rain bike "
    "book market photo lunch idea launch design review mountain sea football concert "
    "evening"
)
FIRST_NAMES, LAST_NAMES, WORDS = (
    t.split() for t in (FIRST_NAMES_TEXT, LAST_NAMES_TEXT, WORDS_TEXT)
)
SHAPES = {  # name -> (authors followed, where they come from)
    "wide_popular": (500, "popular"),
    "wide_uniform": (500, "uniform"),
    "rare": (20, "rare"),
    "huge": (5000, "uniform"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=PAGING_DSN, help="database to create (feed_paging*)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--posts", type=int, default=10_000_000)
    parser.add_argument("--follows", type=int, default=20, help="authors each user follows")
    parser.add_argument("--rare-authors", type=int, default=1000)
    parser.add_argument("--edit-every", type=int, default=100, help="edit every Nth post [100]")
    parser.add_argument(
        "--delete-every", type=int, default=1000, help="delete every Nth post [1000]"
    )
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    name = psycopg2.extensions.parse_dsn(args.dsn).get("dbname", "")
    if not name.startswith("feed_paging"):
        parser.error(
            f"refusing to recreate {name!r}: the database name must start with feed_paging"
        )
    if args.users < max(n for n, _ in SHAPES.values()) + args.rare_authors + 10:
        parser.error("--users is too small for the follow-list shapes")
    return args


def recreate_database(dsn: str) -> None:
    drop_database(dsn)
    prepare_database(dsn)  # creates it and applies sql/


def user_rows(users: int, rng: random.Random) -> Iterator[tuple]:
    password_hash = hash_password_sync(BENCH_PASSWORD)
    for user_id in range(1, users + 1):
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        yield user_id, name, password_hash


def post_rows(args: argparse.Namespace, rng: random.Random) -> Iterator[tuple]:
    """Posts 1..N in id order with rising created_at, none changed yet; authors by Zipf
    popularity, except the rare authors' posts at random ids."""
    active = args.users - args.rare_authors  # users 1..active post by popularity
    rare_posts = {
        post_id: active + 1 + n // 2
        for n, post_id in enumerate(rng.sample(range(1, args.posts + 1), 2 * args.rare_authors))
    }
    cum = zipf_cum_weights(active, 1.0)
    start = time.time() - args.posts * SECONDS_PER_POST
    for first in range(1, args.posts + 1, COPY_BATCH):
        ids = range(first, min(first + COPY_BATCH, args.posts + 1))
        authors = rng.choices(range(1, active + 1), cum_weights=cum, k=len(ids))
        for post_id, author in zip(ids, authors, strict=True):
            created = time.strftime(
                "%Y-%m-%d %H:%M:%S+00", time.gmtime(start + post_id * SECONDS_PER_POST)
            )
            text = f"{' '.join(rng.choices(WORDS, k=6))} #{post_id}"
            yield post_id, rare_posts.get(post_id, author), text, created, post_id


def follow_rows(args: argparse.Namespace, rng: random.Random) -> tuple[Iterator[tuple], dict]:
    """Everyone's follows (index 0 of the graph = user 1 = the most active author), with the
    shape users' lists replaced; returns the rows and {shape: user id}."""
    active = args.users - args.rare_authors
    graph = build_follow_graph(args.users, args.follows, 1.0, rng)
    shape_users = {}
    for n, (shape, (count, source)) in enumerate(SHAPES.items()):
        user = active - 10 - n  # an ordinary, barely active author
        pool = {
            "popular": range(1, 2001),
            "uniform": range(1, active + 1),
            "rare": range(active + 1, args.users + 1),
        }[source]
        graph[user - 1] = [a - 1 for a in rng.sample([a for a in pool if a != user], count)]
        shape_users[shape] = user
    rows = ((user + 1, author + 1) for user, authors in enumerate(graph) for author in authors)
    return rows, shape_users


def change_posts(cur, edit_every: int, delete_every: int) -> int:
    """Edit every edit_every-th post and delete every delete_every-th one (0: none), each taking
    the next change number as the service does (sql/006_post_changes.sql). Returns how many."""
    changed = 0
    for every, change in (
        (edit_every, "edited_at = created_at + interval '1 hour'"),
        (delete_every, "text = '', deleted_at = created_at + interval '1 hour'"),
    ):
        if every > 0:
            cur.execute(
                f"UPDATE posts SET version = nextval('post_ids'), {change}"
                " WHERE id %% %s = 1 AND deleted_at IS NULL",
                (every,),
            )
            changed += cur.rowcount
    return changed


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()

    def say(message: str) -> None:
        print(f"{time.monotonic() - began:6.0f} s  {message}", flush=True)

    recreate_database(args.dsn)
    say(f"created {args.dsn}")
    conn = psycopg2.connect(args.dsn)
    with conn, conn.cursor() as cur:
        # The rows are consistent by construction: skip the per-row foreign-key triggers, and
        # build the secondary indexes once at the end instead of row by row.
        cur.execute("SET session_replication_role = replica")
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN %s"
            " AND indexname NOT LIKE '%%_pkey'",
            (("users", "follows", "posts"),),
        )
        indexes = cur.fetchall()
        cur.execute(f"DROP INDEX {', '.join(name for name, _ in indexes)}")
        users = copy_rows(cur, "users", "id, name, password_hash", user_rows(args.users, rng))
        say(f"users: {users}")
        rows, shape_users = follow_rows(args, rng)
        say(f"follows: {copy_rows(cur, 'follows', 'follower_id, author_id', rows)}")
        cur.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (args.users,))
        columns = "id, author_id, text, created_at, version"  # never changed: version = id
        posts = copy_rows(cur, "posts", columns, post_rows(args, rng))
        say(f"posts: {posts}")
        cur.execute("SELECT setval('post_ids', %s)", (args.posts,))
        say(f"edits and deletes: {change_posts(cur, args.edit_every, args.delete_every)}")
        for _, definition in indexes:
            cur.execute(definition)
        cur.execute("CREATE TABLE bench_shapes (shape text PRIMARY KEY, user_id bigint NOT NULL)")
        cur.executemany("INSERT INTO bench_shapes VALUES (%s, %s)", list(shape_users.items()))
        say("indexes built")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")  # statistics, and the visibility map for index-only scans
    conn.close()
    say(f"vacuumed; shapes: {shape_users}")


if __name__ == "__main__":
    main()
