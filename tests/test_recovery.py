"""Never lose a post: the service recovers from broker, database and process faults.

Faults are simulated with TCP proxies owned by the test (the in-process service reaches RabbitMQ
and PostgreSQL only through them) and with service subprocesses that are SIGTERMed or SIGKILLed.
The real servers are never touched. Every delivery check is exact: each expected post id arrives
once, none is missing, none is extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from feed_app import wire
from feed_app.config import Settings
from feed_app.wire import Close
from tests.conftest import AMQP_URL, both_fanout_modes, with_settings
from tests.faults import (
    assert_exactly_once,
    free_port,
    ids_of,
    open_unread_socket,
    outbox_ids,
    read_until_close,
    until,
    wait_for,
    wait_for_outbox_without,
    with_endpoint,
)
from tests.support import Api, Feed, User, inspect_fanout, wait_queue_gone

pytestmark = both_fanout_modes

# --- fixtures: the in-process service reaches both servers through proxies ------------------------


@pytest.fixture
def settings_changes() -> dict:
    """Per-test Settings changes; a test overrides it with
    @pytest.mark.parametrize("settings_changes", [{...}])."""
    return {}


@pytest.fixture
def settings(settings, amqp_proxy, pg_proxy, settings_changes, fanout_mode) -> Settings:
    # fanout_mode is named so that pytest sees this override depends on it, as the overridden
    # fixture does (it does not look through an override to the fixture it shadows).
    return with_settings(
        settings,
        amqp_url=amqp_proxy.url_for(settings.amqp_url),
        db_dsn=pg_proxy.url_for(settings.db_dsn),
        **settings_changes,
    )


# --- helpers --------------------------------------------------------------------------------------


async def settle(api: Api, author: User, feeds: list[Feed], timeout: float = 10) -> int:
    """Post a marker and wait until every feed has it: whatever was going to arrive before it has
    had every chance to (a late duplicate would show up by then). Returns the marker's id."""
    marker = (await api.post(author, "marker"))["id"]
    for n, feed in enumerate(feeds):
        await until(feed, lambda f=feed: marker in ids_of(f.posts), timeout, f"marker on feed {n}")
    return marker


async def readyz(api: Api) -> tuple[int, dict]:
    return await api.call("GET", "/readyz")


# --- 1. the broker connection drops while sessions are open ---------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_broker_outage_loses_no_post_and_keeps_sockets_open(api, service, amqp_proxy, db_dsn):
    """Proves: while RabbitMQ is unreachable, posting still succeeds (the post waits in the
    outbox) and /readyz says 503; open feed sockets stay open; once the broker is back, /readyz is
    200 and each session has received every post (before, during, after) exactly once."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    feeds = [await api.open_feed(reader), await api.open_feed(reader)]

    before = (await api.post(author, "before"))["id"]
    for feed in feeds:
        await until(feed, lambda f=feed: before in ids_of(f.posts), 5, "post before the outage")

    amqp_proxy.disable()
    await wait_for(lambda: not service.fanout.is_ready, 5, "the service notices the outage")
    code, body = await readyz(api)
    assert code == 503 and "broker" in body["error"], body
    during = [(await api.post(author, f"during {n}"))["id"] for n in range(3)]  # 201 each
    waiting = await outbox_ids(db_dsn)
    assert set(during) <= waiting, f"posts made during the outage not in the outbox: {waiting}"

    amqp_proxy.enable()
    await wait_for(lambda: service.fanout.is_ready, 10, "the service reconnects")
    code, body = await readyz(api)
    assert (code, body["status"]) == (200, "ready"), body
    assert service.metrics.broker_reconnects >= 1
    after = (await api.post(author, "after"))["id"]
    marker = await settle(api, author, feeds)

    for n, feed in enumerate(feeds):
        assert feed.close_code is None, f"feed {n} was closed by the outage"
        assert_exactly_once(ids_of(feed.posts), [before, *during, after, marker], f"feed {n}")
    assert len(service.sessions) == 2
    # The queues of the lost connection are forgotten: only the live ones are watched.
    live = {inspect_fanout(service).queue_of(session) for session in service.sessions}
    assert set(service.broker._overflow_handlers) == live


@pytest.mark.gen_test(timeout=30)
async def test_feed_opened_while_the_broker_is_away_gets_history_then_goes_live(
    api, service, amqp_proxy
):
    """Proves: PostgreSQL alone serves the history of a socket opened during a broker outage;
    `ready` and live posts follow once the broker is back, and a post made in between arrives
    exactly once."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    old = (await api.post(author, "before the outage"))["id"]
    amqp_proxy.disable()
    await wait_for(lambda: not service.fanout.is_ready, 5, "the service notices the outage")

    ws = await websocket_connect(f"{api.ws_url}/post/feed/{reader.id}?token={reader.token}")
    feed = Feed(ws)
    await until(feed, lambda: old in ids_of(feed.history), 5, "history without the broker")
    assert feed.ready is None
    between = (await api.post(author, "during the outage"))["id"]

    amqp_proxy.enable()
    await feed.wait_ready(10)
    after = (await api.post(author, "after the outage"))["id"]
    await until(feed, lambda: after in ids_of(feed.posts), 10, "live after the outage")
    # `between` comes with the catch-up read when the broker is back (before `ready`).
    everything = ids_of(feed.history) + ids_of(feed.posts)
    assert_exactly_once(everything, [old, between, after], "the feed")


# --- 2. ten forced disconnects under steady posting -----------------------------------------------

# Seconds the broker stays unreachable at each of the ten disconnects (0: the connections are cut
# and the reconnect is let through at once).
OUTAGES = [0.0, 0.05, 0.1, 0.2, 0.0, 0.15, 0.05, 0.3, 0.1, 0.0]
RECOVERY_BOUND = 6.0  # seconds; the reconnect backoff is capped at 5 s


@pytest.mark.gen_test(timeout=45)
async def test_ten_disconnects_under_steady_posting(api, service, amqp_proxy):
    """Proves: with three authors each posting every 20-50 ms at once (so transactions overlap
    and posts commit out of id order) and the broker connection cut ten times, two sessions
    each receive every post exactly once. Measures, for each disconnect, the time from the broker
    being reachable again until both sessions have received a post created after that moment
    (so not one already on its way before the cut); asserts it stays under RECOVERY_BOUND."""
    authors, reader = [await api.new_user() for _ in range(3)], await api.new_user()
    for author in authors:
        await api.follow(reader, author)
    feeds = [await api.open_feed(reader), await api.open_feed(reader)]
    loop = asyncio.get_running_loop()
    created: list[tuple[float, int]] = []  # (when the POST was sent, post id)
    stop_posting = asyncio.Event()

    async def post_steadily(author: User) -> None:
        n = 0
        while not stop_posting.is_set():
            sent = loop.time()
            created.append((sent, (await api.post(author, f"steady {n}"))["id"]))
            n += 1
            await asyncio.sleep(0.02 + 0.01 * (n % 4))  # 20, 30, 40, 50 ms, repeating

    async def received_post_sent_after(moment: float, timeout: float, what: str) -> None:
        for n, feed in enumerate(feeds):

            def has_one(f: Feed = feed) -> bool:
                later = {post_id for sent, post_id in created if sent >= moment}
                return not later.isdisjoint(ids_of(f.posts))

            await until(feed, has_one, timeout, f"feed {n}: {what}")

    posters = asyncio.gather(*(post_steadily(author) for author in authors))
    recoveries: list[float] = []
    try:
        await received_post_sent_after(loop.time(), 5, "live delivery before the faults")
        for outage in OUTAGES:
            assert amqp_proxy.drop() >= 1, "the service had no broker connection to cut"
            if outage:
                amqp_proxy.disable()
                await asyncio.sleep(outage)  # the fault's duration, not a wait for a condition
                amqp_proxy.enable()
            back = loop.time()
            await received_post_sent_after(
                back, RECOVERY_BOUND, f"delivery after {outage=} (earlier: {recoveries})"
            )
            recoveries.append(loop.time() - back)
    finally:
        stop_posting.set()
        await posters
    marker = await settle(api, authors[0], feeds)

    figures = (
        f"broker back -> both sessions receive a new post, over {len(recoveries)} disconnects: "
        f"min {min(recoveries):.3f} s, median {statistics.median(recoveries):.3f} s, "
        f"max {max(recoveries):.3f} s ({len(created)} posts, "
        f"{service.metrics.broker_reconnects} reconnects)"
    )
    print("\n" + figures)
    assert service.metrics.broker_reconnects >= len(OUTAGES), figures
    for n, feed in enumerate(feeds):
        assert feed.close_code is None, f"feed {n} closed: {figures}"
        assert_exactly_once(
            ids_of(feed.posts), [*(i for _, i in created), marker], f"feed {n}; {figures}"
        )


# --- 3. SIGKILL after the commit, before the publish ----------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_post_of_a_killed_process_is_delivered_from_the_outbox(
    api, service, processes, db_dsn
):
    """Proves: a post committed by a process that dies before publishing it (its broker is
    unreachable, then it is SIGKILLed) is still delivered, exactly once, to a follower's open
    session on another process, which takes the outbox row over once the dead one's lease ends."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    feed = await api.open_feed(reader)
    doomed = processes(
        FEED_AMQP_URL=with_endpoint(AMQP_URL, "127.0.0.1", free_port()),  # nothing listens there
        FEED_OUTBOX_LEASE="1",
    )
    await doomed.start()
    post = (await Api(doomed.base_url).post(author, "committed, never published"))["id"]
    assert post in await outbox_ids(db_dsn)
    doomed.signal(signal.SIGKILL)
    assert await doomed.wait_exit(5) == -signal.SIGKILL

    loop = asyncio.get_running_loop()
    killed = loop.time()
    await until(feed, lambda: post in ids_of(feed.posts), 10, "the orphaned post is delivered")
    print(f"\norphaned post delivered {loop.time() - killed:.2f} s after the SIGKILL (lease 1 s)")
    marker = await settle(api, author, [feed])
    assert_exactly_once(ids_of(feed.posts), [post, marker], "feed")
    await wait_for_outbox_without(db_dsn, {post, marker})


# --- 4. resuming with since= across a server restart ----------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_resume_with_since_across_a_restart(api, service, processes):
    """Proves: without since=, a feed starts with the newest history_size posts in ascending id
    order; when its server stops, the socket is closed with 1001; after a restart on the same port,
    since=<last post seen> brings exactly the posts made meanwhile (all of them, although more
    than history_size, in order, before `ready`), and then live posts."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    older = [(await api.post(author, f"older {n}"))["id"] for n in range(4)]
    first = processes(FEED_HISTORY_SIZE="3")
    await first.start(ready="/readyz")

    feed = await Api(first.base_url).open_feed(reader)
    assert ids_of(feed.history) == older[-3:], "history: the newest 3, oldest first"
    seen = (await api.post(author, "X"))["id"]
    await until(feed, lambda: seen in ids_of(feed.posts), 5, "live post X on the first server")

    first.signal(signal.SIGTERM)
    assert await feed.wait_closed(10) == Close.GOING_AWAY
    assert await first.wait_exit(10) == 0
    missed = [(await api.post(author, f"while down {n}"))["id"] for n in range(4)]

    second = processes(port=first.port, FEED_HISTORY_SIZE="3")
    await second.start(ready="/readyz")
    resumed = await Api(second.base_url).open_feed(reader, since=seen)
    assert ids_of(resumed.history) == missed
    live = (await api.post(author, "live after the restart"))["id"]
    marker = await settle(api, author, [resumed])
    assert ids_of(resumed.posts) == [live, marker]
    assert ids_of(feed.posts) == [seen]


# --- 5. follow and unfollow while connected, from another process ---------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_follow_and_unfollow_from_another_process_reach_the_open_session(
    api, service, processes
):
    """Proves: PUT /friend/set handled by another process reaches a session open here: it gets a
    `following` message and the author's recent posts, then the author's new posts live; after
    PUT /friend/delete on the other process no post of that author is delivered, while a post of
    another followed author still is."""
    author, other_author, reader = await api.new_user(), await api.new_user(), await api.new_user()
    await api.follow(reader, other_author)
    recent = [(await api.post(author, f"recent {n}"))["id"] for n in range(2)]
    feed = await api.open_feed(reader)
    assert feed.ready == {"type": "ready", "following": 1} and feed.history == []
    elsewhere = processes()
    await elsewhere.start(ready="/readyz")
    remote = Api(elsewhere.base_url)

    def following() -> list[int]:
        return [m["following"] for m in feed.messages if m["type"] == "following"]

    await remote.follow(reader, author)
    await until(feed, lambda: following() == [2], 5, "a `following` message after the follow")
    await until(feed, lambda: set(recent) <= set(ids_of(feed.posts)), 5, "the recent posts")
    live = (await api.post(author, "live after the follow"))["id"]
    await until(feed, lambda: live in ids_of(feed.posts), 5, "a live post of the new author")

    await remote.unfollow(reader, author)
    await until(feed, lambda: following() == [2, 1], 5, "a `following` message after unfollow")
    unfollowed = (await api.post(author, "must not arrive"))["id"]
    still = (await api.post(other_author, "still followed"))["id"]
    marker = await settle(api, other_author, [feed])
    assert unfollowed not in ids_of(feed.posts)
    assert ids_of(feed.posts) == [*recent, live, still, marker]


@pytest.mark.gen_test(timeout=30)
async def test_instances_in_the_two_modes_on_one_vhost_deliver_to_each_other(
    api, service, processes, fanout_mode
):
    """Proves: the modes differ only inside a process (same exchange, routing keys and frames),
    so instances of both can share a broker, and a deployment can change mode one instance at a
    time: posts made on either instance reach the reader's sockets on both, once each."""
    other_mode = "process" if fanout_mode == "session" else "session"
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    elsewhere = processes(FEED_FANOUT=other_mode)
    await elsewhere.start(ready="/readyz")
    remote = Api(elsewhere.base_url)
    feeds = [await api.open_feed(reader), await remote.open_feed(reader)]
    posted = [(await api.post(author, "here"))["id"], (await remote.post(author, "there"))["id"]]
    marker = await settle(remote, author, feeds)
    for feed in feeds:
        assert sorted(ids_of(feed.posts)) == sorted([*posted, marker])


# --- 6. a client that stops reading ---------------------------------------------------------------

SLOW = {"session_queue_max": 20, "prefetch": 5}
FLOOD_POSTS, FLOOD_TEXT_LENGTH = 400, 1000
SERVER_SNDBUF = 8192  # the kernel doubles it; see the test's docstring


@pytest.mark.parametrize("settings_changes", [SLOW])
@pytest.mark.gen_test(timeout=40)
async def test_client_that_stops_reading_is_closed_with_4008(api, service, http_port):
    """Proves: a client that never reads does not make the service buffer without limit. While
    posts of ~1 KB are flooded at it, the service's pending write buffer for that socket stays
    within `prefetch` frames in session mode (then its queue overflows), within
    `session_queue_max` frames in process mode (then its in-process buffer overflows); the
    service closes it with 4008 (the client finds the close frame after the posts it had not
    read), forgets the session, deletes its queue and counts it in slow_client_closes.

    The client's receive buffer is 4 KB. On loopback Linux sizes the server's send buffer to ~4 MB
    at once, which would take thousands of posts to fill; the test shrinks that one server socket's
    send buffer (an OS setting, not the service's) so that ~400 posts are more than enough."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    closes_before = service.metrics.slow_client_closes
    deliveries_before = service.metrics.deliveries
    sock = await open_unread_socket(
        "127.0.0.1", http_port, f"/post/feed/{reader.id}?token={reader.token}"
    )
    try:
        await wait_for(lambda: any(s.ready for s in service.sessions), 5, "the session is ready")
        [session] = service.sessions
        queue = inspect_fanout(service).queue_of(session)
        stream = session.socket.ws_connection.stream
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
        peak = 0

        def pending() -> int:
            return stream._total_write_index - stream._total_write_done_index

        async def watch() -> None:
            nonlocal peak
            while not session.closed:
                peak = max(peak, pending())
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        text = "x" * FLOOD_TEXT_LENGTH
        sent = 0
        # One post at a time: a burst could overflow a 20-post queue even with a reading client.
        while sent < FLOOD_POSTS and not session.closed:
            last = await api.post(author, text)
            sent += 1
        await wait_for(lambda: session.closed, 10, f"the slow session is closed ({sent} posts)")
        await watcher

        close_code, posts_read = await read_until_close(sock, timeout=4)
        frame = len(json.dumps({"type": "post", "post": {"id": 0, "text": text}})) + 200
        in_flight = SLOW[
            "prefetch" if service.settings.fanout == "session" else "session_queue_max"
        ]
        bound = in_flight * frame
        delivered = service.metrics.deliveries - deliveries_before  # the only session here
        through_write = stream._total_write_index
        summary = (
            f"closed with {close_code} after {sent} posts ({posts_read} reached the client); "
            f"pending write buffer peaked at {peak} B (bound {bound} B); {through_write} B of "
            f"{delivered} posts went through IOStream.write"
        )
        print("\nslow client: " + summary)
        assert close_code == Close.TOO_SLOW, summary
        assert 0 < peak <= bound, summary  # > 0: the socket really was full
        # Posts went straight to the kernel while it took them (feed_socket.send_or_buffer): only
        # what waited once it was full went through IOStream.write. How much that is depends on
        # how the kernel drains towards a peer that reads nothing, but at least the server's send
        # buffer's worth bypassed it (with every post through write(), none would).
        post_frame = len(wire.websocket_text_frame(wire.post_frame(last)))
        assert through_write <= delivered * post_frame - SERVER_SNDBUF, summary
        assert service.metrics.slow_client_closes == closes_before + 1, summary
        assert session not in service.sessions and inspect_fanout(service).queue_of(session) is None
        if service.settings.fanout == "session":
            await wait_queue_gone(AMQP_URL, queue)
    finally:
        sock.close()


# --- 7. PostgreSQL unreachable, then back ---------------------------------------------------------

DB_ERROR_BOUND = 3.0  # seconds an answer may take while PostgreSQL refuses connections


@pytest.mark.gen_test(timeout=40)
async def test_database_outage_answers_503_quickly_and_recovers(api, service, pg_proxy):
    """Proves: with PostgreSQL unreachable, writes and reads answer 503 with a JSON error within
    DB_ERROR_BOUND (no hang), a new feed socket is refused with HTTP 503 before the upgrade and
    /readyz is 503; when PostgreSQL is reachable again all of it works without a restart."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    loop = asyncio.get_running_loop()

    pg_proxy.disable()
    for method, path, body, token in [
        ("POST", "/post/create", {"text": "lost?"}, author.token),
        ("GET", f"/user/get/{author.id}", None, None),
        ("GET", "/post/feed", None, reader.token),
        ("GET", "/readyz", None, None),
    ]:
        start = loop.time()
        code, answer = await api.call(method, path, body, token=token)
        elapsed = loop.time() - start
        assert code == 503 and isinstance(answer.get("error"), str), (path, code, answer)
        assert elapsed < DB_ERROR_BOUND, f"{method} {path} took {elapsed:.2f} s"
    assert "database" in (await readyz(api))[1]["error"]

    start = loop.time()
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(f"{api.ws_url}/post/feed/{reader.id}?token={reader.token}")
    assert refused.value.code == 503, refused.value
    assert "error" in json.loads(refused.value.response.body)
    assert loop.time() - start < DB_ERROR_BOUND

    pg_proxy.enable()
    code, body = await readyz(api)
    assert (code, body["status"]) == (200, "ready"), body
    assert await api.call("GET", f"/user/get/{author.id}") == (200, {"id": author.id, "name": "u"})
    feed = await api.open_feed(reader)
    post = (await api.post(author, "after the outage"))["id"]
    await until(feed, lambda: post in ids_of(feed.posts), 5, "live post after the outage")
    assert ids_of(feed.history) == [] and ids_of(feed.posts) == [post]


# --- 8. graceful shutdown with open sessions ------------------------------------------------------

SHUTDOWN_TIMEOUT = 10.0  # FEED_SHUTDOWN_TIMEOUT's default


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.gen_test(timeout=40)
async def test_sigterm_closes_sockets_with_1001_and_loses_no_post(
    api, service, processes, db_dsn, workers
):
    """Proves: on SIGTERM a service (one process, or a parent with two workers) closes all its
    open feed sockets with 1001 and exits with status 0 within FEED_SHUTDOWN_TIMEOUT; a post
    created through it just before the signal is not lost: a follower's session on another process
    receives it exactly once (published before the exit, or taken over from the outbox when the
    lease runs out), and no outbox row is left behind."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    stopping = processes(
        args=("--workers", str(workers)),
        FEED_OUTBOX_LEASE="1",
        FEED_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
    )
    await stopping.start(ready="/readyz")
    remote = Api(stopping.base_url)
    feeds = [await remote.open_feed(reader) for _ in range(2 * workers)]
    survivor = await api.open_feed(reader)

    last = (await remote.post(author, "just before SIGTERM"))["id"]
    loop = asyncio.get_running_loop()
    signalled = loop.time()
    stopping.signal(signal.SIGTERM)
    for n, feed in enumerate(feeds):
        assert await feed.wait_closed(SHUTDOWN_TIMEOUT) == Close.GOING_AWAY, f"feed {n}"
    status = await stopping.wait_exit(SHUTDOWN_TIMEOUT - (loop.time() - signalled))
    took = loop.time() - signalled
    print(f"\nSIGTERM -> exit {status} in {took:.2f} s ({workers} worker(s))")
    assert status == 0, stopping.log_tail()

    for n, feed in enumerate(feeds):
        assert ids_of(feed.posts) in ([], [last]), f"feed {n}: {ids_of(feed.posts)}"
    await until(survivor, lambda: last in ids_of(survivor.posts), 10, "the last post survives")
    marker = await settle(api, author, [survivor])
    assert_exactly_once(ids_of(survivor.posts), [last, marker], "surviving session")
    await wait_for_outbox_without(db_dsn, {last, marker})


# --- 9. races at the seam: closed sockets, stale set-ups, half-open connections -------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_socket_closed_while_its_authors_are_bound_does_not_stall_another(
    api, service, amqp_proxy
):
    """Two sessions need the same author, not yet bound; the first socket closes while the bind
    is in flight (held by the paused proxy). The second must still get ready and posts: in
    process mode both wait on one binding, which the first one's cancellation must not cancel."""
    author, first, second = await api.new_user(), await api.new_user(), await api.new_user()
    await api.follow(first, author)
    await api.follow(second, author)
    amqp_proxy.pause()  # binds are sent; the barrier's answer does not come back yet
    try:
        closing = await api.open_feed_unready(first)
        await wait_for(lambda: service.fanout.subscribers == 1, 5, "the first attaching")
        staying = await api.open_feed_unready(second)
        await wait_for(lambda: service.fanout.subscribers == 2, 5, "the second attaching")
        closing.close()
        await wait_for(lambda: len(service.sessions) == 1, 5, "the first session closed")
    finally:
        amqp_proxy.resume()
    await staying.wait_ready(5)
    post = await api.post(author, "live")
    await until(staying, lambda: post["id"] in ids_of(staying.posts), 5, "a live post")


@pytest.mark.gen_test(timeout=40)
async def test_a_set_up_left_from_a_lost_connection_does_not_close_the_next(
    api, service, amqp_proxy
):
    """The connection drops after the fan-out asked for a channel and before the broker opened
    it. That set-up must fail at once and leave the next connection alone (it used to wait 10 s
    and then close whichever connection was current: the new, healthy one)."""

    class DropRightAfterOpen:
        armed = True

        def on_broker_open(self) -> None:
            if self.armed:
                self.armed = False  # after the fan-out sent its first Channel.Open
                asyncio.get_running_loop().call_soon(amqp_proxy.drop)

        def on_broker_lost(self) -> None:
            pass

    service.broker.listeners.append(DropRightAfterOpen())
    amqp_proxy.drop()
    await wait_for(lambda: amqp_proxy.accepted >= 3, 15, "two reconnects")
    await wait_for(lambda: service.fanout.is_ready, 15, "the fan-out ready")
    accepted = amqp_proxy.accepted
    user = await api.new_user()
    feed = await api.open_feed(user)
    await asyncio.sleep(11)  # longer than a stale channel open used to wait before failing
    assert amqp_proxy.accepted == accepted, "a healthy connection was closed and reopened"
    assert feed.close_code is None


@pytest.mark.gen_test(timeout=40)
async def test_reconnecting_while_the_broker_still_holds_the_old_connection(
    api, service, amqp_proxy
):
    """The service's side of the connection is cut, the broker's is not (a NAT or firewall that
    lost its state): the broker keeps the old connection and its exclusive queues until its own
    heartbeat gives up. The service reconnects at once, and its queues must not collide with
    the old ones (RESOURCE_LOCKED would close the channel, again and again)."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    feed = await api.open_feed(reader)
    assert amqp_proxy.cut_client_side() >= 1
    await wait_for(lambda: service.metrics.broker_reconnects >= 1, 10, "a reconnect")
    await wait_for(lambda: service.fanout.is_ready, 10, "the fan-out ready again")
    post = await api.post(author, "after the cut")
    await until(feed, lambda: post["id"] in ids_of(feed.posts), 10, "the post")
    attempts = amqp_proxy.accepted
    await asyncio.sleep(2)
    assert amqp_proxy.accepted == attempts, "the service keeps reconnecting"


@pytest.mark.gen_test(timeout=40)
async def test_a_follow_made_through_an_instance_without_a_broker_reaches_the_open_session(
    api, service, processes
):
    """The follow change waits in follow_outbox like a post in the outbox: the instance that
    took the PUT cannot announce it, so another one does once its lease runs out."""
    author, reader = await api.new_user(), await api.new_user()
    feed = await api.open_feed(reader)
    nowhere = with_endpoint(AMQP_URL, "127.0.0.1", free_port())
    elsewhere = processes(FEED_AMQP_URL=nowhere, FEED_OUTBOX_LEASE="1")
    await elsewhere.start(ready="/healthz")
    code, body = await Api(elsewhere.base_url).call(
        "PUT", f"/friend/set/{author.id}", token=reader.token
    )
    assert code == 200, body
    await feed.wait_message("following", timeout=10)
    post = await api.post(author, "live after the follow")
    await until(feed, lambda: post["id"] in ids_of(feed.posts), 5, "the followed author's post")


@pytest.mark.gen_test(timeout=40)
async def test_workers_stop_when_their_parent_is_killed(processes):
    """SIGKILL reaches only the parent of `--workers 2`, which then forwards nothing: its
    workers must stop by themselves rather than hold the port, their sockets and queues."""
    service = processes(args=("--workers", "2"))
    await service.start()
    workers = children_of(service.process.pid)
    assert len(workers) == 2, workers
    os.kill(service.process.pid, signal.SIGKILL)
    await wait_for(lambda: not any(running(pid) for pid in workers), 15, "the workers stopping")


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
