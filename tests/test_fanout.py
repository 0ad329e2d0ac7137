"""The fan-outs on their own, with stand-in subscribers, against the real broker."""

import asyncio
import secrets
import time

import pytest

from feed_app.broker import ProcessFanout, process_fanout
from feed_app.fanout import BrokerUnavailable
from feed_app.wire import post_frame


class QuietSubscriber:
    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    def on_post(self, delivery):
        return None

    def on_posts(self, deliveries) -> None:
        pass

    def on_follow_change(self, author_id) -> None:
        pass

    def on_fanout_lost(self) -> None:
        pass

    def on_fanout_ready(self) -> None:
        pass

    def on_overflow(self) -> None:
        pass


@pytest.mark.parametrize("fanout_mode", ["process"], indirect=True)
@pytest.mark.gen_test(timeout=30)
async def test_a_session_cancelled_while_the_process_queue_is_set_up_does_not_cancel_it(service):
    """After a reconnect the process queue binds every key its sessions follow, and sessions
    may attach meanwhile, waiting on the same bindings. One of them closing (its wait is
    cancelled) must not cancel the set-up: the process would deliver nothing until the next
    reconnect. A second process fan-out on the live connection plays the reconnect."""
    fanout = ProcessFanout(service.broker)
    author = 10**13 + secrets.randbelow(10**12)
    with pytest.raises(BrokerUnavailable):
        await fanout.attach(QuietSubscriber(author + 1), [author])  # known; set up later
    barrier = asyncio.Event()  # holds the bind barrier, as a busy setup channel would
    confirm_bound = fanout._confirm_bound

    async def confirm_bound_later(setup, futures):
        await barrier.wait()
        await confirm_bound(setup, futures)

    fanout._confirm_bound = confirm_bound_later
    setting_up = asyncio.ensure_future(fanout._set_up(service.broker.connection))
    await wait_until(lambda: fanout.bindings > 0)
    newcomer = asyncio.ensure_future(fanout.attach(QuietSubscriber(author + 2), [author]))
    await asyncio.sleep(0.05)
    newcomer.cancel()  # its socket closed while it waited
    barrier.set()
    await asyncio.wait_for(setting_up, 5)
    try:
        assert fanout.is_ready
    finally:
        fanout.on_broker_lost()


async def wait_until(condition, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.01)


class RecordingSubscriber(QuietSubscriber):
    def __init__(self, user_id: int) -> None:
        super().__init__(user_id)
        self.posts: list[int] = []

    def on_post(self, delivery):
        self.posts.append(delivery.version)
        return None


@pytest.mark.parametrize("fanout_mode", ["process"], indirect=True)
@pytest.mark.gen_test(timeout=30)
async def test_idle_authors_are_unbound_one_by_one_and_one_followed_again_stays_bound(
    service, monkeypatch
):
    """Authors left without a local follower are unbound after UNBIND_AFTER, one unbind at a
    time. A follower arriving while that goes on gets its authors bound, whether their unbind
    had been sent already or not."""
    monkeypatch.setattr(process_fanout, "UNBIND_AFTER", 0.1)
    fanout = ProcessFanout(service.broker)
    await fanout._set_up(service.broker.connection)
    try:
        base = 10**13 + secrets.randbelow(10**12)
        authors = [base + n for n in range(300)]
        leaving = QuietSubscriber(base - 1)
        await fanout.attach(leaving, authors)
        fanout.detach(leaving)
        await wait_until(lambda: fanout.unbinds_out > 0)  # unbinding has begun
        coming = RecordingSubscriber(base - 2)
        again = [authors[0], authors[-1]]  # one unbound already, one not yet
        await fanout.attach(coming, again)
        await wait_until(lambda: fanout.bindings == 3 and fanout.unbinds_out == 0, timeout=20)
        for post_id, author in enumerate(again, start=base):
            frame = post_frame({"id": post_id})
            await service.broker.publish_post(author, post_id, frame, created_ms=0)
        await wait_until(lambda: len(coming.posts) == 2)
        assert coming.posts == [base, base + 1]
    finally:
        fanout.on_broker_lost()


@pytest.mark.parametrize("fanout_mode", ["process"], indirect=True)
@pytest.mark.gen_test(timeout=30)
async def test_an_unbind_due_after_the_broker_stopped_is_let_go(service, monkeypatch):
    """broker.stop() closes the unbind channels without telling the fan-out (a shutdown is not
    a loss to recover from); the unbind timer that fires after it must not use them."""
    monkeypatch.setattr(process_fanout, "UNBIND_AFTER", 0.1)
    fanout = ProcessFanout(service.broker)
    await fanout._set_up(service.broker.connection)
    leaving = QuietSubscriber(10**13 + secrets.randbelow(10**12))
    await fanout.attach(leaving, [leaving.user_id + 1])
    fanout.detach(leaving)
    await service.broker.stop()
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        await wait_until(lambda: fanout._unbind_timer is None)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


class BatchRecordingSubscriber(QuietSubscriber):
    """Records each call: on_post as a batch of one. The first post blocks the event loop for a
    moment, as a long burst would, so that what the broker delivers meanwhile piles up in the
    connection's socket and is read at once."""

    def __init__(self, user_id: int) -> None:
        super().__init__(user_id)
        self.calls: list[list[int]] = []

    def on_post(self, delivery):
        if not self.calls:
            time.sleep(0.3)
        self.calls.append([delivery.version])
        return None

    def on_posts(self, deliveries) -> None:
        self.calls.append([delivery.version for delivery in deliveries])


@pytest.mark.parametrize("fanout_mode", ["process"], indirect=True)
@pytest.mark.gen_test(timeout=30)
async def test_posts_read_in_one_turn_reach_a_subscriber_together_and_in_order(service):
    """Process mode fans out the first message of a loop turn at once and the ones after it,
    from the same read of the broker, at the turn's end, each subscriber's posts together
    (FeedSession.on_posts writes them with one send): of two authors, in the order published,
    each once, and nothing of an author not followed."""
    fanout = ProcessFanout(service.broker)
    await fanout._set_up(service.broker.connection)
    try:
        base = 10**13 + secrets.randbelow(10**12)
        first, second, other = base, base + 1, base + 2
        subscriber = BatchRecordingSubscriber(base - 1)
        await fanout.attach(subscriber, [first, second])
        await fanout.attach(QuietSubscriber(base - 2), [other])
        authors = [first, first, other, second, first, second]
        confirms = [
            service.broker.publish_post(author, version, post_frame({"id": version}), 0)
            for version, author in enumerate(authors, start=base)
        ]
        await asyncio.gather(*confirms)
        followed = [v for v, a in enumerate(authors, start=base) if a != other]
        await wait_until(lambda: sum(map(len, subscriber.calls)) == len(followed))
        assert [v for call in subscriber.calls for v in call] == followed
        assert max(map(len, subscriber.calls)) > 1  # read while the loop was blocked: together
    finally:
        fanout.on_broker_lost()
