"""Processes the bench tools start (the service, the bare push server): start, wait, stop, logs.

Each runs in its own session (process group), so a Ctrl-C in the terminal reaches only the tool,
which then stops them itself in order: SIGTERM (the service shuts down gracefully), and SIGKILL
to the group only if that did not end it in time. Every ManagedProcess registers itself so that
run_tool can stop whatever is still running, whatever went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from bench.lib.procstats import descendants

REPO = pathlib.Path(__file__).resolve().parents[2]
_RUNNING: list[ManagedProcess] = []
T = TypeVar("T")


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
    """Stop every process still running (the last resort of a tool's `finally`)."""
    for process in list(_RUNNING):
        process.stop(timeout=5)


def raise_fd_limit() -> None:
    """Every socket is a file here and in the service (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_tool(work: Coroutine[Any, Any, T], name: str) -> T:
    """Run a tool's work with its open-file limit raised, and stop whatever it started, however
    it ends: exit 130 on Ctrl-C, 2 when it could not be carried out (a process did not start,
    PostgreSQL refused, ...), with one line instead of a traceback."""
    raise_fd_limit()
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (RuntimeError, OSError, ValueError, psycopg2.Error) as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        stop_all()


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
