"""The RabbitMQ nodes a process connects to, one after another."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NodeList:
    """The RabbitMQ nodes to connect to, in turn: the given URLs, or (when set) the lines of a
    nodes file, read again at every connection attempt, so that a node added to the cluster
    while the process runs is used without a restart. An unreadable or empty file falls back to
    the given URLs."""

    def __init__(self, urls: list[str], nodes_file: str = "") -> None:
        self.urls = urls
        self.nodes_file = nodes_file
        self._turn = 0

    def current(self) -> list[str]:
        if not self.nodes_file:
            return self.urls
        try:
            with open(self.nodes_file) as lines:
                urls = [line.strip() for line in lines if line.strip().startswith("amqp")]
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the nodes file (%s); using FEED_AMQP_URL", exc)
            return self.urls
        return urls or self.urls

    def next(self) -> str:
        urls = self.current()
        url = urls[self._turn % len(urls)]
        self._turn += 1
        return url
