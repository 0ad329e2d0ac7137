"""HAProxy in front of the instances: its configuration, process, reload and runtime API.

It serves HTTPS and WSS on its TLS port, with a certificate (deploy/certificates.py), and answers
plain HTTP on its other port with a redirect to HTTPS.

HAProxy runs in master-worker mode in the foreground of its own session, logging to a file. The
master re-reads the configuration on SIGUSR2 (a reload: new worker, old one finishes its
connections, stopped after hard-stop-after) and stops everything on SIGTERM. Instances are added
through the runtime API while it runs, and written to the configuration for the next reload.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import string
import subprocess

from deploy import processes
from deploy.certificates import Certificate

TEMPLATE = pathlib.Path(__file__).with_name("haproxy.cfg.template")
BACKEND = "instances"
# An instance whose /readyz fails is out after two failed checks (1 s, then 250 ms later) and
# back after two good ones; a check is one cheap GET /readyz per second.
SERVER_OPTIONS = "check inter 1s fastinter 250ms downinter 500ms fall 2 rise 2"
START_TIMEOUT = 10.0


class BalancerError(Exception):
    pass


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not pathlib.Path(found).exists():
        raise BalancerError("haproxy is not installed; run scripts/ensure-cluster-tools")
    return found


@dataclasses.dataclass
class Balancer:
    port: int  # plain HTTP: redirects to tls_port
    tls_port: int  # HTTPS and WSS
    directory: pathlib.Path
    certificate: Certificate | None = None  # set before write_config
    hard_stop_after: str = "30s"
    pid: int | None = None  # the master process

    @property
    def config_path(self) -> pathlib.Path:
        return self.directory / "haproxy.cfg"

    @property
    def stats_socket(self) -> pathlib.Path:
        return self.directory / "haproxy.sock"

    @property
    def log_path(self) -> pathlib.Path:
        return self.directory / "haproxy.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_certs(self) -> str | None:
        """The authority a client must trust for url (for Tornado's ca_certs, or SSL_CERT_FILE);
        None when an operator's certificate chains to one clients already trust."""
        ca = self.certificate and self.certificate.ca
        return str(ca) if ca else None

    def write_config(self, servers: dict[str, int]) -> None:
        """The configuration for these instances (name -> port), checked by haproxy -c."""
        if self.certificate is None:
            raise BalancerError("HAProxy needs a certificate (deploy/certificates.py)")
        lines = [f"    server {name} 127.0.0.1:{port}" for name, port in servers.items()]
        text = string.Template(TEMPLATE.read_text()).substitute(
            hard_stop_after=self.hard_stop_after,
            stats_socket=self.stats_socket,
            bind=f"127.0.0.1:{self.port}",
            tls_bind=f"127.0.0.1:{self.tls_port}",
            certificate=self.certificate.pem,
            https_port_suffix="" if self.tls_port == 443 else f":{self.tls_port}",
            server_options=SERVER_OPTIONS,
            servers="\n".join(lines),
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        candidate = self.config_path.with_suffix(".new")
        candidate.write_text(text)
        check = subprocess.run(
            [haproxy_binary(), "-c", "-q", "-f", str(candidate)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise BalancerError(f"HAProxy refuses {candidate}:\n{check.stdout}{check.stderr}")
        candidate.replace(self.config_path)

    def start(self) -> None:
        self.pid = processes.spawn(
            [haproxy_binary(), "-W", "-f", str(self.config_path)], self.log_path
        )
        if not processes.wait_until(self._serving, START_TIMEOUT):
            raise BalancerError(f"HAProxy did not start:\n{processes.log_tail(self.log_path)}")

    def _serving(self) -> bool:
        if not processes.alive(self.pid):
            raise BalancerError(f"HAProxy exited:\n{processes.log_tail(self.log_path)}")
        return (
            processes.tcp_open(self.port)
            and processes.tcp_open(self.tls_port)
            and self.stats_socket.exists()
        )

    def worker_pid(self) -> int:
        for line in self.command("show info").splitlines():
            if line.startswith("Pid:"):
                return int(line.split(":")[1])
        raise BalancerError("show info has no Pid")

    def reload(self) -> None:
        """Start a new worker with the configuration file as it is now; the old worker keeps its
        connections until they end or hard-stop-after. Returns once the new worker answers."""
        old = self.worker_pid()

        def reloaded() -> bool:
            try:
                return self.worker_pid() != old
            except OSError:
                return False  # the new worker is replacing the socket

        os.kill(self.pid, signal.SIGUSR2)
        if not processes.wait_until(reloaded, START_TIMEOUT):
            raise BalancerError(f"HAProxy did not reload:\n{processes.log_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop at once: every connection, websockets included, is closed."""
        processes.stop(self.pid, timeout=5)
        self.stats_socket.unlink(missing_ok=True)

    def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def add_server(self, name: str, port: int) -> None:
        """Add an instance while HAProxy runs: created in maintenance, then checked and enabled.
        (Servers added at run time do not take default-server's settings: they are repeated.)"""
        self._run_commands(
            [
                f"add server {BACKEND}/{name} 127.0.0.1:{port} {SERVER_OPTIONS}",
                f"enable health {BACKEND}/{name}",
                f"enable server {BACKEND}/{name}",
            ],
            success="New server registered",
        )

    def remove_server(self, name: str) -> None:
        """Take an instance out while HAProxy runs; its open connections are closed."""
        self._run_commands(
            [
                f"set server {BACKEND}/{name} state maint",
                f"shutdown sessions server {BACKEND}/{name}",
                f"del server {BACKEND}/{name}",
            ],
            success="Server deleted",
        )

    def _run_commands(self, lines: list[str], success: str) -> None:
        """Runtime API commands in order; each answers nothing, or `success`, or an error."""
        for line in lines:
            answer = self.command(line).strip()
            if answer and success not in answer:
                raise BalancerError(f"HAProxy: {line}: {answer}")

    def server_states(self) -> dict[str, tuple[str, int]]:
        """Instance name -> (status as HAProxy's checks see it, e.g. UP/DOWN, current sessions)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = (row["status"], int(row["scur"] or 0))
        return states
