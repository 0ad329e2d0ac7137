"""Start the live feed service: `python run.py [--demo] [--workers N]`; `--help` lists settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import NoReturn

import psycopg2
import tornado.netutil

from feed_app.config import Settings, parse_settings, redact_url, use_event_loop
from feed_app.db import prepare_database
from feed_app.demo import seed_demo
from feed_app.pids import process_exists

log = logging.getLogger("feed")


def tune_garbage_collector(young_threshold: int) -> None:
    """With thousands of sessions a process tracks hundreds of thousands of objects, and
    CPython's default thresholds run a full collection every few seconds under load, each
    pausing every socket. Start-up objects are frozen out of collections, and young collections
    run every FEED_GC_YOUNG_THRESHOLD allocations instead of 700, so short-lived delivery
    objects die before they are promoted and full collections come far apart. That is safe
    only because closed sessions and finished queries leave no cycles
    (tests/test_session_lifecycle.py, tests/test_database.py); the measurements are in
    BENCHMARKS.md ("Soak and garbage collection")."""
    gc.freeze()
    gc.set_threshold(young_threshold, 20, 10)


METRICS_DIRECTORY_PREFIX = "feed-metrics-"


@contextlib.contextmanager
def metrics_directory() -> Iterator[None]:
    """A fresh private directory for the metric files of this run's processes (feed_app/metrics.py),
    in PROMETHEUS_MULTIPROC_DIR for this process and the workers it forks, removed at the end: files
    left from another run or instance would be summed with ours. prometheus_client reads the
    variable once, when first imported, so nothing imports it before this runs (feed_app.app and
    feed_app.metrics are imported in serve() and run_workers())."""
    remove_stale_metrics_directories()
    directory = tempfile.mkdtemp(prefix=f"{METRICS_DIRECTORY_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def remove_stale_metrics_directories() -> None:
    """A run killed with SIGKILL cannot remove its directory: remove those whose process is gone."""
    pattern = re.compile(rf"{METRICS_DIRECTORY_PREFIX}(\d+)-")
    for path in pathlib.Path(tempfile.gettempdir()).glob(METRICS_DIRECTORY_PREFIX + "*"):
        found = pattern.match(path.name)
        if found and not process_exists(int(found[1])):
            shutil.rmtree(path, ignore_errors=True)


async def serve(settings: Settings, sockets: list | None, parent: int | None = None) -> None:
    from feed_app.app import Service  # after metrics_directory()

    service = await Service.create(settings)
    tune_garbage_collector(settings.gc_young_threshold)
    service.listen(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if parent is not None:
        watch_parent(parent, stopping)
    log.info("pid %d serving http://%s:%d/", os.getpid(), settings.host, settings.port)
    await stopping.wait()
    log.info("shutting down (deadline %.0f s)", settings.shutdown_timeout)
    await service.stop()
    log.info("stopped")


def run_workers(settings: Settings) -> int:
    """N processes accepting on one shared socket, each with its own AMQP connection and pool.
    The parent only forwards SIGTERM/SIGINT and waits; it exits non-zero if a worker failed."""
    from feed_app.metrics import forget_worker  # after metrics_directory()

    sockets = tornado.netutil.bind_sockets(settings.port, settings.host)
    children = set()
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            run_worker(settings, sockets)
        children.add(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        pid, code = os.wait()
        children.discard(pid)
        forget_worker(pid)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def watch_parent(parent: int, stopping: asyncio.Event) -> None:
    """A worker whose parent died (SIGKILL forwards nothing) stops as if told to: otherwise it
    would hold the port, its sockets and its queues with nobody left to stop it."""

    def check() -> None:
        if os.getppid() != parent:
            log.warning("the parent process %d is gone: stopping", parent)
            stopping.set()
        else:
            loop.call_later(1, check)

    loop = asyncio.get_running_loop()
    loop.call_later(1, check)


def run_worker(settings: Settings, sockets: list) -> NoReturn:
    """A forked worker's whole life: it never returns into main(), whose clean-up (the metrics
    directory) belongs to the parent."""
    try:
        asyncio.run(serve(settings, sockets, parent=os.getppid()))
    except BaseException:
        log.exception("worker failed")
        os._exit(1)
    os._exit(0)


def main() -> int:
    settings = parse_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    if settings.uses_dev_secret:
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.error("set FEED_JWT_SECRET: the development secret is refused off loopback")
            return 2
        log.warning(
            "FEED_JWT_SECRET is not set: using the development secret (never in production)"
        )
    log.info("database %s, broker %s", redact_url(settings.db_dsn), redact_url(settings.amqp_url))
    try:
        prepare_database(settings.db_dsn)
    except psycopg2.OperationalError as exc:
        log.error("cannot prepare the database: %s", str(exc).strip())
        return 2
    if settings.demo:
        seed_demo(settings.db_dsn)
    settings = dataclasses.replace(settings, workers=settings.workers or os.cpu_count() or 1)
    use_event_loop(settings.event_loop)
    with metrics_directory():
        if settings.workers == 1:
            asyncio.run(serve(settings, None))
            return 0
        return run_workers(settings)


if __name__ == "__main__":
    sys.exit(main())
