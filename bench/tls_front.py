"""What TLS at the front costs HAProxy: new connections per second and HAProxy's CPU per new
connection over HTTPS against plain HTTP, and HAProxy's memory per open feed socket over WSS
against WS.

    .venv/bin/python bench/tls_front.py [--connections 3000] [--concurrency 20] [--sockets 2000]

Starts the service (process fan-out: one queue, so the broker it shares hardly notices the
sockets) and HAProxy before it as `scripts/cluster up` configures it (deploy/balancer.py, with a
certificate of a local authority: ECDSA P-256), plus one more frontend speaking plain HTTP to the
same instance, since the cluster's plain port only redirects. Then, through one frontend of a
new HAProxy each time, the two alternating for --rounds:
- --sockets feed sockets opened and held: the growth of HAProxy's worker RSS, divided by them;
- --connections requests GET /healthz, --concurrency at a time, each on a new connection (Tornado's
  client opens one per request) with a full handshake (no session resumption: a new visitor);
  HAProxy's worker CPU seconds over the whole, divided by the connections.
The client runs on the same cores as HAProxy and the service, so connections per second are
bounded by all three; HAProxy's CPU per connection is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shutil
import ssl
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from bench.lib import options
from bench.lib.api import feed_url, new_user
from bench.lib.processes import run_tool
from bench.lib.procstats import cpu_seconds, rss_bytes
from bench.lib.service import UNLIMITED, own_service
from deploy.balancer import Balancer
from deploy.certificates import local_certificate
from deploy.processes import free_port

PLAIN_FRONTEND = """
frontend bench_plain_http
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    default_backend instances
"""


def start_balancer(directory: pathlib.Path, instance_port: int) -> tuple[Balancer, int]:
    """HAProxy as the cluster runs it, plus a plain HTTP frontend; its port."""
    balancer = Balancer(free_port(), free_port(), directory / "haproxy")
    balancer.certificate = local_certificate(directory / "tls")
    balancer.write_config({"instance": instance_port})
    plain_port = free_port()
    with balancer.config_path.open("a") as config:
        config.write(PLAIN_FRONTEND.format(port=plain_port))
    balancer.start()
    return balancer, plain_port


async def connection_rate(
    url: str, context: ssl.SSLContext | None, count: int, concurrency: int, worker: int
) -> tuple[float, float]:
    """(new connections per second, HAProxy worker CPU microseconds per connection)."""
    client = AsyncHTTPClient(force_instance=True, max_clients=concurrency)
    requests = iter(range(count))

    async def one_after_another() -> None:
        for _ in requests:
            request = HTTPRequest(f"{url}/healthz", ssl_options=context, request_timeout=30)
            await client.fetch(request)

    cpu, started = cpu_seconds([worker]), time.perf_counter()
    await asyncio.gather(*(one_after_another() for _ in range(concurrency)))
    elapsed, used = time.perf_counter() - started, cpu_seconds([worker]) - cpu
    client.close()
    return count / elapsed, used / count * 1e6


async def socket_memory(url: str, context: ssl.SSLContext | None, count: int, worker: int) -> float:
    """HAProxy worker RSS growth per open feed socket (url), in bytes."""
    before = rss_bytes([worker])
    sockets = []
    for _ in range(count):
        sockets.append(await websocket_connect(HTTPRequest(url, ssl_options=context)))
    await asyncio.gather(*(ws.read_message() for ws in sockets))  # each one's first frame
    grown = rss_bytes([worker]) - before
    for ws in sockets:
        ws.close()
    await asyncio.sleep(1)  # HAProxy lets go of them before the next round
    return grown / count


async def measure_front(
    tls: bool,
    directory: pathlib.Path,
    instance_port: int,
    user: tuple[int, str],
    args: argparse.Namespace,
) -> tuple[float, float, float]:
    """(new connections/s, HAProxy CPU µs per connection, HAProxy bytes per open socket) through
    one front, in an HAProxy of its own: its memory pools, which keep what they once allocated,
    start empty. The sockets come first for the same reason."""
    balancer, plain_port = start_balancer(directory, instance_port)
    try:
        worker = balancer.worker_pid()
        context = ssl.create_default_context(cafile=balancer.ca_certs) if tls else None
        url = balancer.url if tls else f"http://127.0.0.1:{plain_port}"
        memory = await socket_memory(feed_url(url, *user), context, args.sockets, worker)
        await connection_rate(url, context, args.concurrency, args.concurrency, worker)  # warm
        rate, cpu = await connection_rate(url, context, args.connections, args.concurrency, worker)
        return rate, cpu, memory
    finally:
        balancer.stop()


async def measure(args: argparse.Namespace) -> None:
    settings = {
        **UNLIMITED,
        "FEED_FANOUT": "process",
        "FEED_TRUSTED_PROXIES": "127.0.0.1",
        **dict(args.service_env),
    }
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tls-front-"))
    try:
        async with own_service(
            args.db_dsn, args.amqp_url, settings, directory / "service.log"
        ) as svc:
            instance_port = int(svc.url.rsplit(":", 1)[1])
            user = await new_user(svc.url)  # the sockets' user, made straight at the service
            print(f"{args.connections} new connections, {args.sockets} feed sockets, per row")
            print("| through HAProxy | new connections/s | HAProxy CPU per connection | "
                  "HAProxy memory per open feed socket |")  # fmt: skip
            print("|---|---|---|---|")
            for round_ in range(args.rounds):  # alternating, so a busy spell hits both
                for tls in (False, True):
                    front = directory / f"round{round_}-{'tls' if tls else 'plain'}"
                    rate, cpu, memory = await measure_front(tls, front, instance_port, user, args)
                    name = "HTTPS / WSS" if tls else "HTTP / WS"
                    print(f"| {name} | {rate:,.0f} | {cpu:,.0f} µs | {memory / 1024:,.1f} KiB |")
    finally:
        shutil.rmtree(directory)  # the certificates too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000, help="new connections per front")
    parser.add_argument("--concurrency", type=int, default=20, help="connections at a time")
    parser.add_argument("--sockets", type=int, default=2000, help="feed sockets held per front")
    parser.add_argument("--rounds", type=int, default=3, help="of the two fronts, alternating")
    options.service_options(parser)
    run_tool(measure(parser.parse_args()), "tls_front")


if __name__ == "__main__":
    main()
