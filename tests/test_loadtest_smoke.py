"""End-to-end smoke test of the service under a little load, through bench/loadtest.py --smoke.

The load test spawns the service itself against a database of its own (feed_bench_smoke_<random>,
dropped afterwards, so it collides neither with the suite's feed_test_* databases, nor with full
benchmark runs in feed_bench, nor with a concurrent run of this test), opens ~60 websocket
sessions, posts for a few seconds and checks that every post reached every open session of every
follower exactly once.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import subprocess
import sys

import psycopg2
import pytest

from bench.feedclient import Tracker

REPO = pathlib.Path(__file__).resolve().parent.parent
LOADTEST = REPO / "bench" / "loadtest.py"
SERVER_DSN = os.environ.get("FEED_TEST_SERVER_DSN", "postgresql://127.0.0.1:5432")
TIMEOUT = 120  # seconds; the smoke run itself takes well under half a minute


@pytest.fixture
def smoke_dsn():
    name = f"feed_bench_smoke_{secrets.token_hex(4)}"  # run.py creates it
    yield f"{SERVER_DSN}/{name}"
    admin = psycopg2.connect(f"{SERVER_DSN}/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_smoke_run_loses_and_duplicates_nothing(tmp_path: pathlib.Path, smoke_dsn: str) -> None:
    results_path = tmp_path / "smoke.json"
    argv = [sys.executable, str(LOADTEST), "--smoke", "--quiet", "--db-dsn", smoke_dsn]
    completed = subprocess.run(
        [*argv, "--json", str(results_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    deliveries = json.loads(results_path.read_text())["deliveries"]
    assert deliveries["lost"] == 0, output
    assert deliveries["duplicated"] == 0, output
    assert deliveries["delivered"] > 0, output


def test_tracker_counts_lost_and_duplicated_deliveries() -> None:
    """The smoke test's zeros mean something: the tracker does see a loss and a duplicate."""
    tracker = Tracker()
    record = tracker.new_post(author=0, expected=frozenset({0, 1}), started=0.0)
    tracker.on_http_result(record, 201, None)
    frame = json.dumps({"type": "post", "post": {"id": 7, "text": tracker.text(0, 40)}})
    tracker.on_post_frame(0, frame, 0.01)
    tracker.on_post_frame(0, frame, 0.02)
    tracker.on_post_frame(2, frame, 0.03)
    tracker.on_post_frame(0, json.dumps({"type": "post", "post": {"text": "history"}}), 0.04)
    assert (tracker.delivered, tracker.duplicated, tracker.unexpected) == (2, 1, 1)
    assert tracker.foreign_frames == 1
    assert tracker.losses(open_sessions={0, 1}) == (1, 0)
    assert tracker.losses(open_sessions={0}) == (0, 1)
    assert tracker.outstanding() == 1
