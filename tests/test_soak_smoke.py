"""Connection churn through bench/soak.py --smoke: nothing may be left behind.

The soak spawns the service against a database of its own (feed_soak_smoke_<random>, dropped
afterwards), opens and closes a few hundred feed sessions, each posting once on its socket, and
hangs up during the handshake every tenth time (FIN, RST and shutdown in turn). Afterwards no
session may still be counted open, no session queue of the run may be left in RabbitMQ, and the
service may hold no more file descriptors than after the warm-up. These hold on a noisy machine;
the RSS slope of so short a run does not (it is printed, and checked only by the full soak).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
SOAK = REPO / "bench" / "soak.py"
TIMEOUT = 180  # seconds; the smoke run itself takes about half a minute


def test_churn_with_handshake_hangups_leaves_nothing_behind(
    tmp_path: pathlib.Path, scratch_dsn: str
) -> None:
    results_path = tmp_path / "soak.json"
    argv = [sys.executable, str(SOAK), "--smoke", "--quiet", "--no-chart"]
    completed = subprocess.run(
        [*argv, "--db-dsn", scratch_dsn, "--json", str(results_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = completed.stdout + completed.stderr
    assert results_path.exists(), output
    results = json.loads(results_path.read_text())
    # The run did what it claims: sessions reached ready, and every kind of hang-up happened.
    assert results["sessions_ready"] > 0, output
    assert set(results["hangups"]) == {"fin", "rst", "shutdown"}, output
    assert results["posts_stored"] > 0, output
    assert results["sessions_left"] == 0, output
    assert results["queues_left"] == 0, output
    assert results["fds_growth"] is not None, output
    assert results["fds_growth"] <= results["config"]["fd_tolerance"], output
    assert completed.returncode == 0, output


def test_verdict_names_every_missed_target() -> None:
    """The smoke run's exit status means something: each target, missed, fails the soak."""
    from bench.soak import parse_args, verdict

    met = {
        "rss_growth_mb": 1.0,
        "queues_left": 0,
        "sessions_left": 0,
        "fds_growth": 0,
        "failures": {},
        "cycles": 1000,
    }
    args = parse_args(["--cycles", "1000"])
    assert verdict(met, args) == (0, [])
    missed = {
        "rss_growth_mb": 6.0,
        "queues_left": 2,
        "sessions_left": 3,
        "fds_growth": 9,
        "failures": {"timeout waiting for ready": 11},
    }
    for field, value in missed.items():
        code, reasons = verdict({**met, field: value}, args)
        assert code == 1 and len(reasons) == 1, (field, reasons)
    # A smoke run is too short for the RSS target: it is reported, not checked.
    assert verdict({**met, "rss_growth_mb": 6.0}, parse_args(["--smoke"])) == (0, [])
