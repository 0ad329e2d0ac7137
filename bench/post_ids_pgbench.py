"""The database's own ceiling on posts/s: the old locked counter row against create_post().

    .venv/bin/python bench/post_ids_pgbench.py --clients 1 8 32 --seconds 10

Runs pgbench (PostgreSQL's own load generator, no Python in the loop) on a scratch database with
the service's schema, alternating two statements at each client count:

- `counter`: what the service did before sql/002: take the id from a one-row table locked until
  the commit, so every post of a deployment waits for the one before it to commit (and fsync);
- `sequence`: create_post(), the id from a sequence; nothing is held beyond the rows written.

Both write the post and its outbox row in one transaction, as the service does. The counter
statement uses a table of its own, with ids far above the sequence's, so both run on one schema.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import secrets
import subprocess
import sys
import tempfile

import psycopg2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib.options import SERVER_DSN
from feed_app.db import drop_database, prepare_database

STATEMENTS = {
    "counter": """
        WITH clock AS (UPDATE bench_clock SET last_id = last_id + 1 RETURNING last_id),
        post AS (INSERT INTO posts (id, author_id, text)
                 SELECT last_id, :author, 'x' FROM clock RETURNING id),
        queued AS (INSERT INTO outbox (post_id, claimed_until) SELECT id, now() FROM post)
        SELECT id FROM post;""",
    "sequence": "SELECT id FROM create_post(:author, 'x', 10);",
}


def scratch_database() -> tuple[str, int]:
    dsn = f"{SERVER_DSN}/feed_pgbench_{secrets.token_hex(3)}"
    prepare_database(dsn)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE bench_clock (last_id bigint NOT NULL)")
        cur.execute("INSERT INTO bench_clock VALUES (1000000000000000)")
        cur.execute("INSERT INTO users (name, password_hash) VALUES ('bench', 'x') RETURNING id")
        [(author,)] = cur.fetchall()
    conn.close()
    return dsn, author


def pgbench(dsn: str, script: str, author: int, clients: int, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(script)
        file.flush()
        argv = ["pgbench", "-n", "-f", file.name, "-D", f"author={author}"]
        argv += ["-c", str(clients), "-j", str(min(clients, 2)), "-T", str(int(seconds)), dsn]
        output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"tps = ([\d.]+)", output).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two")
    args = parser.parse_args()
    dsn, author = scratch_database()
    try:
        print(f"{'clients':>7} {'counter posts/s':>16} {'sequence posts/s':>17} {'ratio':>6}")
        for clients in args.clients:
            rates: dict[str, list[float]] = {kind: [] for kind in STATEMENTS}
            for _ in range(args.rounds):
                for kind, script in STATEMENTS.items():
                    rates[kind].append(pgbench(dsn, script, author, clients, args.seconds))
            counter, sequence = (max(rates[kind]) for kind in STATEMENTS)
            print(f"{clients:>7} {counter:>16.0f} {sequence:>17.0f} {sequence / counter:>6.2f}")
    finally:
        drop_database(dsn)


if __name__ == "__main__":
    main()
