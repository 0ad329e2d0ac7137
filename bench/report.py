"""Output of a run: the per-second time series, the end-of-run table, results JSON and the chart."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from bench.feedclient import Tracker, percentile


def time_series(tracker: Tracker, start: float) -> list[dict[str, Any]]:
    """Per second since the posting phase began: posts sent, deliveries expected (by send time)
    and received (by receive time), and the latency percentiles of that second's deliveries."""
    seconds: dict[int, dict[str, Any]] = {}

    def bucket(t: float) -> dict[str, Any]:
        second = max(0, int(t - start))
        return seconds.setdefault(
            second, {"t": second, "posts": 0, "expected": 0, "delivered": 0, "lat": []}
        )

    for record in tracker.posts:
        entry = bucket(record.started)
        entry["posts"] += 1
        entry["expected"] += len(record.expected)
        for session, received in record.received.items():
            got = bucket(received)
            got["delivered"] += 1
            if session in record.expected:
                got["lat"].append(received - record.started)
    series = []
    for second in sorted(seconds):
        entry = seconds.pop(second)
        latencies = sorted(entry.pop("lat"))
        for p in (50, 95, 99):
            value = percentile(latencies, p)
            entry[f"p{p}_ms"] = None if value is None else round(value * 1000, 3)
        series.append(entry)
    return series


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text} {unit}".rstrip()


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def _percentiles(stats: dict[str, Any]) -> str:
    return " / ".join(_fmt(stats.get(k)) for k in ("p50", "p95", "p99", "max")) + " ms"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines of the end-of-run table."""
    cfg, pop = results["config"], results["population"]
    d, res, rmq = results["deliveries"], results["resources"], results["rabbitmq"]
    sessions = results["sessions"]
    rows = [
        (
            "population",
            f"{pop['users']:,} users, {pop['follows']:,} follows (top author"
            f" {pop['top_author_followers']:,} followers), {pop['sessions']:,} sessions",
        ),
        (
            "load",
            f"{cfg['rate']} posts/s for {cfg['duration']} s, authors {cfg['author_choice']},"
            f" {cfg['workers']} worker(s), text {cfg['text_size']} chars",
        ),
        (
            "sessions ready",
            f"{sessions['ready']:,} / {pop['sessions']:,} in {sessions['seconds_to_all_ready']} s"
            f" ({_fmt(sessions['ready_per_s'])}/s)",
        ),
        ("session ready p50/p95/p99/max", _percentiles(sessions["ready_ms"])),
        (
            "session set-up CPU: service / RabbitMQ",
            f"{_fmt(sessions['service_cpu_ms_per_session'])} /"
            f" {_fmt(sessions['rabbitmq_cpu_ms_per_session'])} ms per session",
        ),
        (
            "posts sent / accepted (201)",
            f"{results['posts']['sent']:,} / {results['posts']['accepted']:,}"
            f" ({_fmt(results['posts']['achieved_rate'])} posts/s)",
        ),
        ("post request p50/p95/p99/max", _percentiles(results["posts"]["request_ms"])),
        (
            "deliveries received / expected",
            f"{d['delivered']:,} / {d['expected']:,} (mean fan-out {_fmt(d['mean_fan_out'])})",
        ),
        (
            "deliveries/s achieved / expected",
            f"{_fmt(d['achieved_per_s'])} / {_fmt(d['expected_per_s'])}",
        ),
        ("create->receive p50/p95/p99/max", _percentiles(results["latency_ms"])),
        ("LOST (open sessions)", _fmt(d["lost"])),
        ("DUPLICATED", _fmt(d["duplicated"])),
        ("undelivered to closed sessions", _fmt(d["lost_to_closed_sessions"])),
        ("unexpected deliveries", _fmt(d["unexpected"])),
        ("frames of other posts (history)", _fmt(d["history_frames"])),
        ("errors", _errors(results["errors"])),
        (
            "service RSS before / with sessions",
            f"{_mib(res['service_rss_before'])} / {_mib(res['service_rss_sessions'])}",
        ),
        ("service memory per session", _fmt(res["service_bytes_per_session"], "bytes")),
        ("service CPU per delivery", _fmt(res["service_cpu_us_per_delivery"], "µs")),
        ("RabbitMQ CPU per delivery", _fmt(res["rabbitmq_cpu_us_per_delivery"], "µs")),
        ("load-test client CPU", _fmt(res["client_cpu_percent"], "% of one core")),
        (
            "RabbitMQ queues (run's / all)",
            f"{_fmt(rmq.get('session_queues'))} / {_fmt(rmq.get('queues_total'))}",
        ),
        (
            "RabbitMQ memory: RSS / queue procs",
            f"{_mib(res.get('rabbitmq_rss'))} / {_mib(rmq.get('queue_procs_bytes'))}",
        ),
        (
            "RabbitMQ memory per session queue",
            _fmt(rmq.get("bytes_per_session_queue"), "bytes"),
        ),
    ]
    ceilings = results.get("ceilings") or {}
    if ceilings:
        bare, bare_pika = ceilings.get("bare_push", {}), ceilings.get("pika", {})
        rows += [
            ("ceiling: bare push deliveries/s", _fmt(bare.get("deliveries_per_s"))),
            ("ceiling: bare pika messages/s", _fmt(bare_pika.get("messages_per_s"))),
            ("service / lower ceiling", _fmt(ceilings.get("ratio_to_lower"))),
        ]
    log = results.get("service_log") or {}
    if log:
        rows.append(("service log problem lines", _fmt(log.get("problems"))))
    return rows


def _errors(errors: dict[str, dict[str, int]]) -> str:
    parts = [
        f"{kind}: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
        for kind, counts in errors.items()
        if counts
    ]
    return "; ".join(parts) or "none"


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    width = max(len(label) for label, _ in rows)
    print()
    print("=" * (width + 50))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print("=" * (width + 50))


def write_json(results: dict[str, Any], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def write_chart(results: dict[str, Any], path: pathlib.Path) -> None:
    """Latency percentiles (top) and throughput (bottom) per second of the posting phase."""
    import matplotlib  # imported here: only runs that draw a chart need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = results["time_series"]
    t = [entry["t"] for entry in series]
    figure, (latency, throughput) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for p, style in ((50, "-"), (95, "--"), (99, ":")):
        values = [e[f"p{p}_ms"] if e[f"p{p}_ms"] is not None else math.nan for e in series]
        latency.plot(t, values, style, marker=".", label=f"p{p}")
    latency.set_ylabel("create → receive (ms)")
    latency.set_yscale("log")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(loc="upper left")
    throughput.plot(t, [e["delivered"] for e in series], marker=".", label="delivered/s")
    throughput.plot(t, [e["expected"] for e in series], "--", label="expected/s (by send time)")
    throughput.set_ylabel("deliveries per second")
    throughput.set_xlabel("seconds since the first post")
    throughput.grid(True, alpha=0.3)
    posts = throughput.twinx()
    posts.plot(t, [e["posts"] for e in series], color="grey", alpha=0.5, label="posts/s")
    posts.set_ylabel("posts per second")
    posts.set_ylim(bottom=0, top=max([e["posts"] for e in series] + [1]) * 1.2)
    throughput.set_ylim(bottom=0)
    lines = throughput.get_legend_handles_labels()
    extra = posts.get_legend_handles_labels()
    throughput.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left")
    cfg, d = results["config"], results["deliveries"]
    title = (
        f"{results['population']['sessions']:,} sessions, {cfg['rate']} posts/s,"
        f" {cfg['workers']} worker(s): lost {d['lost']}, duplicated {d['duplicated']}"
    )
    ceilings = results.get("ceilings") or {}
    if ceilings.get("ratio_to_lower") is not None:
        title += f", {ceilings['ratio_to_lower']:.2f} of the lower ceiling"
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
