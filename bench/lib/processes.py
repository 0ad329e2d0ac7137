"""Processes the load test starts (the service, the bare push server): start, wait, stop, logs.

Each runs in its own session (process group), so a Ctrl-C in the terminal reaches only the load
test, which then stops them itself in order: SIGTERM (the service shuts down gracefully), and
SIGKILL to the group only if that did not end it in time. Every ManagedProcess registers itself so
that the load test's last `finally` can stop whatever is still running, whatever went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from bench.lib.procstats import descendants

REPO = pathlib.Path(__file__).resolve().parents[2]
_RUNNING: list[ManagedProcess] = []


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: pathlib.Path,
        env: dict[str, str] | None = None,
        cwd: pathlib.Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        _RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The process and its children (run.py --workers N forks)."""
        return descendants(self.pid) if self.process.poll() is None else []

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the process group. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        # Forked workers are in the same group; none may outlive their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        if self in _RUNNING:
            _RUNNING.remove(self)
        return self.process.returncode


def stop_all() -> None:
    """Stop every process still running (the last resort of the load test's `finally`)."""
    for process in list(_RUNNING):
        process.stop(timeout=5)


async def wait_ready(url: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Poll GET <url>/readyz until 200; fail early if the process exits."""
    client = AsyncHTTPClient()
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.process.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.process.returncode}; see {process.log_path}"
            )
        try:
            response = await client.fetch(f"{url}/readyz", request_timeout=2, connect_timeout=2)
            if response.code == 200:
                return
        except HTTPClientError as exc:
            last_error = f"HTTP {exc.code}"
        except OSError as exc:
            last_error = type(exc).__name__
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last_error})")


@dataclasses.dataclass
class OwnService:
    url: str
    process: ManagedProcess
    jwt_secret: str


async def start_service(
    db_dsn: str,
    amqp_url: str,
    settings: dict[str, str],
    log_path: pathlib.Path,
    args: Sequence[str] = (),
) -> OwnService:
    """run.py on a free port of 127.0.0.1 with a random JWT secret and these FEED_* settings
    (none from this environment) and run.py arguments; returns once it is ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
    env.update(FEED_DB_DSN=db_dsn, FEED_AMQP_URL=amqp_url, FEED_JWT_SECRET=secrets.token_hex(32))
    env.update(settings)
    argv = [sys.executable, str(REPO / "run.py"), "--host", "127.0.0.1", "--port", str(port)]
    service = ManagedProcess("the service", [*argv, *args], log_path, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(url, 60, service)
    return OwnService(url, service, env["FEED_JWT_SECRET"])


@contextlib.asynccontextmanager
async def own_service(
    db_dsn: str, amqp_url: str, settings: dict[str, str], log_path: pathlib.Path
) -> AsyncIterator[OwnService]:
    """start_service, with its users' ids from a random block above 10^12 as in the load test
    (posts are routed by author id on a broker others share); stops it after."""
    service = await start_service(db_dsn, amqp_url, settings, log_path)
    try:
        await asyncio.to_thread(_ids_from_a_random_block, db_dsn)
        yield service
    finally:
        service.process.stop()


def _ids_from_a_random_block(dsn: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        first = 10**12 + secrets.randbelow(9 * 10**5) * 10**7
        cur.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), %s)", (first,))
    conn.close()


# --- the service's log ---------------------------------------------------------------------------

# run.py logs "<time> <pid> <logger> <message>" without the level, so problems are found by what
# they say: tracebacks, access-log lines with a 4xx/5xx status, and the service's own warnings.
_ACCESS = re.compile(r" tornado\.access (\d{3}) ")
_PROBLEM = re.compile(
    r"Traceback|Error|Exception|exception|unavailable|lost|closed \(|cannot|refused|fell behind"
    r"|republishing|not published|not announced|destroyed|did not close|not flushed",
)


def scan_log(path: pathlib.Path, limit: int = 30) -> dict[str, object]:
    """Count and quote the lines of a service log that suggest something went wrong."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0, "problems": 0, "examples": []}
    problems = []
    for line in lines:
        access = _ACCESS.search(line)
        if access:
            # /readyz answers 503 by design until the broker is set up; the load test polls it.
            if int(access[1]) >= 400 and " /readyz " not in line:
                problems.append(line)
        elif _PROBLEM.search(line) or line.startswith((" ", "\t")):
            problems.append(line)  # indented lines are traceback bodies
    return {"lines": len(lines), "problems": len(problems), "examples": problems[:limit]}
