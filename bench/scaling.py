"""Deliveries per second with 1, 2, ... N instances behind HAProxy, on a RabbitMQ cluster.

    .venv/bin/python bench/scaling.py                        # process mode, 1..3 instances
    .venv/bin/python bench/scaling.py --fanout session --instances 2
    .venv/bin/python bench/scaling.py -- --rate 20 --duration 15    # options for loadtest.py

It starts a cluster of its own (deploy/cluster.py: RabbitMQ nodes with their own names and free
ports, one instance, HAProxy), then for k = 1..N instances runs `bench/loadtest.py --saturate`
with `--url` set to HAProxy only, so every session and every post goes through the balancer,
and adds an instance between runs (through HAProxy's runtime API, as `scripts/cluster
add-instance` does). Each run seeds a fresh population, so the new instance gets its share of
new sessions (least connections). The instances run without the limits (a load test posts far
more than 30 posts a minute per user). It prints, per k: the highest posting rate held, the
deliveries/s at it and the most delivered in a step, and the ratio to k = 1; each run's JSON
is in bench/results/scaling-<mode>-<k>.json. The cluster is stopped at the end, whatever
happened.

Every process (load-test client, instances, RabbitMQ nodes, PostgreSQL, HAProxy) shares the
machine's cores: more instances than cores cannot add capacity, they only split it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib import options
from bench.lib.options import RESULTS_DIR
from bench.lib.processes import REPO
from bench.lib.service import UNLIMITED
from deploy.cluster import Cluster, Ports
from feed_app.config import MODES

LOADTEST_DEFAULTS = ["--saturate", "--author-choice", "followers", "--rate", "10"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=3, help="up to this many [3]")
    parser.add_argument("--nodes", type=int, default=3, help="RabbitMQ nodes [3]")
    service = options.service_options(parser, broker=False)
    service.add_argument("--fanout", choices=MODES, default="process", help="[process]")
    parser.add_argument(
        "loadtest", nargs="*", help=f"after --: loadtest.py options {LOADTEST_DEFAULTS}"
    )
    args = parser.parse_args()

    name = f"feedscale{secrets.token_hex(3)}"
    cluster = Cluster(
        pathlib.Path("/tmp") / name,
        node_prefix=name,
        ports=Ports(balancer=0, first_instance=0, first_amqp=0),
        db_dsn=args.db_dsn,
        instance_env={**UNLIMITED, **dict(args.service_env), "FEED_FANOUT": args.fanout},
    )
    rows = []
    try:
        cluster.up(node_count=args.nodes, instance_count=1, demo=False)
        for count in range(1, args.instances + 1):
            if count > 1:
                cluster.add_instance()
            rows.append((count, run_loadtest(cluster, count, args)))
            print_table(rows, args.fanout)
    finally:
        cluster.down()
    return 0


def run_loadtest(cluster: Cluster, count: int, args: argparse.Namespace) -> dict:
    out = RESULTS_DIR / f"scaling-{args.fanout}-{count}.json"
    pids = [instance.pid for instance in cluster.instances]  # their workers are found too
    command = [
        sys.executable,
        str(REPO / "bench" / "loadtest.py"),
        "--url",
        cluster.balancer.url,
        "--db-dsn",
        cluster.db_dsn,
        "--jwt-secret",
        cluster.jwt_secret,
        "--service-pids",
        ",".join(map(str, pids)),
        "--fanout",
        args.fanout,
        "--json",
        str(out),
        "--no-chart",
        *(args.loadtest or LOADTEST_DEFAULTS),
    ]
    print(f"\n=== {count} instance(s): {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    # The balancer's certificate chains to the cluster's own authority (deploy/certificates.py).
    environment = dict(os.environ)
    if cluster.balancer.ca_certs:
        environment["SSL_CERT_FILE"] = cluster.balancer.ca_certs
    subprocess.run(command, check=False, env=environment)
    print(f"=== {count} instance(s) took {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(out.read_text())["runs"][args.fanout]


def print_table(rows: list[tuple[int, dict]], mode: str) -> None:
    print(f"\nscaling through HAProxy, {mode} mode")
    print("| instances | posts/s held | deliveries/s at it | most in a step | ÷ 1 instance |")
    print("|---|---|---|---|---|")
    base = None
    for count, run in rows:
        search = run.get("saturation") or {}
        held, most = search.get("deliveries_per_s_held"), search.get("deliveries_per_s_max")
        base = base or held
        ratio = f"{held / base:.2f}" if held and base else "-"
        print(f"| {count} | {search.get('rate_held')} | {_n(held)} | {_n(most)} | {ratio} |")


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
