"""The options the bench tools share, each added here with its one default: the database, the
broker and the settings of the service a tool starts, a running service to use instead, and
where results go. The defaults come from feed_app.config, as the service's own do."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re

from bench.lib.processes import REPO
from feed_app.config import Settings, redact_url, setting_assignment

# The service's PostgreSQL server; the tools never use the service's own database on it, since
# they seed users into theirs and the load test empties it.
SERVER_DSN = Settings.db_dsn.rsplit("/", 1)[0]
BENCH_DSN = f"{SERVER_DSN}/feed_bench"
PAGING_DSN = f"{SERVER_DSN}/feed_paging"  # built by seed_posts.py, read by measure_paging.py
RESULTS_DIR = REPO / "bench" / "results"


def service_options(
    parser: argparse.ArgumentParser, *, database: bool = True, broker: bool = True
) -> argparse._ArgumentGroup:
    """--db-dsn, --amqp-url and --service-env for a tool that starts the service, in a group the
    tool adds its own service options to. A tool whose service makes a database of its own, or
    brokers of its own, goes without that option."""
    group = parser.add_argument_group("service under test")
    if database:
        group.add_argument(
            "--db-dsn",
            default=os.environ.get("FEED_BENCH_DB_DSN", BENCH_DSN),
            help=f"the service's database (FEED_BENCH_DB_DSN) [{BENCH_DSN}]",
        )
    if broker:
        group.add_argument(
            "--amqp-url",
            default=os.environ.get("FEED_AMQP_URL", Settings.amqp_url),
            help="RabbitMQ URL of the service started here (FEED_AMQP_URL) [the service's default]",
        )
    group.add_argument(
        "--service-env",
        action="append",
        default=[],
        type=setting_assignment,
        metavar="FEED_NAME=VALUE",
        help="a setting of the service started here (repeatable), e.g. FEED_PREFETCH=32",
    )
    return group


def running_service_options(group: argparse._ActionsContainer) -> None:
    """--url, --service-pids and --jwt-secret: instances already running, used instead of one
    started here (service.attach)."""
    group.add_argument(
        "--url",
        action="append",
        default=[],
        help="test an already running instance (repeatable: sessions and posts are spread"
        " round-robin); --db-dsn must then name its database",
    )
    group.add_argument(
        "--service-pids",
        default="",
        help="with --url: comma-separated pids of the instances (children are included),"
        " for their CPU, memory and open files",
    )
    group.add_argument(
        "--jwt-secret",
        default=None,
        help="with --url: the instances' FEED_JWT_SECRET (default: $FEED_JWT_SECRET, else the"
        " dev secret); a service started here gets a random one",
    )


def output_options(group: argparse._ActionsContainer, name: str, *, chart: bool = False) -> None:
    """--json (bench/results/<name>-<time>.json), and with `chart` --chart and --no-chart."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    default = RESULTS_DIR / f"{name}-{stamp}.json"
    group.add_argument(
        "--json",
        type=pathlib.Path,
        default=default,
        help=f"results file [bench/results/{name}-<time>.json]",
    )
    if chart:
        group.add_argument("--chart", type=pathlib.Path, help="chart file [the JSON's, .png]")
        group.add_argument("--no-chart", action="store_true", help="do not draw the chart")


def recorded(args: argparse.Namespace) -> dict[str, object]:
    """The options of a run as its results record them: paths as text, and no secrets (the JWT
    secret, the passwords in the DSN and the broker URL)."""
    values = {
        key: str(value) if isinstance(value, pathlib.Path) else value
        for key, value in vars(args).items()
    }
    if "jwt_secret" in values:
        values["jwt_secret"] = "(set)" if values["jwt_secret"] else None
    if "amqp_url" in values:
        values["amqp_url"] = redact_url(values["amqp_url"])
    if "db_dsn" in values:
        # A key=value DSN ("dbname=x password=y") is not a URL: its password goes by hand.
        values["db_dsn"] = re.sub(r"(password=)\S+", r"\1***", redact_url(values["db_dsn"]))
    return values
