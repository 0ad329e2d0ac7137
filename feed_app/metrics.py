"""Process metrics in the Prometheus text format, without a client library: a few counters, gauges
read on demand, and one latency histogram are all this service needs."""

from __future__ import annotations

import bisect


class Histogram:
    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {running}"]
        return lines


class Metrics:
    def __init__(self) -> None:
        self.deliveries = 0
        self.publishes = 0
        self.broker_reconnects = 0
        self.slow_client_closes = 0
        self.password_hashes = 0
        self.limit_refusals = 0
        self.delivery_latency = Histogram(
            [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5]
        )

    def render(self, gauges: dict[str, float]) -> str:
        """The counters and histogram, plus gauges the caller reads at scrape time."""
        counters = {
            "feed_deliveries_total": ("posts written to feed sockets", self.deliveries),
            "feed_publishes_total": ("posts confirmed by the broker", self.publishes),
            "feed_broker_reconnects_total": ("AMQP reconnections", self.broker_reconnects),
            "feed_slow_client_closes_total": ("sockets closed with 4008", self.slow_client_closes),
            "feed_password_hashes_total": ("scrypt hashes computed", self.password_hashes),
            "feed_limit_refusals_total": ("requests refused by a limit", self.limit_refusals),
        }
        lines = []
        for name, (text, value) in counters.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        name = "feed_create_to_send_seconds"
        lines += [f"# HELP {name} post creation to websocket write", f"# TYPE {name} histogram"]
        lines += self.delivery_latency.lines(name)
        return "\n".join(lines) + "\n"
