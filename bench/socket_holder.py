"""A client process of bench/many_sockets.py: opens feed sockets when told and holds them open.

One process can hold only as many sockets as its open-file limit allows, and one client address
only ~28,000 connections to one server port (the ephemeral port range), so many_sockets.py
starts several of these, each with an address of its own (127.0.0.x).

It reads commands from stdin, one JSON line each, and answers each on stdout:
    {"open": [url, ...], "concurrency": C, "timeout": T, "deadline": D}
        (T seconds for each socket to be ready, D for the whole batch)
        -> {"ready": n, "failed": {error: count}, "open": sockets open now, "ready_ms": {...}}
End of input closes every socket and ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.lib.feedclient import FeedClient, Tracker, open_clients, summarize


async def hold(source_ip: str) -> None:
    tracker = Tracker()
    clients: list[FeedClient] = []
    while line := await asyncio.to_thread(sys.stdin.readline):
        command = json.loads(line)
        failed_before = dict(tracker.connect_errors)
        batch = [
            FeedClient(len(clients) + i, url, tracker, source_ip=source_ip)
            for i, url in enumerate(command["open"])
        ]
        clients += batch
        deadline = time.monotonic() + command["deadline"]
        await open_clients(batch, command["concurrency"], command["timeout"], deadline)
        failed = {
            error: count - failed_before.get(error, 0)
            for error, count in tracker.connect_errors.items()
            if count > failed_before.get(error, 0)
        }
        answer = {
            "ready": sum(1 for c in batch if c.is_open),
            "failed": failed,
            "open": sum(1 for c in clients if c.is_open),
            "ready_ms": summarize([c.ready_seconds for c in batch if c.ready_seconds]),
        }
        print(json.dumps(answer), flush=True)
    for client in clients:
        client.close()
    await asyncio.sleep(0.5)  # let the close frames go out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-ip", required=True, help="client address, e.g. 127.0.0.2")
    asyncio.run(hold(parser.parse_args().source_ip))


if __name__ == "__main__":
    main()
