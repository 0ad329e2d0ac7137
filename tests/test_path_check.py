"""The delivery-path judge's logic (feed_app/path_check.py), on made-up beats and reports: pure
logic, no services. That the check finds a real partition and heals it is proven against a real
RabbitMQ cluster in tests/test_cluster.py."""

from __future__ import annotations

from feed_app.db import BeatReport
from feed_app.path_check import GAP, PathJudge


def bound_judge() -> tuple[PathJudge, float]:
    """A judge whose queue was bound just before PostgreSQL's time 100.0, and its first verdict
    on no peers (which sets the moment after the bind)."""
    judge = PathJudge()
    judge.on_bound()
    verdict = judge.judge(100.0, {}, judge.generation)
    assert verdict is not None and verdict.whole and not verdict.silent
    return judge, 100.0


def test_a_peer_is_judged_only_on_a_report_written_after_the_bind():
    judge, since = bound_judge()
    before = {"p": BeatReport(sent=7, confirmed=7, at=since - 0.3)}
    verdict = judge.judge(since + 0.5, before, judge.generation)
    assert verdict is not None and not verdict.whole and not verdict.silent
    # However far its confirmed beats run, a report from before the bind excuses nothing.
    verdict = judge.judge(since + 1, {"p": BeatReport(7, 7 + 10 * GAP, since - 0.3)}, 1)
    assert verdict is not None and not verdict.silent and not verdict.whole


def test_beats_heard_keep_the_path_whole():
    judge, since = bound_judge()
    assert judge.judge(since + 0.5, {"p": BeatReport(10, 9, since + 0.4)}, 1).whole
    for beat in (11, 12, 13):
        judge.hear("p", beat)
    verdict = judge.judge(since + 2, {"p": BeatReport(13, 13, since + 1.9)}, 1)
    assert verdict.whole and not verdict.silent and not verdict.gap
    # The latest confirmed beat may still be on its way: not silent, and still whole.
    verdict = judge.judge(since + 2.5, {"p": BeatReport(14, 14, since + 2.4)}, 1)
    assert verdict.whole and not verdict.silent


def test_confirmed_beats_that_never_arrive_make_the_peer_silent():
    judge, since = bound_judge()
    judge.judge(
        since + 0.5, {"p": BeatReport(10, 10, since + 0.4), "q": BeatReport(4, 4, 100.4)}, 1
    )
    judge.hear("q", 5)
    reports = {"p": BeatReport(10 + GAP, 10 + GAP - 1, since + 1.4), "q": BeatReport(5, 5, 101.4)}
    verdict = judge.judge(since + 1.5, reports, 1)
    assert not verdict.silent and not verdict.whole  # one confirmed beat of p is unheard so far
    reports["p"] = BeatReport(11 + GAP, 10 + GAP, since + 1.9)
    verdict = judge.judge(since + 2, reports, 1)
    assert verdict.silent == {"p"} and verdict.peers == 2 and not verdict.whole


def test_a_peer_that_stops_confirming_is_not_silent():
    """A peer cut off from its own broker publishes nothing: its posts wait in its outbox."""
    judge, since = bound_judge()
    judge.judge(since + 0.5, {"p": BeatReport(10, 10, since + 0.4)}, 1)
    judge.hear("p", 11)
    verdict = judge.judge(since + 5, {"p": BeatReport(30, 11, since + 4.9)}, 1)
    assert verdict.whole and not verdict.silent


def test_a_beat_skipped_after_the_bind_is_a_gap():
    judge, since = bound_judge()
    judge.judge(since + 0.5, {"p": BeatReport(10, 10, since + 0.4)}, 1)
    judge.hear("p", 12)  # 11 was sent after the bind, and lost
    assert judge.judge(since + 1, {"p": BeatReport(12, 12, since + 0.9)}, 1).gap
    assert not judge.judge(since + 1.5, {"p": BeatReport(12, 12, since + 1.4)}, 1).gap  # once
    judge.hear("p", 13)
    judge.hear("p", 15)
    assert judge.judge(since + 2, {"p": BeatReport(15, 15, since + 1.9)}, 1).gap


def test_a_first_beat_heard_before_the_peer_was_excused_is_checked_later():
    judge, since = bound_judge()
    judge.hear("p", 12)
    assert judge.judge(since + 1, {"p": BeatReport(10, 10, since + 0.9)}, 1).gap
    judge.on_bound()
    judge.judge(200.0, {}, judge.generation)
    judge.hear("p", 11)
    assert not judge.judge(200.5, {"p": BeatReport(10, 10, 200.4)}, judge.generation).gap


def test_beats_sent_before_the_bind_are_excused():
    judge, since = bound_judge()
    judge.hear("p", 9)  # the first beat heard; 8 and earlier went to the old queue
    verdict = judge.judge(since + 0.5, {"p": BeatReport(9, 9, since + 0.4)}, 1)
    assert verdict.whole and not verdict.gap


def test_a_report_read_across_a_bind_is_not_used():
    judge, since = bound_judge()
    generation = judge.generation
    judge.on_lost()
    assert judge.judge(since + 0.5, {}, generation) is None
    judge.on_bound()
    assert judge.judge(since + 1, {"p": BeatReport(99, 99, since + 0.9)}, generation) is None


def test_a_peer_that_left_is_forgotten():
    judge, since = bound_judge()
    judge.judge(since + 0.5, {"p": BeatReport(10, 10, since + 0.4)}, 1)
    judge.hear("p", 11)
    assert judge.judge(since + 1, {}, 1).whole
    # Back under the same id (it cannot be: ids are new per process), it is judged afresh.
    verdict = judge.judge(since + 1.5, {"p": BeatReport(40, 40, since + 1.4)}, 1)
    assert verdict.whole and not verdict.silent
