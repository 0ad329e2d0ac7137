"""Fixtures: a database of its own for the test run, and the service on pytest-tornado's loop,
talking to the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import psycopg2
import pytest

from deploy.balancer import Balancer
from deploy.certificates import Certificate, local_certificate
from deploy.cluster import Cluster, Ports
from deploy.processes import alive
from feed_app.app import Service, make_app
from feed_app.config import MODES, Settings, rate, use_event_loop
from feed_app.db import drop_database, prepare_database
from tests import cluster_tools
from tests.cluster_clients import Scene
from tests.faults import ServiceProcess, TcpProxy, endpoint_of, free_port
from tests.support import Api, inspect_fanout
from tests.tls_front import front

SERVER_DSN = os.environ.get("FEED_TEST_SERVER_DSN", "postgresql://127.0.0.1:5432")
AMQP_URL = os.environ.get("FEED_AMQP_URL", Settings.amqp_url)
# FEED_EVENT_LOOP=asyncio runs the suite, in process and in service subprocesses, on that loop.
EVENT_LOOP = os.environ.get("FEED_EVENT_LOOP", Settings.event_loop)

# Limits far above anything a test does, except where a test checks the limit itself: the suite
# registers, logs in and posts as hundreds of users from 127.0.0.1. For service subprocesses.
NO_LIMITS_ENV = {
    "FEED_LOGIN_RATE_USER": "1000000/second",
    "FEED_LOGIN_RATE_ADDRESS": "1000000/second",
    "FEED_REGISTER_RATE": "1000000/second",
    "FEED_REFRESH_RATE_ADDRESS": "1000000/second",
    "FEED_POST_RATE": "1000000/second",
    "FEED_FOLLOW_RATE": "1000000/second",
    "FEED_HASH_QUEUE": "100000",
    "FEED_SOCKETS_PER_USER": "100000",
    "FEED_SOCKETS_MAX": "100000",
    "FEED_REFUSAL_DELAY": "0",
}
NO_LIMITS = {
    "login_rate_user": rate("1000000/second"),
    "login_rate_address": rate("1000000/second"),
    "register_rate": rate("1000000/second"),
    "refresh_rate_address": rate("1000000/second"),
    "post_rate": rate("1000000/second"),
    "follow_rate": rate("1000000/second"),
    "hash_queue": 100_000,
    "sockets_per_user": 100_000,
    "sockets_max": 100_000,
    "refusal_delay": 0.0,
}


def pytest_configure() -> None:
    """The in-process service runs on the loop run.py would give it: pytest-tornado makes its
    io_loop through asyncio's policy."""
    use_event_loop(EVENT_LOOP)


@pytest.fixture(scope="session")
def db_dsn():
    name = f"feed_test_{secrets.token_hex(4)}"
    dsn = f"{SERVER_DSN}/{name}"
    prepare_database(dsn)  # creates the database too
    # Posts are routed on the broker-wide amq.direct by author id. Anything else sharing the
    # RabbitMQ vhost (another test run, a load test, a dev server) with the same small user ids
    # would deliver its posts into these tests' feeds, so this run's ids start in a random block
    # (below 2^53, so the browser page holds them exactly; bench/ uses 10^12..10^13).
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        first_id = 10**13 + secrets.randbelow(9 * 10**6) * 10**6
        cur.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (first_id,))
    conn.close()
    yield dsn
    drop_database(dsn)


@pytest.fixture
def scratch_dsn() -> Iterator[str]:
    """A database of its own for a bench tool's service (run.py creates it), dropped after. The
    name says "bench": the load test empties only databases named so."""
    dsn = f"{SERVER_DSN}/feed_bench_scratch_{secrets.token_hex(4)}"
    yield dsn
    drop_database(dsn)


@pytest.fixture
def amqp_proxy(io_loop) -> Iterator[TcpProxy]:
    """A TCP proxy in front of RabbitMQ: a service given its URL can be cut off the broker."""
    proxy = TcpProxy(*endpoint_of(AMQP_URL, 5672))
    io_loop.run_sync(proxy.start)
    yield proxy
    io_loop.run_sync(proxy.close)


@pytest.fixture
def pg_proxy(io_loop, db_dsn) -> Iterator[TcpProxy]:
    """A TCP proxy in front of PostgreSQL: a service given its URL can be cut off the database."""
    proxy = TcpProxy(*endpoint_of(db_dsn, 5432))
    io_loop.run_sync(proxy.start)
    yield proxy
    io_loop.run_sync(proxy.close)


# A module whose guarantees must hold in both fan-out modes: pytestmark = both_fanout_modes.
both_fanout_modes = pytest.mark.parametrize("fanout_mode", MODES, indirect=True)


@pytest.fixture
def fanout_mode(request) -> str:
    """The service's fan-out mode: the default unless the module runs both (both_fanout_modes)."""
    return getattr(request, "param", Settings.fanout)


@pytest.fixture
def settings(db_dsn, fanout_mode) -> Settings:
    return Settings(
        db_dsn=db_dsn,
        amqp_url=AMQP_URL,
        outbox_lease=1.0,
        ping_interval=5.0,
        fanout=fanout_mode,
        **NO_LIMITS,
    )


@pytest.fixture
def service(io_loop, settings):
    service = io_loop.run_sync(lambda: Service.create(settings))
    io_loop.run_sync(lambda: inspect_fanout(service).wait_ready(10))
    yield service
    io_loop.run_sync(lambda: stop_or_show_what_hangs(service))


async def stop_or_show_what_hangs(service: Service) -> None:
    """A graceful stop is bounded by settings.shutdown_timeout; if one hangs anyway, fail the
    test with the stack of every task still running, instead of hanging the run."""
    try:
        await asyncio.wait_for(service.stop(), service.settings.shutdown_timeout + 5)
    except asyncio.TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        pytest.fail(f"Service.stop() hung; tasks still running:\n{stacks.getvalue()}")


@pytest.fixture
def app(service):
    return make_app(service)


@pytest.fixture
def processes(tmp_path, db_dsn, settings) -> Iterator[Callable[..., ServiceProcess]]:
    """A factory of service subprocesses on the test database and the real broker (each
    overridable); whatever is still running at the end is killed."""
    started: list[ServiceProcess] = []

    def make(port: int | None = None, args: tuple[str, ...] = (), **env: str) -> ServiceProcess:
        environment = {
            **NO_LIMITS_ENV,
            "FEED_DB_DSN": db_dsn,
            "FEED_AMQP_URL": AMQP_URL,
            "FEED_JWT_SECRET": settings.jwt_secret,  # tokens from the in-process service work
            "FEED_FANOUT": settings.fanout,
            "FEED_EVENT_LOOP": EVENT_LOOP,
            **env,
        }
        log_path = tmp_path / f"service-{len(started)}.log"
        process = ServiceProcess(port or free_port(), environment, log_path, args)
        started.append(process)
        return process

    yield make
    for process in started:
        process.kill()


@pytest.fixture
def api(app, http_server, base_url) -> Api:
    # `app` is named here although http_server starts it: pytest-tornado looks it up at run time,
    # so without it pytest would not see that api depends on settings (and the fan-out mode).
    return Api(base_url)


@pytest.fixture
def db_counts(db_dsn):
    """A function returning the row count of every table, to prove bad input changed nothing."""

    tables = ("users", "follows", "posts", "outbox")
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {table})" for table in tables)

    def counts() -> dict[str, int]:
        with psycopg2.connect(db_dsn) as conn, conn.cursor() as cur:
            cur.execute(sql)  # one statement: one snapshot of every table
            result = dict(zip(tables, cur.fetchone(), strict=True))
        conn.close()
        return result

    return counts


def with_settings(settings: Settings, **changes) -> Settings:
    return dataclasses.replace(settings, **changes)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line saying whether the browser tests ran, and in which Chromium, and one saying how
    many requests the fuzzing sent: CI logs are read with -q, which shows no per-file lines."""
    _report_browser_tests(terminalreporter)
    _report_fuzzing(terminalreporter)


def _report_browser_tests(terminalreporter) -> None:
    outcomes = {
        outcome: sum("test_page_browser" in report.nodeid for report in reports)
        for outcome, reports in terminalreporter.stats.items()
        if outcome in ("passed", "failed", "error", "skipped")
    }
    if not any(outcomes.values()):
        return
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    version = "no Chromium"
    if chromium:
        version = subprocess.run(
            [chromium, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    counts = ", ".join(f"{n} {outcome}" for outcome, n in outcomes.items() if n)
    terminalreporter.write_line(f"browser tests: {counts} ({version})")


def _report_fuzzing(terminalreporter) -> None:
    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz and sum(fuzz.REQUESTS.values()):
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(fuzz.REQUESTS.items()))
        terminalreporter.write_line(f"fuzzing: {sum(fuzz.REQUESTS.values())} requests ({counts})")


# --- a cluster of our own (tests/cluster_tools.py), once per module that asks for one -----------


@pytest.fixture(scope="module")
def fault_table(request) -> Any:
    """The module's fault table: its rows are printed at the end and written to the module's
    FAULT_TABLE."""
    table = request.module.FAULT_TABLE
    rows: list[tuple[str, str, int, int, str]] = []
    yield rows
    lines = ["| fault | time to heal | lost | dup | notes |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    text = "\n".join(lines)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even when the tests pass
            reporter.write_line(
                f"\ncluster faults (also in {table.relative_to(cluster_tools.ROOT)}):"
            )
            reporter.write_line(text)


@pytest.fixture(scope="module")
def cluster(db_dsn, fault_table) -> Any:
    cluster_tools.ensure_cluster_tools()
    name = f"feedt{secrets.token_hex(3)}"
    cluster = Cluster(
        pathlib.Path("/tmp") / name,
        node_prefix=name,
        ports=Ports(balancer=0, first_instance=0, first_amqp=0),
        db_dsn=db_dsn,
        hard_stop_after=f"{cluster_tools.HARD_STOP_AFTER}s",
        instance_env={
            **NO_LIMITS_ENV,
            "FEED_OUTBOX_LEASE": str(cluster_tools.OUTBOX_LEASE),
            "FEED_SHUTDOWN_TIMEOUT": "5",
        },
    )
    started = time.monotonic()
    cluster.up(node_count=3, instance_count=3, demo=False)
    fault_table.append(
        ("`cluster up` (3 nodes, 3 instances, HAProxy)", "", 0, 0, cluster_tools.took(started))
    )
    yield cluster
    pids = [i.pid for i in cluster.instances] + [cluster.balancer.pid]
    beams = [node.beam_pid() for node in cluster.nodes]
    started = time.monotonic()
    cluster.down()
    fault_table.append(("`cluster down`", "", 0, 0, cluster_tools.took(started)))
    assert not cluster.run_dir.exists()
    assert not [pid for pid in pids + beams if alive(pid)], "left running"
    pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()  # the machine's node is fine


@pytest.fixture
def scene(io_loop, cluster, db_dsn) -> Any:
    """An author posting steadily and feeds of its followers on every instance, all through the
    balancer (tests/cluster_clients.py)."""
    scene = Scene(Api(cluster.balancer.url, cluster.balancer.ca_certs), db_dsn)
    yield scene
    io_loop.run_sync(scene.close)


# --- HAProxy with a certificate before one service (tests/tls_front.py) ---------------------------


@pytest.fixture(scope="session")
def front_certificate(tmp_path_factory) -> Certificate:
    """A certificate from an authority of its own, as `scripts/cluster up` makes, for the run
    (Chromium is launched accepting its key: tests/test_page_browser.py)."""
    return local_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_front(tmp_path, front_certificate) -> Iterator[Callable[..., Balancer]]:
    """A factory: HAProxy serving HTTPS and WSS before the service on a port, with
    front_certificate or the one given; every one started is stopped at the end."""
    cluster_tools.ensure_cluster_tools()
    started: list[Balancer] = []

    def make(instance_port: int, certificate: Certificate | None = None) -> Balancer:
        directory = tmp_path / f"haproxy-{len(started)}"
        balancer = front(directory, certificate or front_certificate, instance_port)
        started.append(balancer)
        balancer.start()
        return balancer

    yield make
    for balancer in started:
        balancer.stop()
