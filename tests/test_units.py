"""Pure logic, and a session against fakes of its database and fan-out: de-duplication, the
resume's pages, ack coalescing, the horizon clock, configuration parsing."""

import asyncio
import datetime
import json
import os
import socket
import time

import psycopg2
import pytest
import tornado.iostream
import tornado.websocket

from feed_app import demo, wire
from feed_app.broker.channel import Channel
from feed_app.broker.nodes import NodeList
from feed_app.config import Rate, Settings, parse_settings, rate, redact_url, trusted_networks
from feed_app.db import Post, prepare_database
from feed_app.edge import client_address
from feed_app.fanout import Delivery
from feed_app.feed_socket import send_or_buffer
from feed_app.horizon import HorizonClock
from feed_app.limits import LimitExceeded, SlowRefusals, TokenBuckets, address_key
from feed_app.metrics import Metrics
from feed_app.sessions import FeedSession, SeenPosts, SessionPhase
from feed_app.wire import post_frame


def test_seen_posts_drops_duplicates_and_everything_at_or_below_the_floor():
    seen = SeenPosts(capacity=10)
    assert [seen.add(i) for i in (5, 3, 5, 7, 3)] == [True, True, False, True, False]
    seen.raise_floor(6)
    assert not seen.add(4) and not seen.add(6) and not seen.add(7) and seen.add(8)
    assert seen.add(2, even_below_floor=True) and not seen.add(2, even_below_floor=True)


def test_seen_posts_stays_bounded_by_raising_the_floor(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("feed_app.sessions.time.monotonic", lambda: now[0])
    seen = SeenPosts(capacity=3, hard_capacity=5, keep_for=30)
    for post_id in (10, 11, 12, 13):
        assert seen.add(post_id)
    # Over capacity, but 10 is recent: a post before it may still come from the outbox.
    assert seen.floor == 0 and seen.add(9)
    now[0] += 30
    assert seen.add(14)  # the oldest are old enough now: the floor rises past them
    assert seen.floor == 12 and len(seen._ids) == 3
    assert not seen.add(12) and not seen.add(8) and seen.add(15)
    for post_id in (16, 17, 18, 19):  # within keep_for, up to the hard capacity
        assert seen.add(post_id)
    assert len(seen._ids) == 5 and seen.floor == 14


def test_queue_names_and_routing_keys_read_back_as_they_were_made():
    session_queue = wire.SESSION_QUEUE.match(wire.session_queue(42))
    assert session_queue and session_queue[1] == "42"
    process_queue = wire.PROCESS_QUEUE.match(wire.process_queue())
    assert process_queue and process_queue[1] == str(os.getpid())
    assert not wire.SESSION_QUEUE.match(wire.overflow_queue())
    assert not wire.PROCESS_QUEUE.match(wire.overflow_queue())
    assert wire.author_of(wire.author_key(7)) == 7
    assert wire.user_of_control_key(wire.control_key(9)) == 9
    with pytest.raises(ValueError):
        wire.author_of(wire.control_key(9))


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


def test_every_password_of_a_node_list_is_redacted():
    nodes = "amqp://a:one@h1:5672/%2F,amqp://b:two@h2:5672/%2F,amqp://h3/%2F"
    assert redact_url(nodes) == "amqp://a:***@h1:5672/%2F,amqp://b:***@h2:5672/%2F,amqp://h3/%2F"


def test_node_list_is_read_again_from_the_nodes_file_at_each_attempt(tmp_path, caplog):
    nodes_file = tmp_path / "nodes"
    nodes = NodeList(["amqp://fallback/"], str(nodes_file))
    assert [nodes.next(), nodes.next()] == ["amqp://fallback/"] * 2  # unreadable: the list
    assert "cannot read the nodes file" in caplog.text
    nodes_file.write_text("amqp://n1/\n\n# a comment\namqp://n2/\n")
    assert [nodes.next(), nodes.next()] == ["amqp://n1/", "amqp://n2/"]
    with nodes_file.open("a") as lines:
        lines.write("amqp://n3/\n")  # a node added while running
    assert [nodes.next() for _ in range(3)] == ["amqp://n2/", "amqp://n3/", "amqp://n1/"]
    nodes_file.write_text("")
    assert nodes.next() == "amqp://fallback/"  # empty: the list


class RecordingPikaChannel:
    is_open = True

    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    def add_on_close_callback(self, callback) -> None:
        pass

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))


def test_acks_coalesce_into_one_multiple_ack_and_never_ack_a_tag_twice():
    async def scenario() -> list[list[tuple[int, bool]]]:
        pika_channel = RecordingPikaChannel()
        channel = Channel(pika_channel)
        for tag in range(1, 7):
            channel.delivered(tag)
        rounds = []
        for settled in ([1, 2, 3], [5], [4, 6]):
            for tag in settled:
                channel.ack(tag)
            await asyncio.sleep(0)  # acks go at the end of the loop turn
            rounds.append(pika_channel.acks)
            pika_channel.acks = []
        return rounds

    assert asyncio.run(scenario()) == [
        [(3, True)],  # 1..3 settled together: one frame
        [(5, False)],  # 4 is still being written: 5 goes alone
        [(6, True)],  # then 4 and 6: the run 4..6 goes as one (5 is not outstanding any more)
    ]


def test_a_cached_token_still_expires():
    from unittest import mock

    from feed_app import auth

    token = auth.issue_token(7, "secret", ttl=60, login_id=3)
    assert auth.claims_from_token(token, "secret").user_id == 7
    assert auth.claims_from_token(token, "secret").login_id == 3
    with mock.patch("time.time", return_value=time.time() + 61), pytest.raises(auth.InvalidToken):
        auth.claims_from_token(token, "secret")
    with pytest.raises(auth.InvalidToken):
        auth.claims_from_token(token, "another secret")


def test_rates_parse_from_settings_and_refuse_nonsense(capsys):
    settings = parse_settings(["--post-rate", "5/hour"], {"FEED_FOLLOW_RATE": "7/90"})
    assert (settings.post_rate, settings.follow_rate) == (Rate(5, 3600), Rate(7, 90))
    assert str(Settings().login_rate_user) == "10/minute" and str(Rate(7, 90)) == "7/90"
    for bad in ("0/minute", "5", "5/fortnight", "-1/second", "5/0"):
        with pytest.raises(ValueError):
            rate(bad)
    with pytest.raises(SystemExit):
        parse_settings([], {"FEED_POST_RATE": "lots"})
    assert "FEED_POST_RATE='lots' is not a valid rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings([], {"FEED_TRUSTED_PROXIES": "10.0.0.0/8, proxy.example"})
    assert "FEED_TRUSTED_PROXIES" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--hash-workers", "0"], {})
    assert "--hash-workers must be at least 1" in capsys.readouterr().err


def test_token_bucket_allows_a_burst_then_refills_and_forgets_full_buckets():
    now = [1000.0]
    buckets = TokenBuckets(Rate(3, 60), clock=lambda: now[0])
    for _ in range(3):
        assert buckets.wait("a") == 0
        buckets.take("a")
    assert buckets.wait("a") == pytest.approx(20)  # one token per 20 s
    assert buckets.wait("b") == 0
    now[0] += 15
    assert buckets.wait("a") == pytest.approx(5)
    now[0] += 5
    buckets.take("a")
    now[0] += 60
    buckets.take("b")  # a sweep: "a" is full again, so forgotten; "b" was just used
    assert len(buckets) == 1


def test_client_address_believes_x_forwarded_for_only_from_a_trusted_proxy():
    proxies = trusted_networks("10.0.0.0/8, ::1")
    assert client_address("192.0.2.1", "198.51.100.1", ()) == "192.0.2.1"
    assert client_address("192.0.2.1", "198.51.100.1", proxies) == "192.0.2.1"
    assert client_address("10.1.2.3", None, proxies) == "10.1.2.3"
    assert client_address("10.1.2.3", "198.51.100.1", proxies) == "198.51.100.1"
    # Left of the last untrusted entry, everything may be forged by the client.
    assert client_address("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.0.0.9", proxies) == (
        "198.51.100.1"
    )
    assert client_address("::1", "garbage", proxies) == "::1"
    assert client_address("::ffff:10.0.0.1", " 198.51.100.1 ", proxies) == "198.51.100.1"
    assert client_address("10.0.0.1", "10.0.0.2", proxies) == "10.0.0.2"  # only proxies


def test_clients_are_counted_by_ipv4_address_or_ipv6_64():
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2::9")
    assert address_key("2001:db8:1:2::9") != address_key("2001:db8:1:3::9")


def test_past_the_most_held_refusals_the_next_goes_out_at_once():
    async def scenario() -> None:
        refusals = SlowRefusals(delay=10, metrics=Metrics(), most=1)
        held = asyncio.ensure_future(refusals.refuse(LimitExceeded(429, "held", 30)))
        await asyncio.sleep(0)
        assert refusals.held == 1
        with pytest.raises(LimitExceeded) as refused:
            await asyncio.wait_for(refusals.refuse(LimitExceeded(429, "at once", 30)), 1)
        assert refused.value.message == "at once"
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert refusals.held == 0 and refusals.metrics.limit_refusals == 2

    asyncio.run(scenario())


def test_the_horizon_is_the_last_id_of_a_sample_whose_successor_the_read_saw_finished():
    clock = HorizonClock()
    assert clock.horizon(100) is None  # no sample yet
    clock.add_sample(xid=100, last_value=7)
    assert clock.horizon(1000) is None  # one sample: nothing is known about id 7's writers yet
    clock.add_sample(xid=105, last_value=9)  # writers of ids <= 7 had xids < 105
    clock.add_sample(xid=120, last_value=15)  # writers of ids <= 9 had xids < 120
    assert clock.horizon(104) is None  # a transaction below 105 was still running
    assert clock.horizon(105) == 7
    assert clock.horizon(119) == 7
    assert clock.horizon(120) == 9
    assert clock.horizon(10**9) == 9  # 15's writers are unknown until the next sample


def test_the_horizon_clock_samples_quickly_only_until_it_is_warm():
    clock = HorizonClock()
    delays = []
    for n in range(5):
        delays.append(clock.next_sample_in())
        clock.add_sample(xid=100 + n, last_value=n)
    warming, steady = HorizonClock.WARMING_EVERY, HorizonClock.SAMPLE_EVERY
    assert warming < steady
    assert delays == [warming] * 4 + [steady]  # warm at three pairs: after the fourth sample


def test_the_demo_seeds_a_fresh_database_once(scratch_dsn, capsys):
    prepare_database(scratch_dsn)
    demo.seed_demo(scratch_dsn)
    demo.seed_demo(scratch_dsn)  # a second start finds it done
    with psycopg2.connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == len(demo.DEMO_USERS)
        cur.execute("SELECT count(*), count(DISTINCT id) FROM posts")
        assert cur.fetchone() == (len(demo.DEMO_POSTS), len(demo.DEMO_POSTS))
    conn.close()
    assert "demo users" in capsys.readouterr().out


class WrittenAtOnce:
    """A socket that takes every frame at once, keeping them."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write_text_frame(self, data: bytes) -> asyncio.Future:
        self.frames.append(data)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def write_prebuilt(self, frame: bytes) -> None:
        self.frames.append(websocket_payload(frame))

    def close(self, code=None, reason=None) -> None:
        pass


def websocket_payload(frame: bytes) -> bytes:
    """The payload of one whole unmasked websocket frame."""
    size = frame[1] & 0x7F
    return frame[{126: 4, 127: 10}.get(size, 2) :]


class BoundAtOnce:
    is_ready = True

    async def attach(self, subscriber, authors) -> None:
        pass

    def detach(self, subscriber) -> None:
        pass


def test_a_post_committed_between_two_resume_pages_is_not_dropped():
    """Resume from 1000. Post 1100 is being written while page 1 is read: page 1 holds the 500
    posts after 1000 without it (up to 1501), and its horizon is 1099. 1100 then commits and
    arrives live (held during the sync). Page 2 must be read from 1099, not from 1501, and the
    floor must not pass 1100 unseen: the held post is then sent once."""
    author, late = 7, 1100
    posts = {
        i: Post(i, author, "t", datetime.datetime.now(datetime.UTC), "a", i, None, None)
        for i in range(1001, 1601)
    }
    reads: list[int] = []

    class Database:
        async def following(self, user_id):
            return [author]

        async def changes_after(self, authors, after, limit):
            reads.append(after)
            if len(reads) == 1:
                page = [posts[i] for i in range(1001, 1502) if i != late]
                return page, 1099
            session.on_post(Delivery(late, author, post_frame(posts[late].to_json()), None))
            return [p for i, p in posts.items() if i > after][:limit], 1600

    async def scenario() -> list[bytes]:
        socket = WrittenAtOnce()
        nonlocal session
        session = FeedSession(
            99,
            socket,
            db=Database(),
            fanout=BoundAtOnce(),
            metrics=Metrics(),
            settings=Settings(),
            on_closed=lambda _: None,
        )
        session.start(since=1000)
        await asyncio.wait_for(session._sync_task, 5)
        return socket.frames

    session: FeedSession | None = None
    frames = asyncio.run(scenario())
    sent = [
        json.loads(frame).get("post", {}).get("id") or json.loads(frame).get("id")
        for frame in frames
    ]
    assert reads[:2] == [1000, 1099]
    assert sorted(i for i in sent if i) == list(range(1001, 1601))  # each once, 1100 too


def test_an_ended_log_in_reaches_its_watchers_once_and_is_forgotten_after_the_window():
    """Revocations' bookkeeping alone (no polling): a watcher added after the end is still
    called, each watcher once, and an id is dropped one token lifetime after it was last read."""
    from unittest import mock

    from feed_app.revocations import Revocations

    async def scenario() -> None:
        revocations = Revocations(db=None, token_ttl=60)  # type: ignore[arg-type]
        calls: list[str] = []
        revocations.watch(5, lambda: calls.append("before"))
        revocations.watch(6, lambda: calls.append("other log-in"))
        revocations.ended({5})
        revocations.ended({5})
        revocations.watch(5, lambda: calls.append("after"))
        await asyncio.sleep(0)
        assert calls == ["before", "after"] and revocations.is_ended(5)
        assert not revocations.is_ended(6)
        later = time.monotonic() + revocations.window + 1
        with mock.patch("time.monotonic", return_value=later):
            revocations._forget_old()
        assert not revocations.is_ended(5)

    asyncio.run(scenario())


# --- one frame per post, written to every socket ------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_the_prebuilt_frame_is_what_tornado_would_send(size):
    """Proves: wire.websocket_text_frame gives exactly the bytes of tornado's own frame writer for
    a server's text message (unmasked, uncompressed), for each of the three length encodings."""
    written: list[bytes] = []

    class Stream:
        def write(self, data: bytes) -> None:
            written.append(bytes(data))

    # Only the frame writer is exercised: it reads these attributes, nothing of a connection.
    protocol = tornado.websocket.WebSocketProtocol13.__new__(tornado.websocket.WebSocketProtocol13)
    protocol.mask_outgoing, protocol._wire_bytes_out, protocol.stream = False, 0, Stream()
    payload = (b'{"type":"post","text":"' + b"x" * size)[:size]
    protocol._write_frame(True, 0x1, payload)
    assert wire.websocket_text_frame(payload) == written[0]


def buffered_pair() -> tuple[tornado.iostream.IOStream, socket.socket]:
    """A server-side stream and its peer, with small kernel buffers so that they fill quickly."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return tornado.iostream.IOStream(ours), theirs


def test_send_or_buffer_sends_at_once_then_queues_in_order_behind_what_waits():
    """Proves: with nothing waiting in the stream, a frame goes to the kernel at once (None, no
    future); once the kernel takes no more, the rest of that frame and every frame after it wait
    in the stream's buffer, even after the kernel has room again (the peer read some), and the
    peer reads every byte once, in order."""

    async def scenario() -> None:
        stream, peer = buffered_pair()
        frames = [wire.websocket_text_frame(b"%05d" % i * 200) for i in range(100)]
        results = [send_or_buffer(stream, frame) for frame in frames[:50]]
        assert results[0] is None
        waiting = next(i for i, result in enumerate(results) if result is not None)
        assert all(result is not None for result in results[waiting:]), "none jumps the queue"
        received = peer.recv(8192)  # room in the kernel, while the stream still holds frames
        results += [send_or_buffer(stream, frame) for frame in frames[50:]]
        reader = tornado.iostream.IOStream(peer)
        rest = sum(map(len, frames)) - len(received)
        received += await asyncio.wait_for(reader.read_bytes(rest), 10)
        assert received == b"".join(frames)
        pending = [result for result in results if result is not None]
        await asyncio.wait_for(asyncio.gather(*pending), 10)  # drained: each one resolved
        assert send_or_buffer(stream, frames[0]) is None  # empty again: straight to the kernel
        stream.close()
        with pytest.raises(tornado.iostream.StreamClosedError):
            send_or_buffer(stream, frames[0])
        reader.close()

    asyncio.run(scenario())


def test_send_or_buffer_leaves_other_streams_to_their_own_write():
    """Proves: a stream of another kind (SSLIOStream encrypts in write()) is never written to
    underneath: the frame goes through its write(), which returns a future."""

    class OtherStream(tornado.iostream.IOStream):
        pass

    async def scenario() -> None:
        ours, peer = socket.socketpair()
        stream = OtherStream(ours)
        assert send_or_buffer(stream, b"frame") is not None
        assert peer.recv(16) == b"frame"
        stream.close()
        peer.close()

    asyncio.run(scenario())


class WritesRecorded(WrittenAtOnce):
    """Keeps each write as it came: one write may carry several whole frames."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write_prebuilt(self, frame: bytes) -> None:
        self.writes.append(frame)


def live_session(socket, metrics: Metrics, following: set[int]) -> FeedSession:
    session = FeedSession(
        99,
        socket,
        db=None,
        fanout=BoundAtOnce(),
        metrics=metrics,
        settings=Settings(),
        on_closed=lambda _: None,
    )
    session.following = following
    session._enter(SessionPhase.SYNCING)
    session._release_held()  # live, with nothing held
    return session


def whole_frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked websocket frames one after another in data."""
    payloads = []
    while data:
        size = data[1] & 0x7F
        start = {126: 4, 127: 10}.get(size, 2)
        if size >= 126:
            size = int.from_bytes(data[2:start], "big")
        payloads.append(data[start : start + size])
        data = data[start + size :]
    return payloads


def test_posts_delivered_together_go_out_in_one_write_each_once_in_order():
    """FeedSession.on_posts (process mode, several posts from one read of the broker): the ones
    the feed shows and has not sent, in their order, as whole frames in one write; a post of an
    author not followed and a duplicate are left out, as on_post leaves them out."""
    followed, other, own = 7, 8, 99

    def delivery(version: int, author: int) -> Delivery:
        return Delivery(version, author, post_frame({"id": version}), None)

    async def scenario() -> tuple[WritesRecorded, Metrics]:
        socket, metrics = WritesRecorded(), Metrics()
        session = live_session(socket, metrics, {followed})
        session.on_post(delivery(10, followed))
        batch = [(11, followed), (12, other), (10, followed), (13, own), (14, followed)]
        session.on_posts([delivery(v, a) for v, a in batch])
        return socket, metrics

    socket, metrics = asyncio.run(scenario())
    assert len(socket.writes) == 2
    assert [json.loads(frame)["post"]["id"] for frame in whole_frames(socket.writes[1])] == [
        11,
        13,
        14,
    ]
    assert metrics.deliveries == 4


def test_posts_delivered_together_before_the_feed_is_live_are_held_in_order():
    """Before its first sync has sent the history, a session holds live posts; ones delivered
    together are held like ones delivered alone, and written in their order once it is live."""

    async def scenario() -> WritesRecorded:
        socket = WritesRecorded()
        session = FeedSession(
            99,
            socket,
            db=None,
            fanout=BoundAtOnce(),
            metrics=Metrics(),
            settings=Settings(),
            on_closed=lambda _: None,
        )
        session.following = {7}
        session._enter(SessionPhase.SYNCING)
        session.on_posts([Delivery(v, 7, post_frame({"id": v}), None) for v in (21, 22, 20)])
        assert socket.writes == []
        session._release_held()
        return socket

    socket = asyncio.run(scenario())
    assert [json.loads(websocket_payload(w))["post"]["id"] for w in socket.writes] == [21, 22, 20]


class WritesPending(WritesRecorded):
    """A socket whose kernel buffer is full: every write waits, until `drain`."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[asyncio.Future] = []

    def write_prebuilt(self, frame: bytes) -> asyncio.Future:
        super().write_prebuilt(frame)
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]

    def drain(self) -> None:
        for written in self.pending:
            written.set_result(None)


def test_posts_written_together_count_toward_the_slow_client_bound_one_frame_each():
    """The 4008 bound counts frames not yet taken by the client: a write of three posts
    together counts three, and gives them back once it has left."""

    async def scenario() -> tuple[int, int, int]:
        socket = WritesPending()
        session = live_session(socket, Metrics(), {7})
        session.on_posts([Delivery(v, 7, post_frame({"id": v}), None) for v in (31, 32, 33)])
        waiting = session._unsent_frames, session._unsent_bytes
        socket.drain()
        await asyncio.sleep(0)  # the done callbacks
        return *waiting, session._unsent_frames

    frames, size, after = asyncio.run(scenario())
    assert (frames, after) == (3, 0)
    assert size > 3 * len(post_frame({"id": 31}))  # the frames with their headers
