"""Network partitions between RabbitMQ nodes, on a cluster of this module's own (three nodes,
three instances, HAProxy: tests/conftest.py's `cluster`), each while an author posts steadily
through every instance and feeds of its followers are open on every one.

The link between two nodes is cut with iptables on loopback (deploy/rabbit_nodes.py, cut_link):
every packet between them is dropped, every other connection goes on, as in a real partition. A
feed must show every committed post exactly once through each; how soon the partition was found,
and how soon every feed was live again, go into the module's fault table
(bench/results/partition-faults.md). docs/partitions.md says what the service does about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from typing import Any

import pytest

from deploy import processes
from deploy.cluster import Cluster, Instance
from deploy.rabbit_nodes import Node, NodeError
from feed_app.config import MODES
from tests.cluster_tools import ROOT, assert_exact, blocking, broker_of, record, running

FAULT_TABLE = ROOT / "bench" / "results" / "partition-faults.md"
CUT_SECONDS = 8.0  # how long a staged partition keeps the link down
CTL_TIMEOUT = 20.0  # seconds for rabbitmqctl on a node that may hang in the partition
STOP_APP_TIMEOUT = 30.0  # seconds before a hung stop_app is given up for a restart of the node


class PathWatch:
    """Polls every instance's /readyz while a fault runs: when the first one said its delivery
    path was broken, or (the broker acting first) lost or changed its RabbitMQ node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.brokers = {i.name: readyz(i)[1].get("broker") for i in cluster.instances}
        self.first_broken: float | None = None
        self.first_moved: float | None = None
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            answers = await asyncio.gather(*(blocking(readyz, i) for i in self.cluster.instances))
            now = loop.time()
            for instance, (code, body) in zip(self.cluster.instances, answers, strict=True):
                if body.get("delivery_path") == "broken" and self.first_broken is None:
                    self.first_broken = now
                if (code, body.get("broker")) != (200, self.brokers[instance.name]):
                    self.first_moved = self.first_moved or now
            await asyncio.sleep(0.1)

    def found(self, moment: float) -> str:
        """How long after `moment` the fault was seen, and by whom."""
        seen = [
            (when - moment, who)
            for when, who in ((self.first_broken, "the path check"), (self.first_moved, "a move"))
            if when is not None
        ]
        if not seen:
            return "seen by nobody"
        took, who = min(seen)
        return f"found in {took:.1f} s by {who}"

    def stop(self) -> None:
        self._task.cancel()


def readyz(instance: Instance) -> tuple[int, dict]:
    """/readyz, or 0 when the instance does not answer at all."""
    try:
        return instance.readyz()
    except (OSError, ValueError):
        return 0, {}


def fanout_of(instance: Instance) -> str:
    """The fan-out mode the instance runs in (feed_instance_info in its /metrics)."""
    with urllib.request.urlopen(instance.url + "/metrics", timeout=5) as response:
        found = re.search(r'feed_instance_info\{[^}]*fanout="(\w+)"', response.read().decode())
    assert found, f"{instance.name}: no feed_instance_info"
    return found[1]


async def respread(cluster: Cluster, fanout: str) -> None:
    """Every instance in this fan-out mode, on the first node of its list (instance k on node k),
    restarted where it is not: so that a cut between two nodes lies between two instances."""
    cluster.instance_env["FEED_FANOUT"] = fanout
    for index, instance in enumerate(cluster.instances):
        code, body = await blocking(readyz, instance)
        home = cluster.nodes[index % len(cluster.nodes)].endpoint
        if code == 200 and body["broker"] == home and await blocking(fanout_of, instance) == fanout:
            continue
        await blocking(processes.stop, instance.pid, 15)
        await blocking(cluster.start_instance, instance)
    await blocking(cluster.wait_balanced)


async def set_partition_handling(cluster: Cluster, mode: str) -> None:
    await asyncio.gather(*(blocking(node.set_partition_handling, mode) for node in cluster.nodes))


async def partitioned(cluster: Cluster) -> dict[str, int]:
    """Node -> how many nodes it is partitioned from, as any node sees it ({} when whole). A
    node paused by pause_minority counts as cut off from all (it resumes by itself)."""

    async def view(node: Any) -> dict[str, list[str]]:
        try:
            return await blocking(node.partitions, CTL_TIMEOUT)
        except NodeError:  # its rabbit app is paused, or it hangs
            return {node.name: [other.name for other in cluster.nodes if other is not node]}

    cut_off: dict[str, int] = {}
    for partitions in await asyncio.gather(*(view(node) for node in cluster.nodes)):
        for name, others in partitions.items():
            cut_off[name] = max(cut_off.get(name, 0), len(others))
    return cut_off


async def settled(cluster: Cluster, timeout: float) -> dict[str, int]:
    """Wait (bounded) for the cluster to be whole by itself; what is still partitioned."""
    for _ in range(int(timeout / 0.5)):
        if not (cut_off := await partitioned(cluster)):
            break
        await asyncio.sleep(0.5)
    return cut_off


async def heal_partitions(cluster: Cluster) -> list[str]:
    """What an operator does once the link is back, if RabbitMQ does not heal by itself: restart
    the node cut off from the most others, until no node reports a partition. Returns the nodes
    restarted."""
    restarted: list[str] = []
    while cut_off := await settled(cluster, 10):
        assert len(restarted) < len(cluster.nodes), f"still partitioned: {cut_off}"
        name = max(sorted(cut_off), key=lambda n: cut_off[n])
        node = next(node for node in cluster.nodes if node.name == name)
        await blocking(restart_node, node)
        restarted.append(name)
    return restarted


def restart_node(node: Node) -> None:
    """stop_app and start_app; a node coming out of a pause can hang in stop_app, and then the
    operator restarts the whole node on its data directory (docs/partitions.md)."""
    try:
        node.ctl("stop_app", timeout=STOP_APP_TIMEOUT)
        node.ctl("start_app")
    except NodeError:
        node.kill()
        node.wait_started(node.start())


async def paths_whole(cluster: Cluster, timeout: float = 20) -> None:
    """Every instance reports its delivery path whole (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answers = await asyncio.gather(*(blocking(readyz, i) for i in cluster.instances))
        paths = [body.get("delivery_path", f"HTTP {code}") for code, body in answers]
        if paths == ["whole"] * len(paths):
            return
        assert loop.time() < deadline, f"delivery paths not whole within {timeout} s: {paths}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def partition(cluster: Cluster, *cuts: tuple[Any, Any]) -> Any:
    """The links between these pairs of nodes cut for CUT_SECONDS from entering (or until an
    error), every other connection left alone; yields the loop time the cut began."""
    try:
        await asyncio.gather(*(blocking(node.cut_link, other) for node, other in cuts))
        moment = asyncio.get_running_loop().time()
        yield moment
        await asyncio.sleep(max(0.0, moment + CUT_SECONDS - asyncio.get_running_loop().time()))
    finally:
        for node, other in cuts:
            await blocking(node.restore_link, other)


@pytest.mark.parametrize("fanout", MODES)
@pytest.mark.gen_test(timeout=420)
async def test_a_partition_the_broker_does_nothing_about(cluster, scene, fault_table, fanout):
    """Proves: under RabbitMQ's default partition handling (`ignore`: both sides go on, each
    having dropped the other's queues and bindings, and stay so once the link is back), a
    partition between the nodes of two instances, with posts flowing both ways across it, loses
    and duplicates no post, and the instances find it themselves within seconds (the broker says
    nothing). Then, the partition outliving the cut, each instance is sent back to its own node,
    the third included: still exact. Then an operator restarts a node, the cluster is whole, every
    instance's path is whole again without a restart of its own, and live posts flow."""
    await respread(cluster, fanout)
    await set_partition_handling(cluster, "ignore")
    watch = None
    try:
        await scene.open(running(cluster))
        loop = asyncio.get_running_loop()
        first, second = [
            cluster.node_by_endpoint(await broker_of(i)) for i in cluster.instances[:2]
        ]
        watch = PathWatch(cluster)
        async with partition(cluster, (first, second)) as moment:
            heal = await scene.time_to_heal(moment, CUT_SECONDS + 20)
            found = watch.found(moment)
        await asyncio.sleep(1)  # the nodes meet again, and see that they were partitioned
        assert await partitioned(cluster), "the partition did not outlive the cut"

        await respread(cluster, fanout)  # back on their own nodes, the third one's included
        after = await scene.time_to_heal(loop.time(), 30)

        restarted = await heal_partitions(cluster)
        await paths_whole(cluster)
        outcome = await scene.finish()
        note = (
            f"{found}; after it, each instance back on its own node: live in {after:.1f} s; "
            f"operator restarted {', '.join(restarted)}, every path whole again"
        )
        fault = f"partition {first.name}-{second.name} under `ignore`, {fanout} mode"
        record(fault_table, fault, heal, outcome, note)
        assert_exact(outcome)
    finally:
        if watch:
            watch.stop()
        await set_partition_handling(cluster, "pause_minority")
        await heal_partitions(cluster)


@pytest.mark.parametrize("fanout", MODES)
@pytest.mark.gen_test(timeout=420)
async def test_a_node_cut_off_from_both_others_pauses(cluster, scene, fault_table, fanout):
    """Proves: with the cluster's configured `pause_minority`, a node cut off from both others
    (an instance publishing through it is on the minority side) pauses, and no post is lost or
    duplicated in either mode, though the other nodes may hang while they wait on it; once the
    link is back the node rejoins (restarted by an operator if RabbitMQ left a partition
    recorded) and every instance's path is whole."""
    await respread(cluster, fanout)
    watch = None
    try:
        await scene.open(running(cluster))
        alone = cluster.node_by_endpoint(await broker_of(cluster.instances[0]))
        others = [node for node in cluster.nodes if node is not alone]
        watch = PathWatch(cluster)
        async with partition(cluster, *((alone, other) for other in others)) as moment:
            pass
        # The majority side may hang, waiting on the cut-off node, rather than carry on: the
        # feeds are whole again once the link is back, at the latest.
        heal = await scene.time_to_heal(moment, 30)
        found = watch.found(moment)
        restarted = await heal_partitions(cluster)
        await paths_whole(cluster)
        outcome = await scene.finish()
        note = f"{found}; operator restarted {', '.join(restarted) or 'nothing'}"
        fault = f"{alone.name} cut off from both others, `pause_minority`, {fanout} mode"
        record(fault_table, fault, heal, outcome, note)
        assert_exact(outcome)
    finally:
        if watch:
            watch.stop()
        await heal_partitions(cluster)
