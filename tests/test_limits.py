"""Every limit refuses what is past it, with 429 (or 503, 409) and Retry-After, changes nothing,
and costs no password hash; each test here sets one limit low (conftest raises all others)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
import tornado.netutil
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from feed_app import auth, feed_socket
from feed_app.config import rate
from tests.conftest import with_settings
from tests.support import PASSWORD, Api
from tests.test_session_lifecycle import wait_for


@pytest.fixture
def settings(settings, request):
    """The conftest settings with the limits of the test's @limited(...) marker."""
    marker = request.node.get_closest_marker("limited")
    return with_settings(settings, **(marker.kwargs if marker else {}))


limited = pytest.mark.limited


async def login(api, user_id: int, password: str = "wrong password", headers=None):
    body = {"id": user_id, "password": password}
    return await api.request("POST", "/login", body, headers=headers)


def assert_refused(answer, status: int = 429) -> int:
    code, body, headers = answer
    assert code == status, (code, body)
    assert set(body) == {"error"} and body["error"], body
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


@limited(login_rate_user=rate("3/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_login_attempts_per_user_id_are_refused_without_a_hash(api, service):
    user, other = await api.new_user(), await api.new_user()  # one login each: 1 of 3 used
    for _ in range(2):
        assert (await login(api, user.id))[0] == 401
    hashes = service.metrics.password_hashes
    retry_after = assert_refused(await login(api, user.id))
    assert 1 <= retry_after <= 20  # one token comes back every 20 s
    assert_refused(await login(api, user.id, PASSWORD))  # the right password waits too
    assert service.metrics.password_hashes == hashes  # refused before any hash
    assert (await login(api, other.id))[0] == 401  # other ids are not affected


@limited(login_rate_address=rate("4/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_login_attempts_per_address_are_refused(api, service, db_counts):
    users = [await api.new_user() for _ in range(3)]  # three logins from 127.0.0.1
    assert (await login(api, users[0].id))[0] == 401
    hashes, before = service.metrics.password_hashes, db_counts()
    for user in users:
        assert_refused(await login(api, user.id, PASSWORD))
    assert service.metrics.password_hashes == hashes and db_counts() == before


@limited(register_rate=rate("2/hour"))
@pytest.mark.gen_test(timeout=30)
async def test_registrations_per_address_are_refused(api, service, db_counts):
    for name in ("a", "b"):
        code, _ = await api.call("POST", "/user/register", {"name": name, "password": PASSWORD})
        assert code == 201
    before, hashes = db_counts(), service.metrics.password_hashes
    answer = await api.request("POST", "/user/register", {"name": "c", "password": PASSWORD})
    assert 1000 < assert_refused(answer) <= 1800  # a token every 30 minutes
    assert db_counts() == before and service.metrics.password_hashes == hashes


@limited(hash_workers=1, hash_queue=1)
@pytest.mark.gen_test(timeout=30)
async def test_password_hashes_run_one_at_a_time_and_a_flood_past_the_queue_gets_503(
    api, monkeypatch
):
    user = await api.new_user()
    running, most, release = [0], [0], threading.Event()
    verify = auth.verify_password_sync

    def slow_verify(password: str, stored: str | None) -> bool:
        running[0] += 1
        most[0] = max(most[0], running[0])
        release.wait(10)
        running[0] -= 1
        return verify(password, stored)

    monkeypatch.setattr(auth, "verify_password_sync", slow_verify)
    attempts = [asyncio.ensure_future(login(api, user.id)) for _ in range(6)]
    await asyncio.wait(attempts, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.2)  # every attempt has arrived by now
    refused = [task for task in attempts if task.done()]
    assert len(refused) == 4  # one hashing, one waiting
    for task in refused:
        assert_refused(task.result(), 503)
    release.set()
    assert [(await task)[0] for task in attempts if task not in refused] == [401, 401]
    assert most[0] == 1


@limited(post_rate=rate("2/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_posts_per_user_are_refused(api, db_counts):
    author, other = await api.new_user(), await api.new_user()
    await api.post(author)
    await api.post(author)
    before = db_counts()
    answer = await api.request("POST", "/post/create", {"text": "three"}, token=author.token)
    assert 1 <= assert_refused(answer) <= 30
    assert db_counts() == before
    await api.post(other)  # per user


@limited(post_rate=rate("3/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_edits_and_deletes_count_against_the_post_rate(api):
    """An edit or a delete costs a publish to every follower, as a post does: one budget."""
    author = await api.new_user()
    post = await api.post(author)
    code, edited = await api.call(
        "PUT", "/post/update", {"id": post["id"], "text": "edited"}, token=author.token
    )
    assert code == 200, edited
    answer = await api.request("PUT", f"/post/delete/{post['id']}", token=author.token)
    assert answer[0] == 200, answer
    refused = await api.request(
        "PUT", "/post/update", {"id": post["id"], "text": "again"}, token=author.token
    )
    assert 1 <= assert_refused(refused) <= 60
    assert await api.call("GET", f"/post/get/{post['id']}") == (
        404,
        {"error": f"post {post['id']} not found"},
    )


@limited(follow_rate=rate("3/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_follow_changes_per_user_are_refused(api, db_counts):
    user, author = await api.new_user(), await api.new_user()
    await api.follow(user, author)
    await api.unfollow(user, author)
    await api.follow(user, author)
    before = db_counts()
    for path in (f"/friend/delete/{author.id}", f"/friend/set/{author.id}"):
        assert_refused(await api.request("PUT", path, token=user.token))
    assert db_counts() == before


@limited(follow_max=2)
@pytest.mark.gen_test(timeout=30)
async def test_a_user_follows_at_most_follow_max_authors(api, db_counts):
    user = await api.new_user()
    authors = [await api.new_user() for _ in range(3)]
    await api.follow(user, authors[0])
    await api.follow(user, authors[1])
    before = db_counts()
    code, body = await api.call("PUT", f"/friend/set/{authors[2].id}", token=user.token)
    assert code == 409 and "2 authors" in body["error"], body
    assert db_counts() == before
    await api.follow(user, authors[1])  # following again stays allowed at the cap
    await api.unfollow(user, authors[0])
    await api.follow(user, authors[2])


async def refused_socket(api, path: str, subprotocols: list[str] | None = None):
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(api.ws_url + path, subprotocols=subprotocols)
    response = refused.value.response
    return refused.value.code, json.loads(response.body), response.headers


@limited(sockets_per_user=2)
@pytest.mark.gen_test(timeout=30)
async def test_sockets_per_user_beyond_the_cap_are_refused_before_a_session(
    api, service, monkeypatch
):
    user, other = await api.new_user(), await api.new_user()
    first, second = await api.open_feed(user), await api.open_feed(user)
    sessions = []
    monkeypatch.setattr(feed_socket.FeedSession, "start", lambda s, since: sessions.append(s))
    for _ in range(3):
        answer = await refused_socket(api, f"/post/feed/{user.id}?token={user.token}")
        assert assert_refused(answer) == 10
    assert sessions == [] and len(service.sessions) == 2
    monkeypatch.undo()
    await api.open_feed(other)  # per user
    first.ws.close(1000)
    assert await first.wait_closed() == 1000
    await wait_for(lambda: len(service.sessions) == 2)  # the server saw it close
    third = await api.open_feed(user)  # the closed socket's slot is free again
    assert second.close_code is None and third.ready


@limited(sockets_max=2)
@pytest.mark.gen_test(timeout=30)
async def test_sockets_per_process_beyond_the_cap_get_503(api, service):
    users = [await api.new_user() for _ in range(3)]
    await api.open_feed(users[0])
    await api.open_feed(users[1])
    answer = await refused_socket(api, f"/post/feed/{users[2].id}?token={users[2].token}")
    assert_refused(answer, 503)
    assert len(service.sessions) == 2


@pytest.fixture
def listening(service) -> Api:
    """The service on a server of its own making (Service.listen), as run.py starts it, rather
    than on pytest-tornado's."""
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    service.listen([sock])
    return Api(f"http://127.0.0.1:{sock.getsockname()[1]}")


@limited(login_rate_address=rate("2/minute"))
@pytest.mark.gen_test(timeout=30)
async def test_forwarded_headers_from_an_untrusted_client_are_ignored(listening, caplog):
    user = await listening.new_user()  # the first of two attempts from 127.0.0.1
    caplog.set_level(logging.INFO, logger="tornado.access")
    forged = {"X-Forwarded-For": "203.0.113.7", "X-Real-Ip": "203.0.113.8"}
    assert (await login(listening, user.id, headers=forged))[0] == 401
    again = {"X-Forwarded-For": "203.0.113.9", "X-Real-Ip": "203.0.113.10"}
    assert_refused(await login(listening, user.id, headers=again))
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "(127.0.0.1)" in logged and "203.0.113" not in logged


@limited(login_rate_address=rate("1/minute"), trusted_proxies="127.0.0.0/8")
@pytest.mark.gen_test(timeout=30)
async def test_a_trusted_proxy_names_the_client(api):
    user = await api.new_user()  # from 127.0.0.1 itself
    first = {"X-Forwarded-For": "198.51.100.1"}
    # The client may send its own X-Forwarded-For; the proxy appends what it saw.
    spoofed = {"X-Forwarded-For": "198.51.100.2, 198.51.100.1"}
    assert (await login(api, user.id, headers=first))[0] == 401
    assert_refused(await login(api, user.id, headers=spoofed))
    assert (await login(api, user.id, headers={"X-Forwarded-For": "198.51.100.3"}))[0] == 401


@limited(post_rate=rate("1/minute"), refusal_delay=0.5)
@pytest.mark.gen_test(timeout=30)
async def test_a_refusal_is_answered_only_after_the_refusal_delay(api):
    """A client that loops (the next attempt when the answer comes) is slowed to one attempt
    per delay; a request within the limit is not delayed."""
    author = await api.new_user()
    started = time.monotonic()
    await api.post(author)
    assert time.monotonic() - started < 0.4
    started = time.monotonic()
    assert_refused(await api.request("POST", "/post/create", {"text": "x"}, token=author.token))
    assert 0.45 <= time.monotonic() - started < 5
