"""Resource readings from /proc (CPU seconds, RSS) and from RabbitMQ's command-line tools.

/proc is read directly (no psutil dependency): utime+stime of /proc/<pid>/stat and VmRSS of
/proc/<pid>/status are all the load test needs, and reading them costs microseconds. The RabbitMQ
CLI tools start an Erlang VM and take a noticeable fraction of a second to seconds, so they are
called a couple of times per run by the load test, and every few seconds (list_queues only, about
half a second) by the soak.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Collection, Iterable
from typing import Any

from feed_app.wire import CONTROL_PREFIX, EXCHANGE, PROCESS_QUEUE, SESSION_QUEUE

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CLI_TIMEOUT = 30.0  # seconds; rabbitmqctl with 10,000 queues takes a few


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (run.py --workers N forks N workers under one parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def processes_named(name: str) -> list[int]:
    """Pids whose command name is `name` (e.g. beam.smp, the RabbitMQ VM)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (the ones that still exist)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:  # fields[11], [12] are utime, stime (stat fields 14 and 15)
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def run_queue_seconds(pids: Iterable[int]) -> float:
    """Time the threads of these processes spent runnable but waiting for a CPU (the second
    field of /proc/<pid>/task/<tid>/schedstat): on shared cores, the latency a busy neighbour
    adds to every hop of a post."""
    total = 0
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(pathlib.Path(path).read_text().split()[1])
    return total / 1e9


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of VmRSS. Forked workers share pages with their parent, so this over-counts a little
    for --workers > 1; the per-session figure is a difference and is not affected much."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def open_fds(pids: Iterable[int]) -> int:
    """Open file descriptors of these processes (the ones that still exist)."""
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def connections_to_port(pids: Iterable[int], port: int) -> int:
    """How many of these processes' fds are TCP sockets whose remote port is `port`: tells a
    connection pool's sockets (which grow with demand up to the pool's size) from the rest."""
    inodes = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.append(link[8:-1])
    remote_ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # header
                for line in f:
                    fields = line.split()  # fields[2] is rem_address "hexip:hexport", [9] inode
                    remote_ports[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return sum(1 for inode in inodes if remote_ports.get(inode) == port)


class CpuMeter:
    """CPU seconds of a set of processes between start() and stop(), and the seconds their
    threads waited for a CPU meanwhile."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start = self._start_waiting = 0.0
        self.seconds = self.waiting_seconds = 0.0

    def start(self) -> None:
        pids = self._pids()
        self._start, self._start_waiting = cpu_seconds(pids), run_queue_seconds(pids)

    def stop(self) -> float:
        pids = self._pids()
        self.seconds = cpu_seconds(pids) - self._start
        self.waiting_seconds = run_queue_seconds(pids) - self._start_waiting
        return self.seconds


# --- RabbitMQ --------------------------------------------------------------------------------


async def _run_cli(*argv: str) -> Any | None:
    """Run a RabbitMQ CLI command with --formatter json; None if unavailable or failing."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            "--formatter",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return None
    if process.returncode != 0:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


MEMORY_PARTS = ("queue_procs", "mnesia", "other_ets", "binary")  # where queues and bindings live


async def broker_pid() -> int | None:
    """The OS pid of the RabbitMQ node that rabbitmqctl talks to (other nodes may run on the
    machine, so "every beam.smp" can be more than one broker)."""
    status = await _run_cli("rabbitmqctl", "status")
    try:
        return int(status["pid"]) if isinstance(status, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def run_queue_matcher(user_ids: range, service_pids: Collection[int]) -> Callable[[str], bool]:
    """Whether a queue belongs to this run: a session queue of one of its users, or the process
    queue of one of its service's processes. The broker is shared, so the rest is not counted."""
    pids = set(service_pids)

    def ours(name: str) -> bool:
        if match := SESSION_QUEUE.match(name):
            return int(match[1]) in user_ids
        if match := PROCESS_QUEUE.match(name):
            return int(match[1]) in pids
        return False

    return ours


async def queue_counts(
    user_ids: range, service_pids: Collection[int] = ()
) -> dict[str, int] | None:
    """{"all": queues on the broker, "sessions": this run's queues (run_queue_matcher)}; one
    `rabbitmqctl list_queues` (about half a second), None if it is unavailable or failed."""
    queues = await _run_cli("rabbitmqctl", "list_queues", "-q", "name")
    if not isinstance(queues, list):
        return None
    ours = run_queue_matcher(user_ids, service_pids)
    return {"all": len(queues), "sessions": sum(1 for q in queues if ours(str(q.get("name", ""))))}


async def rabbitmq_snapshot(user_ids: range, service_pids: Collection[int]) -> dict[str, Any]:
    """Queues, bindings and memory: all queues on the broker (it is shared with other users of
    the machine), and the queues and amq.direct bindings of this run (see run_queue_matcher).
    In process mode one queue serves every socket of a process, so the bindings, not the queues,
    say what the sockets cost the broker. The broker's total memory is its RSS (read from /proc
    by the caller); from here come the parts queues and bindings live in."""
    queues, bindings, memory = await asyncio.gather(
        _run_cli("rabbitmqctl", "list_queues", "-q", "name", "memory"),
        _run_cli(
            "rabbitmqctl", "list_bindings", "-q", "source_name", "destination_name", "routing_key"
        ),
        _run_cli("rabbitmq-diagnostics", "-q", "memory_breakdown"),
    )
    ours = run_queue_matcher(user_ids, service_pids)
    result: dict[str, Any] = {"available": queues is not None}
    if isinstance(queues, list):
        run_queues = [q for q in queues if ours(str(q.get("name", "")))]
        result.update(
            queues_total=len(queues),
            run_queues=len(run_queues),
            run_process_queues=sum(1 for q in run_queues if PROCESS_QUEUE.match(q["name"])),
            run_queue_memory_bytes=sum(int(q.get("memory") or 0) for q in run_queues),
        )
    if isinstance(bindings, list):
        keys = [
            str(b.get("routing_key", ""))
            for b in bindings
            if b.get("source_name") == EXCHANGE and ours(str(b.get("destination_name", "")))
        ]
        control = sum(1 for key in keys if key.startswith(CONTROL_PREFIX))
        result.update(run_bindings=len(keys), run_control_bindings=control)
    if isinstance(memory, dict):
        for part in MEMORY_PARTS:
            result[f"{part}_bytes"] = int(memory.get(part, {}).get("bytes", 0))
        result["connection_bytes"] = sum(
            int(v.get("bytes", 0)) for k, v in memory.items() if k.startswith("connection_")
        )
    return result
