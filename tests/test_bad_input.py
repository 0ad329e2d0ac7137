"""Bad input gets a clear 4xx with {"error": ...} and changes nothing."""

import asyncio
import json
import logging
import time

import jwt
import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from feed_app import auth
from feed_app.app import MAX_WS_MESSAGE
from feed_app.httpkit import MAX_BODY
from tests.support import PASSWORD, raw_http, upgrade_request

# The last two: a Unicode digit, and more digits than int() will parse.
BAD_IDS = ["abc", "0", "-1", "1.5", str(2**63), "%E2%91%A0", "9" * 5000]


async def check_refused(api, cases, db_counts):
    # A post made just before still has its outbox row until the broker's confirm comes back
    # and the relay's batched delete runs: start from the count once that is done.
    deadline = asyncio.get_running_loop().time() + 5
    while (before := db_counts())["outbox"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for method, path, kwargs, status in cases:
        code, body = await api.call(method, path, **kwargs)
        assert code == status, (method, path, kwargs, code, body)
        assert isinstance(body, dict) and set(body) == {"error"} and body["error"], body
    assert db_counts() == before


@pytest.mark.gen_test(timeout=30)
async def test_bad_register_and_login(api, db_counts):
    user = await api.new_user()
    cases = [
        ("POST", "/user/register", {"raw": b"{not json"}, 400),
        ("POST", "/user/register", {"raw": b"\xff\xfe"}, 400),
        ("POST", "/user/register", {"body": ["name", "password"]}, 400),
        ("POST", "/user/register", {"body": {"password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": 5, "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": "  ", "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": "n" * 65, "password": PASSWORD}}, 400),
        # 64 characters once stripped, but 65 as sent: the OpenAPI maxLength counts as sent.
        ("POST", "/user/register", {"body": {"name": " " + "n" * 64, "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": "ann", "password": "short"}}, 400),
        ("POST", "/user/register", {"body": {"name": "ann", "password": None}}, 400),
        ("POST", "/user/register", {"body": {"name": "a\x00b", "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": "evil\u202ecilA", "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"body": {"name": "two\nlines", "password": PASSWORD}}, 400),
        ("POST", "/user/register", {"raw": b'{"name": "\\ud800", "password": "longenough"}'}, 400),
        ("POST", "/login", {"body": {"id": str(user.id), "password": PASSWORD}}, 400),
        ("POST", "/login", {"body": {"id": True, "password": PASSWORD}}, 400),
        ("POST", "/login", {"raw": b'{"id": 1.5, "password": "x"}'}, 400),
        ("POST", "/login", {"raw": b'{"id": 1e400, "password": "x"}'}, 400),
        ("POST", "/login", {"body": {"id": 0, "password": PASSWORD}}, 400),
        ("POST", "/login", {"body": {"id": -user.id, "password": PASSWORD}}, 400),
        ("POST", "/login", {"body": {"id": 2**70, "password": PASSWORD}}, 400),
        ("POST", "/login", {"body": {"id": user.id}}, 400),
        ("POST", "/login", {"body": {"id": user.id, "password": "wrong password"}}, 401),
    ]
    await check_refused(api, cases, db_counts)


@pytest.mark.gen_test(timeout=30)
async def test_bad_ids_tokens_and_posts(api, settings, db_counts):
    user, other = await api.new_user(), await api.new_user()
    expired = auth.issue_token(user.id, settings.jwt_secret, ttl=-10)
    forged = auth.issue_token(user.id, "another secret", ttl=60)
    text = {"body": {"text": "hello"}}
    cases = [
        *(("GET", f"/user/get/{bad}", {}, 400) for bad in BAD_IDS),
        *(("GET", f"/post/get/{bad}", {}, 400) for bad in BAD_IDS),
        *(("PUT", f"/friend/set/{bad}", {"token": user.token}, 400) for bad in BAD_IDS),
        ("GET", "/user/get/999999999", {}, 404),
        ("GET", "/post/get/999999999", {}, 404),
        ("PUT", "/friend/set/999999999", {"token": user.token}, 404),
        ("PUT", "/friend/delete/999999999", {"token": user.token}, 404),
        ("PUT", f"/friend/set/{user.id}", {"token": user.token}, 400),
        ("PUT", f"/friend/set/{other.id}", {}, 401),
        ("PUT", f"/friend/set/{other.id}", {"token": expired}, 401),
        ("PUT", f"/friend/set/{other.id}", {"token": forged}, 401),
        ("PUT", f"/friend/set/{other.id}", {"token": "not.a.token"}, 401),
        ("POST", "/post/create", text, 401),
        ("POST", "/post/create", {**text, "token": expired}, 401),
        ("POST", "/post/create", {"raw": b"[1", "token": user.token}, 400),
        ("POST", "/post/create", {"body": {}, "token": user.token}, 400),
        ("POST", "/post/create", {"body": {"text": 42}, "token": user.token}, 400),
        ("POST", "/post/create", {"body": {"text": ""}, "token": user.token}, 400),
        ("POST", "/post/create", {"body": {"text": " \n\t"}, "token": user.token}, 400),
        ("POST", "/post/create", {"body": {"text": "x" * 1001}, "token": user.token}, 400),
        ("POST", "/post/create", {"body": {"text": "nul \x00"}, "token": user.token}, 400),
        ("POST", "/post/create", {"raw": b'{"text": "\\udfff"}', "token": user.token}, 400),
        ("GET", "/post/feed?offset=" + "1" * 5000, {"token": user.token}, 400),
        ("GET", "/post/feed", {}, 401),
        ("GET", "/post/feed?limit=0", {"token": user.token}, 400),
        ("GET", "/post/feed?limit=101", {"token": user.token}, 400),
        ("GET", "/post/feed?offset=-1", {"token": user.token}, 400),
        ("GET", "/post/feed?limit=ten", {"token": user.token}, 400),
        ("GET", "/no/such/endpoint", {}, 404),
    ]
    await check_refused(api, cases, db_counts)
    code, post = await api.call("POST", "/post/create", {"text": "x" * 1000}, token=user.token)
    assert code == 201 and len(post["text"]) == 1000  # the limit itself is allowed


@pytest.mark.gen_test(timeout=30)
async def test_bad_edits_and_deletes(api, settings, db_counts):
    """Edits are validated as posts are; a refused edit or delete leaves the post as it was."""
    user, other = await api.new_user(), await api.new_user()
    expired = auth.issue_token(user.id, settings.jwt_secret, ttl=-10)
    post = await api.post(user, "as it was")
    mine = post["id"]

    def edit(body, token=user.token):
        return {"body": body, "token": token} if token else {"body": body}

    cases = [
        *(("PUT", f"/post/delete/{bad}", {"token": user.token}, 400) for bad in BAD_IDS),
        ("PUT", f"/post/delete/{mine}", {}, 401),
        ("PUT", f"/post/delete/{mine}", {"token": expired}, 401),
        ("PUT", f"/post/delete/{mine}", {"token": other.token}, 403),
        ("PUT", "/post/delete/999999999", {"token": user.token}, 404),
        ("PUT", "/post/update", edit({"id": mine, "text": "new"}, token=None), 401),
        ("PUT", "/post/update", edit({"id": mine, "text": "new"}, token=expired), 401),
        ("PUT", "/post/update", edit({"id": mine, "text": "new"}, token=other.token), 403),
        ("PUT", "/post/update", edit({"id": 999999999, "text": "new"}), 404),
        ("PUT", "/post/update", {"raw": b"[1", "token": user.token}, 400),
        ("PUT", "/post/update", edit({"text": "new"}), 400),
        ("PUT", "/post/update", edit({"id": mine}), 400),
        ("PUT", "/post/update", edit({"id": str(mine), "text": "new"}), 400),
        ("PUT", "/post/update", edit({"id": 0, "text": "new"}), 400),
        ("PUT", "/post/update", edit({"id": 2**63, "text": "new"}), 400),
        ("PUT", "/post/update", edit({"id": True, "text": "new"}), 400),
        ("PUT", "/post/update", edit({"id": mine, "text": " \n\t"}), 400),
        ("PUT", "/post/update", edit({"id": mine, "text": "x" * 1001}), 400),
        ("PUT", "/post/update", edit({"id": mine, "text": "nul \x00"}), 400),
        ("GET", "/post/update", {"token": user.token}, 405),
        ("POST", f"/post/delete/{mine}", {"token": user.token}, 405),
    ]
    await check_refused(api, cases, db_counts)
    assert await api.call("GET", f"/post/get/{mine}") == (200, post)


async def ws_refusal(api, path: str) -> tuple[int, dict]:
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(api.ws_url + path)
    return refused.value.code, json.loads(refused.value.response.body)


@pytest.mark.gen_test(timeout=30)
async def test_feed_socket_is_refused_before_the_upgrade(api, settings, service):
    user, other = await api.new_user(), await api.new_user()
    expired = auth.issue_token(user.id, settings.jwt_secret, ttl=-10)
    ghost = auth.issue_token(10**12, settings.jwt_secret, ttl=60)
    cases = {
        f"/post/feed/{user.id}": (
            401,
            "missing token: subprotocols 'feed, bearer.<token>' or ?token=",
        ),
        f"/post/feed/{user.id}?token=garbage": (401, "invalid token"),
        f"/post/feed/{user.id}?token={expired}": (401, "token expired"),
        f"/post/feed/{user.id}?token={other.token}": (403, "token belongs to another user"),
        f"/post/feed/{10**12}?token={ghost}": (404, f"user {10**12} not found"),
        f"/post/feed/abc?token={user.token}": (
            400,
            "user id must be a positive integer below 2^63",
        ),
        f"/post/feed/{user.id}?token={user.token}&since=x": (400, None),
        f"/post/feed/{user.id}?token={user.token}&since={'9' * 5000}": (400, None),
    }
    for path, (status, message) in cases.items():
        code, body = await ws_refusal(api, path)
        assert code == status, path
        assert body["error"] == message if message else body["error"], path
    assert not service.sessions


@pytest.mark.gen_test(timeout=30)
async def test_feed_tokens_never_reach_the_logs(api, caplog):
    user = await api.new_user()
    caplog.set_level(logging.INFO)
    feed = await api.open_feed(user)
    feed.close()
    await ws_refusal(api, f"/post/feed/{user.id}?token={user.token}&since={'9' * 30}")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"/post/feed/{user.id}?token=***" in logged
    assert user.token not in logged


@pytest.mark.gen_test(timeout=30)
async def test_client_messages_and_oversized_frames_close_the_feed(api):
    user = await api.new_user()
    feed = await api.open_feed(user)
    feed.ws.write_message("x" * (MAX_WS_MESSAGE + 1))
    assert await feed.wait_closed() == 1009  # larger than websocket_max_message_size
    feed = await api.open_feed(user)
    feed.ws.write_message('{"type": "post"}')
    assert await feed.wait_closed() == 1003


def signed(settings, **claims) -> str:
    """A token with exactly these claims, signed with the service's own secret."""
    return jwt.encode(claims, settings.jwt_secret, "HS256")


@pytest.mark.gen_test(timeout=30)
async def test_signed_tokens_with_bad_claims_and_deep_json_get_4xx(api, settings, db_counts):
    user, other = await api.new_user(), await api.new_user()
    soon = int(time.time()) + 60
    ghost = signed(settings, sub=str(10**15 + 7), sid="0", exp=soon)  # no such user here
    bad_tokens = [
        signed(settings, sub=str(user.id), exp=soon),  # no log-in id: nothing could end it
        signed(settings, sub=str(user.id), sid="-1", exp=soon),
        signed(settings, sub=str(user.id), sid=str(2**63), exp=soon),
        signed(settings, sub=str(user.id), sid=7, exp=soon),
        signed(settings, sub=str(2**63), exp=soon),
        signed(settings, sub="-5", exp=soon),
        signed(settings, sub=str(user.id), exp="soon"),
        signed(settings, sub=str(user.id), exp=[soon]),
        signed(settings, sub=str(user.id), exp=soon, iat="yesterday"),
        signed(settings, sub=str(user.id), exp=soon, iat=[1]),
        signed(settings, sub=str(user.id), exp=soon, nbf={"a": 1}),
        signed(settings, sub=str(user.id), exp=1e400),
    ]
    deep = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    cases = [
        ("POST", "/post/create", {"body": {"text": "hi"}, "token": ghost}, 401),
        ("PUT", f"/friend/set/{other.id}", {"token": ghost}, 401),
        *(("POST", "/post/create", {"body": {"text": "hi"}, "token": t}, 401) for t in bad_tokens),
        *(("PUT", f"/friend/set/{other.id}", {"token": t}, 401) for t in bad_tokens),
        *(("GET", "/post/feed", {"token": t}, 401) for t in bad_tokens),
        ("POST", "/post/create", {"raw": deep, "token": user.token}, 400),
        ("POST", "/user/register", {"raw": b"[" * 100_00}, 400),
        ("POST", "/login", {"raw": b'{"id": ' + b"{" * 3000}, 400),
    ]
    await check_refused(api, cases, db_counts)
    for token in [*bad_tokens, ghost]:
        code, body = await ws_refusal(api, f"/post/feed/{user.id}?token={token}")
        assert code in (401, 403) and body["error"], (token, code, body)


@pytest.mark.gen_test(timeout=30)
async def test_tornados_own_refusals_are_json_too(api, db_counts):
    user = await api.new_user()
    host = api.base_url.removeprefix("http://")
    feed = f"/post/feed/{user.id}?token={user.token}"
    before = db_counts()
    requests = {
        "no upgrade": (f"GET {feed} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), 400),
        "%ff id": (upgrade_request(f"/post/feed/%ff?token={user.token}", host), 400),
        "%ff since": (upgrade_request(feed + "&since=%ff", host), 400),
        "cross-site": (upgrade_request(feed, host, Origin="https://evil.example"), 403),
        "version 12": (upgrade_request(feed, host, Sec_WebSocket_Version="12"), 426),
        "no key": (upgrade_request(feed, host, Sec_WebSocket_Key=""), 400),
        "POST feed": (f"POST {feed} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), 405),
        "DELETE feed": (f"DELETE {feed} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), 405),
        "POST /": (f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode(), 405),
        "declared body over the cap": (
            f"POST /user/register HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode(),
            413,
        ),
        "chunked body over the cap": (
            f"POST /user/register HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{MAX_BODY + 1:x}\r\n".encode()
            + b"x" * (MAX_BODY + 1)
            + b"\r\n0\r\n\r\n",
            413,
        ),
    }
    for name, (request, status) in requests.items():
        code, headers, body = await raw_http(api.base_url, request)
        assert code == status, (name, code, body)
        assert headers["content-type"].startswith("application/json"), (name, headers)
        assert json.loads(body)["error"], (name, body)
    assert db_counts() == before


@pytest.mark.gen_test(timeout=30)
async def test_tokens_are_redacted_whatever_the_spelling_of_the_parameter(api, caplog):
    user = await api.new_user()
    caplog.set_level(logging.INFO)
    feed = await api.open_feed_at(f"/post/feed/{user.id}?%74oken={user.token}")
    feed.close()
    await ws_refusal(api, f"/post/feed/{user.id}?TOKEN={user.token}")
    await ws_refusal(api, f"/post/feed/{user.id}?tok%45n={user.token}&since=x")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "%74oken=***" in logged and "TOKEN=***" in logged and "tok%45n=***" in logged
    assert user.token not in logged


@pytest.mark.gen_test(timeout=30)
async def test_invalid_utf8_text_frame_closes_with_1007(api):
    user = await api.new_user()
    feed = await api.open_feed(user)
    # A text frame (opcode 0x1) the client library would never produce from a str.
    feed.ws.protocol._write_frame(True, 0x1, b"\xff\xfe not utf-8")
    assert await feed.wait_closed() == 1007


@pytest.mark.gen_test(timeout=30)
async def test_405_names_the_allowed_methods(api):
    """RFC 9110 asks a 405 for an Allow header (found by the fuzzing: it had none)."""
    host = api.base_url.removeprefix("http://")
    cases = {
        "TRACE /": "GET, HEAD",
        "DELETE /login": "POST",
        "POST /post/feed/1": "GET",
        "GET /friend/set/1": "PUT",
        "PATCH /openapi.json": "GET",
    }
    for request_line, allowed in cases.items():
        request = f"{request_line} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
        code, headers, body = await raw_http(api.base_url, request.encode())
        assert (code, headers.get("allow")) == (405, allowed), (request_line, body)
        assert json.loads(body)["error"]


@pytest.mark.gen_test(timeout=30)
async def test_ids_written_with_a_point_or_exponent_are_integers_as_json_schema_says(api):
    """{"id": 12.0} is the integer 12 in JSON and in the OpenAPI document (the fuzzing sent
    one, and got 400); exact at any size, since such numbers are parsed as Decimal."""
    user = await api.new_user()
    for written in (f"{user.id}.0", f"{user.id}.000", f"{user.id / 10**13}e13"):
        raw = f'{{"id": {written}, "password": "{PASSWORD}"}}'.encode()
        code, body = await api.call("POST", "/login", raw=raw)
        assert code == 200, (written, body)
    raw = f'{{"id": {user.id + 1}.0, "password": "{PASSWORD}"}}'.encode()
    assert (await api.call("POST", "/login", raw=raw))[0] == 401
