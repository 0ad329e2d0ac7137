"""The feed websocket end to end: real PostgreSQL, real RabbitMQ, real sockets."""

import asyncio
import collections

import pika
import psycopg2
import pytest
from tornado.websocket import websocket_connect

from feed_app.horizon import HorizonClock
from tests.conftest import AMQP_URL, both_fanout_modes
from tests.support import Feed, inspect_fanout, wait_queue_gone

pytestmark = both_fanout_modes


@pytest.mark.gen_test(timeout=20)
async def test_every_session_of_a_follower_gets_the_post_and_nobody_else(api, service):
    author, follower, stranger = await api.new_user(), await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    tab1, tab2 = await api.open_feed(follower), await api.open_feed(follower)
    outsider = await api.open_feed(stranger)
    assert tab1.ready == tab2.ready == {"type": "ready", "following": 1}

    post = await api.post(author, "<script>alert(1)</script> & more")
    assert (await tab1.wait_posts(1)) == [post]
    assert (await tab2.wait_posts(1)) == [post]
    # The stranger follows nobody and gets only their own post, which the follower does not.
    own = await api.post(stranger)
    assert await outsider.wait_posts(1) == [own]
    marker = await api.post(author)
    assert await tab1.wait_posts(2) == [post, marker]
    assert outsider.posts == [own]


@pytest.mark.gen_test(timeout=20)
async def test_a_client_offering_compression_gets_the_frames_as_built(api):
    """Proves: the service never negotiates permessage-deflate, which a frame built once per post
    and written to every socket as it is relies on, and a client that offers it reads posts."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    url = f"{api.ws_url}/post/feed/{reader.id}?token={reader.token}"
    ws = await asyncio.wait_for(websocket_connect(url, compression_options={}), 10)
    feed = Feed(ws)
    await feed.wait_ready()
    assert "Sec-WebSocket-Extensions" not in ws.headers
    post = await api.post(author, "uncompressed")
    assert await feed.wait_posts(1) == [post]
    feed.close()


@pytest.mark.gen_test(timeout=20)
async def test_every_tab_of_the_author_shows_the_authors_own_posts(api):
    author = await api.new_user()
    earlier = await api.post(author, "before the tabs opened")
    tabs = [await api.open_feed(author), await api.open_feed(author)]
    later = await api.post(author, "while they are open")
    for tab in tabs:
        assert tab.ready == {"type": "ready", "following": 0} and tab.history == [earlier]
        assert await tab.wait_posts(1) == [later]


@pytest.mark.gen_test(timeout=20)
async def test_new_session_gets_recent_history_before_ready(api, settings):
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    posts = [await api.post(author, f"p{i}") for i in range(settings.history_size + 3)]
    feed = await api.open_feed(follower)
    assert feed.history == posts[-settings.history_size :]  # newest N, oldest first


@pytest.mark.gen_test(timeout=20)
async def test_since_sends_exactly_the_missed_posts(api):
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    seen = await api.post(author, "seen")
    missed = [await api.post(author, f"missed {i}") for i in range(3)]
    feed = await api.open_feed(follower, since=seen["id"])
    assert feed.history == missed
    live = await api.post(author, "live")
    assert await feed.wait_posts(1) == [live]


@pytest.mark.gen_test(timeout=20)
async def test_a_checkpoint_from_beyond_this_database_starts_the_socket_afresh(api):
    """A client of a database since restored or made anew comes back with a checkpoint higher
    than any change here: it gets the history and live posts, not silence."""
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    before = await api.post(author, "before")
    feed = await api.open_feed(follower, since=before["id"] + 10**12)
    assert feed.history == [before]
    live = await api.post(author, "live")
    assert await feed.wait_posts(1) == [live]


@pytest.mark.gen_test(timeout=20)
async def test_unfollowed_author_is_not_delivered_to_new_sessions(api):
    kept, dropped, follower = await api.new_user(), await api.new_user(), await api.new_user()
    await api.follow(follower, kept)
    await api.follow(follower, dropped)
    await api.unfollow(follower, dropped)
    feed = await api.open_feed(follower)
    assert feed.ready["following"] == 1
    await api.post(dropped, "should not arrive")
    expected = await api.post(kept, "should arrive")
    assert await feed.wait_posts(1) == [expected]
    await asyncio.sleep(0.1)
    assert feed.posts == [expected]


@pytest.mark.gen_test(timeout=20)
async def test_follow_while_connected_changes_the_open_session(api):
    author, follower = await api.new_user(), await api.new_user()
    earlier = await api.post(author, "before the follow")
    feed = await api.open_feed(follower)
    assert feed.ready["following"] == 0
    await api.follow(follower, author)
    assert (await feed.wait_message("following"))["following"] == 1
    assert (await feed.wait_posts(1))[0] == earlier  # the new author's recent posts
    later = await api.post(author, "after the follow")
    assert await feed.wait_posts(2) == [earlier, later]


@pytest.mark.gen_test(timeout=20)
async def test_user_following_nobody_keeps_an_idle_working_socket(api, service):
    loner = await api.new_user()
    feed = await api.open_feed(loner)
    assert feed.ready == {"type": "ready", "following": 0}
    await asyncio.sleep(0.3)
    assert feed.close_code is None and len(service.sessions) == 1


@pytest.mark.gen_test(timeout=30)
async def test_session_queue_is_gone_however_the_socket_ends(api, service):
    user = await api.new_user()
    for end in ("client close", "connection drop", "client message"):
        feed = await api.open_feed(user)
        [session] = service.sessions
        queue = inspect_fanout(service).queue_of(session)
        if end == "client close":
            feed.close()
        elif end == "connection drop":
            feed.ws.stream.close()  # no close frame: the TCP connection just goes away
        else:
            feed.ws.write_message("hello?")
            assert await feed.wait_closed() == 1003
        if service.settings.fanout == "session":
            await wait_queue_gone(AMQP_URL, queue)
        for _ in range(100):
            if not service.sessions:
                break
            await asyncio.sleep(0.02)
        assert not service.sessions, end
        assert service.fanout.subscribers == 0, end


@pytest.mark.gen_test(timeout=30)
async def test_sessions_share_a_few_channels_and_queues_follow_the_mode(api, service):
    """One AMQP connection per process and a fixed handful of channels, whatever the load; a
    queue per socket in session mode, one per process in process mode."""
    users = [await api.new_user() for _ in range(3)]
    feeds = [await api.open_feed(user) for user in users for _ in range(4)]
    queues = {inspect_fanout(service).queue_of(session) for session in service.sessions}
    assert len(feeds) == 12
    assert len(queues) == (12 if service.settings.fanout == "session" else 1)
    assert inspect_fanout(service).channels <= 6


@pytest.mark.gen_test(timeout=20)
async def test_following_again_does_not_resend_what_the_session_showed(api):
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    earlier = await api.post(author, "before the session")
    feed = await api.open_feed(follower)
    assert feed.history == [earlier]
    await api.unfollow(follower, author)
    await feed.wait_message("following")
    await api.follow(follower, author)
    await feed._until(lambda: len([m for m in feed.messages if m["type"] == "following"]) == 2, 5)
    later = await api.post(author, "after following again")
    assert await feed.wait_posts(1) == [later]  # `earlier` was not sent a second time


@pytest.mark.gen_test(timeout=20)
async def test_a_malformed_message_does_not_cost_the_connection(api, service):
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    feed = await api.open_feed(follower)
    loop = asyncio.get_running_loop()
    junk = [
        (b"junk", pika.BasicProperties()),
        (b"junk", pika.BasicProperties(message_id=JUNK_ID)),  # not a post frame
        (b'{"type":"post","post":{}}', pika.BasicProperties(message_id="x")),
        # Well formed but for created_ms, which only feeds the latency histogram: delivered.
        (b'{"type":"post","post":{}}', pika.BasicProperties(message_id=JUNK_ID, headers=LATE)),
    ]
    await loop.run_in_executor(None, publish_junk, str(author.id), junk)
    post = await api.post(author, "still delivered")
    assert await feed.wait_posts(2) == [{}, post]
    assert service.metrics.broker_reconnects == 0 and service.fanout.is_ready


LATE = {"created_ms": "soon"}  # a header of the wrong type
JUNK_ID = str(2**62)  # above any floor the session may have reached


def publish_junk(routing_key: str, messages: list[tuple[bytes, pika.BasicProperties]]) -> None:
    """Messages on the posts exchange that no instance of the service published."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for body, properties in messages:
        channel.basic_publish("amq.direct", routing_key, body, properties)
    connection.close()


@pytest.mark.gen_test(timeout=20)
async def test_resuming_from_the_checkpoint_keeps_a_post_that_arrives_out_of_id_order(api, service):
    """A post committed but not yet published (its writer died; the outbox holds it) has a
    lower id than a later post that is shown at once. Resuming after the highest id shown would
    skip it for good; the checkpoint the server sends is below it."""
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    feed = await api.open_feed(follower)
    checkpoint = (await feed.wait_message("checkpoint"))["since"]
    [stuck] = await service.db.insert_posts([(author.id, "committed, not published")], lease=60)
    shown = await api.post(author, "published at once")
    assert await feed.wait_posts(1) == [shown] and stuck.id < shown["id"]
    feed.close()

    resumed = await api.open_feed(follower, since=checkpoint)
    assert [post["id"] for post in resumed.history] == [stuck.id, shown["id"]]
    skipped = await api.open_feed(follower, since=shown["id"])
    assert skipped.history == []  # what the highest shown id would have missed


@pytest.mark.gen_test(timeout=20)
async def test_a_follow_made_while_the_session_reads_its_follows_is_not_missed(
    api, service, monkeypatch
):
    """A follow committed just after the session read the list, announced before the session's
    control binding was in place (so to nobody): the session must still bind that author."""
    author, follower = await api.new_user(), await api.new_user()
    read_following = service.db.following
    reads = 0

    async def following_then_a_follow_lands(user_id: int) -> list[int]:
        nonlocal reads
        result = await read_following(user_id)
        reads += 1
        if reads == 1:
            await service.db.follow(follower.id, author.id, most=1, lease=60)  # not announced
        return result

    monkeypatch.setattr(service.db, "following", following_then_a_follow_lands)
    feed = await api.open_feed(follower)
    assert feed.ready["following"] == 1
    post = await api.post(author, "from the author followed mid-read")
    assert await feed.wait_posts(1) == [post]


@pytest.mark.gen_test(timeout=30)
async def test_a_post_committed_after_one_with_a_higher_id_still_arrives_once(api, service, db_dsn):
    """Post ids come from a sequence, so a post can commit after one with a higher id. A session
    that reads in between gets the higher one; the lower one, once committed and published, must
    not be taken for covered by that read: it arrives live, once, and the checkpoint stays below
    it so that a client resuming from it gets it too."""
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    writer = psycopg2.connect(db_dsn)  # a transaction that takes a post id and holds it open
    try:
        with writer.cursor() as cur:
            cur.execute("SELECT id FROM create_post(%s, 'committed late', 60)", (author.id,))
            [(late_id,)] = cur.fetchall()
        early = await api.post(author, "committed first")
        assert early["id"] > late_id
        feed = await api.open_feed(follower)
        assert [post["id"] for post in feed.history] == [early["id"]]
        writer.commit()
    finally:
        writer.close()
    service.relay.publish(await service.db.get_post(late_id))  # what its writer does next
    assert [post["id"] for post in await feed.wait_posts(1)] == [late_id]
    marker = await api.post(author, "marker")
    assert [post["id"] for post in await feed.wait_posts(2)] == [late_id, marker["id"]]
    checkpoints = [m["since"] for m in feed.messages if m["type"] == "checkpoint"]
    assert all(since < late_id for since in checkpoints), checkpoints
    resumed = await api.open_feed(follower, since=max(checkpoints, default=0))
    assert {late_id, early["id"]} <= {post["id"] for post in resumed.history}


@pytest.mark.gen_test(timeout=30)
async def test_the_horizon_stays_below_a_post_still_being_written_on_a_quiet_server(
    api, service, db_dsn
):
    """A post's transaction takes its id and stays open for a few samples while nothing newer
    finishes (a quiet deployment, a slow fsync): no read may count it as covered, or the post
    is dropped when it arrives. (A snapshot's xmax would: it is the newest finished id + 1.)"""
    author, follower = await api.new_user(), await api.new_user()
    await api.follow(follower, author)
    writer = psycopg2.connect(db_dsn)
    try:
        with writer.cursor() as cur:
            cur.execute("SELECT id FROM create_post(%s, 'slow commit', 60)", (author.id,))
            [(late_id,)] = cur.fetchall()
        await asyncio.sleep(3 * HorizonClock.SAMPLE_EVERY)  # a few samples while it is open
        posts, horizon = await service.db.changes_after([author.id], 0, 20)
        assert late_id not in [post.id for post in posts] and horizon < late_id
        feed = await api.open_feed(follower)
        writer.commit()
    finally:
        writer.close()
    service.relay.publish(await service.db.get_post(late_id))  # what its writer does next
    assert [post["id"] for post in await feed.wait_posts(1)] == [late_id]


@pytest.mark.gen_test(timeout=30)
async def test_a_transaction_running_for_minutes_elsewhere_on_the_server_does_not_stop_feeds(
    api, service, db_dsn, monkeypatch
):
    """A snapshot's xmin counts every running transaction of the server, whatever its database:
    a forgotten psql session, a migration. Once it is older than the horizon clock remembers,
    reads get no horizon; feeds must still open and deliver (their floor just stops rising)."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    clock = service.db.horizon
    clock._pairs = collections.deque(clock._pairs, maxlen=2)  # two samples: one second
    other = psycopg2.connect(db_dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()")  # and the transaction stays open
        for n in range(20):  # two seconds: every pair the clock keeps is newer than `other`
            await api.post(author, f"meanwhile {n}")
            await asyncio.sleep(0.1)
        _, horizon = await service.db.changes_after([author.id], 0, 1)
        assert horizon is None, "the clock still remembers a sample older than `other`"
        feed = await api.open_feed(reader)
        live = await api.post(author, "live")
        assert [post["id"] for post in await feed.wait_posts(1)] == [live["id"]]
        assert len(feed.history) == 20
    finally:
        other.rollback()
        other.close()
