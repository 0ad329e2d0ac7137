"""RabbitMQ nodes of the local cluster: extra nodes on this machine, never its own node.

The machine's node (rabbit@localhost on 5672) is shared with other work and is never touched.
Each cluster node is `<prefix><n>@localhost` with its own AMQP listener, distribution port,
configuration, data and log directories and pid file, all under the cluster's run directory:
- RABBITMQ_CONF_ENV_FILE points at an empty file, because /etc/rabbitmq/rabbitmq-env.conf sets
  NODENAME=rabbit@localhost;
- RABBITMQ_CONFIG_FILE is the node's own file, because /etc/rabbitmq/rabbitmq.conf sets a
  listener on 5672 that would override RABBITMQ_NODE_PORT.
Nodes run as the `rabbitmq` user with HOME=/var/lib/rabbitmq, so that they (and rabbitmqctl) share
the Erlang cookie; distribution and epmd listen on loopback only.

Clustering is RabbitMQ's own: a new node starts standalone, then `stop_app`, `join_cluster
<first node>`, `start_app`. A node that was stopped or killed rejoins by itself when it starts
again with the same data directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import pwd
import shutil
import string
import subprocess

from deploy import processes

RABBITMQ_BIN = pathlib.Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = "/var/lib/rabbitmq"  # holds the Erlang cookie
CONFIG_TEMPLATE = pathlib.Path(__file__).with_name("rabbitmq-node.conf.template")
BOOT_TIMEOUT = 90.0  # seconds; a node boots in 5-10 s on an idle machine
CTL_TIMEOUT = 90.0


class NodeError(Exception):
    """A node did not start, or rabbitmqctl failed (the message has its output)."""


# The commands below run with this environment only: nothing of the caller's (a RABBITMQ_* or
# FEED_* variable) leaks into a node.
BASE_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C.UTF-8"}


def as_root() -> list[str]:
    return [] if os.getuid() == 0 else ["sudo", "-n"]


def as_rabbitmq() -> list[str]:
    """The command prefix that runs a command as the rabbitmq user (root or passwordless sudo)."""
    if pwd.getpwuid(os.getuid()).pw_name == "rabbitmq":
        return []
    if os.getuid() == 0:
        return ["runuser", "-u", "rabbitmq", "--"]
    return ["sudo", "-n", "-u", "rabbitmq", "--"]


@dataclasses.dataclass
class Node:
    name: str  # e.g. feed1@localhost
    amqp_port: int
    dist_port: int
    directory: pathlib.Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    @property
    def dist_source(self) -> str:
        """The loopback address this node's distribution connections leave from: one of its own
        (every 127.x.y.z is loopback), so that a rule can cut the link between two nodes and
        leave every other connection alone (cut_link)."""
        return f"127.{self.dist_port >> 8}.{self.dist_port & 255}.2"

    @property
    def pid_file(self) -> pathlib.Path:
        return self.directory / "data" / "pid"

    @property
    def log_path(self) -> pathlib.Path:
        return self.directory / "stdout.log"

    def _environment(self) -> list[str]:
        data = self.directory / "data"
        return [
            f"HOME={RABBITMQ_HOME}",
            *(f"{name}={value}" for name, value in BASE_ENVIRONMENT.items()),
            f"RABBITMQ_CONF_ENV_FILE={self.directory / 'rabbitmq-env.conf'}",
            f"RABBITMQ_CONFIG_FILE={self.directory / 'rabbitmq.conf'}",
            f"RABBITMQ_ADVANCED_CONFIG_FILE={self.directory / 'advanced.config'}",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={self.directory / 'enabled_plugins'}",
            f"RABBITMQ_NODENAME={self.name}",
            f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_MNESIA_BASE={data / 'mnesia'}",
            f"RABBITMQ_LOG_BASE={data / 'log'}",
            f"RABBITMQ_PID_FILE={self.pid_file}",
            "ERL_EPMD_ADDRESS=127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
            f" -kernel inet_dist_connect_options [{{ip,{{{self.dist_source.replace('.', ',')}}}}}]",
        ]

    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        config = string.Template(CONFIG_TEMPLATE.read_text()).substitute(amqp_port=self.amqp_port)
        (self.directory / "rabbitmq.conf").write_text(config)
        (self.directory / "rabbitmq-env.conf").write_text("")
        (self.directory / "enabled_plugins").write_text("[].\n")
        # Data and logs are written by the node itself, as the rabbitmq user; readable by all, so
        # that the pid file and the logs can be read without sudo.
        data = str(self.directory / "data")
        owner = ["-o", "rabbitmq", "-g", "rabbitmq", "-m", "755"]
        install = [*as_root(), "install", "-d", *owner, data]
        subprocess.run(install, check=True, env=BASE_ENVIRONMENT)

    def start(self) -> int:
        """Start the node in the background (it boots in seconds; see wait_started)."""
        self._write_files()
        with contextlib.suppress(OSError):  # a killed node's; the node writes its own at boot
            self.pid_file.unlink()
        server = str(RABBITMQ_BIN / "rabbitmq-server")
        return processes.spawn(
            [*as_rabbitmq(), "env", *self._environment(), server], self.log_path, BASE_ENVIRONMENT
        )

    def wait_started(self, launcher_pid: int | None, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the node accepts AMQP connections: its listener opens last in the boot."""

        def up() -> bool:
            if launcher_pid and not processes.alive(launcher_pid):
                raise NodeError(f"{self.name} exited:\n{processes.log_tail(self.log_path)}")
            return processes.tcp_open(self.amqp_port)

        if not processes.wait_until(up, timeout, 0.2):
            raise NodeError(f"{self.name} not up in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return processes.log_tail(self.log_path)

    def ctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """rabbitmqctl -n <node> args...; its output, or NodeError with the output."""
        command = [
            *as_rabbitmq(),
            "env",
            *self._environment(),
            str(RABBITMQ_BIN / "rabbitmqctl"),
            "-n",
            self.name,
            *args,
        ]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=BASE_ENVIRONMENT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NodeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: timed out") from exc
        if result.returncode != 0:
            raise NodeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed:\n{result.stdout}"
                f"{result.stderr}"
            )
        return result.stdout

    def join(self, seed: Node) -> None:
        self.ctl("stop_app")
        self.ctl("join_cluster", seed.name)
        self.ctl("start_app")

    def cut_link(self, other: Node) -> None:
        """A network partition between this node and `other`, until restore_link: every packet
        between them is dropped (iptables, on loopback), while their connections with clients,
        with the third node and with rabbitmqctl go on. The link is then dropped at once, as
        RabbitMQ would drop it after net_ticktime (60 s) of silence, and cannot come back."""
        for rule in self._link_rules(other):
            subprocess.run([*as_root(), "iptables", "-I", "OUTPUT", *rule], check=True)
        self.ctl("eval", f"erlang:disconnect_node('{other.name}').")

    def restore_link(self, other: Node) -> None:
        """End a cut_link (nothing if there is none): the nodes may connect again."""
        if not shutil.which("iptables"):
            return  # then no link was ever cut here
        for rule in self._link_rules(other):
            while (
                subprocess.run(
                    [*as_root(), "iptables", "-D", "OUTPUT", *rule], capture_output=True
                ).returncode
                == 0
            ):
                pass  # a rule inserted twice is deleted twice

    def _link_rules(self, other: Node) -> list[list[str]]:
        """Both directions of both connections either node may open to the other."""
        rules = []
        for node, peer in ((self, other), (other, self)):
            rules.append(["-s", node.dist_source, "-p", "tcp", "--dport", str(peer.dist_port)])
            rules.append(["-d", node.dist_source, "-p", "tcp", "--sport", str(peer.dist_port)])
        comment = ["-m", "comment", "--comment", f"feed link cut {self.name} {other.name}"]
        return [[*rule, *comment, "-j", "DROP"] for rule in rules]

    def partitions(self, timeout: float = CTL_TIMEOUT) -> dict[str, list[str]]:
        """Node -> the nodes it is partitioned from, as this node sees it ({} when whole)."""
        status = json.loads(self.ctl("cluster_status", "--formatter", "json", timeout=timeout))
        return status.get("partitions") or {}

    def set_partition_handling(self, mode: str) -> None:
        """Change cluster_partition_handling on the running node (until it restarts: its
        configuration file says pause_minority). The tests use `ignore`, RabbitMQ's default, to
        show that the service heals when the broker does nothing."""
        if mode not in ("ignore", "pause_minority", "autoheal"):
            raise ValueError(f"not a partition handling mode: {mode!r}")
        self.ctl("eval", f"application:set_env(rabbit, cluster_partition_handling, {mode}).")

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as this node sees them."""
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def beam_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        return processes.alive(self.beam_pid())

    def kill(self) -> None:
        """kill -9 the node's Erlang VM: a crash, with no chance to tell anyone."""
        pid = self.beam_pid()
        if pid is None:
            raise NodeError(f"{self.name} has no pid file")
        kill = [*as_rabbitmq(), "kill", "-KILL", str(pid)]
        subprocess.run(kill, check=True, env=BASE_ENVIRONMENT)
        processes.wait_until(lambda: not processes.alive(pid), 10)

    def stop(self) -> None:
        """Stop the node (rabbitmqctl stop waits for the VM to exit); kill it if that fails."""
        if not self.is_running():
            return
        try:
            self.ctl("stop", str(self.pid_file), timeout=30)
        except NodeError:
            self.kill()

    def remove_files(self) -> None:
        data = str(self.directory / "data")
        subprocess.run([*as_root(), "rm", "-rf", data], check=False, env=BASE_ENVIRONMENT)
