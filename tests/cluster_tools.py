"""What the cluster tests (tests/test_cluster.py, tests/test_partitions.py) share, beside their
fixtures in tests/conftest.py: the tools they need, blocking calls off the loop, and the fault
table's rows."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from deploy import processes
from deploy.cluster import Cluster, Instance

ROOT = pathlib.Path(__file__).resolve().parent.parent
HARD_STOP_AFTER = 3  # seconds HAProxy's old worker keeps its connections after a reload
OUTBOX_LEASE = 2  # seconds before another instance republishes a dead one's posts


def ensure_cluster_tools() -> None:
    """HAProxy and RabbitMQ installed (scripts/ensure-cluster-tools installs them if it can). In
    CI a missing tool fails the module: these tests must not pass by being skipped."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure-cluster-tools")], capture_output=True, text=True
    )
    if result.returncode != 0:
        message = f"the cluster tests need HAProxy, RabbitMQ and iptables: {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def took(started: float) -> str:
    return f"took {time.monotonic() - started:.1f} s"


async def blocking(function: Callable, *args: Any) -> Any:
    """Run a blocking call (rabbitmqctl takes about a second) without stalling the clients."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def running(cluster: Cluster) -> list[str]:
    return [i.name for i in cluster.instances if processes.alive(i.pid)]


async def broker_of(instance: Instance) -> str:
    """host:port of the RabbitMQ node an instance is connected to (its /readyz says)."""
    code, body = await blocking(instance.readyz)
    assert code == 200, f"{instance.name}: {body}"
    return body["broker"]


def record(fault_table: list, fault: str, heal: float, outcome: Any, note: str = "") -> None:
    notes = f"{note}; {outcome.detail}" if note else outcome.detail
    fault_table.append((fault, f"{heal:.2f} s", outcome.lost, outcome.duplicated, notes))


def assert_exact(outcome: Any) -> None:
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome.detail
    assert "missing" not in outcome.detail, outcome.detail
