"""FEED_AMQP_NODES_FILE: a RabbitMQ node added to the file is used without a restart."""

from __future__ import annotations

import pytest

from feed_app.app import Service
from feed_app.broker.connection import State
from tests.conftest import AMQP_URL, with_settings
from tests.faults import endpoint_of, free_port, wait_for, with_endpoint


@pytest.mark.gen_test(timeout=40)
async def test_a_node_appended_to_the_nodes_file_is_used_without_a_restart(settings, tmp_path):
    """Proves: a process whose nodes file lists only a node that is down keeps retrying it; once
    a live node is appended to the file, the next attempts reach it, with the same process."""
    dead = with_endpoint(AMQP_URL, "127.0.0.1", free_port())  # nothing listens there
    nodes_file = tmp_path / "nodes"
    nodes_file.write_text(dead + "\n")
    service = await Service.create(
        with_settings(settings, amqp_url=dead, amqp_nodes_file=str(nodes_file))
    )
    try:
        await wait_for(lambda: service.broker.state is State.WAITING, 10, "a failed attempt")
        assert not service.broker.is_open
        with nodes_file.open("a") as lines:
            lines.write(AMQP_URL + "\n")
        await service.broker.wait_open(20)
        host, port = endpoint_of(AMQP_URL, 5672)
        assert service.broker.endpoint == f"{host}:{port}"
    finally:
        await service.stop()
