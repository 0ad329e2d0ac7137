"""Several instances behind HAProxy on a RabbitMQ cluster: faults, through the balancer.

The module starts one cluster with deploy/cluster.py (what `scripts/cluster up` runs): three
RabbitMQ nodes of its own (`feedt<random><n>@localhost`; the machine's node is never touched),
three service instances on the test database and HAProxy, all on free ports. Each test makes one
fault while an author posts steadily and sessions of its followers are spread over every
instance, every request and every socket going through HAProxy. Sessions resume as the page does
(since=<last checkpoint>, already-shown ids dropped), and each must show every committed post
exactly once. The time until every session is live again goes into the fault table, printed at
the end of the module and written to bench/results/cluster-faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pika
import pytest
from tornado.httpclient import AsyncHTTPClient

from deploy import processes
from deploy.cluster import Cluster, Instance, Ports
from deploy.rabbit_nodes import NodeError
from feed_app.wire import Close
from tests.cluster_clients import Scene
from tests.conftest import AMQP_URL, NO_LIMITS_ENV
from tests.faults import TcpProxy, outbox_ids, wait_for, wait_for_outbox_without
from tests.support import Api

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAULT_TABLE = ROOT / "bench" / "results" / "cluster-faults.md"
HARD_STOP_AFTER = 3  # seconds HAProxy's old worker keeps its connections after a reload
OUTBOX_LEASE = 2  # seconds before another instance republishes a dead one's posts


# --- the cluster, once for the module -------------------------------------------------------------


def ensure_cluster_tools() -> None:
    """HAProxy and RabbitMQ installed (scripts/ensure-cluster-tools installs them if it can). In
    CI a missing tool fails the module: these tests must not pass by being skipped."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure-cluster-tools")], capture_output=True, text=True
    )
    if result.returncode != 0:
        message = f"the cluster tests need HAProxy and RabbitMQ: {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def fault_table(request) -> Any:
    rows: list[tuple[str, str, int, int, str]] = []
    yield rows
    lines = ["| fault | time to heal | lost | dup | notes |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    text = "\n".join(lines)
    FAULT_TABLE.parent.mkdir(parents=True, exist_ok=True)
    FAULT_TABLE.write_text(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even when the tests pass
            reporter.write_line(f"\ncluster faults (also in {FAULT_TABLE.relative_to(ROOT)}):")
            reporter.write_line(text)


@pytest.fixture(scope="module")
def cluster(db_dsn, fault_table) -> Any:
    ensure_cluster_tools()
    name = f"feedt{secrets.token_hex(3)}"
    cluster = Cluster(
        pathlib.Path("/tmp") / name,
        node_prefix=name,
        ports=Ports(balancer=0, first_instance=0, first_amqp=0),
        db_dsn=db_dsn,
        hard_stop_after=f"{HARD_STOP_AFTER}s",
        instance_env={
            **NO_LIMITS_ENV,
            "FEED_OUTBOX_LEASE": str(OUTBOX_LEASE),
            "FEED_SHUTDOWN_TIMEOUT": "5",
        },
    )
    started = time.monotonic()
    cluster.up(node_count=3, instance_count=3, demo=False)
    fault_table.append(("`cluster up` (3 nodes, 3 instances, HAProxy)", "", 0, 0, _took(started)))
    yield cluster
    pids = [i.pid for i in cluster.instances] + [cluster.balancer.pid]
    beams = [node.beam_pid() for node in cluster.nodes]
    started = time.monotonic()
    cluster.down()
    fault_table.append(("`cluster down`", "", 0, 0, _took(started)))
    assert not cluster.run_dir.exists()
    assert not [pid for pid in pids + beams if processes.alive(pid)], "left running"
    pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()  # the machine's node is fine


def _took(started: float) -> str:
    return f"took {time.monotonic() - started:.1f} s"


@pytest.fixture
def api(cluster) -> Api:
    return Api(cluster.balancer.url)


@pytest.fixture
def scene(io_loop, api, db_dsn) -> Any:
    scene = Scene(api, db_dsn)
    yield scene
    io_loop.run_sync(scene.close)


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


# --- the front door -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_the_client_address_comes_from_haproxy_not_from_the_client(cluster):
    """Proves: an instance believes X-Forwarded-For from its trusted proxy's address (a request
    straight to it from 127.0.0.1, HAProxy's address here, is logged with the address the header
    claims), and HAProxy drops whatever forwarding headers a client sends and sets the address
    it saw, so through HAProxy the logged address is the real one."""
    spoofed = {"X-Real-Ip": "198.51.100.7", "X-Forwarded-For": "203.0.113.9"}
    instance = cluster.instances[0]
    direct, through = secrets.token_hex(4), secrets.token_hex(4)
    client = AsyncHTTPClient()
    await client.fetch(f"{instance.url}/healthz?probe={direct}", headers=spoofed)
    for _ in range(len(cluster.instances)):  # leastconn spreads them: one reaches `instance`
        await client.fetch(f"{cluster.balancer.url}/healthz?probe={through}", headers=spoofed)

    def logged(probe: str) -> list[str]:
        lines = instance.log_path.read_text().splitlines()
        return [line for line in lines if probe in line]

    await wait_for(lambda: logged(direct) and logged(through), 5, "the access log lines")
    assert "(203.0.113.9)" in logged(direct)[0]
    assert all("(127.0.0.1)" in line for line in logged(through)), logged(through)


# --- RabbitMQ faults ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_stop_app_of_the_node_an_instance_uses(cluster, scene, fault_table):
    """Proves: `rabbitmqctl stop_app` on the node that instance1 uses moves it to another node
    (its sessions stay open, resync from PostgreSQL) with no post lost or duplicated, and the
    node rejoins the cluster after `start_app`."""
    await scene.open(running(cluster))
    instance = cluster.instances[0]
    node = cluster.node_by_endpoint(await broker_of(instance))
    loop = asyncio.get_running_loop()
    moment = loop.time()
    await blocking(node.ctl, "stop_app")
    heal = await scene.time_to_heal(moment)
    assert await broker_of(instance) != node.endpoint
    await blocking(node.ctl, "start_app")
    everyone = sorted(n.name for n in cluster.nodes)
    assert await blocking(node.running_nodes) == everyone
    outcome = await scene.finish()
    record(fault_table, f"`rabbitmqctl stop_app` on {instance.name}'s node", heal, outcome)
    assert_exact(outcome)


@pytest.mark.gen_test(timeout=120)
async def test_kill_9_of_the_node_an_instance_uses(cluster, scene, fault_table):
    """Proves: kill -9 of the node that instance2 uses (its exclusive queues vanish with it)
    moves the instance to another node with no post lost or duplicated; the node, started again
    on its data directory, rejoins the cluster by itself."""
    await scene.open(running(cluster))
    instance = cluster.instances[1]
    node = cluster.node_by_endpoint(await broker_of(instance))
    loop = asyncio.get_running_loop()
    moment = loop.time()
    await blocking(node.kill)
    heal = await scene.time_to_heal(moment)
    assert await broker_of(instance) != node.endpoint
    launcher = node.start()
    await blocking(node.wait_started, launcher)
    everyone = sorted(n.name for n in cluster.nodes)
    assert await blocking(node.running_nodes) == everyone
    outcome = await scene.finish()
    record(fault_table, f"`kill -9` of {instance.name}'s node, then restart", heal, outcome)
    assert_exact(outcome)


@pytest.mark.gen_test(timeout=180)
async def test_a_node_and_an_instance_added_while_running_are_used(cluster, scene, fault_table):
    """Proves: a fourth node and a fourth instance are added with nothing restarted; new
    sockets through HAProxy reach the new instance; and when the three original nodes all stop,
    the running instances move to the new node (which they learnt from their nodes files), with
    no post lost or duplicated."""
    await scene.open(running(cluster))
    originals = list(cluster.instances)
    pids = [instance.pid for instance in originals]
    loop = asyncio.get_running_loop()
    started = loop.time()
    old_nodes = list(cluster.nodes)
    new_node = await blocking(cluster.add_node)
    new_instance = await blocking(cluster.add_instance)
    added = loop.time() - started
    new_feeds = await scene.add_feeds(2)
    assert new_instance.name in {feed.served_by for feed in new_feeds}, scene.spread()

    moment = loop.time()
    await asyncio.gather(*(blocking(node.ctl, "stop_app") for node in old_nodes))
    heal = await scene.time_to_heal(moment)
    for instance in originals:
        assert await broker_of(instance) == new_node.endpoint, instance.name
    assert [instance.pid for instance in originals] == pids, "an instance was restarted"
    await asyncio.gather(*(blocking(node.ctl, "start_app") for node in old_nodes))
    everyone = sorted(n.name for n in cluster.nodes)
    assert await blocking(new_node.running_nodes) == everyone
    outcome = await scene.finish()
    fault_table.append(
        (f"add node 4 and {new_instance.name} while running", "", 0, 0, f"took {added:.1f} s")
    )
    record(fault_table, "`stop_app` on nodes 1-3: instances move to node 4", heal, outcome)
    assert_exact(outcome)


# --- instance faults ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_of_an_instance_moves_its_sessions_without_a_gap(cluster, scene, fault_table):
    """Proves: on SIGTERM an instance closes its sockets with 1001; the clients reconnect
    through HAProxy, land on other instances, resume from their checkpoint and miss nothing."""
    await scene.open(running(cluster))
    victim = cluster.instances[0]
    moved = [feed for feed in scene.feeds if feed.served_by == victim.name]
    assert moved
    loop = asyncio.get_running_loop()
    moment = loop.time()
    os.kill(victim.pid, signal.SIGTERM)
    heal = await scene.time_to_heal(moment)
    for feed in moved:
        assert feed.connections[0].close_code == Close.GOING_AWAY
        assert feed.served_by not in (None, victim.name), feed.connections
    exited = await blocking(processes.wait_until, lambda: not processes.alive(victim.pid), 10)
    assert exited, processes.log_tail(victim.log_path)
    outcome = await scene.finish()
    await blocking(cluster.start_instance, victim)
    await blocking(cluster.wait_balanced)
    record(fault_table, f"SIGTERM {victim.name}", heal, outcome, f"{len(moved)} sessions moved")
    assert_exact(outcome)


@pytest.mark.gen_test(timeout=120)
async def test_sigkill_of_an_instance_its_outbox_is_republished_by_the_others(
    cluster, scene, fault_table
):
    """Proves: posts an instance committed but could not publish (its broker link hangs: a
    proxy holds every byte) are republished by the other instances once their lease ends, after
    that instance is SIGKILLed; sessions that stayed open on other instances get them live, once,
    and the killed instance's sessions resume elsewhere with no gap."""
    node = cluster.nodes[0]
    proxy = TcpProxy("127.0.0.1", node.amqp_port)
    await proxy.start()
    doomed = await blocking(cluster.add_instance, [proxy.url_for(node.url)])
    try:
        await blocking(cluster.wait_balanced)
        await scene.open(running(cluster))
        loop = asyncio.get_running_loop()
        proxy.pause()
        paused = loop.time()

        def stuck() -> set[int]:
            return {i for sent, i, by in scene.poster.sent if by == doomed.name and sent > paused}

        await wait_for(lambda: len(stuck()) >= 3, 10, f"posts committed by {doomed.name}")
        left_over = stuck()
        assert left_over <= await outbox_ids(scene.db_dsn)
        moment = loop.time()
        os.kill(doomed.pid, signal.SIGKILL)
        await proxy.close()  # the held bytes go nowhere; the broker sees the connection end
        heal = await scene.time_to_heal(moment)
        await wait_for(
            lambda: all(left_over <= set(feed.shown) for feed in scene.feeds),
            OUTBOX_LEASE + 10,
            f"the posts left in {doomed.name}'s outbox are delivered",
        )
        republished = loop.time() - moment
        await wait_for_outbox_without(scene.db_dsn, left_over)
        outcome = await scene.finish()
    finally:
        await proxy.close()
        await blocking(cluster.remove_instance, doomed.name)
    note = f"{len(left_over)} posts left in its outbox, delivered {republished:.2f} s after"
    record(fault_table, f"SIGKILL {doomed.name} with unpublished posts", heal, outcome, note)
    assert_exact(outcome)


# --- HAProxy faults -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_haproxy_reload_then_its_old_worker_stops(cluster, scene, fault_table):
    """Proves: a reload does not interrupt anything (open sockets stay on the old worker, new
    requests go to the new one); when the old worker is stopped HARD_STOP_AFTER later, its
    sockets are cut and every client resumes through the new worker with no gap."""
    await scene.open(running(cluster))
    loop = asyncio.get_running_loop()
    before = [len(feed.connections) for feed in scene.feeds]
    moment = loop.time()
    await blocking(cluster.balancer.reload)
    heal = await scene.time_to_heal(moment)
    assert [len(feed.connections) for feed in scene.feeds] == before, "a socket was cut at once"
    await wait_for(
        lambda: all(len(f.connections) > n for f, n in zip(scene.feeds, before, strict=True)),
        HARD_STOP_AFTER + 10,
        "the old worker's sockets are cut",
    )
    cut = min(f.connections[n - 1].closed for f, n in zip(scene.feeds, before, strict=True))
    heal_after_cut = await scene.time_to_heal(cut)
    outcome = await scene.finish()
    fault_table.append(("HAProxy reload", f"{heal:.2f} s", 0, 0, "no socket interrupted"))
    note = f"old worker stopped {cut - moment:.1f} s after the reload"
    record(fault_table, "HAProxy's old worker hard-stopped", heal_after_cut, outcome, note)
    assert_exact(outcome)


@pytest.mark.gen_test(timeout=120)
async def test_haproxy_restart(cluster, scene, fault_table):
    """Proves: HAProxy stopped and started again cuts every socket and refuses requests
    meanwhile; every client comes back through it and resumes with no gap."""
    await scene.open(running(cluster))
    loop = asyncio.get_running_loop()
    moment = loop.time()
    await blocking(cluster.balancer.stop)
    await blocking(cluster.balancer.start)
    heal = await scene.time_to_heal(moment)
    await blocking(cluster.wait_balanced)
    outcome = await scene.finish()
    record(fault_table, "HAProxy stopped and started", heal, outcome)
    assert_exact(outcome)


# --- network partitions between RabbitMQ nodes ------------------------------------------------
# Last in the module: they leave the instances in the fan-out mode they ran last.

CUT_SECONDS = 8.0  # how long a staged partition keeps the link down


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
            return await blocking(node.partitions)
        except NodeError:  # its rabbit app is paused
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
    (stop_app, start_app) the node cut off from the most others, until no node reports a
    partition. Returns the nodes restarted."""
    restarted: list[str] = []
    while cut_off := await settled(cluster, 10):
        assert len(restarted) < len(cluster.nodes), f"still partitioned: {cut_off}"
        name = max(sorted(cut_off), key=lambda n: cut_off[n])
        node = next(node for node in cluster.nodes if node.name == name)
        await blocking(node.ctl, "stop_app")
        await blocking(node.ctl, "start_app")
        restarted.append(name)
    return restarted


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


@pytest.mark.parametrize("fanout", ["session", "process"])
@pytest.mark.gen_test(timeout=300)
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


@pytest.mark.parametrize("fanout", ["session", "process"])
@pytest.mark.gen_test(timeout=300)
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
