"""The demo users (`run.py --demo`, `scripts/cluster up --demo`): four users with a known
password who follow each other, and a history of posts to page through."""

from __future__ import annotations

import psycopg2

from feed_app import auth

DEMO_PASSWORD = "demo-password"
DEMO_USERS = ["alice", "bob", "carol", "dave"]
DEMO_FOLLOWS = [("bob", "carol"), ("carol", "alice"), ("dave", "alice"), ("alice", "bob")]
# (author, text, hours ago): a history to page through. Alice has more than a page of it, so
# "Load older" has something to load once bob follows her.
DEMO_POSTS = [
    ("carol", "Back from the mountains. No signal for three days and I did not miss it.", 50),
    ("dave", "Does anyone have a good recipe for sourdough that does not take two days?", 30),
    ("carol", "Farmers' market is open again on Saturdays, strawberries already!", 6),
    *(
        ("alice", f"Day {day} of learning the cello: {note}", 72 - 2.5 * day)
        for day, note in enumerate(
            [
                "the bow is heavier than it looks.",
                "open strings only, the neighbours are patient.",
                "first scale, out of tune but complete.",
                "my teacher says relax the thumb. Easier said.",
                "played along with a recording for the first time.",
                "the C string buzzes; new rosin helped.",
                "practised 40 minutes without noticing the time.",
                "learned what a bow lift is, then did twenty.",
                "a whole folk tune from memory.",
                "vibrato looks easy on video. It is not.",
                "recorded myself. Never again. Then again tomorrow.",
                "shifting to third position, slowly.",
                "a duet with my teacher: we ended together!",
                "bought a metronome, it is merciless.",
                "Bach's first minuet, the first eight bars.",
                "the whole minuet, with two stops.",
                "sore fingertips, calluses on the way.",
                "a friend asked for a song at dinner. Played it.",
                "tuning by ear now, mostly.",
                "my first recital is booked for next month.",
                "practised in the park; a dog listened to the end.",
                "new strings, a brighter sound.",
                "the minuet without stops!",
                "started on a Saint-Saëns piece, very slowly.",
                "three weeks in, and I look forward to every session.",
            ],
            start=1,
        )
    ),
]


def seed_demo(dsn: str) -> None:
    """Demo users with a known password, following each other, and their posts, created once."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        ids = {}
        cur.execute("SELECT count(*) FROM users WHERE name = ANY(%s)", (DEMO_USERS,))
        (existing,) = cur.fetchone()
        for name in DEMO_USERS:
            cur.execute("SELECT min(id) FROM users WHERE name = %s", (name,))
            (user_id,) = cur.fetchone()
            if user_id is None:
                cur.execute(
                    "INSERT INTO users (name, password_hash) VALUES (%s, %s) RETURNING id",
                    (name, auth.hash_password_sync(DEMO_PASSWORD)),
                )
                (user_id,) = cur.fetchone()
            ids[name] = user_id
        for follower, author in DEMO_FOLLOWS:
            cur.execute(
                "INSERT INTO follows VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (ids[follower], ids[author]),
            )
        if not existing:
            # Oldest first, so that ids (from the sequence, as create_posts takes them) follow
            # time. No outbox row: nobody is connected yet; sessions read history from the
            # database.
            for author, text, hours_ago in sorted(DEMO_POSTS, key=lambda post: -post[2]):
                cur.execute(
                    "INSERT INTO posts (id, author_id, text, created_at, version)"
                    " SELECT n, %s, %s, now() - %s * interval '1 hour', n"
                    " FROM nextval('post_ids') n",
                    (ids[author], text, hours_ago),
                )
    conn.close()
    print(f"demo users (password '{DEMO_PASSWORD}'):", flush=True)
    for name, user_id in ids.items():
        follows = ", ".join(a for f, a in DEMO_FOLLOWS if f == name)
        print(f"  id {user_id:<6} {name:<6} follows {follows}", flush=True)
