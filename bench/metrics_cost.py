"""What counting one delivery costs: today's plain attributes against prometheus_client's
multiprocess Counter.inc() and Histogram.observe(), with timeit, in one process.

    .venv/bin/python bench/metrics_cost.py [--number 200000] [--repeat 5]

A delivery increments a counter and observes its create->send latency (sessions.py, _deliver).
Prints microseconds per call (the best of --repeat runs) and, per delivery, the cost of each way
as a share of the service's CPU per delivery (BENCHMARKS.md). Also the cost of one
Exporter.flush(), which runs once a second per process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import timeit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

CPU_PER_DELIVERY_US = 43.0  # BENCHMARKS.md, "Results": followers, 23 posts/s
LATENCY = 0.08  # seconds: about the create->receive p50 at 10,000 deliveries/s
GAUGES = ("feed_open_sessions", "feed_fanout_subscribers", "feed_fanout_bindings")


def per_call_us(statement: str, names: dict, number: int, repeat: int) -> float:
    return min(timeit.repeat(statement, globals=names, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is kept")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="metrics-cost-")
    # prometheus_client chooses its multiprocess mode when first imported: set the directory first.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        measure(args.number, args.repeat)
    finally:
        shutil.rmtree(directory)


def measure(number: int, repeat: int) -> None:
    import prometheus_client

    from feed_app.metrics import LATENCY_BOUNDS, Exporter, Metrics

    metrics = Metrics()
    names = {
        "metrics": metrics,
        "latency": LATENCY,
        "counter": prometheus_client.Counter("c", "c", registry=None),
        "histogram": prometheus_client.Histogram("h", "h", buckets=LATENCY_BOUNDS, registry=None),
    }
    timings = {
        "plain: metrics.deliveries += 1": "metrics.deliveries += 1",
        "plain: metrics.delivery_latency.observe()": "metrics.delivery_latency.observe(latency)",
        "multiprocess: Counter.inc()": "counter.inc()",
        "multiprocess: Histogram.observe()": "histogram.observe(latency)",
    }
    found = {label: per_call_us(code, names, number, repeat) for label, code in timings.items()}
    for label, us in found.items():
        print(f"{label:<45} {us:7.3f} µs")
    plain = sum(us for label, us in found.items() if label.startswith("plain"))
    client = sum(us for label, us in found.items() if label.startswith("multiprocess"))
    for label, us in (("plain", plain), ("multiprocess", client)):
        share = us / CPU_PER_DELIVERY_US
        print(f"per delivery, {label:<31} {us:7.3f} µs = {share:.2%} of {CPU_PER_DELIVERY_US} µs")

    exporter = Exporter(metrics, lambda: dict.fromkeys(GAUGES, 0), lambda: None, {})
    latency = metrics.delivery_latency

    def flush_a_second_of_deliveries() -> None:
        metrics.deliveries += 10_000
        latency.counts[6] += 10_000
        latency.total += 10_000 * LATENCY
        exporter.flush()

    flush_us = min(timeit.repeat(flush_a_second_of_deliveries, number=100, repeat=repeat)) * 1e4
    print(f"{'Exporter.flush() after 10,000 deliveries':<45} {flush_us:7.1f} µs (once a second)")


if __name__ == "__main__":
    main()
