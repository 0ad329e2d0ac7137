"""Pure logic: de-duplication bookkeeping and configuration parsing."""

import pytest

from feed_app.config import parse_settings, redact_url
from feed_app.sessions import SeenPosts


def test_seen_posts_drops_duplicates_and_everything_at_or_below_the_floor():
    seen = SeenPosts(capacity=10)
    assert [seen.add(i) for i in (5, 3, 5, 7, 3)] == [True, True, False, True, False]
    seen.raise_floor(6)
    assert not seen.add(4) and not seen.add(6) and not seen.add(7) and seen.add(8)
    assert seen.add(2, even_below_floor=True) and not seen.add(2, even_below_floor=True)


def test_seen_posts_stays_bounded_by_raising_the_floor():
    seen = SeenPosts(capacity=3)
    for post_id in (10, 11, 12, 13):
        assert seen.add(post_id)
    assert seen.floor == 10 and len(seen._ids) == 3
    assert not seen.add(10) and not seen.add(9) and seen.add(14)


def test_settings_come_from_environment_then_command_line():
    env = {"FEED_PORT": "9000", "FEED_HISTORY_SIZE": "5"}
    settings = parse_settings(["--history-size", "7"], env)
    assert (settings.port, settings.history_size, settings.demo) == (9000, 7, False)
    assert parse_settings(["--demo"], {}).uses_dev_secret


def test_bad_environment_value_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], {"FEED_PORT": "eighty"})
    assert "FEED_PORT='eighty' is not a valid int" in capsys.readouterr().err


def test_passwords_are_redacted_from_urls():
    assert redact_url("amqp://guest:s3cret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert redact_url("postgresql://127.0.0.1/feed") == "postgresql://127.0.0.1/feed"
