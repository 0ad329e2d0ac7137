"""Background processes of the local cluster, tracked by pid so that a later `scripts/cluster`
command (another Python process) can signal, wait for and stop what an earlier one started.

Every process gets a session of its own: a Ctrl-C in the terminal that ran `scripts/cluster up`
does not reach them, and a process group can be killed as a whole (run.py's workers, the
rabbitmq-server shell and its Erlang VM).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from feed_app.pids import process_exists

# Popen objects of the processes started by this Python process: polling them reaps the zombie a
# dead child would otherwise leave (its pid would look alive to os.kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


def spawn(argv: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None) -> int:
    """Start argv in its own session, stdout and stderr appended to log_path; returns the pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=pathlib.Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
    _CHILDREN[process.pid] = process
    return process.pid


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return process_exists(pid)  # also another user's (a RabbitMQ node's Erlang VM)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def stop(pid: int | None, timeout: float, signum: int = signal.SIGTERM) -> None:
    """Send signum, wait up to timeout for the exit, then SIGKILL the process group."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    if not wait_until(lambda: not alive(pid), timeout):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5)


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers do: a port with only closed connections lingering (TIME-WAIT) is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
