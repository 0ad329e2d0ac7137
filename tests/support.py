"""Test clients for the HTTP API and the feed websocket, with bounded waits everywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import http.cookies
import json
import secrets
import urllib.parse
from typing import Any, Protocol, runtime_checkable

import pika
import pika.exceptions
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.websocket import WebSocketClientConnection, websocket_connect

from feed_app import wire
from feed_app.fanout import Subscriber
from tests import contract

PASSWORD = "correct horse"


@runtime_checkable
class FanoutInspection(Protocol):
    """What the tests read of a fan-out beyond the seam the service uses (feed_app/fanout.py):
    both of feed_app/broker/'s fan-outs have it."""

    channels: int  # AMQP channels the fan-out uses

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until is_ready (asyncio.TimeoutError past the timeout)."""

    def queue_of(self, subscriber: Subscriber) -> str | None:
        """The queue the subscriber's posts come through (shared in process mode)."""


def inspect_fanout(service: Any) -> FanoutInspection:
    """The service's fan-out, for what FanoutInspection reads."""
    fanout = service.fanout
    assert isinstance(fanout, FanoutInspection), fanout
    return fanout


@dataclasses.dataclass
class User:
    id: int
    token: str


def refresh_cookie(set_cookies: list[str]) -> http.cookies.Morsel | None:
    """The refresh token's cookie among a response's Set-Cookie headers."""
    for header in set_cookies:
        cookie = http.cookies.SimpleCookie(header)
        if wire.REFRESH_COOKIE in cookie:
            return cookie[wire.REFRESH_COOKIE]
    return None


class Api:
    def __init__(self, base_url: str, ca_certs: str | None = None) -> None:
        """ca_certs: the authority an https base_url's certificate chains to, when it is not
        one the system trusts (a TLS front's own, tests/tls_front.py)."""
        self.base_url = base_url
        self.ws_url = base_url.replace("http", "ws", 1)
        self.ca_certs = ca_certs

    def ws_request(self, path: str, **options: Any) -> HTTPRequest:
        return HTTPRequest(self.ws_url + path, ca_certs=self.ca_certs, **options)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        code, body, _ = await self.request(method, path, body, token, raw)
        return code, body

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, HTTPHeaders]:
        """The status, the decoded JSON body and the headers of one request."""
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is None and method in ("POST", "PUT"):
            data = b""
        request = HTTPRequest(
            self.base_url + path,
            method,
            headers=headers,
            body=data,
            request_timeout=10,
            ca_certs=self.ca_certs,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        decoded = json.loads(response.body) if response.body else None
        # Every answer a test sees is held to the OpenAPI document.
        contract.check(method, path, response.code, decoded, response.headers["Content-Type"])
        return response.code, decoded, response.headers

    async def new_user(self, name: str = "") -> User:
        code, body = await self.call(
            "POST", "/user/register", {"name": name or "u", "password": PASSWORD}
        )
        assert code == 201, body
        user_id = body["user_id"]
        code, body = await self.call("POST", "/login", {"id": user_id, "password": PASSWORD})
        assert code == 200, body
        return User(user_id, body["token"])

    async def follow(self, user: User, author: User) -> None:
        code, body = await self.call("PUT", f"/friend/set/{author.id}", token=user.token)
        assert code == 200, body

    async def unfollow(self, user: User, author: User) -> None:
        code, body = await self.call("PUT", f"/friend/delete/{author.id}", token=user.token)
        assert code == 200, body

    async def post(self, author: User, text: str = "") -> dict:
        text = text or f"post {secrets.token_hex(4)}"
        code, body = await self.call("POST", "/post/create", {"text": text}, token=author.token)
        assert code == 201, body
        return body

    async def open_feed(self, user: User, since: int | None = None, timeout: float = 10) -> Feed:
        query = f"?token={user.token}" + ("" if since is None else f"&since={since}")
        return await self.open_feed_at(f"/post/feed/{user.id}{query}", timeout)

    async def open_feed_unready(self, user: User, timeout: float = 10) -> Feed:
        """A feed socket as soon as the upgrade is done, its session still setting up."""
        request = self.ws_request(f"/post/feed/{user.id}?token={user.token}")
        return Feed(await asyncio.wait_for(websocket_connect(request), timeout))

    async def open_feed_at(
        self, path: str, timeout: float = 10, subprotocols: list[str] | None = None
    ) -> Feed:
        connecting = websocket_connect(self.ws_request(path), subprotocols=subprotocols)
        ws = await asyncio.wait_for(connecting, timeout)
        feed = Feed(ws)
        await feed.wait_ready(timeout)
        return feed


class Feed:
    """An open feed socket. Messages are read into `posts`/`messages` as they arrive."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.history: list[dict] = []  # posts that came before `ready`
        self.ready: dict | None = None
        self.close_code: int | None = None
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while (text := await self.ws.read_message()) is not None:
            message = json.loads(text)
            if message["type"] == "ready":
                self.ready = message
            elif message["type"] == "post" and self.ready is None:
                self.history.append(message["post"])
            else:
                self.messages.append(message)
            self._arrived.set()
        self.close_code = self.ws.close_code
        self._arrived.set()

    async def _until(self, condition, timeout: float) -> None:
        async def wait() -> None:
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_ready(self, timeout: float = 10) -> dict:
        await self._until(lambda: self.ready is not None or self.close_code is not None, timeout)
        assert self.ready is not None, f"closed before ready: {self.close_code}"
        return self.ready

    @property
    def posts(self) -> list[dict]:
        return [m["post"] for m in self.messages if m["type"] == "post"]

    async def wait_posts(self, count: int, timeout: float = 5) -> list[dict]:
        await self._until(lambda: len(self.posts) >= count or self.close_code is not None, timeout)
        assert len(self.posts) >= count, f"got {len(self.posts)} posts, wanted {count}"
        return self.posts

    async def wait_message(self, kind: str, timeout: float = 5) -> dict:
        await self._until(lambda: any(m["type"] == kind for m in self.messages), timeout)
        return next(m for m in self.messages if m["type"] == kind)

    def answer(self, ref: int) -> dict | None:
        """The answer to the post message `ref`, once it came."""
        answers = wire.ANSWER_FRAME_TYPES
        return next((m for m in self.messages if m["type"] in answers and m["ref"] == ref), None)

    async def wait_answer(self, ref: int, timeout: float = 5) -> dict:
        await self._until(lambda: self.answer(ref) or self.close_code is not None, timeout)
        answer = self.answer(ref)
        assert answer is not None, f"closed with {self.close_code} before answer {ref}"
        return answer

    async def post(self, ref: int, text: str, timeout: float = 5) -> dict:
        """Post over the socket; the answer (posted or refused)."""
        await self.ws.write_message(wire.post_message(ref, text))
        return await self.wait_answer(ref, timeout)

    async def wait_closed(self, timeout: float = 5) -> int | None:
        await self._until(lambda: self.close_code is not None, timeout)
        return self.close_code

    def close(self) -> None:
        self.ws.close()


def queue_exists(amqp_url: str, name: str) -> bool:
    """Ask the broker over a separate connection (blocking: run it in an executor)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 405:  # RESOURCE_LOCKED: exists, exclusive to the service
            return True
        if exc.reply_code == 404:
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()


async def wait_queue_gone(amqp_url: str, name: str, timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await loop.run_in_executor(None, queue_exists, amqp_url, name):
        assert loop.time() < deadline, f"queue {name} still exists after {timeout} s"
        await asyncio.sleep(0.05)


def upgrade_request(path: str, host: str, **headers: str) -> bytes:
    """A websocket upgrade request as a browser sends it; keyword arguments add or replace
    headers (underscores for dashes; an empty value leaves the header out)."""
    fields = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_http(base_url: str, request: bytes, timeout: float = 5) -> tuple[int, dict, bytes]:
    """Send bytes as they are and read the answer: status, headers (lower-case names), body."""
    url = urllib.parse.urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in header_lines if line)
        )
        length = int(headers.get("content-length", 0))
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()
