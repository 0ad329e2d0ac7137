"""The feed socket's token in Sec-WebSocket-Protocol (what the page uses: no token in the URL),
beside ?token= for existing clients."""

import json
import logging

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from tests.support import raw_http, upgrade_request


@pytest.mark.gen_test(timeout=30)
async def test_token_in_the_subprotocols_opens_the_feed_and_is_not_echoed(api, caplog):
    author, user = await api.new_user(), await api.new_user()
    await api.follow(user, author)
    caplog.set_level(logging.INFO)
    offered = ["feed", f"bearer.{user.token}"]
    feed = await api.open_feed_at(f"/post/feed/{user.id}", subprotocols=offered)
    assert feed.ws.selected_subprotocol == "feed"
    assert feed.ready == {"type": "ready", "following": 1}
    post = await api.post(author)
    assert await feed.wait_posts(1) == [post]
    host = api.base_url.removeprefix("http://")
    request = upgrade_request(
        f"/post/feed/{user.id}", host, Sec_WebSocket_Protocol=f"feed, bearer.{user.token}"
    )
    status, headers, _ = await raw_http(api.base_url, request)
    assert status == 101 and headers["sec-websocket-protocol"] == "feed"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert user.token not in logged


@pytest.mark.gen_test(timeout=30)
async def test_query_token_still_works_and_may_offer_the_feed_subprotocol(api):
    user = await api.new_user()
    plain = await api.open_feed(user)
    assert plain.ws.selected_subprotocol is None
    offered = await api.open_feed_at(
        f"/post/feed/{user.id}?token={user.token}", subprotocols=["feed"]
    )
    assert offered.ws.selected_subprotocol == "feed"


@pytest.mark.gen_test(timeout=30)
async def test_bad_subprotocol_tokens_are_refused_before_the_upgrade(api, service):
    user, other = await api.new_user(), await api.new_user()
    cases = [
        (["bearer." + user.token], 400),  # "feed" not offered: nothing the server could select
        (["feed", "bearer.garbage"], 401),
        (["feed", "bearer."], 401),
        (["feed", "bearer." + other.token], 403),
        (["feed"], 401),  # no token anywhere
    ]
    for subprotocols, status in cases:
        with pytest.raises(HTTPClientError) as refused:
            await websocket_connect(api.ws_url + f"/post/feed/{user.id}", subprotocols=subprotocols)
        assert refused.value.code == status, subprotocols
        assert json.loads(refused.value.response.body)["error"]
    assert not service.sessions
