"""End-to-end smoke test of the service under a little load, through bench/loadtest.py --smoke.

The load test spawns the service itself against a database of its own (feed_bench_smoke_<random>,
dropped afterwards, so it collides neither with the suite's feed_test_* databases, nor with full
benchmark runs in feed_bench, nor with a concurrent run of this test), once in each fan-out mode,
opens ~60 websocket sessions, posts for a few seconds and checks that every post reached every
open session of every follower exactly once. A fifth of the actions are edits and deletes of
earlier posts (--change-share), audited the same way.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from bench.lib import saturation
from bench.lib.feedclient import Tracker
from feed_app.config import MODES
from feed_app.wire import deleted_frame, post_frame

REPO = pathlib.Path(__file__).resolve().parent.parent
LOADTEST = REPO / "bench" / "loadtest.py"
TIMEOUT = 120  # seconds; the smoke run (both modes) takes about 20 s


def test_smoke_run_loses_and_duplicates_nothing(tmp_path: pathlib.Path, scratch_dsn: str) -> None:
    results_path = tmp_path / "smoke.json"
    argv = [sys.executable, str(LOADTEST), "--smoke", "--quiet", "--fanout", "both"]
    argv += ["--change-share", "0.2"]
    argv += ["--db-dsn", scratch_dsn]
    completed = subprocess.run(
        [*argv, "--json", str(results_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    runs = json.loads(results_path.read_text())["runs"]
    assert list(runs) == list(MODES), output
    for run in runs.values():
        deliveries = run["phase"]["deliveries"]
        assert deliveries["lost"] == 0, output
        assert deliveries["duplicated"] == 0, output
        assert deliveries["delivered"] > 0, output
        by_kind = run["phase"]["posts"]["by_kind"]
        assert by_kind["edit"]["accepted"] > 0 and by_kind["delete"]["accepted"] > 0, output
    # The same posts went to the same sessions in both modes, and the broker was counted.
    assert (
        runs["session"]["phase"]["deliveries"]["expected"]
        == (runs["process"]["phase"]["deliveries"]["expected"])
    )
    assert runs["process"]["rabbitmq"]["run_queues"] == 1, output
    assert runs["session"]["rabbitmq"]["run_queues"] == runs["session"]["sessions"]["ready"]


def test_tracker_counts_lost_and_duplicated_deliveries() -> None:
    """The smoke test's zeros mean something: the tracker does see a loss and a duplicate."""
    tracker = Tracker()
    record = tracker.new_post(author=0, expected=frozenset({0, 1}), started=0.0)
    tracker.on_result(record, 201, None)
    frame = post_frame({"id": 7, "text": tracker.text(0, 40)}).decode()
    tracker.on_post_frame(0, frame, 0.01)
    tracker.on_post_frame(0, frame, 0.02)
    tracker.on_post_frame(2, frame, 0.03)
    tracker.on_post_frame(0, post_frame({"text": "history"}).decode(), 0.04)
    assert (tracker.delivered, tracker.duplicated, tracker.unexpected) == (2, 1, 1)
    assert tracker.foreign_frames == 1
    assert tracker.losses(open_sessions={0, 1}) == (1, 0)
    assert tracker.losses(open_sessions={0}) == (0, 1)
    assert tracker.outstanding() == 1


def test_tracker_audits_edits_and_deletes_like_posts() -> None:
    """An edit is matched by its own marker in the new text, a delete by the post id it was
    sent for; a delete of a post the tracker never deleted is someone else's frame."""
    tracker = Tracker()
    post = tracker.new_post(author=0, expected=frozenset({0, 1}), started=0.0)
    tracker.on_result(post, 201, None)
    edit = tracker.new_post(0, frozenset({0, 1}), 0.1, kind="edit", post_id=7)
    tracker.on_result(edit, 200, None)
    delete = tracker.new_post(0, frozenset({0, 1}), 0.2, kind="delete", post_id=7)
    tracker.on_result(delete, 200, None)
    edited = post_frame({"id": 7, "text": tracker.text(edit.index, 40)}).decode()
    for session in (0, 1):
        tracker.on_post_frame(session, edited, 0.3)
        tracker.on_deleted_frame(session, deleted_frame(7, 9).decode(), 0.4)
    tracker.on_deleted_frame(0, deleted_frame(7, 9).decode(), 0.5)
    tracker.on_deleted_frame(0, deleted_frame(8, 10).decode(), 0.5)
    assert (tracker.duplicated, tracker.foreign_frames) == (1, 1)
    assert tracker.losses(open_sessions={0, 1}) == (2, 0)  # the post itself never came
    missing_edit = tracker.new_post(0, frozenset({0}), 0.6, kind="edit", post_id=7)
    tracker.on_result(missing_edit, 404, None)  # refused: nothing expected of it
    assert tracker.losses(open_sessions={0, 1}) == (2, 0)


def _phase(rate: float, capacity: float) -> dict[str, Any]:
    """A posting phase's results as a service that delivers `capacity` posts/s would give them."""
    achieved = min(rate, capacity)
    return {
        "rate": rate,
        "posts": {"planned": 100, "accepted": 100, "achieved_rate": rate},
        "deliveries": {
            "expected_per_s": rate * 10,
            "achieved_per_s": achieved * 10,
            "lost": 0,
            "lost_to_closed_sessions": 0,
            "duplicated": 0,
        },
    }


@pytest.mark.parametrize(
    ("capacity", "held", "not_held"), [(130.0, 125.0, 150.0), (30.0, 31.25, 37.5)]
)
def test_saturation_search_brackets_the_rate_held(
    capacity: float, held: float, not_held: float
) -> None:
    """Up by the factor from the start rate (or down, when even that is not held), then
    bisections between the highest rate held and the lowest not held."""
    tried = []

    async def step(rate: float) -> dict[str, Any]:
        tried.append(rate)
        return _phase(rate, capacity)

    found = asyncio.run(
        saturation.search(step, start=50, factor=2, max_steps=10, refine=2, tolerance=0.05)
    )
    assert (found["rate_held"], found["lowest_rate_not_held"]) == (held, not_held)
    assert found["deliveries_per_s_max"] == capacity * 10
    assert len(tried) <= 10


def test_saturation_search_stops_at_a_lost_delivery() -> None:
    async def step(rate: float) -> dict[str, Any]:
        phase = _phase(rate, 1000)
        phase["deliveries"]["lost"] = 1 if rate > 50 else 0
        return phase

    found = asyncio.run(
        saturation.search(step, start=50, factor=2, max_steps=10, refine=2, tolerance=0.05)
    )
    assert [s["rate"] for s in found["steps"]] == [50, 100]
    assert found["stopped"] and found["rate_held"] == 50
