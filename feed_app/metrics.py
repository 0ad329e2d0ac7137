"""/metrics for the whole instance: every worker process that `run.py --workers N` forks counts on
its own, and any of them answers a scrape with the sum of all, through prometheus_client's
multiprocess mode (each process writes its values to mmap'ed files in PROMETHEUS_MULTIPROC_DIR,
and the answering one merges the files).

The hot paths do not call prometheus_client: in multiprocess mode Counter.inc() and
Histogram.observe() take a lock and write the mmap on every call, which costs a delivery many
times what a plain attribute increment and a bisect do, and a share of its CPU that would show in
throughput (bench/metrics_cost.py measures both; BENCHMARKS.md, "Metrics on the delivery path",
has the figures). So sessions, the relay and the limits count in plain attributes of `Metrics`,
and `Exporter` adds what changed since its last flush to the prometheus_client metrics every
second, and once more in the worker that answers a scrape. A scrape shows the other workers'
counts as of their last flush, at most a second old.

Without PROMETHEUS_MULTIPROC_DIR (the tests' in-process services) each Exporter keeps its values
in memory and a scrape shows that one process.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections.abc import Callable, Iterable, Iterator

import prometheus_client
import tornado.ioloop
from prometheus_client import multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0  # seconds; how stale another worker's counts can be in a scrape
LATENCY_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5]

# Metrics attribute -> (metric name, help). Counters are summed over the workers.
COUNTERS = {
    "deliveries": ("feed_deliveries_total", "posts written to feed sockets"),
    "publishes": ("feed_publishes_total", "posts confirmed by the broker"),
    "posts_created": ("feed_posts_created_total", "posts committed"),
    "post_commits": (
        "feed_post_commits_total",
        "transactions that committed new posts (group commit: several posts each)",
    ),
    "broker_reconnects": ("feed_broker_reconnects_total", "AMQP reconnections"),
    "slow_client_closes": ("feed_slow_client_closes_total", "sockets closed with 4008"),
    "password_hashes": ("feed_password_hashes_total", "scrypt hashes computed"),
    "limit_refusals": ("feed_limit_refusals_total", "requests refused by a limit"),
    "path_breaks": (
        "feed_delivery_path_breaks_total",
        "times a process found peers' heartbeats not reaching it",
    ),
    "path_resyncs": (
        "feed_delivery_path_resyncs_total",
        "times every session read what it missed, for a break that healed or a lost heartbeat",
    ),
}
LATENCY = ("feed_create_to_send_seconds", "post creation to websocket write")
# Gauges each worker sets from its own state: a scrape shows the sum over the live workers.
GAUGES = {
    "feed_open_sessions": "open feed sockets",
    "feed_fanout_subscribers": "sessions known to the fan-out",
    "feed_fanout_bindings": "bindings the fan-out holds on the broker",
    "feed_workers": "worker processes serving",
    "feed_delivery_path_broken": "worker processes whose peers' heartbeats do not reach them",
    "feed_delivery_path_silent_peers": "peers whose heartbeats do not reach this process",
}
BROKER_CONNECTIONS = ("feed_broker_connections", "worker processes connected to this RabbitMQ node")


class Histogram:
    """Counts per bucket (upper bounds inclusive, as Prometheus's `le`) and the sum."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.total += value * count


class Metrics:
    """What the hot paths count, in plain attributes (read and flushed by `Exporter`)."""

    def __init__(self) -> None:
        self.deliveries = 0
        # Creation time (ms) -> writes of it in this loop turn, for delivery_latency.
        self._written: dict[int, int] = {}
        self.publishes = 0
        self.posts_created = 0
        self.post_commits = 0
        self.broker_reconnects = 0
        self.slow_client_closes = 0
        self.password_hashes = 0
        self.limit_refusals = 0
        self.path_breaks = 0
        self.path_resyncs = 0
        self.delivery_latency = Histogram(LATENCY_BOUNDS)

    def delivered(self, created_ms: int | None) -> None:
        """A post written to a socket. Its latency (from its creation) is observed once per
        post and loop turn, at the turn's end: one post goes to hundreds of sockets in one turn,
        and a clock read and a histogram update per socket cost a noticeable share of a write.
        Every write it stands for happened before that moment."""
        self.deliveries += 1
        if created_ms:
            written = self._written
            if not written:
                asyncio.get_running_loop().call_soon(self._observe_written)
            written[created_ms] = written.get(created_ms, 0) + 1

    def _observe_written(self) -> None:
        written, self._written = self._written, {}
        now = time.time()
        for created_ms, count in written.items():
            self.delivery_latency.observe(max(0.0, now - created_ms / 1000), count)


class Exporter:
    """One per process: flushes `Metrics` and the gauges that `read_gauges` returns (names of
    GAUGES) into prometheus_client, and renders a scrape. `broker_node` is the RabbitMQ node
    (host:port) this process is connected to, or None. `info` labels `feed_instance_info`."""

    CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest() writes

    def __init__(
        self,
        metrics: Metrics,
        read_gauges: Callable[[], dict[str, float]],
        broker_node: Callable[[], str | None],
        info: dict[str, str],
    ) -> None:
        self.directory = os.environ.get(MULTIPROC_DIR)
        if self.directory and values.ValueClass is values.MutexValue:
            raise RuntimeError(
                f"{MULTIPROC_DIR} was set after prometheus_client was imported (it chooses its"
                " multiprocess mode once, at import): set it before importing feed_app.app"
            )
        self.metrics = metrics
        self._read_gauges = read_gauges
        self._broker_node = broker_node
        self._info = info
        # Metric objects register with no registry: in multiprocess mode a scrape reads the
        # files, and in memory it reads these objects (both in render()).
        self._counters = {
            attribute: prometheus_client.Counter(name, text, registry=None)
            for attribute, (name, text) in COUNTERS.items()
        }
        self._latency = prometheus_client.Histogram(*LATENCY, buckets=LATENCY_BOUNDS, registry=None)
        self._gauges = {
            name: prometheus_client.Gauge(name, text, multiprocess_mode="livesum", registry=None)
            for name, text in GAUGES.items()
        }
        self._broker_connections = prometheus_client.Gauge(
            *BROKER_CONNECTIONS, ["node"], multiprocess_mode="livesum", registry=None
        )
        self._flushed = dict.fromkeys(COUNTERS, 0)
        self._flushed_latency = Histogram(LATENCY_BOUNDS)
        self._node: str | None = None
        self._timer = tornado.ioloop.PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)

    def start(self) -> None:
        self.flush()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()
        self.flush()

    def flush(self) -> None:
        """Add what the counters gained since the last flush; set the gauges to their value now."""
        for attribute, counter in self._counters.items():
            value = getattr(self.metrics, attribute)
            if value != self._flushed[attribute]:
                counter.inc(value - self._flushed[attribute])
                self._flushed[attribute] = value
        self._flush_latency()
        gauges = {**self._read_gauges(), "feed_workers": 1}
        for name, gauge in self._gauges.items():
            gauge.set(gauges[name])
        node = self._broker_node()
        if node != self._node:
            # A node used before stays in the output with 0: multiprocess mode cannot remove
            # a label set.
            if self._node:
                self._broker_connections.labels(self._node).set(0)
            if node:
                self._broker_connections.labels(node).set(1)
            self._node = node

    def _flush_latency(self) -> None:
        """Histogram.observe() adds one observation to the sum and to one bucket's value; this adds
        the observations made since the last flush to the same values, a bucket at a time.
        (prometheus_client has no public call that adds several observations at once.)"""
        current, flushed = self.metrics.delivery_latency, self._flushed_latency
        if current.counts == flushed.counts:
            return
        for bucket, now, before in zip(
            self._latency._buckets, current.counts, flushed.counts, strict=True
        ):
            if now != before:
                bucket.inc(now - before)
        self._latency._sum.inc(current.total - flushed.total)
        flushed.counts, flushed.total = list(current.counts), current.total

    def render(self, outbox_backlog: int | None) -> bytes:
        """The Prometheus text for a scrape: this process's counts flushed first, then every
        worker's (or, in memory, this process's), the instance's info, and the outbox backlog
        (a count in the database, the same whichever worker reads it: read once, not summed;
        None leaves it out)."""
        self.flush()
        scrape = _Scrape(self._sources(), self._now(outbox_backlog))
        return prometheus_client.generate_latest(scrape)

    def _sources(self) -> Iterable[Collector]:
        if self.directory:
            return [multiprocess.MultiProcessCollector(None, self.directory)]
        return [
            *self._counters.values(),
            self._latency,
            *self._gauges.values(),
            self._broker_connections,
        ]

    def _now(self, outbox_backlog: int | None) -> list[Metric]:
        found: list[Metric] = [
            InfoMetricFamily("feed_instance", "this instance's name and settings", self._info)
        ]
        if outbox_backlog is not None:
            found.append(
                GaugeMetricFamily(
                    "feed_outbox_backlog", "changes not yet published", outbox_backlog
                )
            )
        return found


class _Scrape:
    """A collector over the metrics' sources and the families computed for this scrape."""

    def __init__(self, sources: Iterable[Collector], now: list[Metric]):
        self.sources = sources
        self.now = now

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()
        yield from self.now


def forget_worker(pid: int) -> None:
    """A worker exited: its gauges leave the sums (its counters stay, as counters must)."""
    multiprocess.mark_process_dead(pid)
