"""Sessions that end (issue 17): short access tokens renewed through a rotating refresh token,
log-out here or everywhere and a password change, each reaching open feed sockets on any instance
within a second; and a socket that never outlives its token."""

from __future__ import annotations

import asyncio
import datetime
import time

import psycopg2
import pytest
from tornado.httpclient import HTTPClientError

from feed_app import auth, wire
from tests.conftest import with_settings
from tests.support import PASSWORD, Api, Feed, User, refresh_cookie

REVOCATION_REACH = 1.0  # seconds: the issue's bound for an ended log-in to reach a socket


@pytest.fixture
def settings(settings):
    """No grace for a rotated refresh token: its second use ends the log-in at once."""
    return with_settings(settings, refresh_grace=0.0)


class Device:
    """One log-in: its user, its access token and the refresh cookie it holds."""

    def __init__(self, api: Api, user_id: int, token: str, refresh: str) -> None:
        self.api, self.user_id, self.token, self.refresh = api, user_id, token, refresh

    @property
    def user(self) -> User:
        return User(self.user_id, self.token)

    async def refresh_token(self, cookie: str | None = None) -> tuple[int, dict, str | None]:
        """POST /token/refresh with this device's cookie (or the one given); a new cookie and
        token are kept. Returns the status, the body and the Set-Cookie morsel's value."""
        sent = self.refresh if cookie is None else cookie
        code, body, headers = await self.api.request(
            "POST", wire.REFRESH_PATH, headers={"Cookie": f"{wire.REFRESH_COOKIE}={sent}"}
        )
        morsel = refresh_cookie(headers.get_list("Set-Cookie"))
        if code == 200:
            self.token = body["token"]
            if morsel is not None and morsel.value:
                self.refresh = morsel.value
        return code, body, None if morsel is None else morsel.value


async def log_in(api: Api, user_id: int, password: str = PASSWORD) -> Device:
    code, body, headers = await api.request("POST", "/login", {"id": user_id, "password": password})
    assert code == 200, body
    morsel = refresh_cookie(headers.get_list("Set-Cookie"))
    assert morsel is not None and morsel.value
    return Device(api, user_id, body["token"], morsel.value)


async def closed_within(feed: Feed, timeout: float) -> tuple[int | None, float]:
    """The close code, and the seconds it took to come."""
    started = time.monotonic()
    code = await feed.wait_closed(timeout)
    return code, time.monotonic() - started


async def still_live(api: Api, author: User, feed: Feed) -> None:
    """The feed is open and delivers: a new post arrives."""
    before = len(feed.posts)
    post = await api.post(author)
    posts = await feed.wait_posts(before + 1)
    assert post["id"] in [p["id"] for p in posts] and feed.close_code is None


@pytest.mark.gen_test(timeout=30)
async def test_login_sets_an_httponly_strict_refresh_cookie_scoped_to_the_refresh_path(
    api, settings
):
    user = await api.new_user()
    code, body, headers = await api.request("POST", "/login", {"id": user.id, "password": PASSWORD})
    assert code == 200 and body["expires_in"] == 15 * 60 and body["user_id"] == user.id
    morsel = refresh_cookie(headers.get_list("Set-Cookie"))
    assert morsel["httponly"] and morsel["samesite"] == "Strict"
    assert morsel["path"] == wire.REFRESH_PATH
    assert not morsel["secure"]  # plain HTTP here; Secure follows request.protocol == "https"
    assert morsel.value not in body.values()
    claims = auth.claims_from_token(body["token"], settings.jwt_secret)
    assert claims.login_id > 0 and claims.expires - time.time() <= 15 * 60


@pytest.mark.gen_test(timeout=30)
async def test_refresh_rotates_and_reuse_of_a_rotated_token_ends_the_whole_chain(api, db_dsn):
    author = await api.new_user()
    device = await log_in(api, author.id)
    first_cookie = device.refresh
    code, body, second_cookie = await device.refresh_token()
    assert code == 200 and second_cookie and second_cookie != first_cookie
    assert (await api.call("GET", "/friend/list", token=device.token))[0] == 200
    code, _, third_cookie = await device.refresh_token()
    assert code == 200 and third_cookie not in (first_cookie, second_cookie)
    feed = await api.open_feed(device.user)

    # The first cookie again: someone copied it. The log-in ends, on every device holding it.
    code, body, cleared = await device.refresh_token(first_cookie)
    assert code == 401 and "used twice" in body["error"] and cleared == ""
    assert (await feed.wait_closed(REVOCATION_REACH + 1)) == wire.Close.LOGGED_OUT
    code, body = await api.call("GET", "/friend/list", token=device.token)
    assert code == 401 and body["error"] == "logged out: this log-in has ended"
    code, body, _ = await device.refresh_token()  # the newest token of the chain is ended too
    assert code == 401 and body["error"] == "this log-in has ended: log in"
    assert (await device.refresh_token("no such token"))[0] == 401
    assert (await api.call("POST", wire.REFRESH_PATH))[0] == 401  # no cookie at all
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM refresh_tokens WHERE hash = %s", (first_cookie.encode(),))
        assert cur.fetchone() == (0,)  # hashes only: no token is stored as it is
    conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_rotated_token_used_again_within_the_grace_refreshes_without_rotating(api, service):
    """Two tabs of one browser share the cookie jar and may refresh at once."""
    user = await api.new_user()
    device = await log_in(api, user.id)
    old = auth.refresh_token_hash(device.refresh)
    _, nxt = auth.new_refresh_token()
    assert (await service.db.rotate_refresh_token(old, nxt, 60, 10))[0] == "rotated"
    _, other = auth.new_refresh_token()
    assert (await service.db.rotate_refresh_token(old, other, 60, 10))[0] == "grace"
    assert (await service.db.rotate_refresh_token(nxt, other, 60, 10))[0] == "rotated"


@pytest.mark.gen_test(timeout=30)
async def test_log_out_ends_this_log_in_only(api):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    laptop, phone = await log_in(api, reader.id), await log_in(api, reader.id)
    laptop_feed, phone_feed = await api.open_feed(laptop.user), await api.open_feed(phone.user)
    code, body, headers = await api.request("POST", "/logout", token=laptop.token)
    assert code == 200 and body == {"logins_ended": 1}
    assert refresh_cookie(headers.get_list("Set-Cookie")).value == ""
    assert (await laptop_feed.wait_closed(REVOCATION_REACH)) == wire.Close.LOGGED_OUT
    assert (await api.call("GET", "/friend/list", token=laptop.token))[0] == 401
    assert (await laptop.refresh_token())[0] == 401
    await still_live(api, author, phone_feed)
    assert (await api.call("GET", "/friend/list", token=phone.token))[0] == 200
    assert (await phone.refresh_token())[0] == 200


@pytest.mark.gen_test(timeout=60)
async def test_log_out_everywhere_closes_a_socket_on_another_instance_within_a_second(
    api, processes
):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    other = processes()
    await other.start(ready="/readyz")
    elsewhere = Api(other.base_url)
    here, there = await log_in(api, reader.id), await log_in(elsewhere, reader.id)
    feed_there = await elsewhere.open_feed(there.user)
    feed_there_too = await elsewhere.open_feed(here.user)  # this device's token, other instance
    await still_live(api, author, feed_there)

    code, body = await api.call("POST", "/logout/all", token=here.token)
    assert code == 200 and body == {"logins_ended": 3}  # new_user logged in too
    for feed in (feed_there, feed_there_too):
        code, took = await closed_within(feed, REVOCATION_REACH + 1)
        assert code == wire.Close.LOGGED_OUT and took <= REVOCATION_REACH, took
    for instance in (api, elsewhere):
        for device in (here, there):
            code, body = await instance.call("GET", "/friend/list", token=device.token)
            assert code == 401 and body["error"] == "logged out: this log-in has ended"
    with pytest.raises(HTTPClientError) as refused:
        await elsewhere.open_feed(there.user)
    assert refused.value.code == 401


@pytest.mark.gen_test(timeout=30)
async def test_a_password_change_ends_every_other_log_in(api, db_counts):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    this, other = await log_in(api, reader.id), await log_in(api, reader.id)
    other_feed = await api.open_feed(other.user)
    new_password = "another horse"

    counts = db_counts()
    change = {"old_password": "wrong horse", "new_password": new_password}
    code, body = await api.call("PUT", "/user/password", change, token=this.token)
    assert code == 403 and body == {"error": "wrong password"}
    short = {"old_password": PASSWORD, "new_password": "short"}
    assert (await api.call("PUT", "/user/password", short, token=this.token))[0] == 400
    assert db_counts() == counts
    await still_live(api, author, other_feed)

    change = {"old_password": PASSWORD, "new_password": new_password}
    code, body = await api.call("PUT", "/user/password", change, token=this.token)
    assert code == 200 and body == {"logins_ended": 2}  # and new_user's
    assert (await other_feed.wait_closed(REVOCATION_REACH)) == wire.Close.LOGGED_OUT
    assert (await api.call("GET", "/friend/list", token=other.token))[0] == 401
    assert (await other.refresh_token())[0] == 401
    assert (await api.call("GET", "/friend/list", token=this.token))[0] == 200
    assert (await this.refresh_token())[0] == 200
    code, _ = await api.call("POST", "/login", {"id": reader.id, "password": PASSWORD})
    assert code == 401
    await log_in(api, reader.id, new_password)


def created_at(post: dict) -> float:
    return datetime.datetime.fromisoformat(post["created_at"]).timestamp()


def login_of(device: Device, secret: str) -> int:
    return auth.claims_from_token(device.token, secret).login_id


async def post_until_closed(api: Api, author: User, feed: Feed) -> None:
    while feed.close_code is None:
        await api.post(author)
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=30)
async def test_a_socket_is_closed_when_its_token_expires_and_no_post_arrives_after(api, settings):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    device = await log_in(api, reader.id)
    short = auth.issue_token(
        reader.id, settings.jwt_secret, 2, login_of(device, settings.jwt_secret)
    )
    expires = auth.claims_from_token(short, settings.jwt_secret).expires
    feed = await api.open_feed(User(reader.id, short))
    poster = asyncio.ensure_future(post_until_closed(api, author, feed))
    code = await feed.wait_closed(expires - time.time() + REVOCATION_REACH)
    closed_at = time.time()
    await poster
    assert code == wire.Close.TOKEN_EXPIRED
    assert feed.ws.close_reason == wire.Close.TOKEN_EXPIRED.reason
    assert expires <= closed_at <= expires + REVOCATION_REACH
    assert feed.posts, "posts arrived while the token was good"
    late = [post for post in feed.posts if created_at(post) > expires]
    assert not late, f"posts made after the token expired arrived: {late}"


@pytest.mark.gen_test(timeout=30)
async def test_a_token_sent_in_band_before_expiry_keeps_the_socket(api, settings):
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    device = await log_in(api, reader.id)
    secret = settings.jwt_secret
    short = auth.issue_token(reader.id, secret, 2, login_of(device, secret))
    expires = auth.claims_from_token(short, secret).expires
    feed = await api.open_feed(User(reader.id, short))
    await feed.ws.write_message(wire.token_message(device.token))  # 15 minutes, same log-in
    await asyncio.sleep(expires - time.time() + REVOCATION_REACH)
    await still_live(api, author, feed)

    # The renewed socket still follows its log-in.
    assert (await api.call("POST", "/logout", token=device.token))[0] == 200
    assert (await feed.wait_closed(REVOCATION_REACH)) == wire.Close.LOGGED_OUT


@pytest.mark.gen_test(timeout=30)
async def test_a_bad_in_band_token_or_any_other_message_closes_the_socket(api, settings):
    reader, stranger = await api.new_user(), await api.new_user()
    ended = await log_in(api, reader.id)
    assert (await api.call("POST", "/logout", token=ended.token))[0] == 200
    secret = settings.jwt_secret
    cases = [
        (wire.token_message("garbage"), wire.Close.TOKEN_EXPIRED),
        (wire.token_message(auth.issue_token(reader.id, secret, -10)), wire.Close.TOKEN_EXPIRED),
        (wire.token_message(stranger.token), wire.Close.TOKEN_EXPIRED),
        (wire.token_message(ended.token), wire.Close.LOGGED_OUT),
        ('{"type": "hello"}', wire.Close.CLIENT_DATA),
        ("not json", wire.Close.CLIENT_DATA),
    ]
    for message, close in cases:
        feed = await api.open_feed(reader)
        await feed.ws.write_message(message)
        assert (await feed.wait_closed()) == close, message


@pytest.mark.gen_test(timeout=30)
async def test_refreshes_are_limited_per_address_and_a_refusal_changes_nothing(processes, db_dsn):
    instance = processes(FEED_REFRESH_RATE_ADDRESS="2/minute")
    await instance.start()
    api = Api(instance.base_url)
    user = await api.new_user()
    device = await log_in(api, user.id)
    assert (await device.refresh_token())[0] == 200
    assert (await device.refresh_token())[0] == 200
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(rotated_at) FROM refresh_tokens")
        before = cur.fetchone()
    conn.close()
    code, body, headers = await api.request(
        "POST", wire.REFRESH_PATH, headers={"Cookie": f"{wire.REFRESH_COOKIE}={device.refresh}"}
    )
    assert code == 429 and "token refreshes" in body["error"] and int(headers["Retry-After"]) > 0
    assert refresh_cookie(headers.get_list("Set-Cookie")) is None
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(rotated_at) FROM refresh_tokens")
        assert cur.fetchone() == before
    conn.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_login_deletes_the_users_dead_log_ins_and_keeps_the_rest(api, db_dsn):
    user = await api.new_user()
    abandoned, ended, live = [await log_in(api, user.id) for _ in range(3)]
    assert (await api.call("POST", "/logout", token=ended.token))[0] == 200
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE hash = %s",
            (auth.refresh_token_hash(abandoned.refresh),),
        )
    conn.close()
    await log_in(api, user.id)
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(revoked_at) FROM logins WHERE user_id = %s", (user.id,))
        # new_user's, the ended one (ended just now), the live one and the new one
        assert cur.fetchone() == (4, 1)
    conn.close()
    assert (await live.refresh_token())[0] == 200
