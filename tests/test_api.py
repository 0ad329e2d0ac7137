"""The HTTP API against the real PostgreSQL and RabbitMQ."""

import asyncio

import pytest

from tests.conftest import AMQP_URL
from tests.faults import endpoint_of
from tests.support import PASSWORD


@pytest.mark.gen_test
async def test_register_login_and_get_user(api):
    code, body = await api.call("POST", "/user/register", {"name": "ann", "password": PASSWORD})
    assert code == 201
    user_id = body["user_id"]
    assert await api.call("GET", f"/user/get/{user_id}") == (200, {"id": user_id, "name": "ann"})
    code, body = await api.call("POST", "/login", {"id": user_id, "password": PASSWORD})
    assert code == 200 and body["token"].count(".") == 2


@pytest.mark.gen_test
async def test_wrong_password_and_unknown_id_get_the_same_answer(api):
    user = await api.new_user()
    wrong = await api.call("POST", "/login", {"id": user.id, "password": "not the password"})
    unknown = await api.call("POST", "/login", {"id": 10**12, "password": PASSWORD})
    assert wrong == unknown == (401, {"error": "wrong user id or password"})


@pytest.mark.gen_test
async def test_post_create_get_and_feed_page(api):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    await api.follow(reader, author)  # idempotent
    first = await api.post(author, "first")
    second = await api.post(author, "second")
    assert second["id"] > first["id"] and first["author_id"] == author.id
    assert first["created_at"].endswith("+00:00")
    assert await api.call("GET", f"/post/get/{first['id']}") == (200, first)
    code, body = await api.call("GET", "/post/feed", token=reader.token)
    assert code == 200 and body["posts"] == [second, first]
    code, body = await api.call("GET", "/post/feed?offset=1&limit=1", token=reader.token)
    assert body["posts"] == [first]
    await api.unfollow(reader, author)
    await api.unfollow(reader, author)  # idempotent
    assert await api.call("GET", "/post/feed", token=reader.token) == (200, {"posts": []})


@pytest.mark.gen_test
async def test_health_ready_and_metrics(api):
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    host, port = endpoint_of(AMQP_URL, 5672)  # /readyz names the RabbitMQ node in use
    ready = {"status": "ready", "broker": f"{host}:{port}"}
    assert await api.call("GET", "/readyz") in (
        (200, {**ready, "delivery_path": "unknown"}),  # no verdict yet: the first beat is due
        (200, {**ready, "delivery_path": "whole"}),
    )
    # The delivery path is judged within a few beats (feed_app/path_check.py).
    for _ in range(50):
        answer = await api.call("GET", "/readyz")
        if answer[1].get("delivery_path") != "unknown":
            break
        await asyncio.sleep(0.1)
    assert answer == (200, {**ready, "delivery_path": "whole"})
    from tornado.httpclient import AsyncHTTPClient

    response = await AsyncHTTPClient().fetch(api.base_url + "/metrics")
    text = response.body.decode()
    for name in ("feed_open_sessions", "feed_deliveries_total", "feed_outbox_backlog"):
        assert f"\n{name} " in "\n" + text
    assert "feed_create_to_send_seconds_bucket" in text


@pytest.mark.gen_test
async def test_page_is_served_and_renders_text_as_text(api):
    from tornado.httpclient import AsyncHTTPClient

    response = await AsyncHTTPClient().fetch(api.base_url + "/")
    page = response.body.decode()
    assert 'id="output"' in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert "textContent" in page


@pytest.mark.gen_test
async def test_no_answer_may_be_framed_or_sniffed(api):
    """The page and the API alike: no other site frames them, no browser guesses their type."""
    from tornado.httpclient import AsyncHTTPClient

    for path in ("/", "/healthz", "/no/such/path"):
        response = await AsyncHTTPClient().fetch(api.base_url + path, raise_error=False)
        assert response.headers.get("Content-Security-Policy") == "frame-ancestors 'none'", path
        assert response.headers.get("X-Frame-Options") == "DENY", path
        assert response.headers.get("X-Content-Type-Options") == "nosniff", path
