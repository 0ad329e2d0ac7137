"""/metrics: an instance with several worker processes answers with the sum of all of them,
whichever worker takes the scrape; the flushed counts match what prometheus_client would count."""

from __future__ import annotations

import asyncio
import collections
import re
import signal

import prometheus_client
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from feed_app.metrics import GAUGES as EXPORTED_GAUGES
from feed_app.metrics import LATENCY, LATENCY_BOUNDS, Exporter, Metrics
from tests.conftest import EVENT_LOOP
from tests.faults import ServiceProcess
from tests.support import Api

# "<date> <time> <pid> tornado.access <status> GET <path> ...", as run.py formats its log.
ACCESS_LINE = re.compile(r"^\S+ \S+ (\d+) tornado\.access (\d{3}) GET (\S+)", re.M)
GAUGES = ("feed_open_sessions", "feed_fanout_subscribers", "feed_fanout_bindings")
MOST_SOCKETS = 64  # opened at most until both workers hold some; the kernel spreads accepts

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(base_url: str) -> Samples:
    response = await AsyncHTTPClient().fetch(base_url + "/metrics", request_timeout=5)
    return parse(response.body.decode())


def pids_serving(instance: ServiceProcess, status: str, path: str) -> list[int]:
    """The worker pid of each request the access log shows, in order."""
    log = instance.log_path.read_text(errors="replace")
    return [
        int(pid)
        for pid, seen_status, seen_path in ACCESS_LINE.findall(log)
        if seen_status == status and seen_path.startswith(path)
    ]


def differences(samples: Samples, expected: dict[str, float]) -> dict[str, tuple]:
    return {
        name: (samples.get((name, ())), value)
        for name, value in expected.items()
        if samples.get((name, ())) != value
    }


def forget_unpublished_changes(db_dsn: str) -> None:
    with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM outbox")
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_every_worker_answers_with_the_sum_of_all_workers(processes, settings, db_dsn):
    """Proves: with `--workers 2`, sessions on both workers, posts created and hashes computed on
    either, every scrape (answered by either worker, once each has flushed) shows the instance's
    totals, not the answering worker's own; the instance's name comes from FEED_INSTANCE_NAME."""
    # A long lease: with the tests' 1 s one, a confirm slowed by a busy broker lets the other
    # worker's sweep publish the post again (allowed: sessions drop it), and the exact count of
    # publishes below would be off.
    instance = processes(
        args=("--workers", "2"), FEED_INSTANCE_NAME="metrics-test", FEED_OUTBOX_LEASE="30"
    )
    # Earlier tests on this database leave outbox rows behind (their services were killed or
    # cut off from the broker). A new instance's first sweep publishes them, as it should, and
    # they would count among this test's publishes.
    forget_unpublished_changes(db_dsn)
    await instance.start(ready="/readyz")
    api = Api(instance.base_url)
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    feeds = []
    while len(set(pids_serving(instance, "101", "/post/feed/"))) < 2 or len(feeds) < 4:
        assert len(feeds) < MOST_SOCKETS, "every feed socket went to one worker"
        feeds.append(await api.open_feed(reader))
    sessions = collections.Counter(pids_serving(instance, "101", "/post/feed/"))
    posts = 3
    for _ in range(posts):
        await api.post(author)
    for feed in feeds:
        await feed.wait_posts(posts)

    expected = {
        "feed_open_sessions": len(feeds),
        "feed_deliveries_total": posts * len(feeds),
        "feed_create_to_send_seconds_count": posts * len(feeds),
        "feed_publishes_total": posts,
        "feed_posts_created_total": posts,
        "feed_post_commits_total": posts,  # one after another: a batch each
        "feed_password_hashes_total": 4,  # two registrations, two logins
        "feed_workers": 2,
        "feed_fanout_subscribers": len(feeds),
    }
    # Each worker flushes its counts every second: wait for the sums (bounded)...
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while differences(samples := await scrape(instance.base_url), expected):
        assert loop.time() < deadline, (
            f"no sums in 10 s; (scraped, expected): {differences(samples, expected)}, "
            f"sessions per worker {dict(sessions)}"
        )
        await asyncio.sleep(0.1)
    labels = {
        "event_loop": EVENT_LOOP,  # what run.py chose, read from the running loop
        "fanout": settings.fanout,
        "name": "metrics-test",
        "workers": "2",
    }
    assert samples[("feed_instance_info", tuple(sorted(labels.items())))] == 1

    # ...then every scrape shows them, until each worker has answered a few.
    before = len(pids_serving(instance, "200", "/metrics"))
    for _ in range(60):
        samples = await scrape(instance.base_url)
        assert not differences(samples, expected), differences(samples, expected)
        answered = collections.Counter(pids_serving(instance, "200", "/metrics")[before:])
        if len(answered) == 2 and min(answered.values()) >= 3:
            break
    assert len(answered) == 2, f"scrapes answered by {dict(answered)} only"
    instance.signal(signal.SIGTERM)
    assert await instance.wait_exit(15) == 0, instance.log_tail()


def test_flushed_counts_render_as_prometheus_client_counts_them():
    """Proves: the plain counts the hot paths keep, flushed in two rounds (as the timer does),
    render as the same histogram and counter that prometheus_client's own observe()/inc() give,
    bucket boundaries included."""
    metrics = Metrics()
    exporter = Exporter(metrics, lambda: dict.fromkeys(EXPORTED_GAUGES, 0), lambda: None, {})
    registry = prometheus_client.CollectorRegistry()
    reference = prometheus_client.Histogram(*LATENCY, buckets=LATENCY_BOUNDS, registry=registry)
    deliveries = prometheus_client.Counter("feed_deliveries_total", "", registry=registry)
    for batch in ([0.0005, 0.001, 0.003, 0.08], [0.08, 0.25, 0.3, 1.0, 7.0]):
        for latency in batch:
            metrics.deliveries += 1
            metrics.delivery_latency.observe(latency)
            deliveries.inc()
            reference.observe(latency)
        exporter.flush()

    def wanted(samples: Samples) -> Samples:
        return {
            key: value
            for key, value in samples.items()
            if key[0].startswith((LATENCY[0], "feed_deliveries_total"))
            and not key[0].endswith("_created")
        }

    rendered = wanted(parse(exporter.render(None).decode()))
    counted = wanted(parse(prometheus_client.generate_latest(registry).decode()))
    assert rendered == pytest.approx(counted)
    assert rendered[(LATENCY[0] + "_count", ())] == 9
