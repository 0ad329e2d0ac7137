"""The local cluster: RabbitMQ nodes, service instances and HAProxy, started and stopped as one.

    scripts/cluster up [--nodes 3] [--instances 3] [--port 8880] [--tls-port 8443] [--cert PEM]
                       [--env NAME=VALUE ...]
    scripts/cluster status | down | add-node | add-instance | remove-instance NAME | reload | env

What `up` starts, all on loopback:
- RabbitMQ nodes feed1@localhost... (AMQP 5681...), clustered (deploy/rabbit_nodes.py);
- service instances instance1... (HTTP 8881...), each run.py with the node list in its own order
  (instance k starts from node k), in FEED_AMQP_URL and in a nodes file that add-node extends;
- HAProxy in front of the instances (deploy/balancer.py): HTTPS and WSS on 8443, with the
  certificate given by --cert (or FEED_CLUSTER_CERT), else one made for this cluster by an
  authority of its own whose certificate is tls/ca.pem (deploy/certificates.py); plain HTTP on
  8880 redirects there.
The instances share a database (feed_cluster, with the demo users) and a FEED_JWT_SECRET made
for this cluster. Everything lives under the run directory (/tmp/feed-cluster, or
$FEED_CLUSTER_DIR), whose state.json tells later commands what runs; `down` stops all of it,
drops the database if `up` created it, and removes the run directory. The machine's own RabbitMQ
node (rabbit@localhost, 5672) is never touched.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import secrets
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

import psycopg2
import psycopg2.extensions

from deploy import processes
from deploy.balancer import Balancer, BalancerError
from deploy.certificates import (
    Certificate,
    CertificateError,
    local_certificate,
    operator_certificate,
)
from deploy.rabbit_nodes import Node, NodeError
from feed_app.config import setting_assignment
from feed_app.db import drop_database, prepare_database
from feed_app.demo import seed_demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = pathlib.Path(os.environ.get("FEED_CLUSTER_DIR", "/tmp/feed-cluster"))
DEFAULT_DSN = "postgresql://127.0.0.1:5432/feed_cluster"
# Strict-Transport-Security for an hour, not the instances' default year: a browser keeps it for
# the host name (localhost), where `scripts/run-demo` serves plain HTTP.
CLUSTER_HSTS_MAX_AGE = "3600"
INSTANCE_START_TIMEOUT = 30.0
INSTANCE_STOP_TIMEOUT = 15.0  # above FEED_SHUTDOWN_TIMEOUT's default of 10 s


# Straight to the instance on loopback, whatever http_proxy the environment sets.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterError(Exception):
    pass


@dataclasses.dataclass
class Ports:
    """Where things listen. A first port of 0 means "any free port" (the tests use that)."""

    balancer: int = 8880  # plain HTTP, redirected
    balancer_tls: int = 8443
    first_instance: int = 8881
    first_amqp: int = 5681

    def instance(self, index: int) -> int:
        return self.first_instance + index if self.first_instance else processes.free_port()

    def node(self, index: int) -> tuple[int, int]:
        """(AMQP port, distribution port) of the index-th node."""
        if self.first_amqp:
            amqp = self.first_amqp + index
            return amqp, amqp + 20000  # RabbitMQ's own convention for the distribution port
        return processes.free_port(), processes.free_port()


@dataclasses.dataclass
class Instance:
    name: str  # also its server name in HAProxy and its X-Served-By
    port: int
    nodes_file: pathlib.Path
    amqp_urls: list[str]
    log_path: pathlib.Path
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def readyz(self) -> tuple[int, dict]:
        try:
            with _DIRECT.open(self.url + "/readyz", timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def is_ready(self) -> bool:
        if not processes.alive(self.pid):
            raise ClusterError(f"{self.name} exited:\n{processes.log_tail(self.log_path)}")
        with contextlib.suppress(OSError, ValueError):
            return self.readyz()[0] == 200
        return False


class Cluster:
    def __init__(
        self,
        run_dir: pathlib.Path = DEFAULT_RUN_DIR,
        *,
        node_prefix: str = "feed",
        ports: Ports | None = None,
        db_dsn: str = DEFAULT_DSN,
        hard_stop_after: str = "30s",
        instance_env: dict[str, str] | None = None,
        certificate: pathlib.Path | None = None,
    ) -> None:
        """certificate: the operator's PEM for HAProxy; without one `up` makes one."""
        self.run_dir = run_dir
        self.node_prefix = node_prefix
        self.ports = ports or Ports()
        if not self.ports.balancer:
            self.ports.balancer = processes.free_port()
        if not self.ports.balancer_tls:
            self.ports.balancer_tls = processes.free_port()
        self.db_dsn = db_dsn
        self.instance_env = instance_env or {}
        self.operator_certificate = certificate
        self.jwt_secret = secrets.token_urlsafe(32)
        self.created_database = False
        self.nodes: list[Node] = []
        self.instances: list[Instance] = []
        self.balancer = Balancer(
            self.ports.balancer,
            self.ports.balancer_tls,
            run_dir / "haproxy",
            hard_stop_after=hard_stop_after,
        )
        self._node_launchers: dict[str, int] = {}

    # --- state, so that each command finds what the previous ones started -----------------------

    @property
    def state_path(self) -> pathlib.Path:
        return self.run_dir / "state.json"

    def save(self) -> None:
        state = {
            "node_prefix": self.node_prefix,
            "ports": dataclasses.asdict(self.ports),
            "db_dsn": self.db_dsn,
            "instance_env": self.instance_env,
            "jwt_secret": self.jwt_secret,
            "created_database": self.created_database,
            "balancer": {
                "hard_stop_after": self.balancer.hard_stop_after,
                "pid": self.balancer.pid,
                "certificate": self.balancer.certificate
                and dataclasses.asdict(self.balancer.certificate),
            },
            "nodes": [dataclasses.asdict(node) for node in self.nodes],
            "instances": [dataclasses.asdict(instance) for instance in self.instances],
        }
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2, default=str))
        temporary.chmod(0o600)  # it holds the JWT secret
        temporary.replace(self.state_path)

    @classmethod
    def load(cls, run_dir: pathlib.Path) -> Cluster:
        try:
            state = json.loads((run_dir / "state.json").read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {run_dir} (start one: scripts/cluster up)") from None
        cluster = cls(
            run_dir,
            node_prefix=state["node_prefix"],
            ports=Ports(**state["ports"]),
            db_dsn=state["db_dsn"],
            hard_stop_after=state["balancer"]["hard_stop_after"],
            instance_env=state["instance_env"],
        )
        cluster.jwt_secret = state["jwt_secret"]
        cluster.created_database = state["created_database"]
        cluster.balancer.pid = state["balancer"]["pid"]
        if certificate := state["balancer"].get("certificate"):
            cluster.balancer.certificate = Certificate(
                pathlib.Path(certificate["pem"]),
                certificate["ca"] and pathlib.Path(certificate["ca"]),
            )
        for node in state["nodes"]:
            cluster.nodes.append(Node(**{**node, "directory": pathlib.Path(node["directory"])}))
        for instance in state["instances"]:
            paths = {key: pathlib.Path(instance[key]) for key in ("nodes_file", "log_path")}
            cluster.instances.append(Instance(**{**instance, **paths}))
        return cluster

    # --- up and down ----------------------------------------------------------------------------

    def up(self, node_count: int = 3, instance_count: int = 3, demo: bool = True) -> None:
        """Start everything; on failure, stop what was started and raise."""
        if self.state_path.exists():
            raise ClusterError(f"a cluster already runs from {self.run_dir} (scripts/cluster down)")
        self._check_ports_free(node_count, instance_count)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)  # the nodes, running as rabbitmq, reach their directories
        self.save()
        try:
            self._start_nodes(node_count)
            self._prepare_database(demo)
            self._start_instances(instance_count)
            self.balancer.certificate = self._certificate()
            self.balancer.write_config({i.name: i.port for i in self.instances})
            self.balancer.start()
            self.save()
            self.wait_balanced()
        except (ClusterError, NodeError, BalancerError, CertificateError) as exc:
            self.down()
            raise ClusterError(f"{exc}; what `up` had started is stopped again") from exc
        except Exception as exc:
            self.down()
            raise ClusterError(f"up failed ({exc!r}); what it started is stopped again") from exc
        except BaseException:
            self.down()
            raise

    def _certificate(self) -> Certificate:
        if self.operator_certificate is not None:
            return operator_certificate(self.operator_certificate)
        return local_certificate(self.run_dir / "tls")

    def _check_ports_free(self, node_count: int, instance_count: int) -> None:
        wanted = [self.ports.balancer, self.ports.balancer_tls]
        if self.ports.first_instance:
            wanted += [self.ports.first_instance + i for i in range(instance_count)]
        if self.ports.first_amqp:
            wanted += [port for i in range(node_count) for port in self.ports.node(i)]
        busy = [port for port in wanted if not processes.port_free(port)]
        if busy:
            raise ClusterError(f"ports in use: {busy} (another cluster? scripts/cluster status)")

    def _start_nodes(self, count: int) -> None:
        new = [self._new_node() for _ in range(count)]
        for node in new:  # they boot side by side
            self._node_launchers[node.name] = node.start()
        self.save()
        for node in new:
            node.wait_started(self._node_launchers[node.name])
        for node in new[1:]:
            node.join(new[0])

    def _new_node(self) -> Node:
        index = len(self.nodes)
        amqp_port, dist_port = self.ports.node(index)
        name = f"{self.node_prefix}{index + 1}@localhost"
        node = Node(name, amqp_port, dist_port, self.run_dir / "nodes" / name.split("@")[0])
        self.nodes.append(node)
        return node

    def _prepare_database(self, demo: bool) -> None:
        try:
            psycopg2.connect(self.db_dsn).close()
        except psycopg2.OperationalError:
            self.created_database = True  # or PostgreSQL is down, which the next line reports
        prepare_database(self.db_dsn)
        self.save()
        if demo:
            seed_demo(self.db_dsn)

    def down(self) -> None:
        """Stop everything this cluster started and remove its files. Tolerates a half-started
        or half-stopped cluster, so it also cleans up after a failed `up`."""
        self.balancer.stop()
        _each(lambda instance: processes.stop(instance.pid, INSTANCE_STOP_TIMEOUT), self.instances)
        for node, other in itertools.combinations(self.nodes, 2):
            node.restore_link(other)  # a test's partition, left by its failure
        _each(Node.stop, self.nodes)
        for node in self.nodes:
            node.remove_files()
        if self.created_database:
            self._drop_database()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _drop_database(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            drop_database(self.db_dsn)

    # --- instances ------------------------------------------------------------------------------

    def _start_instances(self, count: int) -> None:
        new = [self._new_instance() for _ in range(count)]
        for instance in new:
            self.start_instance(instance, wait=False)
        self.save()
        for instance in new:
            self.wait_instance_ready(instance)

    def _new_instance(self, amqp_urls: list[str] | None = None) -> Instance:
        # Numbered after the highest so far: a removed instance's name and port are not reused.
        index = max((int(i.name.removeprefix("instance")) for i in self.instances), default=0)
        name = f"instance{index + 1}"
        if amqp_urls is None:  # instance k starts from node k, so they spread over the nodes
            urls = [node.url for node in self.nodes]
            shift = index % len(urls)
            amqp_urls = urls[shift:] + urls[:shift]
        directory = self.run_dir / "instances"
        directory.mkdir(parents=True, exist_ok=True)
        instance = Instance(
            name,
            self.ports.instance(index),
            directory / f"{name}.nodes",
            amqp_urls,
            directory / f"{name}.log",
        )
        instance.nodes_file.write_text("".join(url + "\n" for url in amqp_urls))
        self.instances.append(instance)
        return instance

    def instance(self, name: str) -> Instance:
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise ClusterError(f"no instance {name!r}; there are {[i.name for i in self.instances]}")

    def start_instance(self, instance: Instance, wait: bool = True) -> None:
        """Start (or start again) an instance on its port, with its nodes file."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
        environment["FEED_HSTS_MAX_AGE"] = CLUSTER_HSTS_MAX_AGE  # --env may set another
        environment.update(
            FEED_HOST="127.0.0.1",
            FEED_PORT=str(instance.port),
            FEED_DB_DSN=self.db_dsn,
            FEED_AMQP_URL=",".join(instance.amqp_urls),
            FEED_AMQP_NODES_FILE=str(instance.nodes_file),
            FEED_JWT_SECRET=self.jwt_secret,
            FEED_INSTANCE_NAME=instance.name,  # in /metrics, as in HAProxy and X-Served-By
            # HAProxy, on this host, is the one peer whose X-Forwarded-For and
            # X-Forwarded-Proto are believed.
            FEED_TRUSTED_PROXIES="127.0.0.1",
            **self.instance_env,
        )
        instance.pid = processes.spawn(
            [sys.executable, str(ROOT / "run.py")], instance.log_path, environment
        )
        if wait:
            self.wait_instance_ready(instance)
            self.save()

    def wait_instance_ready(self, instance: Instance) -> None:
        if not processes.wait_until(instance.is_ready, INSTANCE_START_TIMEOUT, 0.1):
            raise ClusterError(
                f"{instance.name}: /readyz not 200 in {INSTANCE_START_TIMEOUT:.0f} s:\n"
                + processes.log_tail(instance.log_path)
            )

    def add_instance(self, amqp_urls: list[str] | None = None) -> Instance:
        """One more instance, taken into HAProxy without a reload (runtime API) and written to
        its configuration for the next one."""
        instance = self._new_instance(amqp_urls)
        self.start_instance(instance)
        self.balancer.add_server(instance.name, instance.port)
        self.balancer.write_config({i.name: i.port for i in self.instances})
        self.save()
        return instance

    def remove_instance(self, name: str) -> None:
        """Take an instance out of HAProxy, stop it (SIGTERM: its clients reconnect elsewhere)."""
        instance = self.instance(name)
        self.balancer.remove_server(name)
        processes.stop(instance.pid, INSTANCE_STOP_TIMEOUT)
        self.instances.remove(instance)
        self.balancer.write_config({i.name: i.port for i in self.instances})
        self.save()

    def wait_balanced(self, timeout: float = 15.0) -> None:
        """Until HAProxy's checks see every instance that runs as UP."""

        def all_up() -> bool:
            states = self.balancer.server_states()
            running = [i.name for i in self.instances if processes.alive(i.pid)]
            # "UP 1/2": up, one check into going down or (just added) into coming up.
            return all(states.get(name, ("",))[0].startswith("UP") for name in running)

        if not processes.wait_until(all_up, timeout, 0.1):
            states = self.balancer.server_states()
            raise ClusterError(f"HAProxy does not see every instance UP: {states}")

    # --- nodes ----------------------------------------------------------------------------------

    def add_node(self) -> Node:
        """One more RabbitMQ node, joined to the cluster, and appended to every instance's nodes
        file: running instances use it at their next connection attempt, without a restart."""
        seed = next((n for n in self.nodes if processes.tcp_open(n.amqp_port)), None)
        if seed is None:
            raise ClusterError("no node of the cluster is running to join")
        node = self._new_node()
        self.save()
        launcher = node.start()
        node.wait_started(launcher)
        node.join(seed)
        for instance in self.instances:
            instance.amqp_urls.append(node.url)
            with instance.nodes_file.open("a") as nodes_file:
                nodes_file.write(node.url + "\n")
        self.save()
        return node

    def node_by_endpoint(self, endpoint: str) -> Node:
        for node in self.nodes:
            if node.endpoint == endpoint:
                return node
        raise ClusterError(f"no node listens on {endpoint}")

    # --- what runs ------------------------------------------------------------------------------

    def status(self) -> str:
        lines = [
            f"cluster in {self.run_dir}",
            f"balancer  {self.balancer.url}/  (HAProxy; {self.balancer.plain_url}/ redirects)",
        ]
        if self.balancer.ca_certs:
            lines.append(
                f"  its certificate's authority, for clients to trust: {self.balancer.ca_certs}"
            )
        try:
            states = self.balancer.server_states()
        except OSError:
            states = {}
            lines[-1] += "  NOT RUNNING"
        lines.append("instances")
        for instance in self.instances:
            state, sessions = states.get(instance.name, ("not in HAProxy", 0))
            try:
                code, body = instance.readyz()
                ready = f"ready, broker {body.get('broker')}" if code == 200 else str(body)
            except OSError:
                ready = "not answering"
            lines.append(
                f"  {instance.name:<10} {instance.url:<24} pid {instance.pid}  {ready};"
                f"  HAProxy: {state}, {sessions} connections"
            )
        lines.append("RabbitMQ nodes")
        for node in self.nodes:
            running = "running" if processes.tcp_open(node.amqp_port) else "NOT RUNNING"
            lines.append(f"  {node.name:<20} amqp {node.endpoint}  {running}")
        seed = next((n for n in self.nodes if processes.tcp_open(n.amqp_port)), None)
        if seed is not None:
            with contextlib.suppress(NodeError, ValueError):
                lines.append(f"  running in the cluster: {', '.join(seed.running_nodes())}")
        return "\n".join(lines)

    def shell_environment(self) -> str:
        """What a client of the cluster (the load test's --url) needs, as shell assignments:
        SSL_CERT_FILE makes OpenSSL's clients (Python's, curl) trust the cluster's own authority,
        in place of the system's, in that shell."""
        lines = [
            f"export FEED_CLUSTER_URL={self.balancer.url}",
            f"export FEED_DB_DSN={self.db_dsn}",
            f"export FEED_JWT_SECRET={self.jwt_secret}",
        ]
        if self.balancer.ca_certs:
            lines.append(f"export SSL_CERT_FILE={self.balancer.ca_certs}")
        return "\n".join(lines)


def _each(action: Callable, items: Iterable) -> None:
    """Run action on every item side by side (stopping nodes and instances is mostly waiting);
    one failure does not stop the others."""
    items = list(items)
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        for future in [pool.submit(action, item) for item in items]:
            with contextlib.suppress(Exception):
                future.result()


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=pathlib.Path, default=DEFAULT_RUN_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start nodes, instances and HAProxy")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--instances", type=int, default=3)
    up.add_argument(
        "--port", type=int, default=Ports.balancer, help="HAProxy's plain HTTP port (redirects)"
    )
    up.add_argument("--tls-port", type=int, default=Ports.balancer_tls, help="HTTPS and WSS")
    up.add_argument(
        "--cert",
        type=pathlib.Path,
        default=os.environ.get("FEED_CLUSTER_CERT") or None,
        help="PEM with the certificate, its chain and its key [FEED_CLUSTER_CERT]; "
        "default: one made for this cluster",
    )
    up.add_argument("--db-dsn", default=DEFAULT_DSN)
    up.add_argument(
        "--env",
        action="append",
        default=[],
        type=setting_assignment,
        metavar="NAME=VALUE",
        help="a setting of every instance (repeatable), e.g. FEED_FANOUT=process",
    )
    commands.add_parser("down", help="stop everything and remove the run directory")
    commands.add_parser("status", help="what runs")
    commands.add_parser("add-node", help="one more RabbitMQ node, used without restarts")
    commands.add_parser("add-instance", help="one more instance behind HAProxy")
    remove = commands.add_parser("remove-instance", help="take an instance out and stop it")
    remove.add_argument("name")
    commands.add_parser("reload", help="reload HAProxy (hitless)")
    commands.add_parser("env", help="shell exports for clients: URL, database, JWT secret")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            ports = Ports(balancer=args.port, balancer_tls=args.tls_port)
            cluster = Cluster(
                args.run_dir,
                ports=ports,
                db_dsn=args.db_dsn,
                instance_env=dict(args.env),
                certificate=args.cert,
            )
            cluster.up(args.nodes, args.instances)
            print(cluster.status())
            print(f"\nopen {cluster.balancer.url}/ ; scripts/cluster down stops it all")
            return 0
        cluster = Cluster.load(args.run_dir)
        if args.command == "down":
            cluster.down()
            print(f"stopped; {args.run_dir} removed")
        elif args.command == "status":
            print(cluster.status())
        elif args.command == "add-node":
            node = cluster.add_node()
            print(
                f"{node.name} on {node.endpoint} joined; instances use it from their next connect"
            )
        elif args.command == "add-instance":
            instance = cluster.add_instance()
            print(f"{instance.name} on {instance.url} is behind HAProxy")
        elif args.command == "remove-instance":
            cluster.remove_instance(args.name)
            print(f"{args.name} removed")
        elif args.command == "reload":
            cluster.balancer.reload()
            print("HAProxy reloaded")
        elif args.command == "env":
            print(cluster.shell_environment())
    except (ClusterError, NodeError, BalancerError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
