"""Posting over the feed socket (docs/websocket.md, feed_app/posting.py): a post message is the
same post as POST /post/create makes, checked, limited and answered alike, on the socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import pytest
from tornado.websocket import WebSocketClosedError

from feed_app import feed_socket, wire
from feed_app.config import rate
from feed_app.posting import MAX_POST_LENGTH
from tests.conftest import both_fanout_modes, with_settings

pytestmark = both_fanout_modes


@pytest.fixture
def settings(settings, pg_proxy, fanout_mode, request):
    # fanout_mode is named so that pytest sees this override depends on it (tests/test_recovery.py)
    marker = request.node.get_closest_marker("limited")
    limits = marker.kwargs if marker else {}
    return with_settings(settings, db_dsn=pg_proxy.url_for(settings.db_dsn), **limits)


async def stored(api, post_id: int) -> int:
    return (await api.call("GET", f"/post/get/{post_id}"))[0]


@pytest.mark.gen_test(timeout=30)
async def test_a_post_message_is_answered_and_reaches_followers_as_a_created_post_does(api):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    authors_feed, readers_feed = await api.open_feed(author), await api.open_feed(reader)

    answer = await authors_feed.post(7, "from the socket")
    assert answer["type"] == "posted" and answer["ref"] == 7
    post = answer["post"]
    assert (post["author_id"], post["text"]) == (author.id, "from the socket")
    assert await api.call("GET", f"/post/get/{post['id']}") == (200, post)
    assert (await readers_feed.wait_posts(1)) == [post]
    assert (await authors_feed.wait_posts(1)) == [post]  # the author's other tabs see it too

    over_http = await api.post(author, "and over HTTP")
    assert set(over_http) == set(post)
    assert [p["id"] for p in await readers_feed.wait_posts(2)] == [post["id"], over_http["id"]]


@pytest.mark.gen_test(timeout=30)
async def test_feed_sockets_send_each_frame_at_once(api, service):
    """TCP_NODELAY on the server's side: with Nagle's algorithm, the post frame that follows an
    answer would wait for the client's delayed ACK of the answer (seen: posts over the socket
    at 46 ms p99 instead of 8)."""
    author = await api.new_user()
    await api.open_feed(author)
    [session] = service.sessions
    sock = session.socket.ws_connection.stream.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.gen_test(timeout=30)
async def test_a_bad_text_is_refused_as_http_refuses_it_and_the_socket_stays(api, db_counts):
    author = await api.new_user()
    feed = await api.open_feed(author)
    texts = [None, 5, ["a list"], "   ", "x" * (MAX_POST_LENGTH + 1), "nul \x00", "\ud800"]
    before = db_counts()
    for ref, text in enumerate(texts):
        raw = json.dumps({"type": "post", "ref": ref, "text": text})
        await feed.ws.write_message(raw)
        answer = await feed.wait_answer(ref)
        code, body = await api.call("POST", "/post/create", raw=raw.encode(), token=author.token)
        assert code == 400, (text, body)
        assert (answer["type"], answer["status"]) == ("refused", 400)
        assert answer["error"] == body["error"], text
    assert db_counts() == before
    assert (await feed.post(99, "x" * MAX_POST_LENGTH))["type"] == "posted"


@pytest.mark.gen_test(timeout=30)
async def test_the_longest_post_in_its_widest_json_fits_in_one_message(api):
    """1,000 characters outside the BMP, each a surrogate pair escaped as JSON may send it."""
    author = await api.new_user()
    feed = await api.open_feed(author)
    text = "\U0001f600" * MAX_POST_LENGTH
    raw = json.dumps({"type": "post", "ref": 1, "text": text})  # ensure_ascii: 12 bytes a char
    assert len(raw) > 12 * MAX_POST_LENGTH
    await feed.ws.write_message(raw)
    answer = await feed.wait_answer(1)
    assert answer["type"] == "posted" and answer["post"]["text"] == text


@pytest.mark.parametrize(
    "message",
    [
        {"type": "post", "text": "no ref"},
        {"type": "post", "ref": -1, "text": "negative"},
        {"type": "post", "ref": 1.5, "text": "not an integer"},
        {"type": "post", "ref": True, "text": "a boolean"},
        {"type": "post", "ref": "1", "text": "a string"},
        {"type": "post", "ref": wire.MAX_REF + 1, "text": "past what a browser holds"},
        ["post", 1, "not an object"],
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_a_post_message_that_cannot_be_answered_closes_the_socket(api, db_counts, message):
    author = await api.new_user()
    feed = await api.open_feed(author)
    before = db_counts()
    await feed.ws.write_message(json.dumps(message))
    assert (await feed.wait_closed()) == wire.Close.CLIENT_DATA
    assert db_counts() == before


@pytest.mark.limited(post_rate=rate("2/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_posts_over_the_socket_and_over_http_share_one_rate(api, db_counts):
    author = await api.new_user()
    feed = await api.open_feed(author)
    await api.post(author)
    assert (await feed.post(1, "second"))["type"] == "posted"
    before = db_counts()["posts"]  # (the outbox rows of the two are being deleted meanwhile)
    refused = await feed.post(2, "third")
    assert (refused["type"], refused["status"]) == ("refused", 429)
    assert "too many posts" in refused["error"] and 1 <= refused["retry_after"] <= 30
    assert db_counts()["posts"] == before
    assert (await api.request("POST", "/post/create", {"text": "x"}, token=author.token))[0] == 429


@pytest.mark.gen_test(timeout=30)
async def test_with_postgresql_unreachable_a_post_is_refused_with_503_and_the_socket_stays(
    api, pg_proxy
):
    author = await api.new_user()
    feed = await api.open_feed(author)
    pg_proxy.disable()
    refused = await feed.post(1, "while the database is down")
    assert (refused["type"], refused["status"]) == ("refused", 503)
    assert refused["error"] == "database unavailable, try again shortly"
    pg_proxy.enable()
    posted = await feed.post(2, "back")
    assert posted["type"] == "posted" and await stored(api, posted["post"]["id"]) == 200


@pytest.mark.gen_test(timeout=30)
async def test_past_the_posts_being_stored_the_socket_is_not_read_until_one_is_answered(
    api, service, pg_proxy
):
    """A socket's posts waiting for PostgreSQL are bounded: with MAX_POSTS_IN_FLIGHT of them
    waiting, the server reads no more of the socket (TCP holds the client back); once they are
    answered the rest are read and stored, in order, none refused."""
    author = await api.new_user()
    feed = await api.open_feed(author)
    [session] = service.sessions
    most = feed_socket.MAX_POSTS_IN_FLIGHT
    pg_proxy.pause()
    for ref in range(most + 2):
        await feed.ws.write_message(wire.post_message(ref, f"waiting {ref}"))
    await asyncio.sleep(0.3)  # time to read all of them, were the socket still read
    assert len(session.socket._posting) == most
    assert not any(feed.answer(ref) for ref in range(most + 2))
    pg_proxy.resume()
    answers = await asyncio.gather(*(feed.wait_answer(ref) for ref in range(most + 2)))
    assert [answer["type"] for answer in answers] == ["posted"] * (most + 2)
    texts = [answer["post"]["text"] for answer in answers]
    assert texts == [f"waiting {n}" for n in range(most + 2)]


@pytest.mark.gen_test(timeout=30)
async def test_what_a_socket_sends_once_the_server_closes_it_stores_nothing(api, db_counts):
    """A post right behind a bad token renewal (closed with 4001), and one right behind a
    log-out (4003): the server is closing the socket, and stores neither."""
    author = await api.new_user()
    before = db_counts()
    feed = await api.open_feed(author)
    await feed.ws.write_message(wire.token_message("not a token"))
    await feed.ws.write_message(wire.post_message(1, "behind a bad token"))
    assert (await feed.wait_closed()) == wire.Close.TOKEN_EXPIRED
    feed = await api.open_feed(author)
    assert (await api.call("POST", "/logout", token=author.token))[0] == 200
    with contextlib.suppress(WebSocketClosedError):  # unless the close came first
        await feed.ws.write_message(wire.post_message(2, "behind a log-out"))
    assert (await feed.wait_closed()) == wire.Close.LOGGED_OUT
    assert feed.answer(2) is None and db_counts() == before


@pytest.mark.gen_test(timeout=30)
async def test_a_post_sent_as_the_socket_closes_is_stored_and_the_answer_goes_nowhere(
    api, service, pg_proxy, caplog
):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    readers_feed = await api.open_feed(reader)
    feed = await api.open_feed(author)
    pg_proxy.pause()
    await feed.ws.write_message(wire.post_message(1, "sent, then gone"))
    await asyncio.sleep(0.1)
    feed.ws.close(1000)
    assert (await feed.wait_closed()) == 1000
    pg_proxy.resume()
    [post] = await readers_feed.wait_posts(1)
    assert post["text"] == "sent, then gone"
    assert [session.user_id for session in service.sessions] == [reader.id]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
