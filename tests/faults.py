"""Fault injection for the recovery tests: a TCP proxy the test can break, a service subprocess it
can SIGTERM or SIGKILL, a websocket client that never reads, and exact-delivery assertions.

Nothing here touches the machine's real PostgreSQL or RabbitMQ: a "broker outage" is the proxy in
front of the broker dropping and refusing connections, which is all the service can observe anyway.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable

import psycopg2
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.support import Feed

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"


def free_port() -> int:
    """A TCP port nothing listens on right now (nothing will, unless the test starts something)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_endpoint(url: str, host: str, port: int) -> str:
    """The URL (an AMQP URL or a PostgreSQL DSN in URL form) pointed at another host and port,
    keeping user, password, path and query."""
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def endpoint_of(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


# --- a TCP proxy the test can break ---------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a real server, and breaks on request.

    drop():    abort every live connection (what a broker restart or a network cut looks like).
    disable(): from now on, accept and abort every new connection at once ("server down");
               enable() undoes it. The listening port stays the same throughout.
    pause():   hold every byte from now on, both ways, with the connections left open (a peer
               that hangs); resume() lets them through.
    cut_client_side(): abort the client's side of every live connection but leave the server's
               open, as a NAT or firewall that lost its state does: the server believes in the
               old connections until its own timeouts say otherwise (close() aborts them).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.enabled = True
        self.accepted = 0  # connections forwarded to the target
        self.refused = 0  # connections aborted because the proxy was disabled
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._half_open: list[asyncio.StreamWriter] = []
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's."""
        return with_endpoint(url, "127.0.0.1", self.port)

    @property
    def live_connections(self) -> int:
        return len(self._links)

    def drop(self) -> int:
        """Abort every live connection on both sides; returns how many there were."""
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        return len(links)

    def disable(self) -> None:
        """The server is "down": live connections are dropped and new ones aborted on accept."""
        self.enabled = False
        self.drop()

    def enable(self) -> None:
        self.enabled = True

    def cut_client_side(self) -> int:
        links, self._links = self._links, set()
        for link in links:
            self._half_open.append(link.abort_client_side())
        return len(links)

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.drop()
        for writer in self._half_open:
            writer.transport.abort()
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.enabled:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if not self.enabled:  # disabled while connecting upstream
            self.refused += 1
            writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(reader, writer, upstream_reader, upstream_writer, self._flowing)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One proxied connection: two pumps, each with back-pressure (drain), abortable as a unit."""

    def __init__(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
        flowing: asyncio.Event,
    ) -> None:
        self.writers = (client_writer, server_writer)
        self.pumps = [
            asyncio.ensure_future(self._pump(client_reader, server_writer, flowing)),
            asyncio.ensure_future(self._pump(server_reader, client_writer, flowing)),
        ]

    async def run(self) -> None:
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for writer in self.writers:
            writer.transport.abort()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        # One side finished or failed: the whole link goes (neither server half-closes here).
        writer.transport.abort()

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for pump in self.pumps:
            pump.cancel()

    def abort_client_side(self) -> asyncio.StreamWriter:
        """Abort the client's side only; returns the server's side, still open."""
        client, server = self.writers
        self.writers = (client,)  # run() must not abort the server's side when the pumps end
        client.transport.abort()
        for pump in self.pumps:
            pump.cancel()
        return server


# --- the service as a separate process ------------------------------------------------------------


class ServiceProcess:
    """`.venv/bin/python run.py --port P [args]` with the given FEED_* environment, logging to a
    file."""

    def __init__(
        self, port: int, env: dict[str, str], log_path: pathlib.Path, args: tuple[str, ...] = ()
    ) -> None:
        self.port = port
        self.args = args
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    async def start(self, ready: str = "/healthz", timeout: float = 20) -> None:
        """Start the process and wait until `ready` answers 200 (bounded)."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
        environment.update(self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(PYTHON), "run.py", "--port", str(self.port), *self.args],
                cwd=ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers in a process group of their own: see kill()
            )
        deadline = time.monotonic() + timeout
        client = AsyncHTTPClient()
        while True:
            assert self.process.poll() is None, f"service exited early:\n{self.log_tail()}"
            assert time.monotonic() < deadline, (
                f"{ready} not 200 in {timeout} s:\n{self.log_tail()}"
            )
            with contextlib.suppress(HTTPClientError, OSError):
                response = await client.fetch(self.base_url + ready, request_timeout=2)
                if response.code == 200:
                    return
            await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); fails if still running at timeout."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (status := self.process.poll()) is None:
            assert time.monotonic() < deadline, (
                f"still running after {timeout} s:\n{self.log_tail()}"
            )
            await asyncio.sleep(0.02)
        return status

    def kill(self) -> None:
        """SIGKILL to the process and its workers, if still running (test clean-up). Workers
        outlive a parent killed alone, so the whole process group is killed."""
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --- a websocket client that never reads ----------------------------------------------------------


async def open_unread_socket(host: str, port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """Do the websocket upgrade by hand on a socket with a small receive buffer, then never read
    again: the server's writes pile up in the kernel and then in the server itself. (Tornado's own
    client would keep reading frames into memory, which is not a slow client at all.)"""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 256), 5)
        assert chunk, f"connection closed during the upgrade: {response!r}"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


# --- exact delivery -------------------------------------------------------------------------------


def ids_of(posts: Iterable[dict]) -> list[int]:
    return [post["id"] for post in posts]


def assert_exactly_once(received: list[int], expected: Iterable[int], label: str = "") -> None:
    """Every expected id received exactly once, and nothing else."""
    expected = set(expected)
    counts = collections.Counter(received)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    missing = sorted(expected - counts.keys())
    unexpected = sorted(counts.keys() - expected)
    assert not (duplicated or missing or unexpected), (
        f"{label}: duplicated {duplicated}, missing {missing}, unexpected {unexpected}"
    )


async def until(feed: Feed, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (on the feed's arrival event, bounded) until condition() holds."""
    try:
        await feed._until(condition, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll an in-process condition every 10 ms (bounded); returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        if loop.time() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


# --- the database, read directly ------------------------------------------------------------------


def _query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


async def outbox_ids(dsn: str) -> set[int]:
    """Post ids still waiting in the outbox (read straight from PostgreSQL, not via the service)."""
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(None, _query, dsn, "SELECT post_id FROM outbox")
    return {post_id for (post_id,) in rows}


async def wait_for_outbox_without(dsn: str, post_ids: set[int], timeout: float = 5) -> None:
    """The outbox rows of these posts get deleted (their publication was confirmed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while left := post_ids & await outbox_ids(dsn):
        assert loop.time() < deadline, f"still in the outbox after {timeout} s: {left}"
        await asyncio.sleep(0.05)


async def read_until_close(sock: socket.socket, timeout: float) -> tuple[int | None, int]:
    """Read the server's websocket frames (unmasked) until its close frame: returns the close
    code (None if the connection ended without one) and how many text frames came before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buffer = bytearray()
    texts = 0

    async def need(count: int) -> bool:
        while len(buffer) < count:
            remaining = deadline - loop.time()
            assert remaining > 0, f"no close frame within {timeout} s ({texts} text frames)"
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
            if not chunk:
                return False
            buffer.extend(chunk)
        return True

    while await need(2):
        opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
        header = 2
        if length == 126:
            if not await need(4):
                break
            length, header = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            if not await need(10):
                break
            length, header = int.from_bytes(buffer[2:10], "big"), 10
        if not await need(header + length):
            break
        payload = bytes(buffer[header : header + length])
        del buffer[: header + length]
        if opcode == 0x8:
            return (int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None), texts
        texts += opcode == 0x1
    return None, texts
