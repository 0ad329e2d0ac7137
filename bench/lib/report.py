"""Output of a run: progress lines, the per-second time series, the end-of-run table (a column
per fan-out mode), results JSON and the chart."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

from bench.lib.feedclient import Tracker, percentile


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


async def while_reporting(work: Any, line: Callable[[float], str], quiet: bool) -> None:
    """Await `work`, printing line(elapsed) once a second meanwhile (unless quiet)."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    try:
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if not task.done() and not quiet:
                print(line(time.monotonic() - started), flush=True)
        await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


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


def _run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines of one mode's column."""
    phase, sessions = run.get("phase") or {}, run["sessions"]
    res = phase.get("resources", {})
    mem, rmq = run["memory"], run["rabbitmq"]
    rows = [
        (
            "sessions ready",
            f"{sessions['ready']:,} / {sessions['opened']:,} in"
            f" {sessions['seconds_to_all_ready']} s ({_fmt(sessions['ready_per_s'])}/s)",
        ),
        ("session ready p50/p95/p99/max", _percentiles(sessions["ready_ms"])),
        (
            "session set-up CPU: service / RabbitMQ",
            f"{_fmt(sessions['service_cpu_ms_per_session'])} /"
            f" {_fmt(sessions['rabbitmq_cpu_ms_per_session'])} ms per session",
        ),
    ]
    if phase:
        rows += _phase_rows(phase)
    rows += [
        ("service CPU per delivery", _fmt(res.get("service_cpu_us_per_delivery"), "µs")),
        ("RabbitMQ CPU per delivery", _fmt(res.get("rabbitmq_cpu_us_per_delivery"), "µs")),
        ("load-test client CPU", _fmt(res.get("client_cpu_percent"), "% of one core")),
        (
            "waiting for a CPU: service / client",
            f"{_fmt(res.get('service_waiting_percent'))} / "
            f"{_fmt(res.get('client_waiting_percent'), '% of the phase')}",
        ),
        (
            "service RSS before / with sessions",
            f"{_mib(mem['service_rss_before'])} / {_mib(mem['service_rss_sessions'])}",
        ),
        ("service memory per session", _fmt(mem["service_bytes_per_session"], "bytes")),
        ("RabbitMQ RSS growth per session", _fmt(mem["rabbitmq_bytes_per_session"], "bytes")),
        ("RabbitMQ queue memory per session", _fmt(rmq.get("queue_bytes_per_session"), "bytes")),
        (
            "RabbitMQ queues: run's / all",
            f"{_fmt(rmq.get('run_queues'))} / {_fmt(rmq.get('queues_total'))}",
        ),
        (
            "RabbitMQ bindings of the run (control)",
            f"{_fmt(rmq.get('run_bindings'))} ({_fmt(rmq.get('run_control_bindings'))})",
        ),
        (
            "RabbitMQ RSS / queue procs / mnesia",
            f"{_mib(mem['rabbitmq_rss_sessions'])} / {_mib(rmq.get('queue_procs_bytes'))}"
            f" / {_mib(rmq.get('mnesia_bytes'))}",
        ),
    ]
    if run.get("saturation"):
        rows += _saturation_rows(run["saturation"])
    log = run.get("service_log") or {}
    if log:
        rows.append(("service log problem lines", _fmt(log.get("problems"))))
    return rows


def _phase_rows(phase: dict[str, Any]) -> list[tuple[str, str]]:
    posts, d = phase["posts"], phase["deliveries"]
    return _common_phase_rows(phase, posts, d) + [
        (f"{kind}s sent / accepted, ->receive p50/p95/p99/max", _by_kind(counts))
        for kind, counts in posts.get("by_kind", {}).items()
    ]


def _by_kind(counts: dict[str, Any]) -> str:
    return f"{counts['sent']:,} / {counts['accepted']:,}, {_percentiles(counts['latency_ms'])}"


def _common_phase_rows(
    phase: dict[str, Any], posts: dict[str, Any], d: dict[str, Any]
) -> list[tuple[str, str]]:
    return [
        ("posting", f"{phase['rate']:g} posts/s for {phase['duration']:g} s"),
        (
            "posts sent / accepted (201)",
            f"{posts['sent']:,} / {posts['accepted']:,} ({_fmt(posts['achieved_rate'])} posts/s)",
        ),
        ("post request p50/p95/p99/max", _percentiles(posts["request_ms"])),
        (
            "deliveries received / expected",
            f"{d['delivered']:,} / {d['expected']:,} (fan-out {_fmt(d['mean_fan_out'])})",
        ),
        (
            "deliveries/s achieved / expected",
            f"{_fmt(d['achieved_per_s'])} / {_fmt(d['expected_per_s'])}",
        ),
        ("create->receive p50/p95/p99/max", _percentiles(phase["latency_ms"])),
        ("create->write p50/p95/p99 (service)", _service_latency(phase.get("service_latency_ms"))),
        ("slowest 1%: request / to 1st receipt / drain", _tail(phase.get("tail_ms"), "slowest")),
        ("all: request / to 1st receipt / drain", _tail(phase.get("tail_ms"), "all")),
        ("LOST (open sessions)", _fmt(d["lost"])),
        ("DUPLICATED", _fmt(d["duplicated"])),
        ("undelivered to closed sessions", _fmt(d["lost_to_closed_sessions"])),
        ("unexpected deliveries", _fmt(d["unexpected"])),
        ("frames of other posts (history)", _fmt(d["history_frames"])),
        ("errors", _errors(phase["errors"])),
    ]


def _tail(tail: dict[str, Any] | None, which: str) -> str:
    """Medians of where a delivery's time went (feedclient.tail_parts)."""
    if not tail:
        return "-"
    part = tail[which]
    parts = " / ".join(_fmt(part[name]) for name in ("request", "to_first_receipt", "drain"))
    return f"{parts} ms (of {_fmt(part['latency'])} ms, medians)"


def _service_latency(found: dict[str, Any] | None) -> str:
    """The service's own histogram, interpolated in its buckets ('-': no reading)."""
    if not found:
        return "-"
    values = " / ".join(_fmt(found.get(p)) for p in ("p50", "p95", "p99"))
    return f"{values} ms (its buckets)"


def _saturation_rows(search: dict[str, Any]) -> list[tuple[str, str]]:
    steps = " ".join(
        f"{s['rate']:g}{'+' if s['held'] else '-'}" for s in search["steps"]
    )  # "50+ 100+ 200- 150+": the rates tried, in order, held or not
    return [
        ("saturation: steps (posts/s, held +)", steps),
        ("saturation: highest rate held", _fmt(search["rate_held"], "posts/s")),
        ("saturation: deliveries/s at it", _fmt(search["deliveries_per_s_held"])),
        ("saturation: most deliveries/s in a step", _fmt(search["deliveries_per_s_max"])),
        ("saturation: stopped", search["stopped"] or "bracketed"),
    ]


def _comparison_rows(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Ceilings and ratios under the modes' columns; process/session in the first column."""
    comparison, ceilings = results["comparison"], results.get("ceilings") or {}
    modes = list(results["runs"])
    rows: list[tuple[str, list[str]]] = []
    if ceilings:
        bare, bare_pika = ceilings.get("bare_push", {}), ceilings.get("pika", {})
        floor = bare.get("floor", {})
        rows += [
            ("ceiling: bare push deliveries/s", [_fmt(bare.get("deliveries_per_s"))]),
            ("ceiling: bare push CPU per write", [_fmt(bare.get("server_cpu_us_per_write"), "µs")]),
            ("floor: prebuilt frame, deliveries/s", [_fmt(floor.get("deliveries_per_s"))]),
            (
                "floor: prebuilt frame, CPU per write",
                [_fmt(floor.get("server_cpu_us_per_write"), "µs")],
            ),
            ("ceiling: bare pika messages/s", [_fmt(bare_pika.get("messages_per_s"))]),
        ]
    per_mode = [
        ("share of the bare push ceiling", "share_of_bare_push"),
        ("share of the lower ceiling", "share_of_lower_ceiling"),
        ("floor CPU per write / service CPU per delivery", "cpu_share_of_floor"),
        ("at saturation: share of bare push", "saturation_share_of_bare_push"),
        ("create->receive p99 / p50", "p99_over_p50"),
    ]
    for label, key in per_mode:
        values = [_fmt(comparison[mode][key]) for mode in modes]
        if any(v != "-" for v in values):
            rows.append((label, values))
    ratios = comparison.get("process_over_session")
    if ratios:
        rows += [
            (f"process / session: {label}", [_fmt(ratios[key])])
            for label, key in (
                ("RabbitMQ CPU per delivery", "rabbitmq_cpu_us_per_delivery"),
                ("service CPU per delivery", "service_cpu_us_per_delivery"),
                ("deliveries/s", "deliveries_per_s"),
                ("deliveries/s at saturation", "deliveries_per_s_at_saturation"),
                ("create->receive p99", "create_receive_p99_ms"),
                ("session ready p99", "ready_p99_ms"),
                ("service memory per session", "service_bytes_per_session"),
                ("RabbitMQ queue memory per session", "rabbitmq_queue_bytes_per_session"),
                ("RabbitMQ bindings", "rabbitmq_bindings"),
            )
            if ratios.get(key) is not None
        ]
    return rows


def _errors(errors: dict[str, dict[str, int]]) -> str:
    parts = [
        f"{kind}: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
        for kind, counts in errors.items()
        if counts
    ]
    return "; ".join(parts) or "none"


def table(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The end-of-run table: a column per mode, then the ceilings and ratios."""
    columns = {mode: dict(_run_rows(run)) for mode, run in results["runs"].items()}
    labels = list(dict.fromkeys(label for rows in columns.values() for label in rows))
    rows = [("fan-out mode", list(columns))]
    rows += [(label, [col.get(label, "") for col in columns.values()]) for label in labels]
    return rows + _comparison_rows(results)


def print_table(results: dict[str, Any]) -> None:
    cfg = results["config"]
    pop = next(iter(results["runs"].values()))["population"]
    print()
    print(
        f"{pop['users']:,} users, {pop['follows']:,} follows (top author"
        f" {pop['top_author_followers']:,} followers), {pop['sessions']:,} sessions;"
        f" authors {cfg['author_choice']}, {cfg['workers']} worker(s),"
        f" text {cfg['text_size']} chars, posts over {cfg.get('post_via', 'http')}"
    )
    rows = table(results)
    width = max(len(label) for label, _ in rows)
    columns = len(results["runs"])
    # Cells that span no mode (a ceiling, a process/session ratio) do not widen the columns.
    per_mode = [values for _, values in rows if len(values) == columns]
    widths = [max(len(values[i]) for values in per_mode) for i in range(columns)]
    rule = "=" * (width + sum(widths) + 3 * columns)
    print(rule)
    for label, values in rows:
        cells = [f"{v:<{w}}" for v, w in zip(values, widths, strict=False)]
        print(f"{label:<{width}}  " + " | ".join(cells).rstrip())
    print(rule)


def write_json(results: dict[str, Any], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def write_chart(results: dict[str, Any], path: pathlib.Path) -> None:
    """Latency percentiles (top) and throughput (bottom) per second of each mode's main phase."""
    import matplotlib  # imported here: only runs that draw a chart need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    title = []
    for number, (mode, run) in enumerate(results["runs"].items()):
        phase = run.get("phase")
        if not phase:
            continue
        series = phase["time_series"]
        t = [entry["t"] for entry in series]
        color = f"C{number}"  # one colour per mode; the line style tells the figures apart
        for p, style in ((50, "-"), (99, ":")):
            values = [e[f"p{p}_ms"] if e[f"p{p}_ms"] is not None else math.nan for e in series]
            latency.plot(t, values, style, color=color, marker=".", label=f"{mode} p{p}")
        delivered = [e["delivered"] for e in series]
        throughput.plot(t, delivered, color=color, marker=".", label=f"{mode} delivered")
        expected = [e["expected"] for e in series]
        throughput.plot(t, expected, "--", color=color, label=f"{mode} expected")
        d = phase["deliveries"]
        title.append(
            f"{mode}: {phase['rate']:g} posts/s, lost {d['lost']}, duplicated {d['duplicated']}"
        )
    latency.set_ylabel("create → receive (ms)")
    latency.set_yscale("log")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(loc="upper left")
    throughput.set_ylabel("deliveries per second (expected: by send time)")
    throughput.set_xlabel("seconds since the first post")
    throughput.set_ylim(bottom=0)
    throughput.grid(True, alpha=0.3)
    throughput.legend(loc="upper left")
    sessions = next(iter(results["runs"].values()))["population"]["sessions"]
    figure.suptitle(f"{sessions:,} sessions; " + "; ".join(title))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
