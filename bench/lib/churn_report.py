"""What the soak prints and draws from its results (bench/lib/churn.py): the summary table and a
chart of the readings against cycles done."""

from __future__ import annotations

import pathlib
from typing import Any

from bench.lib.churn import after_warmup, least_squares, shown


def print_summary(results: dict[str, Any]) -> None:
    rss, fds, broker = results["rss_mb"], results["fds"], results["broker_rss_mb"]
    db = results["db_connections"]
    slope = results["rss_slope_kb_per_1000"]
    rows = [
        (
            "cycles done (warm-up excluded from slopes)",
            f"{results['cycles']:,} ({results['warmup_cycles']:,}) at {results['cycles_per_s']}/s",
        ),
        (
            "sessions ready / hang-ups",
            f"{results['sessions_ready']:,} / "
            + (", ".join(f"{k} {v}" for k, v in results["hangups"].items()) or "none"),
        ),
        ("posts stored (post messages answered `posted`)", f"{results['posts_stored']:,}"),
        ("failed cycles", ", ".join(f"{k} x{v}" for k, v in results["failures"].items()) or "0"),
        (
            "session ready p50/p99/max",
            " / ".join(shown(results["ready_ms"][k]) for k in ("p50", "p99", "max")) + " ms",
        ),
        (
            "service RSS start / baseline / final",
            f"{rss['start']} / {rss['baseline']} / {rss['final']} MB",
        ),
        ("RSS growth after warm-up", f"{results['rss_growth_mb']} MB"),
        ("RSS slope", f"{shown(slope)} KB per 1,000 sessions"),
        (
            "fds start / baseline / final (database)",
            " / ".join(f"{fds[k]} ({db[k]})" for k in ("start", "baseline", "final")),
        ),
        ("fds growth after warm-up, database aside", shown(results["fds_growth"])),
        ("sessions left", shown(results["sessions_left"])),
        ("session queues left", shown(results["queues_left"])),
        ("broker RSS baseline / final", f"{broker['baseline']} / {broker['final']} MB"),
        ("broker RSS slope", f"{shown(results['broker_rss_slope_kb_per_1000'])} KB per 1,000"),
        ("drain", f"{results['drain_seconds']} s"),
    ]
    log = results.get("service_log") or {}
    if log:
        rows.append(("service log problem lines", shown(log.get("problems"))))
    width = max(len(label) for label, _ in rows)
    print("\n" + "=" * (width + 50))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print("=" * (width + 50))
    for line in log.get("examples", [])[:5]:
        print("  log: " + line)


def write_chart(results: dict[str, Any], path: pathlib.Path) -> None:
    """Service RSS (with its fit), broker RSS, and sessions / queues / fds against cycles."""
    import matplotlib  # imported here: only runs that draw a chart need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    x = [s["cycles"] for s in samples]

    def series(field: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if s[field] is None else s[field] / scale for s in samples]

    figure, (service, broker, counts) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    service.plot(x, series("rss_kb", 1024), marker=".", label="service RSS")
    measured = after_warmup(samples)
    fit = least_squares(measured, "rss_kb")
    if fit:
        ends = [measured[0]["cycles"], measured[-1]["cycles"]]
        fitted = [(fit[0] * end + fit[1]) / 1024 for end in ends]
        service.plot(ends, fitted, "--", color="grey", label="least-squares fit after warm-up")
    service.set_ylabel("service RSS (MB)")
    service.legend(loc="upper left")
    broker.plot(x, series("broker_rss_kb", 1024), marker=".", color="tab:orange")
    broker.set_ylabel("broker RSS (MB)")
    counts.plot(x, series("open_sessions"), marker=".", label="open sessions (/metrics)")
    counts.plot(x, series("queues"), marker=".", label="session queues of the run")
    counts.set_ylabel("sessions, queues")
    fds = counts.twinx()
    fds.plot(x, series("fds"), color="grey", alpha=0.6, label="service fds")
    fds.set_ylabel("fds")
    lines, extra = counts.get_legend_handles_labels(), fds.get_legend_handles_labels()
    counts.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left")
    counts.set_xlabel("cycles done")
    for axis in (service, broker, counts):
        axis.axvline(results["warmup_cycles"], color="grey", linestyle=":")
        axis.grid(True, alpha=0.3)
    figure.suptitle(
        f"{results['cycles']:,} cycles: RSS {shown(results['rss_slope_kb_per_1000'])} KB per"
        f" 1,000 sessions, growth {results['rss_growth_mb']} MB; sessions left"
        f" {results['sessions_left']}, queues left {results['queues_left']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
